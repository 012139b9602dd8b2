"""Per-server state refs: read receipts, acknowledgements and presence, off the shared branch.

Contract: PROTOCOL.md, "Per-server state refs". Server S owns ``refs/fleet/S`` on ``origin`` (or,
where the host refuses refs outside ``refs/heads``, the branch ``fleet-state/S``): one root commit
whose tree holds ``state.json``. Every update is a new root commit pushed with
``--force-with-lease`` on the tip it was built from, so the ref's history never grows and only
processes of S ever race for it; a lost lease is re-read, merged (set union) and pushed again.

Everyone reads every state ref, up to :data:`MAX_STATE_SERVERS` servers'. What needs them all
(``fleet_status.py``, ``inbox.py acks``, the archive) lists the remote (:meth:`StateStore.poll`,
one ``ls-remote``) and fetches the refs whose tips moved, by the commits listed and without
negotiation; a look at the fleet does that beside a fetch of the branch
(:meth:`StateStore.mirror_fleet`). What needs only the branch and this server's own ref (the
monitor's cycle, the inbox) fetches both by exact name in one call
(:class:`monitor_remote.RemotePoller`). Fetched state refs are mirrored locally
under the same names (``refs/fleet/S``; the fallback branch under ``refs/fleet-state/S``), which
is also what an operator gets from ``git fetch origin 'refs/fleet/*:refs/fleet/*'``.

Everything read here comes from another machine: the file's size, nesting, entry counts and text
lengths are bounded, and a state ref that breaks a bound is ignored with a warning (it never
stops a reader). A ``version`` newer than this program's is read for the keys it knows and never
rewritten; unknown keys are kept by every write.
"""

from __future__ import annotations

import json
import re
import time

