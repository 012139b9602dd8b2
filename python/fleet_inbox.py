"""Read the fleet mailbox: list, show, follow a thread, mark read, acknowledge, search, wait.

The code of ``python/inbox.py``: that file is the command, the import name and the
documentation (usage, exit codes, what is read); this module is what it runs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from fleet_cli import ArgumentParser, preview, run_cli, sanitize
from fleet_common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_TEMPFAIL,
    EXIT_USAGE,
    MAX_JSON_DEPTH,
    UsageError,
    datetime_from_epoch,
    default_repo_path,
    defer_logging_setup,
    format_duration,
    get_logger,
    is_valid_server_id,
    json_depth_exceeds,
    parse_timestamp,
    resolve_server_id,
    timestamp_seconds,
    utc_now,
    write_line,
)
from fleet_git import MAILBOX_PATH, BranchMissing, Clone, NotAFile, RemoteUnavailable
from fleet_mailbox import (
    PRIORITIES,
    Mailbox,
    MailboxCorrupt,
    flag,
    is_addressed_to,
    message_key,
    message_time,
    parse_document,
    recipients,
    reply_subject,
    valid_messages,
)
from fleet_secrets import LazyPattern
from fleet_state import (
    LOCAL_FALLBACK_PREFIX,
    MAX_ID_CHARS,
    MAX_NOTE_CHARS,
    REF_PREFIX,
    StateChange,
    StateStore,
)
from fleet_state import has_acknowledged as _has_acknowledged
from fleet_state import has_read as _has_read
from monitor_remote import RemotePoller

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import datetime as _dt
    from typing import Any, Callable, Dict, Final, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union

    from fleet_mailbox import (
        MessageKey,
    )
    from fleet_state import (
        ServerState,
    )

    Msg = Dict[str, Any]

log = get_logger("inbox")  # the command's name, in logs as before

EXIT_UNREAD: Final = 3  # list --count: mail is waiting (hooks and prompts test for it)
EXIT_TIMEOUT: Final = 124  # wait: nothing arrived in time (timeout(1)'s convention)

DEFAULT_POLL_SECONDS: Final = 2.0  # wait: one poll (one git fetch) this often
FIRST_LOOK_SECONDS: Final = 5.0  # the least time wait's network calls get, however short its timeout
LAST_LOOK_SECONDS: Final = 2.0  # the look at the timeout itself may take this long past it
MAX_SUBJECT_CHARS: Final = 1000  # text returned from another machine is cut to these lengths
MAX_BODY_CHARS: Final = 1_000_000
MAX_FIELD_CHARS: Final = 64  # type, priority, timestamp
MAX_RECIPIENTS: Final = 256
MAX_THREAD: Final = 2000  # messages followed in one thread
MAX_SEARCH_WORDS: Final = 20
MAX_WORD_CHARS: Final = 200
MAX_SINCE_DAYS: Final = 36500
LINE_SUBJECT_CHARS: Final = 80  # a subject in a one-line listing

_PRIORITY_RANK: Final = {"urgent": 0, "high": 1, "normal": 2, "low": 3}
# Compiled on first use (fleet_secrets.LazyPattern): a listing needs none of them.
_CONTROL = LazyPattern(r"[\x00-\x1f\x7f]")
_DURATION = LazyPattern(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_DATE_ONLY = LazyPattern(r"^\s*\d{4}-\d{2}-\d{2}\s*$")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ID_SECONDS = LazyPattern(r"^msg_(\d{9,11})_")
# Reply prefixes older tools wrote, "Ack Re:" and "ACK:" included (threads without in_reply_to).
_THREAD_PREFIX = LazyPattern(r"^\s*(?:(?:ack\s*re|ack|re|aw|sv|fw|fwd)\s*(?:\[\d+\])?\s*:\s*)+",
                             re.IGNORECASE)



class AmbiguousId(UsageError):
    """An id that several senders used (older tools' id scheme collided): give the sender."""

    def __init__(self, msg_id: str, senders: Sequence[str]) -> None:
        self.msg_id = msg_id
        self.senders = list(senders)
        shown = ", ".join(sanitize(s, MAX_FIELD_CHARS) for s in self.senders)
        super().__init__(f"id {sanitize(msg_id, 120)} is shared by messages from {shown}; "
                         "say which with --from SENDER")


# --------------------------------------------------------------------------- input checks


def check_message_id(value: Any) -> str:
    """A message id as given by a person or an agent: non-empty text, no control characters."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS \
            or _CONTROL.search(value):
        raise UsageError(f"malformed message id '{sanitize(str(value), 120)}'")
    return value


def _check_sender(value: Optional[str]) -> Optional[str]:
    """A sender to match: compared case-insensitively with ``from`` (older tools wrote free text)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_ID_CHARS \
            or _CONTROL.search(value):
        raise UsageError(f"malformed sender '{sanitize(str(value), 120)}'")
    return value.strip().lower()


def parse_since(value: Union[str, _dt.datetime, None], *, what: str = "--since") -> Optional[_dt.datetime]:
    """A moment from ``2h`` / ``30m`` / ``1d`` / ``45s`` / ``1w`` (that long ago) or an ISO time.

    ISO forms are those :func:`fleet_common.parse_timestamp` reads, and a bare date (midnight
    UTC). Anything else raises :class:`UsageError`.
    """
    if value is None:
        return None
    import datetime as _dt  # only for a moment asked for: not on the start of every command

    if isinstance(value, _dt.datetime):
        return value.replace(tzinfo=_dt.timezone.utc) if value.tzinfo is None else value
    text = str(value)
    m = _DURATION.match(text)
    if m:
        seconds = float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
        if seconds > MAX_SINCE_DAYS * 86400:
            raise UsageError(f"{what} {text[:40]!r}: more than {MAX_SINCE_DAYS} days")
        return utc_now() - _dt.timedelta(seconds=seconds)
    if _DATE_ONLY.match(text):
        text = text.strip() + "T00:00:00Z"
    moment = parse_timestamp(text)
    if moment is None:
        raise UsageError(f"{what} {str(value)[:40]!r}: use a duration such as 30m, 2h, 1d or an "
                         "ISO time such as 2025-11-04T08:00:00Z")
    return moment


def _check_limit(limit: Optional[int]) -> Optional[int]:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"--limit must be a positive number, not {limit!r}")
    return limit


def _check_priority(priority: Optional[str]) -> Optional[str]:
    if priority is None:
        return None
    prio = str(priority).strip().lower()
    if prio not in PRIORITIES:
        raise UsageError(f"invalid priority {str(priority)[:40]!r}: use one of {', '.join(PRIORITIES)}")
    return prio


