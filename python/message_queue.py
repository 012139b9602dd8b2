"""The local retry queue: messages (and other transactions) that could not be delivered now.

Contract: PROTOCOL.md ("The fleet repository": ``<server>/queue/message_queue.json``, never
committed; "Bad input": an unreadable local file is moved aside, never emptied; exit code 75 means
"waits in the local retry queue, which the monitor drains").

File format (version 1), written atomically, UTF-8 JSON, ``indent=2``, ASCII-escaped::

    {"version": 1, "server": "code2", "items": [entry, ...]}

    entry = {"id": str, "from": str, "kind": "message", "message": {...complete message...},
             "status": "pending" | "sent" | "dead", "attempts": int,
             "queued_at": iso, "next_attempt_at": epoch float, "last_error": str | None,
             "last_attempt_at": iso | None, "sent_at": iso | None}

Rules:

- One entry per ``(id, from)`` (PROTOCOL.md "Identity"; ``from`` compared case-insensitively).
  The full message, id included, is queued, so redelivery is idempotent: the delivery transaction
  skips a message that is already in the mailbox.
- A new entry is due at once. Each failed attempt of the monitor waits 2 s, 4 s, 8 s, 16 s ...
  (capped at ``max_backoff``); after ``max_attempts`` failures the entry is ``dead``: kept in the
  file, logged once as an ERROR, and revived only by :meth:`MessageQueue.retry_dead`.
- Sent entries are kept for 7 days and at most 1000 of them; pending and dead ones are never pruned.
- Every read-modify-write holds ``message_queue.json.lock`` (the send CLI and the monitor write the
  same file). Reads take no lock and never write (an idle monitor reads every cycle); the only
  exception is a file that does not parse, which is moved aside under the lock.
- The queue folder is created on the first write, never by constructing or reading a queue.

Library module: raises :class:`fleet_common.SuiteError` subclasses, never prints or exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import fleet_common
from fleet_common import (
    MAX_STATE_BYTES,
    BadInput,
    NotARegularFile,
    RuntimePaths,
    SuiteError,
    UsageError,
    atomic_write_json,
    default_repo_path,
    dump_json_bytes,
    file_lock,
    iso_from_epoch,
    load_json_bounded,
    load_state_file,
    parse_timestamp,
    read_local_file,
    resolve_server_id,
    runtime_dir,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import os
    from typing import Any, Callable, Dict, Final, Iterator, List, Optional, Tuple, TypedDict, TypeVar, Union

    # JSON shapes for readers and type checkers (plain dicts at runtime); "from" is a Python keyword,
    # hence the functional form.
    QueueEntry = TypedDict("QueueEntry", {
        "id": str, "from": str, "kind": str, "message": Dict[str, Any], "status": str,
        "attempts": int, "queued_at": str, "next_attempt_at": float, "last_error": Optional[str],
        "last_attempt_at": Optional[str], "sent_at": Optional[str],
    })

    class QueueStats(TypedDict):
        pending: int
        dead: int
        sent: int
        oldest_pending_age_s: Optional[float]
        next_due_in_s: Optional[float]

    T = TypeVar("T")

    Items = List[Any]

log = logging.getLogger(__name__)

QUEUE_VERSION: Final = 1
QUEUE_SUBDIR: Final = fleet_common.QUEUE_SUBDIR  # the names live in RuntimePaths
QUEUE_FILE: Final = fleet_common.QUEUE_FILE_NAME
LOCK_TIMEOUT: Final = 10.0
DEFAULT_MAX_ATTEMPTS: Final = 5
DEFAULT_MAX_BACKOFF: Final = 300.0
FIRST_BACKOFF: Final = 2.0
SENT_RETENTION_S: Final = 7 * 24 * 3600.0
MAX_SENT: Final = 1000

PENDING: Final = "pending"
SENT: Final = "sent"
DEAD: Final = "dead"







class QueueBusy(SuiteError):
    """Another process held the queue lock for longer than the timeout."""


class UnknownEntry(SuiteError):
    """No queue entry has the given id (and sender)."""


def backoff_delay(attempts: int, max_backoff: float = DEFAULT_MAX_BACKOFF) -> float:
    """Seconds to wait after the ``attempts``-th failure: 2, 4, 8, 16 ... capped at ``max_backoff``."""
    if attempts < 1:
        return 0.0
    exponent = min(attempts - 1, 60)  # 2**60 s is far past any cap; avoids huge floats
    return float(min(FIRST_BACKOFF * (2 ** exponent), max_backoff))


def _sender_key(value: Any) -> str:
    # Server ids compare case-insensitively (PROTOCOL.md "Server ids"); legacy values stay opaque.
    return str(value if value is not None else "").lower()


def _is_entry(entry: Any) -> bool:
    # A hand-edited file may hold anything; such items are kept in the file but never served.
    return isinstance(entry, dict) and isinstance(entry.get("id"), str)


def _queue_problem(data: Dict[str, Any]) -> Optional[str]:
    """What makes a queue document unusable (moved aside, logged critical), or ``None``."""
    if not isinstance(data.get("items", []), list):
        return "'items' is not a list"
    return None


def _due_at(entry: Dict[str, Any]) -> float:
    value = entry.get("next_attempt_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0  # unreadable schedule: due now rather than never
    return float(value)


class MessageQueue:
    """The persistent retry queue of one server at ``<repo>/<server>/queue/message_queue.json``.

    ``build_repo_path`` defaults to ``BUILD_REPO_PATH``, else ``K:/Projects/Build``; ``server_id``
    to ``SERVER_ID``, else ``code2`` (validated: :class:`UsageError`). ``clock`` returns epoch
    seconds (``time.time`` by default) and drives every timestamp and the backoff schedule.
    """

    sent_retention_s: float = SENT_RETENTION_S
    max_sent: int = MAX_SENT
    lock_timeout: float = LOCK_TIMEOUT

    def __init__(
        self,
        build_repo_path: Optional[Union[str, os.PathLike]] = None,
        server_id: Optional[str] = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        clock: Optional[Callable[[], float]] = None,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise UsageError(f"max_attempts must be a positive integer, not {max_attempts!r}")
        if not max_backoff > 0:
            raise UsageError(f"max_backoff must be positive, not {max_backoff!r}")
        self.repo = Path(build_repo_path if build_repo_path is not None else default_repo_path())
        self.server_id = resolve_server_id(server_id)
        self.max_attempts = max_attempts
        self.max_backoff = float(max_backoff)
        self.clock: Callable[[], float] = clock or time.time
        # Computed only: the folder appears on the first write (runtime_dir), not here.
        self.path = RuntimePaths(self.repo, self.server_id).queue
        self.lock_path = self.path.with_name(QUEUE_FILE + ".lock")

    def __repr__(self) -> str:
        return f"MessageQueue({str(self.path)!r})"

    # ------------------------------------------------------------------ reading (never writes)

    def get_pending(self) -> List[QueueEntry]:
        """All pending entries, in the order they were queued."""
        return [e for e in self._entries() if e.get("status") == PENDING]

    def get_due(self, now: Optional[float] = None) -> List[QueueEntry]:
        """Pending entries whose ``next_attempt_at`` has come, in the order they were queued."""
        moment = self.clock() if now is None else float(now)
        return [e for e in self.get_pending() if _due_at(e) <= moment]

    def get_dead(self) -> List[QueueEntry]:
        """Entries that used up their attempts (kept until :meth:`retry_dead`)."""
        return [e for e in self._entries() if e.get("status") == DEAD]

    def get(self, message_id: str, sender: Optional[str] = None) -> Optional[QueueEntry]:
        """The entry of ``message_id`` (from ``sender``) in any status, or ``None``."""
        return self._find(self._entries(), message_id, sender)

    def stats(self) -> QueueStats:
        """Counts and ages for health checks; reads the file only."""
        now = self.clock()
        entries = self._entries()
        pending = [e for e in entries if e.get("status") == PENDING]
        ages = []
        for entry in pending:
            queued = parse_timestamp(entry.get("queued_at"))
            if queued is not None:
                ages.append(now - queued.timestamp())
        return {
            "pending": len(pending),
            "dead": sum(1 for e in entries if e.get("status") == DEAD),
            "sent": sum(1 for e in entries if e.get("status") == SENT),
            "oldest_pending_age_s": max(0.0, max(ages)) if ages else None,
            "next_due_in_s": max(0.0, min(_due_at(e) for e in pending) - now) if pending else None,
        }

    def __len__(self) -> int:
        return len(self.get_pending())

    # ------------------------------------------------------------------ changes (locked)

    def enqueue(self, message: Dict[str, Any], reason: str = "", kind: str = "message") -> str:
        """Queue a complete message (its ``id`` included) for delivery; return the id.

        Idempotent per ``(id, from)``: a pending entry is left as it is. A ``sent`` or ``dead``
        entry of the same key becomes pending again with fresh attempts (one entry per key). A
        message without ``from`` is taken as this server's own. ``reason`` (why it could not be
        delivered now) is kept as ``last_error``. Raises :class:`UsageError` for a message without
        a string id, or a repository folder that does not exist.
        """
        return self.enqueue_many([message], reason, kind)[0]

    def enqueue_many(self, messages: List[Dict[str, Any]], reason: str = "",
                     kind: str = "message") -> List[str]:
        """:meth:`enqueue` several messages in one locked write (a monitor's cycle queues all its
        automatic replies at once); return their ids. All are checked before any is queued."""
        if not isinstance(kind, str) or not kind:
            raise UsageError("kind must be a non-empty string")
        checked = [self._checked(message) for message in messages]
        if not checked:
            return []
        now = self.clock()

        def change(items: Items) -> List[str]:
            index: Dict[Tuple[str, str], Dict[str, Any]] = {}
            for entry in items:  # the first entry of a key, as _find reads it
                if _is_entry(entry):
                    index.setdefault((entry["id"], _sender_key(entry.get("from"))), entry)
            outcomes = []
            for msg_id, sender, payload in checked:
                entry = index.get((msg_id, _sender_key(sender)))
                if entry is not None and entry.get("status") == PENDING:
                    outcomes.append("present")
                    continue
                fresh = {
                    "id": msg_id, "from": sender, "kind": kind, "message": payload,
                    "status": PENDING, "attempts": 0, "queued_at": iso_from_epoch(now, fraction=True),
                    "next_attempt_at": now, "last_error": reason or None,
                    "last_attempt_at": None, "sent_at": None,
                }
                if entry is None:
                    items.append(fresh)
                    index[(msg_id, _sender_key(sender))] = fresh
                    outcomes.append("queued")
                    continue
                previous = entry.get("status")
                entry.clear()
                entry.update(fresh)
                outcomes.append(f"requeued ({previous})")
            return outcomes

        outcomes = self._mutate(change)
        for (msg_id, sender, _), outcome in zip(checked, outcomes):
            if outcome != "present":
                log.log(
                    logging.DEBUG if kind == "reply" else logging.INFO,  # replies always pass through
                    "message %s %s for delivery by the monitor: %s", msg_id, outcome,
                    reason or "no reason given",
                    extra={"metadata": {"id": msg_id, "from": sender, "kind": kind, "reason": reason}},
                )
        return [msg_id for msg_id, _, _ in checked]

    def _checked(self, message: Any) -> Tuple[str, str, Dict[str, Any]]:
        """(id, sender, private JSON copy) of a message to queue, or :class:`UsageError`."""
        if not isinstance(message, dict):
            raise UsageError(f"a queued message must be a JSON object, not {type(message).__name__}")
        msg_id = message.get("id")
        if not isinstance(msg_id, str) or not msg_id:
            raise UsageError("a queued message needs its id (redelivery is idempotent by id)")
        sender = message.get("from", self.server_id)
        if not isinstance(sender, str) or not sender:
            raise UsageError(f"message {msg_id}: 'from' must be a non-empty string")
        try:
            # A private copy: the caller may go on changing its dict; JSON-only values are checked now.
            payload = json.loads(json.dumps(message))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"message {msg_id} cannot be stored as JSON: {exc}") from None
        return msg_id, sender, payload

    def mark_sent(self, message_id: str, sender: Optional[str] = None) -> bool:
        """Mark an entry delivered and verified; ``False`` when the queue does not hold it."""
        if not self.path.exists():
            return False  # nothing queued: no folder, no file, no write
        now = self.clock()

        def change(items: Items) -> bool:
            entry = self._find(items, message_id, sender)
            if entry is None or entry.get("status") == SENT:
                return entry is not None
            entry["status"] = SENT
            entry["sent_at"] = entry["last_attempt_at"] = iso_from_epoch(now, fraction=True)
            return True

        return self._mutate(change)

    def increment_attempts(
        self, message_id: str, error: str = "", sender: Optional[str] = None, *, final: bool = False,
    ) -> QueueEntry:
        """Record a failed delivery attempt and return the updated entry.

        Schedules the next attempt ``backoff_delay(attempts)`` seconds from now; at
        ``max_attempts`` (at once with ``final``: the entry can never be delivered) the entry
        turns ``dead``, kept, and one ERROR is logged. An entry that is not pending is returned
        unchanged. Raises :class:`UnknownEntry` when there is no such entry.
        """
        now = self.clock()

        def change(items: Items) -> Tuple[Optional[Dict[str, Any]], bool]:
            entry = self._find(items, message_id, sender)
            if entry is None or entry.get("status") != PENDING:
                return entry, False
            attempts = entry.get("attempts")
            attempts = (attempts if isinstance(attempts, int) and not isinstance(attempts, bool) else 0) + 1
            entry["attempts"] = attempts
            entry["last_error"] = error or None
            entry["last_attempt_at"] = iso_from_epoch(now, fraction=True)
            entry["next_attempt_at"] = now + backoff_delay(attempts, self.max_backoff)
            died = final or attempts >= self.max_attempts
            if died:
                entry["status"] = DEAD
            return dict(entry), died

        if not self.path.exists():
            entry, died = None, False
        else:
            entry, died = self._mutate(change)
        if entry is None:
            who = f" from {sender}" if sender else ""
            raise UnknownEntry(f"the retry queue holds no message {message_id}{who}")
        if died:
            log.error(
                "message %s gave up after %d attempts: %s", message_id, entry["attempts"],
                entry.get("last_error") or "no error given",
                extra={"metadata": {
                    "id": message_id, "from": entry.get("from"), "kind": entry.get("kind"),
                    "attempts": entry["attempts"], "last_error": entry.get("last_error"),
                }},
            )
        return entry

    def postpone(self, message_id: str, error: str = "", sender: Optional[str] = None,
                 seconds: float = DEFAULT_MAX_BACKOFF) -> bool:
        """Try a pending entry again in ``seconds`` without spending an attempt (the remote
        answered; what is missing is room, which an archive pass makes). ``False`` when the
        queue holds no such pending entry."""
        now = self.clock()

        def change(items: Items) -> bool:
            entry = self._find(items, message_id, sender)
            if entry is None or entry.get("status") != PENDING:
                return False
            entry["last_error"] = error or None
            entry["last_attempt_at"] = iso_from_epoch(now, fraction=True)
            entry["next_attempt_at"] = now + seconds
            return True

        return self._mutate(change) if self.path.exists() else False

    def retry_dead(self, message_id: Optional[str] = None, sender: Optional[str] = None) -> int:
        """Make dead entries (all, or one id) pending again with 0 attempts, due now; return how many."""
        if not self.path.exists():
            return 0
        now = self.clock()

        def change(items: Items) -> int:
            count = 0
            for entry in items:
                if not _is_entry(entry) or entry.get("status") != DEAD:
                    continue
                if message_id is not None and entry["id"] != message_id:
                    continue
                if sender is not None and _sender_key(entry.get("from")) != _sender_key(sender):
                    continue
                entry["status"] = PENDING
                entry["attempts"] = 0
                entry["next_attempt_at"] = now
                count += 1
            return count

        count = self._mutate(change)
        if count:
            log.info("%d dead message(s) queued again", count,
                     extra={"metadata": {"id": message_id, "count": count}})
        return count

    # ------------------------------------------------------------------ internals

    def _fresh(self) -> Dict[str, Any]:
        return {"version": QUEUE_VERSION, "server": self.server_id, "items": []}

    @staticmethod
    def _usable(data: Any) -> bool:
        # Anything load_state_file would move aside is not usable: that is done under the lock.
        version = data.get("version", 1) if isinstance(data, dict) else None
        return (isinstance(data, dict) and _queue_problem(data) is None
                and isinstance(version, int) and not isinstance(version, bool) and version >= 1)

    def _entries(self) -> List[Dict[str, Any]]:
        """The entries as the file holds them now, without taking the lock or writing."""
        try:
            # Never through a symlink (PROTOCOL.md, "Trust between servers"); one in the file's
            # or its folders' place is moved aside under the lock, below.
            raw = read_local_file(self.path, max_bytes=MAX_STATE_BYTES)
        except (NotARegularFile, BadInput):
            raw = b""
        if raw is None:
            return []
        try:
            usable = self._usable(load_json_bounded(raw, what=QUEUE_FILE, max_bytes=MAX_STATE_BYTES))
        except BadInput:
            usable = False
        if usable:
            # Same bytes on disk or a newer atomic replacement; load_state_file checks the version.
            data = load_state_file(self.path, version=QUEUE_VERSION, fresh=self._fresh,
                                   problem=_queue_problem)
        else:
            # Moving a file aside is a change: only under the lock, after reading it again there,
            # so a good file another process has just written is never the one moved aside.
            with self._locked():
                data = self._load_locked()
        items = data.get("items")
        return [e for e in items if _is_entry(e)] if isinstance(items, list) else []

    def _load_locked(self) -> Dict[str, Any]:
        data = load_state_file(self.path, version=QUEUE_VERSION, fresh=self._fresh,
                               problem=_queue_problem)
        data.setdefault("items", [])
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        from filelock import Timeout  # lazy, as fleet_common.file_lock

        lock = file_lock(self.lock_path, timeout=self.lock_timeout)
        try:
            lock.acquire()
        except Timeout:
            raise QueueBusy(
                f"{self.lock_path} stayed locked for {self.lock_timeout:g} s; is another process stuck?"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _mutate(self, change: Callable[[Items], T]) -> T:
        """Apply ``change`` to the items under the lock; write only when the document changed."""
        runtime_dir(self.repo, self.server_id, QUEUE_SUBDIR)  # UsageError if the repo is missing
        with self._locked():
            data = self._load_locked()
            before = dump_json_bytes(data)
            result = change(data["items"])
            self._prune_sent(data["items"])
            after = dump_json_bytes(data)
            if after != before:
                if len(after) > MAX_STATE_BYTES:  # a queue this program could not read back
                    raise SuiteError(f"the retry queue would grow to {len(after)} bytes, more than the "
                                     f"{MAX_STATE_BYTES} it reads back; it was left as it was")
                data["server"] = self.server_id
                atomic_write_json(self.path, data)
        return result

    def _prune_sent(self, items: Items) -> None:
        """Drop sent entries older than the retention or beyond ``max_sent`` (newest kept)."""
        cutoff = self.clock() - self.sent_retention_s
        sent = []
        for index, entry in enumerate(items):
            if _is_entry(entry) and entry.get("status") == SENT:
                moment = parse_timestamp(entry.get("sent_at"))
                sent.append((moment.timestamp() if moment is not None else float("-inf"), index))
        drop = {index for stamp, index in sent if stamp < cutoff}
        kept = sorted((s for s in sent if s[1] not in drop), reverse=True)
        drop.update(index for _, index in kept[self.max_sent:])
        if drop:
            items[:] = [entry for index, entry in enumerate(items) if index not in drop]

    def _find(self, items: Items, message_id: str, sender: Optional[str]) -> Optional[Dict[str, Any]]:
        matches = [
            e for e in items
            if _is_entry(e) and e["id"] == message_id
            and (sender is None or _sender_key(e.get("from")) == _sender_key(sender))
        ]
        if len(matches) > 1:
            if sender is None:
                raise UsageError(f"several queued messages have id {message_id}; name the sender")
            # Only a hand-edited file holds one key twice; act on the first, as a reader would.
        return matches[0] if matches else None