from fleet_common import (
    BadInput,
    SuiteError,
    get_logger,
    is_valid_server_id,
    iso_utc,
    load_json_bounded,
    normalize_server_id,
    parse_timestamp,
    sleep_jittered,
)
from fleet_git import (
    LOCAL_LOCK_RETRIES,
    NETWORK_TIMEOUT,
    GitError,
    LocalRefLocked,
    RemoteUnavailable,
    _first_line,
    _local_lock_busy,
    damaged_objects,
    ref_stays_locked,
    stop_git,
)
from fleet_mailbox import MAX_KEY_CHARS, is_direct, is_handled_by, message_key, names_server, recipients
from fleet_secrets import LazyPattern
from fleet_start import (  # (their one owner: the script of a look at the fleet reads them first)
    FALLBACK_PREFIX,
    LOCAL_FALLBACK_PREFIX,
    MAX_STATE_SERVERS,  # (lowered here by a test, the look-ahead's stays: what that starts is then not taken)
    NEGOTIATE_KEY,
    REF_PREFIX,
    PathLook,
    branch_look_refspec,
    listed_refs,
    listed_state_refs,
    listing_args,
    look_at_start,
    mirrors_at_start,
    moved_state_refspecs,
    parse_state_ref,
    remote_listing,
    state_fetch_command,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import subprocess
    from typing import (
        AbstractSet,
        Any,
        Callable,
        Container,
        Dict,
        Final,
        Iterable,
        List,
        Mapping,
        Optional,
        Sequence,
        Set,
        Tuple,
    )

    from fleet_git import (
        Clone,
        Finished,
    )
    from fleet_mailbox import MessageKey

log = get_logger(__name__)

STATE_FILE: Final = "state.json"
STATE_VERSION: Final = 1

MAX_STATE_BYTES: Final = 8 * 1024 * 1024
MAX_COMMIT_BYTES: Final = 64 * 1024  # a state ref's commit: a tree, an author, a short message
MAX_STATE_DEPTH: Final = 8
MAX_ENTRIES: Final = 200_000  # read receipts or acknowledgements in one state ref
MAX_ID_CHARS: Final = MAX_KEY_CHARS  # the mailbox refuses longer ids and senders, so none is lost here
MAX_NOTE_CHARS: Final = 2000
MAX_LEASE_ATTEMPTS: Final = 20
STOPPED: Final = "stopped"  # the presence activity of a monitor's clean stop
MAX_LOCKED_MIRRORS: Final = 8  # locked mirrors passed over in one deletion, before all wait for a later look
_LOCKED_REF = LazyPattern(r"cannot lock ref '([^']+)'")  # (these two: compiled when a fetch fails)
_GONE_COMMIT = ("not our ref", "unadvertised object")  # a fetch by a commit the remote no longer has
# A fetch by the name of a ref deleted since the listing (capitalised before git 2.20).
_MISSING_REF = LazyPattern(r"couldn't find remote ref (\S+)", re.IGNORECASE)
MAX_GONE_REFS: Final = 64  # refs deleted between a listing and its fetch that are left out; past that, fail


class StateRefError(SuiteError):
    """A state ref could not be written (refused, or a lease lost too often)."""


class StateRefRefused(StateRefError):
    """The remote refuses the state ref's name."""


def _key_ok(mid: Any, sender: Any) -> bool:
    return (isinstance(mid, str) and isinstance(sender, str) and 0 < len(mid) <= MAX_ID_CHARS
            and 0 < len(sender) <= MAX_ID_CHARS)


def _bounded_text(value: Any, limit: int) -> Optional[str]:
    return value[:limit] if isinstance(value, str) else None


class ServerState:
    """One server's ``state.json``: what it has read and acknowledged, and its presence."""

    __slots__ = ("server", "version", "read", "acks", "presence", "updated", "retired", "extra")

    def __init__(self, server: str) -> None:
        self.server = server
        self.version = STATE_VERSION
        self.read: Dict[MessageKey, None] = {}  # ordered set
        self.acks: Dict[MessageKey, Dict[str, Any]] = {}
        self.presence: Optional[Dict[str, Any]] = None
        self.updated: Optional[str] = None
        self.retired: Optional[Dict[str, Optional[str]]] = None  # {"at", "presence"}: see is_retired
        self.extra: Dict[str, Any] = {}  # unknown keys, kept by every write

    # ----------------------------------------------------------------- reading

    @classmethod
    def from_bytes(cls, raw: bytes, server: str) -> "ServerState":
        """Parse a state file; :class:`BadInput` when it breaks a bound or has the wrong shape."""
        doc = load_json_bounded(raw, what=f"the state ref of {server}", max_bytes=MAX_STATE_BYTES,
                                max_depth=MAX_STATE_DEPTH)
        if not isinstance(doc, dict):
            raise BadInput(f"the state ref of {server} is not a JSON object")
        state = cls(server)
        version = doc.get("version", 1)
        state.version = version if isinstance(version, int) and version >= 1 else STATE_VERSION
        read = doc.get("read", [])
        acks = doc.get("acks", [])
        if not isinstance(read, list) or not isinstance(acks, list):
            raise BadInput(f"the state ref of {server}: 'read' and 'acks' must be lists")
        if len(read) > MAX_ENTRIES or len(acks) > MAX_ENTRIES:
            raise BadInput(f"the state ref of {server} holds more than {MAX_ENTRIES} entries")
        for item in read:
            if isinstance(item, list) and len(item) == 2 and _key_ok(item[0], item[1]):
                state.read[(item[0], item[1].lower())] = None
        for item in acks:
            if isinstance(item, dict) and _key_ok(item.get("id"), item.get("from")):
                entry = {"id": item["id"], "from": item["from"].lower()}
                at = _bounded_text(item.get("at"), 40)
                if at:
                    entry["at"] = at
                note = _bounded_text(item.get("note"), MAX_NOTE_CHARS)
                if note:
                    entry["note"] = note
                state.acks[(entry["id"], entry["from"])] = entry
        presence = doc.get("presence")
        state.presence = presence if isinstance(presence, dict) else None
        state.updated = _bounded_text(doc.get("updated"), 40)
        state.retired = _retirement(doc.get("retired"))
        state.extra = {k: v for k, v in doc.items()
                       if k not in ("version", "server", "updated", "presence", "read", "acks", "retired")}
        return state

    def has_read(self, key: MessageKey) -> bool:
        return key in self.read

    def has_acked(self, key: MessageKey) -> bool:
        return key in self.acks

    def presence_time(self) -> Optional[float]:
        """Epoch seconds of the last presence, or ``None``."""
        if not self.presence:
            return None
        moment = parse_timestamp(self.presence.get("timestamp"))
        return moment.timestamp() if moment is not None else None

    def presence_stamp(self) -> Optional[str]:
        """The presence's ``timestamp`` as written, or ``None``."""
        stamp = self.presence.get("timestamp") if isinstance(self.presence, dict) else None
        return stamp if isinstance(stamp, str) else None

    def is_retired(self) -> bool:
        """Whether the server has left the fleet (``message_monitor.py --retire``): its state
        records a retirement, and its presence is exactly the one that retirement saw. No clock
        is compared: a monitor that starts again under the same id publishes another presence
        and is back at once, whatever the time on the machine that retired it; its writes drop
        the record, except a clean stop's right after a retirement, which carries it forward.
        Of a server's two ref names, the record is read from ``refs/fleet/S`` whenever that ref
        exists (:meth:`merge`): a record pushed under the other name cannot retire it."""
        return bool(self.retired) and self.presence_stamp() == self.retired["presence"]

    # ----------------------------------------------------------------- writing

    @property
    def writable(self) -> bool:
        """A state written by a newer program is read, never rewritten (PROTOCOL.md)."""
        return self.version <= STATE_VERSION

    def merge(self, other: "ServerState", *, retirement: bool = False) -> None:
        """Fold ``other`` in: set union of receipts and acknowledgements, the newest presence;
        with ``retirement``, ``other``'s retirement record (or its lack of one) as well: the
        caller passes it for ``refs/fleet/S``, and for ``fleet-state/S`` only when there is no
        ``refs/fleet/S`` (:func:`takes_retirement`)."""
        for key in other.read:
            self.read.setdefault(key, None)
        for key, entry in other.acks.items():
            self.acks.setdefault(key, entry)
        if other.presence is not None:
            mine = self.presence_time()
            theirs = other.presence_time()
            if self.presence is None or (theirs is not None and (mine is None or theirs > mine)):
                self.presence = other.presence
        if retirement:
            self.retired = other.retired
        for k, v in other.extra.items():
            self.extra.setdefault(k, v)

    def to_bytes(self) -> bytes:
        doc: Dict[str, Any] = {"version": STATE_VERSION, "server": self.server, "updated": iso_utc()}
        if self.presence is not None:
            doc["presence"] = self.presence
        doc["read"] = [[mid, sender] for mid, sender in self.read]
        doc["acks"] = list(self.acks.values())
        if self.retired:
            doc["retired"] = self.retired
        for k, v in self.extra.items():
            doc.setdefault(k, v)
        return (json.dumps(doc, indent=1, ensure_ascii=True) + "\n").encode("ascii")

    def copy(self) -> "ServerState":
        twin = ServerState(self.server)
        twin.version = self.version
        twin.read = dict(self.read)
        twin.acks = {k: dict(v) for k, v in self.acks.items()}
        twin.presence = dict(self.presence) if self.presence is not None else None
        twin.updated = self.updated
        twin.retired = dict(self.retired) if self.retired else None
        twin.extra = dict(self.extra)
        return twin


class StateChange:
    """What one writer adds to its own state: receipts, acknowledgements, presence, prunes, and
    its retirement.

    A change is re-applied to the freshly read state after a lost lease, so it is data, not a
    closure over a stale document.
    """

    def __init__(self, read: Iterable[MessageKey] = (), acks: Iterable[Mapping[str, Any]] = (),
                 presence: Optional[Dict[str, Any]] = None,
                 drop: Iterable[MessageKey] = (), retire: bool = False, seen: Optional[str] = None) -> None:
        self.read = [k for k in read if _key_ok(*k)]
        self.acks = [dict(a) for a in acks if _key_ok(a.get("id"), a.get("from"))]
        self.presence = presence
        self.drop = set(drop)
        self.retire = retire
        self.seen = seen  # with retire: the presence timestamp readers take now (None: none)

    def apply(self, state: ServerState) -> bool:
        """Apply to ``state``; whether anything changed."""
        changed = False
        for key in self.read:
            key = (key[0], key[1].lower())
            if key not in state.read:
                state.read[key] = None
                changed = True
        for ack in self.acks:
            key = (ack["id"], ack["from"].lower())
            if key not in state.acks:
                entry = {"id": key[0], "from": key[1], "at": ack.get("at") or iso_utc()}
                note = _bounded_text(ack.get("note"), MAX_NOTE_CHARS)
                if note:
                    entry["note"] = note
                state.acks[key] = entry
                changed = True
            state.read.setdefault(key, None)
        if self.presence is not None:
            carry = state.is_retired() and self.presence.get("activity") == STOPPED
            state.presence = self.presence
            if carry and state.retired:  # a clean stop right after a retirement: still gone
                state.retired = {"at": state.retired["at"], "presence": state.presence_stamp()}
            else:
                state.retired = None  # a monitor runs under this id: it is back
            changed = True
        for key in self.drop:
            if key in state.read:
                del state.read[key]
                changed = True
            if key in state.acks:
                del state.acks[key]
                changed = True
        if self.retire:  # against the state it is applied to: again after a lost lease
            anchor, stamp = self.seen, state.presence_stamp()
            if stamp is not None and stamp != self.seen:
                seen = parse_timestamp(self.seen) if self.seen else None
                if seen is None or (state.presence_time() or 0.0) > seen.timestamp():  # a newer one
                    if not (isinstance(state.presence, dict) and state.presence.get("activity") == STOPPED):
                        raise StateRefError(f"{state.server} published presence while it was being "
                                            "retired: its monitor is running")
                    anchor = stamp  # its monitor stopped cleanly meanwhile: retired as it now is
            state.retired = {"at": iso_utc(), "presence": anchor}
            changed = True
        return changed


# --------------------------------------------------------------------------- refs


def _retirement(value: Any) -> Optional[Dict[str, Optional[str]]]:
    """A state's ``retired`` record, ``{"at": time, "presence": the presence timestamp it saw}``;
    ``None`` for anything else (a record that cannot be read retires no one)."""
    if not isinstance(value, dict):
        return None
    at = _bounded_text(value.get("at"), 40)
    seen = value.get("presence")
    if not at or parse_timestamp(at) is None or not (seen is None or isinstance(seen, str) and len(seen) <= 40):
        return None
    return {"at": at, "presence": seen}


def takes_retirement(local_ref: str, local_refs: Container[str]) -> bool:
    """Whether a reader takes the retirement record of the state mirrored at ``local_ref``:
    ``refs/fleet/S`` always; the fallback ``refs/fleet-state/S`` only when ``refs/fleet/S`` is
    not among ``local_refs``. A server writes ``refs/fleet/S`` wherever the host allows it, so
    a record that any member pushes under the other name is never read beside it."""
    if local_ref.startswith(REF_PREFIX):
        return True
    return REF_PREFIX + local_ref.rsplit("/", 1)[-1] not in local_refs


def _server_ids(names: Iterable[str]) -> Set[str]:
    return {normalize_server_id(name) for name in names if is_valid_server_id(name)}


def _ranked(servers: Iterable[str], first: Iterable[str] = (), then: Iterable[str] = ()) -> List[str]:
    """At most :data:`MAX_STATE_SERVERS` of ``servers``, in name order: those in ``first`` (the
    roster's, say), then those in ``then`` (the mailbox's), before the rest."""
    names = sorted(set(servers))
    if len(names) <= MAX_STATE_SERVERS:
        return names
    tier1, tier2 = set(first), set(then)
    names.sort(key=lambda name: 0 if name in tier1 else 1 if name in tier2 else 2)  # stable
    return sorted(names[:MAX_STATE_SERVERS])


class RemoteView:
    """One ``ls-remote``: the shared branch's tip and every state ref's tip."""

    __slots__ = ("branch_tip", "state_tips")

    def __init__(self, branch_tip: Optional[str], state_tips: Dict[str, str]) -> None:
        self.branch_tip = branch_tip
        self.state_tips = state_tips  # remote ref name -> oid

    def servers(self) -> List[str]:
        found = {parse_state_ref(ref) for ref in self.state_tips}
        return sorted({item[0] for item in found if item is not None})


class _BranchInLook:
    """The shared branch in a look's one fetch (:meth:`StateStore._mirror_by_path`): its tip as
    listed, then as fetched (``None``: the remote has no such branch), and the tracking ref's id
    before the look (``fetched``; ``None``: no such ref)."""

    __slots__ = ("tip", "fetched")

    def __init__(self, tip: Optional[str], fetched: Optional[str]) -> None:
        self.tip = tip
        self.fetched = fetched


def _call(meanwhile: Optional[Callable[[Any], None]], value: object) -> Optional[Exception]:
    """``meanwhile(value)``; what it raised, held for its caller to raise once the fetch is done."""
    try:
        if meanwhile is not None:
            meanwhile(value)
    except Exception as exc:  # noqa: BLE001 - raised by the caller, after the fetch
        return exc
    return None


def _left_alone(mirrors: Mapping[str, str], wanted: Sequence[str]) -> Dict[str, str]:
    """The ``mirrors`` (local ref -> id) that a fetch of the refspecs ``wanted`` does not move."""
    moving = {spec.rpartition(":")[2] for spec in wanted}
    return {local: oid for local, oid in mirrors.items() if local not in moving}


class StateStore:
    """Read every server's state ref and write this clone's own, over one :class:`Clone`."""

    def __init__(self, clone: Clone) -> None:
        self.clone = clone
        self._states: Dict[str, Tuple[Tuple[str, ...], ServerState]] = {}
        self._warned: Dict[str, str] = {}
        self._own: Dict[str, Tuple[str, str]] = {}
        self.last_view: Optional[RemoteView] = None
        self.left_out = 0  # servers whose state refs the last reading of them all left out
        self.tips: Dict[str, str] = {}  # the mirrors' ids as last read (by mirrored(), say)
        self._unfetched = 0  # servers whose state refs the last listed fetch of all left out
        self._listed: Optional[RemoteView] = None  # that listing, while it left some out
        self.after_look: Optional[Dict[str, str]] = None  # the mirrors as mirror_fleet left them, when read

    # ----------------------------------------------------------------- polling and fetching

    def poll(self) -> RemoteView:
        """The shared branch and every state ref in one network call (an idle cycle's only one)."""
        return self._listed_view(self.clone.network_git(*self._listing(), check=False))

    def _listing(self) -> List[str]:
        return listing_args(self.clone.branch)

    def _listed_view(self, proc: "Finished") -> RemoteView:
        if proc.returncode != 0:
            raise RemoteUnavailable(["git", "ls-remote", "origin"], proc.returncode, proc.stdout,
                                    proc.stderr)
        return self._view_of(listed_refs(proc.stdout))

    def _view_of(self, refs: Mapping[str, str]) -> RemoteView:
        """The view of a listing (name -> id: ``ls-remote``'s, or :func:`fleet_start.remote_listing`'s)."""
        states = {ref: oid for ref, oid in refs.items() if parse_state_ref(ref) is not None}
        self.last_view = RemoteView(refs.get(f"refs/heads/{self.clone.branch}"), states)
        return self.last_view

    def local_tip(self, local_ref: str) -> Optional[str]:
        return self.clone.read_ref(local_ref)

    def refspecs_to_fetch(self, view: RemoteView, servers: Optional[Iterable[str]] = None,
                          first: Iterable[str] = (), then: Iterable[str] = (), *, by_name: bool = False,
                          gone: AbstractSet[str] = frozenset(),
                          mirrors: Optional[Mapping[str, str]] = None) -> List[str]:
        """Refspecs for the state refs whose remote tip differs from the local mirror (as in
        ``mirrors``, when given), of these servers or, when ``None``, of at most
        :data:`MAX_STATE_SERVERS` (``first``, then ``then``, first), the refs in ``gone``
        (deleted since the listing) left out: by the commit the listing named, or ``by_name``
        after the remote refused one of those (it moved since, and the old commit is gone)
        (:func:`fleet_start.moved_state_refspecs`)."""
        found = listed_state_refs(view.state_tips)
        if servers is None:
            order = _ranked(found, first, then)
        else:
            wanted = {normalize_server_id(s) for s in servers}
            order = sorted(name for name in found if name in wanted)
        mirrored = self.local_tip if mirrors is None else mirrors.get
        return moved_state_refspecs(found, order, mirrored, by_name=by_name, gone=gone)

    def fetch(self, servers: Optional[Iterable[str]] = None, view: Optional[RemoteView] = None,
              first: Iterable[str] = (), then: Iterable[str] = ()) -> RemoteView:
        """Bring the local mirrors of these servers' state refs (when ``None``, of every server,
        at most :data:`MAX_STATE_SERVERS`, ``first`` first) up to date.

        Refs that vanished on the remote are dropped locally, so a deleted state is not read.
        """
        view = view or self.poll()
        self._fetch_states(view, servers, list(first), list(then))
        self.drop_vanished(view, servers)
        if servers is None:
            self._unfetched = self.left_out = max(0, len(view.servers()) - MAX_STATE_SERVERS)
        return view

    def _fetch_states(self, view: RemoteView, servers: Optional[Iterable[str]] = None,
                      first: Sequence[str] = (), then: Sequence[str] = (), *,
                      started: Optional["subprocess.Popen[bytes]"] = None,
                      before: Optional[Mapping[str, str]] = None, locks_are_fatal: bool = True,
                      deadline: Optional[float] = None,
                      branch: Optional["_BranchInLook"] = None) -> Optional[Dict[str, str]]:
        """``git fetch`` of the state refs :meth:`refspecs_to_fetch` names for ``view`` (named
        again for each attempt: after a busy lock, by name after a listed commit is refused,
        without a ref deleted since the listing); ``started``: the first attempt, already running
        (:meth:`mirror_fleet`), begun when the mirrors were ``before``, waited for until ``deadline``.
        ``branch``: the shared branch too, in the same fetch (:meth:`_mirror_by_path`), unless the
        tracking ref holds what was listed already; its tip, as fetched, is left in ``branch.tip``
        (``None`` once the remote has no such branch), and a lock of its tracking ref that stays
        is :class:`LocalRefLocked`, as in :meth:`Clone.fetch`.

        Without negotiation: a state ref is a root commit holding one file, so there is nothing
        to negotiate, and git's negotiation never ends early for a root commit (the remote cannot
        say it has found a common base) but goes on for four round trips or more. A ref that
        carries history instead (someone pushed a branch there) would, without negotiation, bring
        all of it again each time it moves: once one is seen, this clone negotiates from then on
        (:data:`NEGOTIATE_KEY`). Another process of this clone moving the same mirror meanwhile
        (its lock, or "is at X but expected Y") is contention, not an outage: what is still
        behind is fetched again; a lock that stays is :class:`LocalRefLocked`, or, unless
        ``locks_are_fatal``, a warning (git updated every other mirror).
        """
        negotiates = self.clone.setting_is_true(NEGOTIATE_KEY)
        if before is None and not negotiates:
            before = self.clone.refs_in(REF_PREFIX, LOCAL_FALLBACK_PREFIX)
        busy_attempts = 0
        by_name = False  # a listed commit was refused: by name from then on
        gone: Set[str] = set()  # refs deleted since the listing, left out
        own_ref = f"refs/heads/{self.clone.branch}"
        with_branch = branch is not None and branch.tip is not None
        while True:
            if with_branch and own_ref in gone:
                branch.tip = with_branch = None  # type: ignore[union-attr]  # deleted since the listing
            branch_spec = branch_look_refspec(self.clone.branch, branch.tip,  # type: ignore[union-attr]
                                              branch.fetched) if with_branch else None
            argv = ["git", "fetch", "origin", *([self.clone.branch] if branch_spec else []), "state refs"]
            if started is not None:
                proc, started = self.clone.finish_network_git(started, deadline=deadline), None
            else:
                wanted = self.refspecs_to_fetch(view, servers, first, then, by_name=by_name, gone=gone)
                if not wanted and branch_spec is None:
                    return None
                config, args, refspecs = self._fetch_command(wanted, branch_spec, branch)
                proc = self.clone.fetch_git(*args, config=config, input=refspecs)
            if proc.returncode == 0:
                break
            text = proc.stderr.decode("utf-8", "replace")
            missing = set(_MISSING_REF.findall(text)) - gone
            if missing and len(gone) < MAX_GONE_REFS:  # deleted since the listing: the rest
                gone |= missing
                continue
            if not by_name and any(words in text.lower() for words in _GONE_COMMIT):
                by_name = True
                continue
            busy = _local_lock_busy(text)
            if busy and busy_attempts < LOCAL_LOCK_RETRIES:
                busy_attempts += 1
                sleep_jittered(0.05, 0.2)
                continue
            if busy and branch_spec is not None and f"'{self.clone.remote_ref}'" in text:
                raise ref_stays_locked(argv, proc, self.clone.remote_ref)
            if busy and not locks_are_fatal:
                log.warning("a state ref stays locked in this clone; it is read as last fetched: %s",
                            _first_line(proc.stderr))
                break
            damaged = damaged_objects(argv, proc) if branch_spec is not None else None
            if damaged is not None:
                raise damaged
            error = LocalRefLocked if busy else RemoteUnavailable
            raise error(argv, proc.returncode, proc.stdout, proc.stderr)
        if with_branch:
            branch.tip = self.clone.read_ref(self.clone.remote_ref)  # type: ignore[union-attr]  # as fetched, by name
        if before is not None and not negotiates:
            return self._check_roots(before)
        return None

    def _fetch_command(self, wanted: Sequence[str], branch_spec: Optional[str] = None,
                       branch: Optional["_BranchInLook"] = None) -> Tuple[Tuple[str, ...], List[str], Optional[bytes]]:
        """(git's ``-c`` options, ``fetch``'s arguments, its standard input) for a fetch of the
        state refs ``wanted`` (and of the branch, by ``branch_spec``): beyond
        :data:`REFSPECS_IN_ARGV` of them, on standard input."""
        from_tip = self.clone.remote_ref if branch is not None and branch.fetched is not None else None
        return state_fetch_command(wanted, negotiate=self.clone.setting_is_true(NEGOTIATE_KEY),
                                   branch=branch_spec, branch_from=from_tip)

    def _check_roots(self, before: Mapping[str, str]) -> Dict[str, str]:
        """After a fetch without negotiation: if a state ref that moved carries history (a commit
        with a parent, or a tag), say so once and negotiate from now on (:meth:`_fetch_states`).
        A commit that cannot be read here says nothing either way. Returns the mirrors it read."""
        after = self.clone.refs_in(REF_PREFIX, LOCAL_FALLBACK_PREFIX)
        moved = {ref: oid for ref, oid in after.items() if before.get(ref) != oid}
        if not moved:
            return after
        try:  # one cat-file for all; a commit too big for a state ref's is left out
            found = self.clone.read_objects_within(sorted(set(moved.values())), MAX_COMMIT_BYTES)[0]
        except GitError:  # unreadable here: the reader says so
            return after
        carrying = []
        for ref, oid in sorted(moved.items()):
            item = found.get(oid)
            if item is not None and (item[1] == "tag" or (
                    item[1] == "commit" and b"\nparent " in item[2].split(b"\n\n", 1)[0])):
                carrying.append(ref)
        if carrying:
            self.clone.remember(NEGOTIATE_KEY, "true")
            log.warning("%s is no state ref (it carries history); this clone negotiates when it "
                        "fetches state refs from now on", carrying[0], extra={"metadata": {"refs": carrying[:20]}})
        return after

    def drop_vanished(self, view: RemoteView, servers: Optional[Iterable[str]] = None, *,
                      mirrors: Optional[Mapping[str, str]] = None) -> bool:
        """Delete local mirrors (of these servers, or all) whose ref the remote no longer has, so a
        deleted state is neither read nor used as the base of a lease (``mirrors``: as read a
        moment ago, instead of reading them again). Whether none was."""
        wanted = None if servers is None else {normalize_server_id(s) for s in servers}
        present = {parse_state_ref(ref)[1] for ref in view.state_tips}  # type: ignore[index]
        gone = [local for local in (sorted(mirrors) if mirrors is not None else self._local_refs())
                if local not in present and (wanted is None or local.rsplit("/", 1)[-1] in wanted)]
        untouched = not gone
        # One transaction, all or nothing, without waiting for locks: a mirror that is locked (a
        # process killed while it wrote it) is left out and the rest deleted again; a lock on all
        # of them (packed-refs.lock) leaves them for the next look.
        kept: List[str] = []
        for _attempt in range(MAX_LOCKED_MIRRORS):
            if not gone:
                break
            proc = self.clone.git("-c", "core.filesRefLockTimeout=0", "-c", "core.packedRefsTimeout=0",
                                  "update-ref", "--stdin", check=False,
                                  input="".join(f"delete {local}\n" for local in gone).encode("utf-8"))
            if proc.returncode == 0:
                gone = []
                break
            locked = _LOCKED_REF.search(proc.stderr.decode("utf-8", "replace"))
            if locked is None or locked.group(1) not in gone:
                break
            gone.remove(locked.group(1))
            kept.append(locked.group(1))
        kept += gone
        if kept:
            log.warning("%d mirrors of state refs deleted on the remote stay in this clone (locked), until a "
                        "later look: %s", len(kept), ", ".join(kept[:5]))
        return untouched

    def _local_refs(self, mirrors: Optional[Mapping[str, str]] = None) -> List[str]:
        self.tips = dict(mirrors) if mirrors is not None else self.clone.refs_in(REF_PREFIX, LOCAL_FALLBACK_PREFIX)
        return sorted(self.tips)

    def mirrored(self, first: Iterable[str] = (), then: Iterable[str] = (), *,
                 mirrors: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
        """The state refs mirrored in this clone, both names, of at most
        :data:`MAX_STATE_SERVERS` servers (``first``, then ``then``, first): local ref -> server
        id (refs whose name is no server id are left out); :attr:`left_out` says how many servers
        were not read, here or by the last listed fetch of all. ``mirrors``: the refs as read a
        moment ago (:attr:`after_look`), instead of reading them again."""
        found = {}
        for local in self._local_refs(mirrors):
            name = local.rsplit("/", 1)[-1]
            if is_valid_server_id(name) and name == name.lower():
                found[local] = name
        names = set(found.values())
        self.left_out = max(0, len(names) - MAX_STATE_SERVERS, self._unfetched)
        kept = set(_ranked(names, first, then))
        return {local: name for local, name in found.items() if name in kept}

    def known_servers(self, first: Iterable[str] = (), then: Iterable[str] = ()) -> List[str]:
        """Servers with a state ref mirrored in this clone (at most :data:`MAX_STATE_SERVERS`)."""
        return sorted(set(self.mirrored(first, then).values()))

    def mirror_fleet(self, first: Iterable[str] = (),
                     meanwhile: Optional[Callable[[Optional[str]], None]] = None,
                     unmoved: Optional[Callable[[Mapping[str, str]], None]] = None) -> Optional[str]:
        """The shared branch and the state refs of every server, at most
        :data:`MAX_STATE_SERVERS` of them (``first``, then those mirrored already, first), the
        mirrors of refs the remote no longer has dropped: what a look at the whole fleet
        (``fleet_status.py``, ``inbox.py acks``) needs, busy or idle.

        The branch's fetch (:meth:`Clone.fetch`) runs beside a listing of the remote (the
        ``ls-remote`` of :meth:`poll`) and, when a state ref moved, a fetch of those that did,
        by the commits listed and without negotiation (:meth:`_fetch_states`: in one fetch with the branch, a
        moved state ref kept git negotiating for four round trips, 640 ms instead of 430 over a
        100 ms link). ``fleet_status.py``'s script starts all three before the suite loads, the
        last from a thread once the listing is in (:func:`fleet_start.mirrors_at_start`). Never by pattern: a pattern
        would mirror every ref another member pushes under ``refs/fleet/`` (20,000 of them took
        80 MB of ref files in a clone), and where ref names are case-blind (``core.ignorecase``:
        Windows, macOS) a ref such as ``refs/fleet/CODE2`` would land on code2's mirror; only
        lower-case server ids are fetched. :meth:`fetch_named` then brings those of the servers
        the fetched branch names, when some were left out. All three are processes of this one
        thread, waited for until one deadline, the network timeout from the start; whatever
        stops the look (Ctrl+C too) stops them and their helpers, retries included
        (:func:`fleet_git.stop_git`). Returns the branch's tip, ``None`` when the remote has no
        such branch (the state refs are fetched all the same).

        From a remote reached by a path (:meth:`Clone.remote_folder`) the listing is the remote's
        refs as git's files backend keeps them (:func:`fleet_start.remote_listing`, what
        ``ls-remote`` reads there), and one fetch brings the branch and the state refs that moved
        (:meth:`_mirror_by_path`), none when nothing moved.

        ``meanwhile(tip)`` is called once the branch is in, while the state refs' fetch may still
        run (a look reads the mailbox then); what it raises is raised once that fetch is done.
        ``unmoved(mirrors)`` is called while a fetch of state refs runs, with the mirrors (local
        ref -> id) it leaves as they are (a look reads their state files then); what it raises is
        dropped (the caller reads what it missed, again, afterwards).
        """
        first = list(first)
        chosen = look_at_start(self.clone.root)  # as the script began, when it did
        if chosen is None:
            folder = self.clone.remote_folder()
            listed = remote_listing(folder, self.clone.branch) if folder is not None else None
            if listed is not None:
                chosen = PathLook(listed, self.clone.refs_in(REF_PREFIX, LOCAL_FALLBACK_PREFIX),
                                  self.clone.read_ref(self.clone.remote_ref))
        if isinstance(chosen, PathLook):
            return self._mirror_by_path(chosen, first, meanwhile, unmoved)
        deadline = time.monotonic() + NETWORK_TIMEOUT
        running: List["subprocess.Popen[bytes]"] = []
        try:
            running.append(self.clone.start_network_git(*self._listing()))
            running.append(self.clone.start_branch_fetch())
            view = self._listed_view(self.clone.finish_network_git(running[0], deadline=deadline))
            # The mirrors before this fetch of the state refs: as the script's look-ahead read them
            # when it started that fetch already (fleet_start), else now.
            before = mirrors_at_start(self.clone.root)
            if before is None:
                before = self.clone.refs_in(REF_PREFIX, LOCAL_FALLBACK_PREFIX)
            held = [local.rsplit("/", 1)[-1] for local in before]
            wanted = self.refspecs_to_fetch(view, first=first, then=held, mirrors=before)
            if wanted:
                config, args, refspecs = self._fetch_command(wanted)
                running.append(self.clone.start_fetch(*args, config=config, input=refspecs))
            tip = self.clone.fetch(allow_missing=True, started=running[1], deadline=deadline)
            failed = _call(meanwhile, tip)  # raised below: the state refs' fetch is not cut off
            after: Optional[Dict[str, str]] = dict(before)  # no state ref moved, nor any mirror
            if wanted:
                _call(unmoved, _left_alone(before, wanted))
                after = self._fetch_states(view, None, first, held, started=running[2], before=before,
                                           locks_are_fatal=False, deadline=deadline)
        except BaseException:
            for proc in running:
                stop_git(proc)
            raise
        self._looked(view, after)
        if failed is not None:
            raise failed
        return tip

    def _mirror_by_path(self, look: PathLook, first: List[str], meanwhile: Optional[Callable[[Optional[str]], None]],
                        unmoved: Optional[Callable[[Mapping[str, str]], None]]) -> Optional[str]:
        """:meth:`mirror_fleet` from a remote reached by a path, whose refs ``look`` holds as read
        before anything was fetched: one fetch of the branch (when it moved, by name) and the state
        refs that moved (by the commits listed), the one the script started when it did, none when
        nothing moved. A listing costs no process there, and one fetch less costs the clone's git
        a walk of every mirrored ref and a connectivity check. (Over a network, the usual way is
        faster: there the branch's fetch starts with the listing, not after it.)"""
        deadline = time.monotonic() + NETWORK_TIMEOUT
        view = self._view_of(look.listed)
        before = look.before
        held = [local.rsplit("/", 1)[-1] for local in before]
        branch = _BranchInLook(view.branch_tip, look.fetched)
        spec = branch_look_refspec(self.clone.branch, branch.tip, branch.fetched)
        moved = spec is not None
        wanted = self.refspecs_to_fetch(view, first=first, then=held, mirrors=before)
        failed: Optional[Exception] = None
        started = None
        try:
            if wanted or moved:
                config, args, refspecs = self._fetch_command(wanted, spec, branch)
                started = self.clone.start_fetch(*args, config=config, input=refspecs)
            if not moved:  # the branch is here as listed: read while the state refs come
                failed = _call(meanwhile, branch.tip)
            if wanted:
                _call(unmoved, _left_alone(before, wanted))
            after: Optional[Dict[str, str]] = dict(before)
            if started is not None:
                after = self._fetch_states(view, None, first, held, started=started, before=before,
                                           locks_are_fatal=False, deadline=deadline, branch=branch)
                self.clone.maintain()
        except BaseException:
            if started is not None:
                stop_git(started)
            raise
        self.clone.note_fetched(branch.tip)
        if moved:
            failed = _call(meanwhile, branch.tip)
        self._looked(view, after)
        if failed is not None:
            raise failed
        return branch.tip

    def _looked(self, view: RemoteView, after: Optional[Dict[str, str]]) -> None:
        """What a look leaves: how many servers were left out, and the mirrors as its fetch left
        them (read once since, when it was not negotiated), for the deletion of those the remote
        no longer has and for the reading that follows the look."""
        self._unfetched = max(0, len(view.servers()) - MAX_STATE_SERVERS)
        self._listed = view if self._unfetched else None
        self.after_look = after if self.drop_vanished(view, mirrors=after) else None

    def fetch_named(self, first: Iterable[str], then: Iterable[str] = ()) -> None:
        """After :meth:`mirror_fleet` left some state refs out (past :data:`MAX_STATE_SERVERS`):
        fetch those of the servers named in ``first`` (the roster's, say), then in ``then`` (the
        mailbox's), at most that many, so a crowd of other refs cannot hide them. Nothing to do
        when nothing was left out. A ref deleted since the listing is left out; a remote that
        fails meanwhile leaves the mirrors as last fetched, with a warning: a stale mirror only
        shows fewer receipts."""
        view = self._listed
        if view is None:
            return
        first, then = (_server_ids(names) for names in (first, then))
        wanted = _ranked((first | then) & set(view.servers()), first, then)
        if not wanted:
            return
        try:
            self._fetch_states(view, wanted, locks_are_fatal=False)
        except RemoteUnavailable as exc:
            log.warning("the state refs of the servers the fleet names could not be fetched; they are read "
                        "as last fetched: %s", exc)

    def read(self, server: str) -> ServerState:
        """``server``'s state as last fetched (both ref names merged); empty when it has none.

        A state ref that breaks a bound or whose objects are missing is ignored with one warning
        (its receipts then count as absent: a message shows as unread, never as read).
        """
        server = normalize_server_id(server)
        tips = tuple(t or "" for t in (self.local_tip(REF_PREFIX + server),
                                        self.local_tip(LOCAL_FALLBACK_PREFIX + server)))
        cached = self._states.get(server)
        if cached is not None and cached[0] == tips:
            return cached[1]
        state = ServerState(server)
        for tip, retirement in zip(tips, (True, not tips[0])):
            if not tip:
                continue
            try:
                state.merge(self._read_commit(tip, server), retirement=retirement)
            except (BadInput, GitError) as exc:
                if self._warned.get(server) != tip:
                    self._warned[server] = tip
                    log.warning("state ref of %s ignored: %s", server, exc,
                                extra={"metadata": {"server": server, "tip": tip}})
        self._states[server] = (tips, state)
        return state

    def _read_commit(self, commit: str, server: str) -> ServerState:
        blob, raw = self.clone.read_file(commit, STATE_FILE, MAX_STATE_BYTES)
        if raw is None:
            return ServerState(server)
        return ServerState.from_bytes(raw, server)

    def read_all(self, servers: Optional[Iterable[str]] = None, first: Iterable[str] = (),
                 then: Iterable[str] = ()) -> Dict[str, ServerState]:
        """The state of these servers, or of every server mirrored here (at most
        :data:`MAX_STATE_SERVERS`, ``first`` then ``then`` first; :attr:`left_out` says how many
        more)."""
        names = self.known_servers(first, then) if servers is None else [normalize_server_id(s) for s in servers]
        return {name: self.read(name) for name in names}

    # ----------------------------------------------------------------- writing

    def update(self, server: str, change: StateChange, *, author: Optional[str] = None,
               names: Optional[Tuple[str, str]] = None) -> bool:
        """Apply ``change`` to ``server``'s own state ref and push it; whether it was pushed.

        The push carries a lease on the tip the new state was built from: when another process of
        the same server won meanwhile, its state is fetched, the change applied to it again, and
        pushed again (nothing is lost). A remote that refuses ``refs/fleet/*`` gets the fallback
        branch from then on (remembered in the clone's config, said once in the log). ``names``:
        (remote ref, local mirror) to write instead of this clone's own choice
        (:meth:`retirement_refs`).
        """
        server = normalize_server_id(server)
        delay = 0.05
        refusals = 0
        for _attempt in range(MAX_LEASE_ATTEMPTS):
            remote_ref, local_ref = names or self._own_refs(server)
            base = self.local_tip(local_ref)
            current = self._base_state(base, server)
            if not current.writable:
                raise StateRefError(f"the state ref of {server} was written by a newer version "
                                    f"({current.version}); not rewriting it")
            if not change.apply(current):
                return False
            data = current.to_bytes()
            if len(data) > MAX_STATE_BYTES:  # readers would ignore it: never publish what none reads
                raise StateRefError(f"the state of {server} would be {len(data)} bytes, more than the "
                                    f"{MAX_STATE_BYTES} readers accept; archive old mail to shrink it")
            blob = self.clone.write_object("blob", data)
            tree = self.clone.write_object("tree", b"100644 " + STATE_FILE.encode() + b"\0" + bytes.fromhex(blob))
            commit = self.clone.commit_tree(tree, None, f"{server}: state", author or server)
            outcome = self._push(commit, remote_ref, base)
            if outcome == "ok":
                # With the old value: a slower process of this server never moves the mirror back.
                self.clone.git("update-ref", local_ref, commit, base or "", check=False)
                return True
            if outcome == "refused" and remote_ref.startswith(REF_PREFIX) and names is None:
                refusals += 1
                if refusals >= 2:  # refused twice: the host refuses custom refs, not a hiccup
                    self._use_fallback(server)
                continue
            if outcome == "refused":
                raise StateRefRefused(f"the remote refused {remote_ref}")
            # Lease lost: another process of this server pushed first. Fetch it and merge.
            log.info("state ref %s moved meanwhile (lease lost); merging and pushing again", remote_ref,
                     extra={"metadata": {"ref": remote_ref}})
            sleep_jittered(delay / 2, delay)
            delay = min(delay * 1.6, 1.0)
            self.fetch([server])
        raise StateRefError(f"the state ref of {server} kept moving; gave up after "
                            f"{MAX_LEASE_ATTEMPTS} attempts")

    def _base_state(self, base: Optional[str], server: str) -> ServerState:
        """The state a write builds on. One of ours that readers cannot use (another member wrote
        garbage over it, or a bound was broken) is started afresh with a warning: readers already
        count it as empty, so nothing they could read is lost, and the monitor is not stuck on it."""
        if not base:
            return ServerState(server)
        try:
            return self._read_commit(base, server)
        except BadInput as exc:
            log.warning("own state ref of %s cannot be read (%s); writing a fresh one", server, exc,
                        extra={"metadata": {"server": server, "tip": base}})
            return ServerState(server)

    def _push(self, commit: str, remote_ref: str, base: Optional[str]) -> str:
        """``ok``, ``lease`` (lost to another process of this server) or ``refused``."""
        lease = f"--force-with-lease={remote_ref}:{base or ''}"
        proc = self.clone.network_git("push", "--porcelain", "--no-verify", lease, "origin",
                                      f"{commit}:{remote_ref}", check=False)
        status = None
        for line in proc.stdout.decode("utf-8", "replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1].endswith(":" + remote_ref):
                status = (parts[0], parts[2])
        if status is not None and status[0] in (" ", "*", "+", "="):
            return "ok"
        text = (status[1] if status else "") + " " + proc.stderr.decode("utf-8", "replace")
        lowered = text.lower()
        if "stale info" in lowered or "fetch first" in lowered or "non-fast-forward" in lowered \
                or "cannot lock ref" in lowered or "incorrect old value" in lowered:
            return "lease"
        if status is not None and status[0] == "!":
            return "refused"
        raise RemoteUnavailable(["git", "push", "origin", remote_ref], proc.returncode, proc.stdout,
                                proc.stderr, _first_line(proc.stderr) or "push failed")

    # ----------------------------------------------------------------- which ref is ours

    def states_by_name(self, server: str) -> List[ServerState]:
        """``server``'s state under each of its two ref names, as last fetched, unmerged (those
        that cannot be read left out)."""
        server = normalize_server_id(server)
        found = []
        for local in (REF_PREFIX + server, LOCAL_FALLBACK_PREFIX + server):
            tip = self.local_tip(local)
            try:
                if tip:
                    found.append(self._read_commit(tip, server))
            except (BadInput, GitError):
                continue
        return found

    def retirement_refs(self, server: str, view: RemoteView) -> Tuple[str, str]:
        """(remote ref, local mirror) where ``server``'s retirement record must go to be read
        (:func:`takes_retirement`): ``refs/fleet/S`` when the remote has it, else the fallback
        branch when it has that, else this clone's own choice (:meth:`_own_refs`)."""
        server = normalize_server_id(server)
        if REF_PREFIX + server in view.state_tips:
            return REF_PREFIX + server, REF_PREFIX + server
        if FALLBACK_PREFIX + server in view.state_tips:
            return FALLBACK_PREFIX + server, LOCAL_FALLBACK_PREFIX + server
        return self._own_refs(server)

    def _config_key(self, server: str) -> str:
        return f"fleet.{server}.stateref"

    def _own_refs(self, server: str) -> Tuple[str, str]:
        """(remote ref, local mirror) that this server writes."""
        if server not in self._own:
            proc = self.clone.git("config", "--get", self._config_key(server), check=False)
            if proc.stdout.decode().strip() == "branch":
                self._own[server] = (FALLBACK_PREFIX + server, LOCAL_FALLBACK_PREFIX + server)
            else:
                self._own[server] = (REF_PREFIX + server, REF_PREFIX + server)
        return self._own[server]

    def _use_fallback(self, server: str) -> None:
        self.clone.git("config", self._config_key(server), "branch")
        self._own.pop(server, None)
        log.warning("the remote refuses %s%s: this server's state is kept on the branch %s%s "
                    "from now on", REF_PREFIX, server, FALLBACK_PREFIX[len("refs/heads/"):], server,
                    extra={"metadata": {"server": server}})


# --------------------------------------------------------------------------- questions


def has_read(msg: Mapping[str, Any], server: str, states: Mapping[str, ServerState]) -> bool:
    """Whether ``server`` has read ``msg``: the legacy mailbox fields or its state ref."""
    state = states.get(server)
    return is_handled_by(msg, server, state.read if state is not None else ()) or (
        state is not None and message_key(msg) in state.acks)


def has_acknowledged(msg: Mapping[str, Any], server: str, states: Mapping[str, ServerState]) -> bool:
    """Whether ``server`` acknowledged ``msg``: legacy ``acknowledged_by`` or its state ref."""
    if names_server(msg.get("acknowledged_by"), server):
        return True
    if msg.get("ack_status") == "acknowledged" and is_direct(msg) and recipients(msg) == {server}:
        return True  # an older tool's acknowledgement of mail to one server (PROTOCOL.md)
    state = states.get(server)
    return state is not None and message_key(msg) in state.acks


def presence_doc(*, started: float, interval: float, healthy: Optional[bool] = None,
                 activity: str = "idle", version: str = "", extra: Optional[Mapping[str, Any]] = None
                 ) -> Dict[str, Any]:
    """A ``presence`` object as PROTOCOL.md shows it (timestamp first)."""
    import datetime as _dt

    doc: Dict[str, Any] = {"timestamp": iso_utc(),
                           "started": iso_utc(_dt.datetime.fromtimestamp(started, _dt.timezone.utc)),
                           "healthy": healthy, "activity": activity, "suite_version": version,
                           "interval": interval}
    if extra:
        doc.update(extra)
    return doc