# --------------------------------------------------------------------------- the message shape


def _bounded(value: Any, limit: int) -> Optional[str]:
    return value[:limit] if isinstance(value, str) else None


def _priority(msg: Mapping[str, Any]) -> str:
    value = msg.get("priority")
    return value.strip().lower()[:MAX_FIELD_CHARS] if isinstance(value, str) and value.strip() else "normal"


def _type(msg: Mapping[str, Any]) -> str:
    value = msg.get("type")
    return value.strip().lower()[:MAX_FIELD_CHARS] if isinstance(value, str) and value.strip() else "info"


def _reply_target(msg: Mapping[str, Any]) -> Optional[str]:
    value = msg.get("in_reply_to")
    return value if isinstance(value, str) and value and len(value) <= MAX_ID_CHARS else None


def _when(msg: Mapping[str, Any]) -> float:
    """Epoch seconds for sorting; a missing or unparseable timestamp is oldest (PROTOCOL.md)."""
    seconds = timestamp_seconds(msg.get("timestamp"))
    return seconds if seconds is not None else float("-inf")


def message_view(msg: Mapping[str, Any], server: str, states: Mapping[str, ServerState], *,
                 archived: bool = False, body: bool = False) -> Msg:
    """The one JSON shape of a message for readers (CLI ``--json``, the MCP server, fleet status).

    ``read`` and ``acknowledged`` are by ``server`` (legacy mailbox fields or its state ref);
    ``priority`` and ``type`` are lower-case with the protocol's defaults for a missing value;
    ``timestamp`` is as written. Text is cut to bounded lengths; a cut body adds
    ``"truncated": true``.
    """
    to = msg.get("to")
    if isinstance(to, list):
        shown_to: Any = [_bounded(item, MAX_ID_CHARS) for item in to[:MAX_RECIPIENTS]]
    else:
        shown_to = _bounded(to, MAX_ID_CHARS)
    view: Msg = {
        "id": _bounded(msg.get("id"), MAX_ID_CHARS),
        "from": _bounded(msg.get("from"), MAX_ID_CHARS),
        "to": shown_to,
        "subject": _bounded(msg.get("subject"), MAX_SUBJECT_CHARS),
        "type": _type(msg),
        "priority": _priority(msg),
        "timestamp": _bounded(msg.get("timestamp"), MAX_FIELD_CHARS),
        "in_reply_to": _reply_target(msg),
        "ack_required": flag(msg.get("ack_required")),
        "auto": flag(msg.get("auto")),
        "read": _has_read(msg, server, states),
        "acknowledged": _has_acknowledged(msg, server, states),
        "archived": archived,
    }
    if body:
        text = msg.get("body")
        text = text if isinstance(text, str) else ("" if text is None else str(text)[:MAX_BODY_CHARS])
        view["body"] = text[:MAX_BODY_CHARS]
        if len(text) > MAX_BODY_CHARS:
            view["truncated"] = True
    return view


def _list_order(entry: "Found") -> Tuple[int, float, int]:
    """Most urgent first, then oldest first, then mailbox order."""
    return (_PRIORITY_RANK.get(_priority(entry.msg), _PRIORITY_RANK["normal"]), _when(entry.msg), entry.order)


def _time_order(entry: "Found") -> Tuple[float, int]:
    return (_when(entry.msg), entry.order)


class Found:
    """One message as read, with where it came from and its place for stable sorting."""

    __slots__ = ("msg", "archived", "order")

    def __init__(self, msg: Dict[str, Any], archived: bool, order: int) -> None:
        self.msg = msg
        self.archived = archived
        self.order = order


# --------------------------------------------------------------------------- threads


def thread_subject(subject: Any) -> str:
    """A subject without ``Re:``/``Ack Re:``/``ACK:`` (and ``Fwd:`` ...) prefixes, case-folded."""
    text = subject if isinstance(subject, str) else ""
    return " ".join(_THREAD_PREFIX.sub("", text[:MAX_SUBJECT_CHARS]).split()).casefold()


def _is_legacy_reply(msg: Mapping[str, Any]) -> bool:
    """An answer written by an older tool: a reply prefix but no ``in_reply_to``."""
    subject = msg.get("subject")
    return (_reply_target(msg) is None and isinstance(subject, str)
            and _THREAD_PREFIX.match(subject[:MAX_SUBJECT_CHARS]) is not None)


def _sender(msg: Mapping[str, Any]) -> str:
    return str(msg.get("from", "")).strip().lower()


def _includes(msg: Mapping[str, Any], server: str) -> bool:
    """``server`` sent ``msg`` or is among its recipients (a broadcast includes everyone)."""
    if _sender(msg) == server:
        return True
    rcpt = recipients(msg)
    return rcpt is None or server in rcpt


