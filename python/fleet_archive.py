"""Archive old mail out of the shared mailbox, and find messages wherever they are.

``coordination/messages.json`` grows with every message; every send and every cycle pays for its
size. An archive pass moves the messages that are done with and older than N days into
``coordination/archive/messages-YYYY-MM.json`` (by the month of their timestamp), by one
PROTOCOL.md transaction that writes the main file and every touched archive file together, so no
commit on the branch ever holds a message twice or loses one.

Done with: every server the message is addressed to has read it (:func:`has_read`, the one
answer to "has S read m", which also takes each server's read receipts from elsewhere). For a
message to one server or a list, those are the servers it names; for a broadcast, every server
the fleet knows (:func:`known_servers`: the senders and recipients in the mailbox, the roster
``coordination/servers.json``, the servers that have read marks). A server that has retired
(``message_monitor.py --retire``: it left the fleet for good) reads nothing more, so no message
waits for it. Age alone never archives a message: no archive setting may hide mail from an
addressee that has not read it. Entries that are not valid messages, or whose timestamp does not
parse, stay in the main file.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re

from fleet_common import SuiteError, is_valid_server_id, utc_now
from fleet_git import NotAFile
from fleet_mailbox import (
    MAILBOX_PATH,
    MAX_MAILBOX_BYTES,
    Mailbox,
    MailboxCorrupt,
    entry_problem,
    find_message,
    flag,
    is_handled_by,
    known_servers,
    message_key,
    message_time,
    parse_document,
    recipients,
    serialize,
    valid_messages,
)
from fleet_roster import ROSTER_PATH

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import AbstractSet, Any, Container, Dict, Iterable, List, Mapping, Optional, Set, Tuple

    from fleet_mailbox import (
        MessageKey,
    )

    # Read receipts kept outside the mailbox (each server's state ref): server -> (id, from) keys.
    Receipts = Mapping[str, Container[MessageKey]]

log = logging.getLogger(__name__)

ARCHIVE_DIR = "coordination/archive"
_ARCHIVE_NAME = re.compile(r"^messages-(\d{4})-(\d{2})\.json$")
_ID_SECONDS = re.compile(r"^msg_(\d{9,11})_")

_NO_RECEIPTS: Container[MessageKey] = frozenset()


def archive_path(moment: _dt.datetime) -> str:
    return f"{ARCHIVE_DIR}/messages-{moment.year:04d}-{moment.month:02d}.json"


def has_read(msg: Mapping[str, Any], server: str, receipts: Optional[Receipts] = None) -> bool:
    """Whether ``server`` has read ``msg``: the one answer to that question (PROTOCOL.md, "A
    message"). In the mailbox: ``read_by``, or ``read`` on a message to that server alone; and
    in ``receipts[server]``, the (id, from) keys it recorded elsewhere (its state ref)."""
    return is_handled_by(msg, server, receipts.get(server, _NO_RECEIPTS) if receipts else _NO_RECEIPTS)


def addressees(msg: Mapping[str, Any], known: Optional[AbstractSet[str]]) -> Optional[Set[str]]:
    """The servers ``msg`` is addressed to: those it names, or for a broadcast every known
    server; never its sender. ``None`` when a broadcast meets an unknown fleet."""
    rcpt = recipients(msg)
    if rcpt is None:
        if known is None:
            return None
        rcpt = set(known)
    rcpt.discard(str(msg.get("from", "")).lower())
    return rcpt


def is_done_with(msg: Mapping[str, Any], known: Optional[AbstractSet[str]] = None,
                 receipts: Optional[Receipts] = None, retired: AbstractSet[str] = frozenset()) -> bool:
    """Every server ``msg`` is addressed to has read it (:func:`has_read`), or has ``retired``.

    A broadcast needs every server in ``known`` (:func:`known_servers`); with ``known`` None
    (the fleet cannot be told) no broadcast is done. A message addressed to no valid server is
    done: nobody will ever read it; nor will a server that retired.
    """
    targets = addressees(msg, known)
    if targets is None:
        return False
    return all(server in retired or has_read(msg, server, receipts) for server in targets)


def read_roster(clone: Any, tip: Optional[str]) -> Optional[List[str]]:
    """The roster's servers at ``tip`` (its format's owner is :mod:`fleet_roster`); ``None``
    (the fleet cannot be told: broadcasts stay) when the roster could not be used whole."""
    from fleet_roster import read_roster as read_roster_file

    roster = read_roster_file(clone, tip)
    if roster.problem:
        log.warning("%s; broadcasts stay in the mailbox", roster.problem,
                    extra={"metadata": {"path": ROSTER_PATH}})
        return None
    return list(roster.servers)


def audience(data: Mapping[str, Any], roster: Optional[List[str]],
             receipts: Optional[Receipts]) -> Optional[Set[str]]:
    """The servers a broadcast waits for. With a roster: its servers and those with state refs
    (a mistyped ``--to`` in the mailbox must not hold every broadcast forever); without one, every
    id the mailbox names too (:func:`known_servers`); ``None`` when a roster exists but cannot be
    used (broadcasts stay)."""
    if roster is None:
        return None
    if roster:
        return set(roster) | {name for name in (receipts or {}) if is_valid_server_id(name)}
    return known_servers(data, (), receipts)


_RECEIPT_FIELDS = ("read", "read_by", "acknowledged_by", "ack_status")


def _same_message(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """The same message, receipts aside (an archived copy carries folded-in receipts)."""
    return ({k: v for k, v in a.items() if k not in _RECEIPT_FIELDS}
            == {k: v for k, v in b.items() if k not in _RECEIPT_FIELDS})


def plan_archive(data: Dict[str, Any], days: float, now: Optional[_dt.datetime] = None,
                 known: Optional[AbstractSet[str]] = None, receipts: Optional[Receipts] = None,
                 retired: AbstractSet[str] = frozenset()
                 ) -> Tuple[List[Any], Dict[str, List[Dict[str, Any]]]]:
    """(entries that stay, archive path -> messages that move), order kept on both sides.

    A message moves when it is older than ``days`` and done with (:func:`is_done_with` with
    ``known`` servers, ``receipts`` and ``retired`` servers).
    """
    cutoff = (now or utc_now()) - _dt.timedelta(days=days)
    stay: List[Any] = []
    moves: Dict[str, List[Dict[str, Any]]] = {}
    for entry in data.get("messages", []):
        if entry_problem(entry) is not None:
            stay.append(entry)
            continue
        when = message_time(entry)
        if when is None or when >= cutoff or not is_done_with(entry, known, receipts, retired):
            stay.append(entry)
            continue
        moves.setdefault(archive_path(when), []).append(entry)
    return stay, moves


class StateReceipts:
    """What the archive needs from the state refs: each server's read receipts and
    acknowledgements, (id, from) keys; the servers that retired; and whether every server's
    state was read (else a broadcast's audience is unknown)."""

    __slots__ = ("read", "acked", "retired", "complete")

    def __init__(self, read: Optional[Dict[str, Set[MessageKey]]] = None,
                 acked: Optional[Dict[str, Set[MessageKey]]] = None,
                 retired: AbstractSet[str] = frozenset(), complete: bool = True) -> None:
        self.read = read if read is not None else {}
        self.acked = acked if acked is not None else {}
        self.retired = retired
        self.complete = complete


def state_receipts(clone: Any) -> StateReceipts:
    """The state refs' receipts, freshly fetched: at most ``fleet_state.MAX_STATE_SERVERS``
    servers' are read, past that the roster's first, then those the mailbox at the fetched tip
    names (their mail is what can move)."""
    from fleet_state import MAX_STATE_SERVERS, StateStore

    store = StateStore(clone)
    view = store.poll()
    roster, mail = _named_at_tip(clone) if len(view.servers()) > MAX_STATE_SERVERS else (set(), set())
    store.fetch(view=view, first=roster, then=mail)
    found = StateReceipts(retired=set())
    for name, state in store.read_all(first=roster, then=mail).items():
        found.read[name] = set(state.read) | set(state.acks)
        found.acked[name] = set(state.acks)
        if state.is_retired():
            found.retired.add(name)
    if store.left_out:
        log.warning("the remote holds the state refs of %d servers; the archive read %d and keeps every "
                    "broadcast", MAX_STATE_SERVERS + store.left_out, MAX_STATE_SERVERS)
        found.complete = False
    return found


def _named_at_tip(clone: Any) -> Tuple[Set[str], Set[str]]:
    """(the roster's servers, those the mailbox names) at the clone's fetched tip; none when
    they cannot be read (the archive pass itself then says why)."""
    tip = clone.tip()
    if not tip:
        return set(), set()
    try:
        data = Mailbox(clone).read(tip)[1]
    except SuiteError:
        data = {}
    return set(read_roster(clone, tip) or ()), known_servers(data)


def fold_receipts(msg: Dict[str, Any], read: Receipts, acked: Receipts) -> Dict[str, Any]:
    """``msg`` as it goes into the archive: the state refs' receipts written into its
    ``read_by`` and ``acknowledged_by`` (PROTOCOL.md: only then may a server drop them)."""
    key = message_key(msg)
    readers = sorted(name for name, keys in read.items() if key in keys)
    ackers = sorted(name for name, keys in acked.items() if key in keys)
    if not readers and not ackers:
        return msg
    out = dict(msg)
    for field, names in (("read_by", readers), ("acknowledged_by", ackers)):
        if not names:
            continue
        current = out.get(field) if isinstance(out.get(field), list) else []
        have = {n.lower() for n in current if isinstance(n, str)}
        out[field] = list(current) + [n for n in names if n not in have]
    if ackers and flag(out.get("ack_required")):
        out["ack_status"] = "acknowledged"
    return out


def archive_mailbox(clone: Any, server: str, days: float,
                    now: Optional[_dt.datetime] = None,
                    states: Optional[StateReceipts] = None) -> Dict[str, Any]:
    """One archive pass by one transaction; returns counts and a one-line summary.

    ``states``: what each server recorded outside the mailbox (:class:`StateReceipts`); by
    default read from every server's state ref. Each archived message carries the receipts in
    ``read_by`` / ``acknowledged_by``, so no receipt is lost when a state ref drops it.
    """
    result: Dict[str, Any] = {"archived": 0, "files": [], "skipped": []}
    if states is None:
        states = state_receipts(clone)
    receipts, acked, retired = states.read, states.acked, states.retired
    mailbox = Mailbox(clone)

    def change(tip: Optional[str]):
        blob, raw = mailbox.read_raw(tip)
        data = parse_document(raw, blob)  # its own copy: the pass changes it
        known = audience(data, read_roster(clone, tip), receipts) if states.complete else None
        original = list(data.get("messages", []))
        stay, moves = plan_archive(data, days, now, known, receipts, retired)
        if not moves:
            return None
        files: Dict[str, Optional[bytes]] = {}
        moved = 0
        kept: Set[int] = set()  # entries planned to move that must stay after all
        result["skipped"] = []
        for path, msgs in sorted(moves.items()):
            try:
                a_blob, a_raw = mailbox.read_raw(tip, path)
                archive = parse_document(a_raw, a_blob, path=path)
            except (MailboxCorrupt, NotAFile) as exc:
                # Another member's file that cannot be read (or a link): that month's mail stays
                # in the hot mailbox, where nothing is lost; every other month moves as usual.
                kept.update(id(msg) for msg in msgs)
                result["skipped"].append(path)
                log.warning("%s cannot be read (%s); its month's mail stays in the mailbox", path,
                            getattr(exc, "reason", exc), extra={"metadata": {"path": path}})
                continue
            present = {message_key(m): m for m in archive["messages"] if isinstance(m, dict)}
            here = 0
            held: Set[int] = set()
            for msg in msgs:
                there = present.get(message_key(msg))
                if there is None:
                    present[message_key(msg)] = msg
                    archive["messages"].append(fold_receipts(msg, receipts, acked))
                    here += 1
                elif _same_message(there, msg):
                    here += 1  # the archive holds it already (an older tool's pass): leave one copy
                else:  # another message with the same (id, from), as older tools wrote: never lose one
                    held.add(id(msg))
            content = serialize(archive)
            if len(content) > MAX_MAILBOX_BYTES:  # a month past what readers read: it stays hot
                kept.update(id(msg) for msg in msgs)
                result["skipped"].append(path)
                log.warning("%s would grow past %d bytes; its month's mail stays in the mailbox", path,
                            MAX_MAILBOX_BYTES, extra={"metadata": {"path": path}})
                continue
            kept |= held
            moved += here
            files[path] = content
        if not moved:
            return None
        keep = {id(e) for e in stay} | kept
        data["messages"] = [e for e in original if id(e) in keep]
        files[MAILBOX_PATH] = serialize(data)
        result.update(archived=moved, files=sorted(set(moves) - set(result["skipped"])))
        return files, f"{server}: archive {moved} messages older than {days:g} days"

    tx = mailbox.change(change, author=server)
    result["commit"] = tx.commit
    if not tx.changed:
        result.update(archived=0, files=[])
    result["summary"] = (f"archived {result['archived']} messages into {', '.join(result['files'])}"
                         if result["archived"] else "nothing to archive")
    if result["skipped"]:
        result["summary"] += (f"; {', '.join(result['skipped'])} cannot be read or would grow past what "
                              "readers read, so that month's mail stays in the mailbox")
    return result


def archive_pass(clone: Any, server: str, days: float) -> Dict[str, Any]:
    """What ``--archive-days`` and the monitor's daily pass do: archive (receipts folded in), then
    drop from ``server``'s own state ref the entries the archive now holds for it, so state refs
    stay as small as the hot mailbox."""
    from fleet_state import StateChange, StateStore

    result = archive_mailbox(clone, server, days)
    store = StateStore(clone)  # archive_mailbox fetched every state ref, ours included
    own = store.read(server)
    drop = prunable_keys(clone, clone.tip(), server, own.read, own.acks) if own.writable else []
    if drop:
        store.update(server, StateChange(drop=drop))
        result["summary"] += f"; {len(drop)} receipts now kept by the archive left {server}'s state ref"
    result["pruned"] = len(drop)
    return result


def prunable_keys(clone: Any, tip: Optional[str], server: str, read: Iterable[MessageKey],
                  acked: Iterable[MessageKey]) -> List[MessageKey]:
    """Entries ``server`` may drop from its state ref: messages gone from the hot mailbox whose
    archived copy already names ``server`` in ``read_by`` (and, for an acknowledgement, in
    ``acknowledged_by``). Anything else stays: archiving never makes read mail unread."""
    acked = set(acked)
    candidates = set(read) | acked
    if not candidates or tip is None:
        return []
    mailbox = Mailbox(clone)
    hot = {message_key(m) for _, m in valid_messages(mailbox.read(tip)[1], warn=False)}
    candidates -= hot
    done: List[MessageKey] = []
    for path in archive_files(clone, tip) if candidates else ():
        try:
            archived = mailbox.read(tip, path)[1]
        except (MailboxCorrupt, NotAFile):
            continue  # receipts of that month stay in the state ref (the pass said why)
        for _, msg in valid_messages(archived, warn=False):
            key = message_key(msg)
            if key not in candidates or not has_read(msg, server):
                continue
            ackers = msg.get("acknowledged_by") if isinstance(msg.get("acknowledged_by"), list) else []
            if key in acked and server not in [a.lower() for a in ackers if isinstance(a, str)]:
                continue
            done.append(key)
            candidates.discard(key)
    return done


def archived_copies(clone: Any, tip: Optional[str], messages: Iterable[Mapping[str, Any]], *,
                    mailbox: Optional[Mailbox] = None) -> Set[int]:
    """Which of ``messages`` (their ``id()``) the archive holds already: the same message,
    receipts aside, in its month's file (each file read once, through ``mailbox``'s parse cache
    when given; an unreadable one holds nothing). A copy of such a message in the hot mailbox is
    one that came back (a queued retry of a push that had landed, an older tool's merge), never
    new mail; another message under the same id and sender (older tools' ids collided) is not."""
    by_path: Dict[str, List[Mapping[str, Any]]] = {}
    for msg in messages:
        when = message_time(msg)
        if when is not None:
            by_path.setdefault(archive_path(when), []).append(msg)
    found: Set[int] = set()
    mailbox = mailbox or Mailbox(clone)
    for path, msgs in by_path.items() if tip is not None else ():
        try:
            _, data = mailbox.read(tip, path)
        except (MailboxCorrupt, NotAFile):
            continue
        there: Dict[MessageKey, List[Mapping[str, Any]]] = {}
        for _, archived in valid_messages(data, warn=False):
            there.setdefault(message_key(archived), []).append(archived)
        found.update(id(m) for m in msgs if any(_same_message(a, m) for a in there.get(message_key(m), ())))
    return found


def is_archived(clone: Any, tip: Optional[str], msg: Mapping[str, Any], *,
                mailbox: Optional[Mailbox] = None) -> bool:
    """Whether the archive holds ``msg`` already (:func:`archived_copies`)."""
    return id(msg) in archived_copies(clone, tip, [msg], mailbox=mailbox)


def archive_files(clone: Any, tip: Optional[str]) -> List[str]:
    """Archive file paths at ``tip``, newest month first."""
    entries = clone.read_tree(tip, ARCHIVE_DIR)  # an unreadable tree raises: no "no archive"
    names = [e[3] for e in entries or () if e[1] == "blob" and _ARCHIVE_NAME.match(e[3])]
    return [f"{ARCHIVE_DIR}/{n}" for n in sorted(names, reverse=True)]


def find_anywhere(clone: Any, tip: Optional[str], msg_id: str,
                  sender: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A message by id in the mailbox, else in the archive (the id's month first)."""
    mailbox = Mailbox(clone)

    def search(path: str) -> Optional[Dict[str, Any]]:
        try:
            blob, data = mailbox.read(tip, path)
            if blob is None:
                return None
            return find_message(data, msg_id, sender)
        except MailboxCorrupt:
            return None

    found = search(MAILBOX_PATH)
    if found is not None:
        return found
    files = archive_files(clone, tip)
    m = _ID_SECONDS.match(msg_id)
    if m:
        guess = archive_path(_dt.datetime.fromtimestamp(int(m.group(1)), _dt.timezone.utc))
        if guess in files:
            files.remove(guess)
            files.insert(0, guess)
    for path in files:
        found = search(path)
        if found is not None:
            return found
    return None


def archived_keys(clone: Any, tip: Optional[str]) -> List[MessageKey]:
    """Every message key in the archive (for tests and audits)."""
    keys: List[MessageKey] = []
    mailbox = Mailbox(clone)
    for path in archive_files(clone, tip):
        keys.extend(message_key(m) for m in mailbox.read(tip, path)[1]["messages"] if isinstance(m, dict))
    return keys