def _same_conversation(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Each one's sender takes part in the other: how older tools' answers are matched up."""
    return _includes(b, _sender(a)) and _includes(a, _sender(b))


# --------------------------------------------------------------------------- the inbox


class Inbox:
    """One server's view of the shared mailbox, read from the fetched branch and the state refs."""

    def __init__(self, repo: Optional[str] = None, server: Optional[str] = None,
                 branch: Optional[str] = None, *, clone: Optional[Clone] = None) -> None:
        self.server = resolve_server_id(server)
        self.clone = clone if clone is not None else Clone(repo or default_repo_path(), branch)
        self.store = StateStore(self.clone)
        self.mailbox = Mailbox(self.clone)
        self.poller = RemotePoller(self.clone, self.server, self.store, one_shot=True, discover_own_state=True)

    # ----------------------------------------------------------------- fetching and reading

    def _sync_fleet(self) -> None:
        """The shared branch and every server's state ref in one ``git fetch``
        (:meth:`StateStore.mirror_fleet`), for what needs other servers' receipts (:meth:`acks`)."""
        if self.store.mirror_fleet(first=[self.server]) is None:
            raise BranchMissing(self.clone.branch, ["git", "fetch", "origin", self.clone.branch], None)

    def _state_servers(self, named: Set[str]) -> List[str]:
        """After :meth:`_sync_fleet`: the servers that have a state ref, at most
        ``MAX_STATE_SERVERS``, this one, then the ``named`` ones (and their refs), first."""
        self.store.fetch_named([self.server], named)
        servers = sorted(set(self.store.mirrored(first=[self.server], then=named).values()))
        if self.store.left_out:
            log.warning("the remote holds the state refs of %d servers; %d of them are not read",
                        len(servers) + self.store.left_out, self.store.left_out)
        return servers

    def _refresh(self) -> None:
        """The shared branch and this server's own state ref, brought up to date: one ``git
        fetch`` of both by their exact names (:meth:`RemotePoller.poll`, the monitor's poll), or,
        while this clone mirrors no state ref of its own, a listing of the remote first (another
        clone of this server, its monitor's say, may have written one)."""
        self.poller.poll()

    def _states(self, servers: Optional[Iterable[str]] = None) -> Dict[str, ServerState]:
        names = {self.server} | set(servers or ())
        return self.store.read_all(sorted(names))

    def _hot(self) -> List[Found]:
        """Valid messages of the hot mailbox at the fetched tip (invalid entries are the monitor's
        to report; here they are skipped quietly)."""
        blob, raw = self.clone.read_file(self.clone.tip(), MAILBOX_PATH)
        try:
            data = self.mailbox.parse(raw, blob)
        except RecursionError:
            raise MailboxCorrupt(blob, "nested too deeply") from None
        return [Found(msg, False, pos) for pos, msg in valid_messages(data, warn=False)]

    def _archive_files(self) -> List[str]:
        from fleet_archive import archive_files

        return archive_files(self.clone, self.clone.tip())

    def _archive_file(self, path: str, base: int) -> List[Found]:
        """One archive file's valid messages; a file that does not parse is skipped with a warning."""
        try:
            blob, raw = self.clone.read_file(self.clone.tip(), path)
        except NotAFile as exc:  # a folder there, or more than the suite reads
            log.warning("archive file %s cannot be read (%s); its messages are skipped", path, exc.reason,
                        extra={"metadata": {"path": path, "blob": exc.oid}})
            return []
        if raw is None:
            return []
        try:
            if json_depth_exceeds(raw, MAX_JSON_DEPTH):
                raise MailboxCorrupt(blob, f"nests deeper than {MAX_JSON_DEPTH} levels")
            data = parse_document(raw, blob)
        except MailboxCorrupt:
            log.warning("archive file %s does not parse; its messages are skipped", path,
                        extra={"metadata": {"path": path, "blob": blob}})
            return []
        return [Found(msg, True, base + pos) for pos, msg in valid_messages(data, warn=False)]

    def _messages(self, include_archive: bool) -> List[Found]:
        """The hot mailbox, then (when asked) every archive file, each read once; a message
        present twice (same id and sender) is kept once, the hot copy first."""
        found = self._hot()
        if not include_archive:
            return found
        seen: Set[MessageKey] = {message_key(f.msg) for f in found}
        # Archived mail sorts before hot mail of the same moment: it is older by construction.
        base = -(1 << 40)
        for path in reversed(self._archive_files()):  # oldest month first
            for entry in self._archive_file(path, base):
                key = message_key(entry.msg)
                if key not in seen:
                    seen.add(key)
                    found.append(entry)
            base += 1 << 30
        return found

    def _with_id(self, msg_id: str) -> List[Found]:
        """Messages with this id: the hot mailbox, else the archive (the id's month first)."""
        hot = [f for f in self._hot() if f.msg["id"] == msg_id]
        if hot:
            return hot
        from fleet_archive import archive_path

        files = self._archive_files()
        m = _ID_SECONDS.match(msg_id)
        if m:
            try:
                guess = archive_path(datetime_from_epoch(int(m.group(1))))
            except (OverflowError, OSError, ValueError):
                guess = ""
            if guess in files:
                files.remove(guess)
                files.insert(0, guess)
        for path in files:
            matches = [f for f in self._archive_file(path, 0) if f.msg["id"] == msg_id]
            if matches:
                return matches
        return []

    def _locate(self, msg_id: str, sender: Optional[str]) -> Found:
        """The one message with this id (and sender); unknown or ambiguous ids are bad input."""
        msg_id = check_message_id(msg_id)
        wanted = _check_sender(sender)
        found = self._with_id(msg_id)
        if not found:
            raise UsageError(f"no message with id {sanitize(msg_id, 120)} in the mailbox or its archive")
        if wanted is not None:
            found = [f for f in found if _sender(f.msg) == wanted]
            if not found:
                raise UsageError(f"no message with id {sanitize(msg_id, 120)} from "
                                 f"{sanitize(wanted, MAX_FIELD_CHARS)}")
        senders = sorted({_sender(f.msg) for f in found})
        if len(senders) > 1:
            raise AmbiguousId(msg_id, senders)
        return found[-1]

    def _view(self, entry: Found, states: Mapping[str, ServerState], *, body: bool = False) -> Msg:
        return message_view(entry.msg, self.server, states, archived=entry.archived, body=body)

    def _mark(self, keys: Iterable[MessageKey]) -> int:
        """Record these (unread) messages as read in this server's state ref; how many."""
        keys = list(dict.fromkeys(keys))
        if keys:
            self.store.update(self.server, StateChange(read=keys))
        return len(keys)

    # ----------------------------------------------------------------- commands

    def unread(self, *, include_read: bool = False, since: Union[str, _dt.datetime, None] = None,
               sender: Optional[str] = None, priority: Optional[str] = None, limit: Optional[int] = None,
               include_archive: bool = False, bodies: bool = False) -> Dict[str, Any]:
        """Mail addressed to this server that it has not read (all of it with ``include_read``),
        most urgent first, then oldest first. ``priority`` keeps that priority and more urgent
        ones; ``count`` is every match, ``messages`` at most ``limit`` of them. Marks nothing."""
        moment = parse_since(since)
        wanted = _check_sender(sender)
        prio = _check_priority(priority)
        limit = _check_limit(limit)
        self._refresh()
        states = self._states()
        cutoff = moment.timestamp() if moment is not None else None
        matches = []
        for entry in self._messages(include_archive):
            msg = entry.msg
            if not is_addressed_to(msg, self.server):
                continue
            if wanted is not None and _sender(msg) != wanted:
                continue
            if prio is not None and _PRIORITY_RANK.get(_priority(msg), _PRIORITY_RANK["normal"]) > _PRIORITY_RANK[prio]:
                continue
            if cutoff is not None and _when(msg) < cutoff:
                continue
            if not include_read and _has_read(msg, self.server, states):
                continue
            matches.append(entry)
        matches.sort(key=_list_order)
        shown = matches[:limit] if limit is not None else matches
        return {"server": self.server, "count": len(matches),
                "messages": [self._view(e, states, body=bodies) for e in shown]}

    def get(self, msg_id: str, sender: Optional[str] = None, *, peek: bool = False) -> Dict[str, Any]:
        """One message in full, from the hot mailbox or the archive; marks it read unless ``peek``
        (only mail addressed to this server is ever marked)."""
        check_message_id(msg_id)
        self._refresh()
        entry = self._locate(msg_id, sender)
        states = self._states()
        if not peek and is_addressed_to(entry.msg, self.server) \
                and not _has_read(entry.msg, self.server, states):
            self._mark([message_key(entry.msg)])
            states = self._states()
        return {"message": self._view(entry, states, body=True)}

    def thread(self, msg_id: str, sender: Optional[str] = None) -> Dict[str, Any]:
        """The conversation ``msg_id`` belongs to, oldest first, with bodies.

        Linked by ``in_reply_to`` up to the root and down to every answer (an id names every
        message that has it). Answers written by older tools (a ``Re:``/``Ack Re:``/``ACK:``
        subject without ``in_reply_to``) are joined by subject and participants, and so is the
        message they answer; the result then says ``inferred``.
        """
        check_message_id(msg_id)
        wanted = _check_sender(sender)
        self._refresh()
        entries = self._messages(include_archive=True)
        by_id: Dict[str, List[int]] = {}
        answers: Dict[str, List[int]] = {}
        for index, entry in enumerate(entries):
            by_id.setdefault(entry.msg["id"], []).append(index)
            parent = _reply_target(entry.msg)
            if parent is not None:
                answers.setdefault(parent, []).append(index)
        starts = [i for i in by_id.get(msg_id, []) if wanted is None or _sender(entries[i].msg) == wanted]
        if not starts:
            self._locate(msg_id, sender)  # raises the error show gives (unknown id, other sender)
        members: Set[int] = set()

        def link(first: Iterable[int]) -> None:
            stack = list(first)
            while stack and len(members) < MAX_THREAD:
                index = stack.pop()
                if index in members:
                    continue
                members.add(index)
                msg = entries[index].msg
                parent = _reply_target(msg)
                if parent is not None:
                    stack.extend(by_id.get(parent, ()))
                stack.extend(answers.get(msg["id"], ()))

        link(starts)
        inferred = self._infer(entries, members, link)
        ordered = sorted((entries[i] for i in members), key=_time_order)
        root = self._thread_root(entries, by_id, starts[0], members, inferred, ordered)
        states = self._states()
        return {"root": root, "inferred": inferred,
                "messages": [self._view(e, states, body=True) for e in ordered]}

    @staticmethod
    def _infer(entries: List[Found], members: Set[int], link: Callable[[Iterable[int]], None]) -> bool:
        """Join answers that older tools wrote without ``in_reply_to``; whether any was joined.

        A message without ``in_reply_to`` joins when its subject (without reply prefixes) is a
        member's, each one's sender takes part in the other, and one of the two is such a legacy
        answer (so two unrelated conversations on one subject never merge through their roots).
        Each pair is looked at once: the cost is bounded by the messages that share a subject.
        """
        topics: Dict[int, str] = {}
        by_topic: Dict[str, List[int]] = {}
        for index, entry in enumerate(entries):
            if index in members or _reply_target(entry.msg) is None:
                topic = thread_subject(entry.msg.get("subject"))
                topics[index] = topic
                if index not in members and topic:
                    group = by_topic.setdefault(topic, [])
                    if len(group) < MAX_THREAD:
                        group.append(index)
        inferred = False
        pending = list(members)
        while pending and len(members) < MAX_THREAD:
            known_index = pending.pop()
            known = entries[known_index].msg
            topic = topics.get(known_index)
            if topic is None:
                topic = topics[known_index] = thread_subject(known.get("subject"))
            for index in by_topic.get(topic, ()):
                msg = entries[index].msg
                if index in members or not _same_conversation(msg, known):
                    continue
                if _is_legacy_reply(msg) or _is_legacy_reply(known):
                    before = set(members)
                    link([index])
                    pending.extend(members - before)
                    inferred = True
        return inferred

    @staticmethod
    def _thread_root(entries: List[Found], by_id: Mapping[str, List[int]], start: int,
                     members: Set[int], inferred: bool, ordered: List[Found]) -> str:
        """The id at the top of the ``in_reply_to`` chain; for an inferred thread, the oldest
        message that answers nothing (preferring a subject without a reply prefix)."""
        if inferred:
            tops = [e for e in ordered if not any(i in members for i in by_id.get(_reply_target(e.msg) or "", ()))]
            plain = [e for e in tops if not _is_legacy_reply(e.msg)]
            return str((plain or tops or ordered)[0].msg["id"])
        current, seen = start, {start}
        while True:
            parents = [i for i in by_id.get(_reply_target(entries[current].msg) or "", ()) if i in members]
            if not parents or parents[0] in seen:
                return str(entries[current].msg["id"])
            current = parents[0]
            seen.add(current)

    def mark_read(self, ids: Iterable[str] = (), *, all: bool = False,
                  before: Union[str, _dt.datetime, None] = None) -> Dict[str, Any]:
        """Record mail as read in this server's state ref: these ids (every message addressed to
        this server that has one), or with ``all`` every unread message (older than ``before``).
        Any unknown id is bad input and nothing is marked."""
        wanted = [check_message_id(i) for i in ids]
        if all and wanted:
            raise UsageError("give message ids or --all, not both")
        if not all and not wanted:
            raise UsageError("give message ids to mark read, or --all")
        if before is not None and not all:
            raise UsageError("--before goes with --all")
        moment = parse_since(before, what="--before")
        self._refresh()
        states = self._states()
        if all:
            keys = self._unread_keys(states, moment.timestamp() if moment is not None else None)
        else:
            keys = self._keys_to_mark(wanted, states)
        return {"marked": self._mark(keys)}

    def _unread_keys(self, states: Dict[str, ServerState], cutoff: Optional[float]) -> List[MessageKey]:
        """Every unread message addressed to this server (older than ``cutoff``, when given)."""
        return [message_key(entry.msg) for entry in self._hot()
                if is_addressed_to(entry.msg, self.server) and not _has_read(entry.msg, self.server, states)
                and (cutoff is None or _when(entry.msg) < cutoff)]

    def _keys_to_mark(self, wanted: Sequence[str], states: Dict[str, ServerState]) -> List[MessageKey]:
        """The unread copies of these ids addressed to this server; an id that names no message,
        or none addressed here, is bad input."""
        keys: List[MessageKey] = []
        for msg_id in dict.fromkeys(wanted):
            found = self._with_id(msg_id)
            if not found:
                raise UsageError(f"no message with id {sanitize(msg_id, 120)} in the mailbox or its archive")
            mine = [f for f in found if is_addressed_to(f.msg, self.server)]
            if not mine:
                raise UsageError(f"message {sanitize(msg_id, 120)} is not addressed to {self.server}")
            keys.extend(message_key(f.msg) for f in mine if not _has_read(f.msg, self.server, states))
        return keys

    def acknowledge(self, msg_id: str, sender: Optional[str] = None, *, note: Optional[str] = None,
                    message: bool = True) -> Dict[str, Any]:
        """Record that this server acted on a message (with ``note``) and, unless ``message`` is
        false, send its sender a short ``type: ack`` answer. Acknowledging twice records and
        sends nothing the second time. ``reply`` is the answer's send result, or ``None``."""
        check_message_id(msg_id)
        if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE_CHARS):
            raise UsageError(f"--note must be text of at most {MAX_NOTE_CHARS} characters")
        self._refresh()
        entry = self._locate(msg_id, sender)
        msg = entry.msg
        if not is_addressed_to(msg, self.server):
            raise UsageError(f"message {msg['id'][:120]} is not addressed to {self.server}")
        states = self._states()
        already = _has_acknowledged(msg, self.server, states)
        reply = None
        if not already:
            ack: Dict[str, Any] = {"id": msg["id"], "from": _sender(msg)}
            if note:
                ack["note"] = note
            # Decided where the state ref is written (under its lease): of two acknowledgements
            # at once, only the one that recorded it sends the answer.
            already = not self.store.update(self.server, StateChange(acks=[ack]))
            states = self._states()
            if message and not already:
                reply = self._send_ack(msg, note).to_dict()
        return {"acknowledged": self._view(entry, states), "reply": reply,
                "already_acknowledged": already}

    def _send_ack(self, msg: Mapping[str, Any], note: Optional[str]):
        from auto_reply import render_ack
        from fleet_send import send_message

        body = render_ack(self.server, msg.get("subject"))
        if note:
            body += f"\nNote: {note}"
        # type "ack" is never answered automatically (auto_reply), so this cannot start a loop.
        return send_message(body, reply_subject(msg.get("subject")), to=_sender(msg), msg_type="ack",
                            from_sender=self.server, reply_to=msg["id"], clone=self.clone)

    def acks(self) -> Dict[str, Any]:
        """What this server owes (mail to it that requires an acknowledgement it has not given)
        and what it is owed (its own such mail: who acknowledged, who not yet, for how long).
        A broadcast waits on every server that has a state ref or has read it; a recipient that
        retired (``message_monitor.py --retire``) is listed apart, never waited on."""
        self._sync_fleet()
        hot = self._hot()
        mine = [e for e in hot if _sender(e.msg) == self.server and flag(e.msg.get("ack_required"))]
        wanted: Set[str] = {self.server}
        broadcast = False
        for entry in mine:
            rcpt = recipients(entry.msg)
            if rcpt is None:
                broadcast = True
            else:
                wanted |= rcpt
        everyone = set(self._state_servers(wanted))
        if broadcast:
            wanted |= everyone
        states = self._states(wanted)
        owed = [e for e in hot if is_addressed_to(e.msg, self.server)
                and flag(e.msg.get("ack_required")) and not _has_acknowledged(e.msg, self.server, states)]
        owed.sort(key=_list_order)
        now = time.time()
        owed_to_me = []
        for entry in sorted(mine, key=_time_order):
            msg = entry.msg
            rcpt = recipients(msg)
            if rcpt is None:
                rcpt = (everyone | set(_names(msg.get("read_by"))) | set(_names(msg.get("acknowledged_by"))))
            rcpt = {s for s in rcpt if s != self.server}
            done = sorted(s for s in rcpt if _has_acknowledged(msg, s, states))
            gone = sorted(s for s in rcpt - set(done) if s in states and states[s].is_retired())
            when = message_time(msg)
            owed_to_me.append({
                "message": self._view(entry, states),
                "acknowledged_by": done,
                "waiting_on": sorted(rcpt - set(done) - set(gone)),
                "retired": gone,
                "age_seconds": round(now - when.timestamp(), 1) if when is not None else None,
            })
        return {"owed": [self._view(e, states) for e in owed], "owed_to_me": owed_to_me}

    def search(self, words: Sequence[str], *, include_archive: bool = False, limit: Optional[int] = None,
               bodies: bool = False) -> Dict[str, Any]:
        """This server's correspondence (mail to it or from it) whose subject, body and sender
        together hold every word (case-insensitive), newest first."""
        if isinstance(words, str):
            words = words.split()
        terms = [w.casefold() for w in words if isinstance(w, str) and w.strip()]
        if not terms:
            raise UsageError("give at least one word to search for")
        if len(terms) > MAX_SEARCH_WORDS or any(len(t) > MAX_WORD_CHARS for t in terms):
            raise UsageError(f"search for at most {MAX_SEARCH_WORDS} words of at most "
                             f"{MAX_WORD_CHARS} characters")
        limit = _check_limit(limit)
        self._refresh()
        states = self._states()
        hits = []
        for entry in self._messages(include_archive):
            msg = entry.msg
            if _sender(msg) != self.server and not is_addressed_to(msg, self.server):
                continue
            text = " ".join(str(msg.get(field) or "") for field in ("subject", "body", "from")).casefold()
            if all(term in text for term in terms):
                hits.append(entry)
        hits.sort(key=lambda e: (_when(e.msg), e.order), reverse=True)
        shown = hits[:limit] if limit is not None else hits
        return {"count": len(hits), "messages": [self._view(e, states, body=bodies) for e in shown]}

    def wait(self, *, timeout: Optional[float] = None, reply_to: Optional[str] = None,
             poll_seconds: float = DEFAULT_POLL_SECONDS, peek: bool = False,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             max_body_chars: Optional[int] = None) -> Dict[str, Any]:
        """Block until unread mail addressed to this server is there (with ``reply_to``: an
        answer to that message, read or not), or ``timeout`` seconds pass (``None``: no limit).

        Mail already waiting counts, so nothing that lands between a ``list`` and a ``wait`` is
        missed. What arrives is returned with bodies and marked read unless ``peek``; with
        ``max_body_chars``, only the messages whose views (as compact JSON) fit in that many
        characters together, at most :data:`MAX_TAKEN` (the first always, its body cut to half of
        it: ``"truncated": true``), and ``"more"`` says how many arrived that were left for a later
        call, unread. Polls with
        one ``git fetch`` (:meth:`_refresh`) every ``poll_seconds``; a
        failing poll after the first is retried (the remote may come back before the timeout).
        """
        _check_wait(timeout, poll_seconds, reply_to)
        deadline = None if timeout is None else clock() + timeout
        # No network call waits past the timeout either (a slow or hung remote); the first look
        # has at least FIRST_LOOK_SECONDS, so "--timeout 0" still looks once.
        self.clone.network_deadline = (None if timeout is None else time.monotonic()
                                       + max(timeout + LAST_LOOK_SECONDS, FIRST_LOOK_SECONDS))
        try:
            try:
                self._refresh()
            except RemoteUnavailable:
                if deadline is None or deadline - clock() > 0:
                    raise  # the remote cannot be reached: say so now, not at the timeout
                return {"arrived": False, "messages": []}
            question = None
            if reply_to is not None:
                asked = self._with_id(reply_to)
                if not asked:
                    raise UsageError(f"no message with id {reply_to[:120]} to wait for an answer to")
                question = asked[-1].msg
                if asked[-1].archived:  # its answers may be archived too: looked for there once
                    found = self._arrived(reply_to, question, include_archive=True)
                    if found:
                        self.clone.network_deadline = None
                        return {"arrived": True, "messages": self._take(found, peek, max_body_chars)}
            looked_at: Optional[Tuple[Optional[str], Tuple[str, ...]]] = None
            warned = False
            while True:
                state = (self.clone.tip(), self._own_state_tips())
                if state != looked_at:
                    looked_at = state
                    arrived = self._arrived(reply_to, question)
                    if arrived:
                        # The read mark's push gets its own limit: cut short, it could land
                        # unseen and leave mail read that was never returned.
                        self.clone.network_deadline = None
                        taken = self._take(arrived, peek, max_body_chars)
                        result: Dict[str, Any] = {"arrived": True, "messages": taken}
                        if len(taken) < len(arrived):
                            result["more"] = len(arrived) - len(taken)
                        return result
                remaining = None if deadline is None else deadline - clock()
                if remaining is not None and remaining <= 0:
                    return {"arrived": False, "messages": []}
                sleep(poll_seconds if remaining is None else min(poll_seconds, remaining))
                warned = self._refresh_while_waiting(warned, ended=lambda: deadline is not None
                                                     and deadline - clock() <= 0)
        finally:
            self.clone.network_deadline = None

    def _take(self, arrived: List[Found], peek: bool, max_body_chars: Optional[int] = None) -> List[Dict[str, Any]]:
        """What ``wait`` returns: the views with bodies (within ``max_body_chars``, see
        :meth:`wait`), marked read first unless ``peek``; what does not fit stays unread."""
        states = self._states()
        views = [self._view(e, states, body=True) for e in arrived]
        if max_body_chars is not None:  # the whole view counts, not only its body
            if len(views[0]["body"]) > max_body_chars // 2:
                views[0]["body"] = views[0]["body"][:max_body_chars // 2]
                views[0]["truncated"] = True
            kept, room = 1, max_body_chars - _json_chars(views[0])
            while kept < min(len(views), MAX_TAKEN) and _json_chars(views[kept]) <= room:
                room -= _json_chars(views[kept])
                kept += 1
            arrived, views = arrived[:kept], views[:kept]
        if not peek:
            self._mark([message_key(e.msg) for e in arrived if not _has_read(e.msg, self.server, states)])
            for view in views:
                view["read"] = True  # what wait takes is mail to this server
        return views

    def _refresh_while_waiting(self, warned: bool, ended: Callable[[], bool] = lambda: False) -> bool:
        """Poll again; a remote that does not answer is said once, then retried; not when the
        wait's own timeout (``ended``) cut the poll short. Returns whether it has been said."""
        try:
            self._refresh()
        except RemoteUnavailable as exc:
            if not warned and not ended():
                log.warning("waiting for mail: the remote did not answer (%s); still trying", exc.reason)
            return True
        return warned

    def _own_state_tips(self) -> Tuple[str, ...]:
        """This server's state ref tips as last fetched (another process of it may mark mail read)."""
        mirrors = (self.store.local_tip(REF_PREFIX + self.server),
                   self.store.local_tip(LOCAL_FALLBACK_PREFIX + self.server))
        return tuple(tip for tip in mirrors if tip)

    def _arrived(self, reply_to: Optional[str], question: Optional[Mapping[str, Any]] = None, *,
                 include_archive: bool = False) -> List[Found]:
        """Unread mail for this server; with ``reply_to``, the answers to ``question``: only from a
        server it was sent to, or its sender (anyone may answer a broadcast)."""
        states = self._states()
        answerers = _answerers(question) if question is not None else None
        found = []
        for entry in self._messages(include_archive) if include_archive else self._hot():
            msg = entry.msg
            if not is_addressed_to(msg, self.server):
                continue
            if reply_to is not None:
                if _reply_target(msg) == reply_to and (answerers is None or _sender(msg) in answerers):
                    found.append(entry)
            elif not _has_read(msg, self.server, states):
                found.append(entry)
        found.sort(key=_list_order if reply_to is None else _time_order)
        return found


MAX_TAKEN: Final = 50  # messages one bounded wait returns at most (the rest waits for the next)


def _json_chars(view: Mapping[str, Any]) -> int:
    return len(json.dumps(view, ensure_ascii=False, separators=(",", ":")))


def _answerers(question: Mapping[str, Any]) -> Optional[Set[str]]:
    """Who may answer ``question``: the servers it went to and its sender; ``None`` (anyone)
    for a broadcast. Any member can set ``in_reply_to``: an answer from a server that was not
    asked is mail like any other, not the answer."""
    addressees = recipients(question)
    return None if addressees is None else addressees | {_sender(question)}


def _check_wait(timeout: Optional[float], poll_seconds: float, reply_to: Optional[str]) -> None:
    if timeout is not None and timeout < 0:
        raise UsageError("--timeout must not be negative")
    if not poll_seconds > 0:
        raise UsageError("the poll interval must be positive")
    if reply_to is not None:
        check_message_id(reply_to)


def _names(value: Any) -> List[str]:
    """Valid server ids in a legacy list field (``read_by``, ``acknowledged_by``)."""
    if not isinstance(value, list):
        return []
    return [v.strip().lower() for v in value[:MAX_RECIPIENTS] if is_valid_server_id(v)]


# --------------------------------------------------------------------------- terminal text


def _to_text(to: Any) -> str:
    return ", ".join(str(t) for t in to) if isinstance(to, list) else str(to)


def render_line(view: Mapping[str, Any]) -> str:
    """One line for a listing: unread mark, priority, time, sender, id, subject, flags."""
    mark = " " if view.get("read") else "*"
    flags = ""
    if view.get("ack_required") and not view.get("acknowledged"):
        flags += "  [ack required]"
    if view.get("archived"):
        flags += "  [archived]"
    subject = view.get("subject")
    return (f"{mark} {sanitize(view.get('priority') or 'normal', 8).upper():<6} "
            f"{sanitize(view.get('timestamp') or '?', 32):<20} "
            f"{sanitize(view.get('from') or '?', 32):<12} {sanitize(view.get('id'), 80)}  "
            f"{preview(subject, LINE_SUBJECT_CHARS) if subject else '(no subject)'}{flags}")


def _body_lines(text: str, indent: str = "") -> List[str]:
    """The body as it was written, line by line, every control character made inert."""
    return [indent + sanitize(line) for line in text.splitlines()] or [indent]


def render_full(view: Mapping[str, Any]) -> str:
    """A message in full for a terminal: headers, then the body."""
    lines = [
        f"From:     {sanitize(view.get('from'), MAX_ID_CHARS)}",
        f"To:       {sanitize(_to_text(view.get('to')), 2 * MAX_ID_CHARS)}",
        f"Subject:  {sanitize(view.get('subject') or '(no subject)', MAX_SUBJECT_CHARS)}",
        f"Date:     {sanitize(view.get('timestamp') or '(none)', MAX_FIELD_CHARS)}",
        f"Id:       {sanitize(view.get('id'), MAX_ID_CHARS)}",
        f"Type:     {sanitize(view.get('type'), MAX_FIELD_CHARS)}    Priority: "
        f"{sanitize(view.get('priority'), MAX_FIELD_CHARS)}",
    ]
    if view.get("in_reply_to"):
        lines.append(f"Re:       {sanitize(view['in_reply_to'], MAX_ID_CHARS)}")
    state = "read" if view.get("read") else "unread"
    if view.get("ack_required"):
        state += ", acknowledged" if view.get("acknowledged") else ", acknowledgement required"
    if view.get("archived"):
        state += ", archived"
    lines.append(f"Status:   {state}")
    lines.append("")
    lines.extend(_body_lines(str(view.get("body") or "")))
    if view.get("truncated"):
        lines.append(f"[body cut at {MAX_BODY_CHARS} characters]")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

_VALUE_OPTIONS: Final = frozenset({"--repo", "--server", "--branch", "--since", "--from", "--priority",
                                   "--limit", "--before", "--note", "--timeout", "--reply-to"})


def _list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="read mail too")
    p.add_argument("--since", default=None, metavar="2h|ISO", help="only mail newer than this")
    p.add_argument("--from", dest="sender", default=None, metavar="ID", help="only mail from this sender")
    p.add_argument("--priority", default=None, metavar="P", help="only this priority and more urgent ones")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="show at most N messages")
    p.add_argument("--include-archive", action="store_true", help="read the archive too")
    p.add_argument("--bodies", action="store_true", help="include message bodies")
    p.add_argument("--count", action="store_true",
                   help="print the number only; exit 3 when it is not zero, 0 when it is")


def _show_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("--from", dest="sender", default=None, metavar="SENDER",
                   help="the sender, when two senders used the same id")
    p.add_argument("--peek", action="store_true", help="do not mark it read")


def _thread_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("--from", dest="sender", default=None, metavar="SENDER")


def _mark_read_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", metavar="ID")
    p.add_argument("--all", action="store_true", help="every unread message")
    p.add_argument("--before", default=None, metavar="2h|ISO", help="with --all: only mail older than this")


def _ack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("id")
    p.add_argument("--from", dest="sender", default=None, metavar="SENDER")
    p.add_argument("--note", default=None, help="what was done (kept with the acknowledgement)")
    p.add_argument("--no-message", action="store_true", help="do not send the sender an ack message")


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("words", nargs="+", metavar="WORD")
    p.add_argument("--include-archive", action="store_true", help="search the archive too")
    p.add_argument("--limit", type=int, default=None, metavar="N")
    p.add_argument("--bodies", action="store_true", help="include message bodies")


def _wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, metavar="SEC", help="give up after SEC (exit 124)")
    p.add_argument("--reply-to", default=None, metavar="ID", help="wait for an answer to this message")
    p.add_argument("--peek", action="store_true", help="do not mark what arrives read")


# Each command: its help line and what adds its own arguments.
_COMMAND_ARGS: Final = (
    ("list", "unread mail, most urgent first (the default)", _list_args),
    ("show", "one message in full (marks it read)", _show_args),
    ("thread", "the conversation a message belongs to", _thread_args),
    ("mark-read", "mark messages read", _mark_read_args),
    ("ack", "acknowledge a message (you acted on it)", _ack_args),
    ("acks", "acknowledgements owed by and to this server", lambda p: None),
    ("search", "search mail to and from this server", _search_args),
    ("wait", "wait for mail (or an answer) to arrive", _wait_args),
)
COMMANDS: Final = tuple(name for name, _help, _add in _COMMAND_ARGS)


def _parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; with ``only`` (the command that was named), just that command:
    building all eight parsers costs more than a listing's own work. ``inbox.py -h`` builds all."""
    common = ArgumentParser(add_help=False)
    common.add_argument("--repo", default=None, help="fleet clone (default: $BUILD_REPO_PATH or K:/Projects/Build)")
    common.add_argument("--server", default=None, help="this server's id (default: $SERVER_ID or code2)")
    common.add_argument("--branch", default=None, help="shared branch (default: the remote's default)")
    as_json = ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON object")

    parser = ArgumentParser(
        prog="inbox.py", description="Read this server's mail in the fleet mailbox.",
        epilog="Exit codes: 0 done, 1 failure, 2 bad usage or input, 3 list --count: mail waiting, "
               "75 ack recorded but its answer queued, 124 wait: nothing arrived, 130 interrupted.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text, add_arguments in _COMMAND_ARGS:
        if only is None or name == only:
            add_arguments(sub.add_parser(name, parents=[common, as_json], help=help_text))
    return parser


def _with_command(argv: Sequence[str]) -> List[str]:
    """``list`` when no command is named; the command first when options came before it."""
    args = list(argv)
    index = 0
    while index < len(args):
        token = args[index]
        if token == "--":
            break
        if token.startswith("-"):
            index += 2 if token in _VALUE_OPTIONS else 1
            continue
        if token in COMMANDS:
            return [token] + args[:index] + args[index + 1:]
        break
    if any(a in ("-h", "--help") for a in args) and not any(a in COMMANDS for a in args):
        return args
    return ["list"] + args


def _emit_json(data: Any) -> None:
    write_line(json.dumps(data, ensure_ascii=True))


def _run(args: argparse.Namespace, inbox: Inbox) -> int:
    """One command; returns the exit code (output through write_line)."""
    command = _COMMAND_RUNNERS.get(args.command)
    if command is None:  # pragma: no cover - argparse chose it
        raise UsageError(f"unknown command {args.command!r}")
    return command(args, inbox)


def _write_lines(views: Iterable[Dict[str, Any]], bodies: bool) -> None:
    """One line per message, its body indented below when asked (``list``, ``search``)."""
    for view in views:
        write_line(render_line(view))
        if bodies:
            write_line("\n".join(_body_lines(view.get("body") or "", "      ")))


def _run_list(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.unread(include_read=args.all, since=args.since, sender=args.sender,
                          priority=args.priority, limit=args.limit,
                          include_archive=args.include_archive, bodies=args.bodies)
    if args.count:
        if args.json:
            _emit_json({"server": result["server"], "count": result["count"]})
        else:
            write_line(str(result["count"]))
        return EXIT_UNREAD if result["count"] else EXIT_OK
    if args.json:
        _emit_json(result)
    elif not result["messages"]:
        write_line(f"No {'' if args.all else 'unread '}mail for {inbox.server}.")
    else:
        noun = "message" if result["count"] == 1 else "messages"
        write_line(f"{inbox.server}: {result['count']} {'' if args.all else 'unread '}{noun}")
        _write_lines(result["messages"], args.bodies)
    return EXIT_OK


def _run_show(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.get(args.id, args.sender, peek=args.peek)
    if args.json:
        _emit_json(result)
    else:
        write_line(render_full(result["message"]))
    return EXIT_OK


def _run_thread(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.thread(args.id, args.sender)
    if args.json:
        _emit_json(result)
        return EXIT_OK
    count = len(result["messages"])
    head = f"Thread {result['root']}: {count} message{'s' if count != 1 else ''}"
    if result["inferred"]:
        head += " (partly inferred from subjects and participants: older tools wrote no in_reply_to)"
    write_line(head)
    for view in result["messages"]:
        write_line("")
        write_line(render_full(view))
    return EXIT_OK


def _run_mark_read(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.mark_read(args.ids, all=args.all, before=args.before)
    noun = "message" if result["marked"] == 1 else "messages"
    if args.json:
        _emit_json(result)
    else:
        write_line(f"Marked {result['marked']} {noun} read.")
    return EXIT_OK


def _run_ack(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.acknowledge(args.id, args.sender, note=args.note, message=not args.no_message)
    reply = result["reply"]
    if args.json:
        _emit_json(result)
    else:
        write_line(_ack_text(result))
    if reply is not None and reply["status"] == "queued":
        return EXIT_TEMPFAIL
    if reply is not None and reply["status"] == "failed":
        return EXIT_FAILURE
    return EXIT_OK


def _ack_text(result: Dict[str, Any]) -> str:
    view, reply = result["acknowledged"], result["reply"]
    what = f"{sanitize(view['id'], 120)} from {sanitize(view['from'], MAX_FIELD_CHARS)}"
    if result["already_acknowledged"]:
        return f"{what} was already acknowledged."
    if reply is None:
        return f"Acknowledged {what}."
    if reply["status"] == "sent":
        return f"Acknowledged {what}; answer {reply['message_id']} sent."
    return f"Acknowledged {what}; the answer {reply['message_id']} is {reply['status']}: {reply['reason']}"


def _run_acks(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.acks()
    if args.json:
        _emit_json(result)
        return EXIT_OK
    write_line(f"Owed by {inbox.server} ({len(result['owed'])}): acknowledge with inbox.py ack ID")
    for view in result["owed"]:
        write_line(render_line(view))
    write_line(f"Asked by {inbox.server} ({len(result['owed_to_me'])}): who has acknowledged, who has not")
    for item in result["owed_to_me"]:
        write_line(render_line(item["message"]))
        write_line(f"      acknowledged by: {', '.join(item['acknowledged_by']) or 'nobody yet'}; "
                   f"waiting on: {', '.join(item['waiting_on']) or 'nobody'}; "
                   + (f"retired: {', '.join(item['retired'])}; " if item["retired"] else "")
                   + f"age: {format_duration(item['age_seconds'])}")
    return EXIT_OK


def _run_search(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.search(args.words, include_archive=args.include_archive, limit=args.limit,
                          bodies=args.bodies)
    if args.json:
        _emit_json(result)
        return EXIT_OK
    write_line(f"{result['count']} found")
    _write_lines(result["messages"], args.bodies)
    return EXIT_OK


def _run_wait(args: argparse.Namespace, inbox: Inbox) -> int:
    result = inbox.wait(timeout=args.timeout, reply_to=args.reply_to, peek=args.peek)
    if args.json:
        _emit_json(result)
    elif result["arrived"]:
        write_line("\n\n".join(render_full(view) for view in result["messages"]))
    else:
        write_line(f"inbox: nothing arrived within {args.timeout:g} s", sys.stderr)
    return EXIT_OK if result["arrived"] else EXIT_TIMEOUT


_COMMAND_RUNNERS: Final[Dict[str, Callable[[argparse.Namespace, Inbox], int]]] = {
    "list": _run_list, "show": _run_show, "thread": _run_thread, "mark-read": _run_mark_read,
    "ack": _run_ack, "acks": _run_acks, "search": _run_search, "wait": _run_wait,
}
assert set(_COMMAND_RUNNERS) == set(COMMANDS)


def _setup_cli_logging(server: str) -> None:
    """Warnings on stderr only: reading mail writes no file into the clone."""
    import logging

    from structured_log import setup_logging

    setup_logging(None, server, console_level=logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = _with_command(sys.argv[1:] if argv is None else argv)
    parser = _parser(words[0] if words and words[0] in COMMANDS else None)
    args = parser.parse_args(words)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return run_cli("inbox", lambda: _open_and_run(args))


def _open_and_run(args: argparse.Namespace) -> int:
    server = resolve_server_id(args.server)
    defer_logging_setup(lambda: _setup_cli_logging(server))
    return _run(args, Inbox(args.repo or default_repo_path(), server, args.branch))


if __name__ == "__main__":
    raise SystemExit(main())
