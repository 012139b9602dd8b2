"""The monitor's local files under ``<server>/state/``: its memory and its status.

``monitor_state.json`` (:class:`MonitorState`): message keys already shown and read marks not
yet pushed, written before a message is shown so that a restart never shows it twice.
``monitor_status.json``: what the last cycle did, for health checks (``system_health``), the
``--status`` report and the fleet overview. This module is the one owner of both formats:
others call :func:`read_status` and :func:`write_status`, never the file names.
"""

from __future__ import annotations

import logging

from fleet_common import (
    BadInput,
    RuntimePaths,
    SuiteError,
    atomic_write_json,
    iso_utc,
    load_json_bounded,
    load_state_file,
    read_local_file,
    runtime_dir,
)
from fleet_mailbox import entry_problem, key_from_str, key_str, message_key

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Dict, Final, Optional, Set

    from fleet_mailbox import MessageKey

log = logging.getLogger("message_monitor")  # the monitor's log, as before the split

PROCESSED_CAP = 20000  # local processed keys kept (the mailbox's read_by is the lasting record)
STATE_VERSION = 1
STATUS_VERSION: Final = 1
STATUS_FILE_MAX_BYTES: Final = 1024 * 1024  # monitor_status.json is a few hundred bytes
STATUS_REWRITE_IDLE: Final = 60.0  # seconds between status-file rewrites while idle


# --------------------------------------------------------------------------- monitor_state.json


STATE_LISTS = ("processed", "pending_marks", "pending_acks", "hook_owed")
HOOK_OWED_CAP = 1000  # messages kept for an --on-message command that has not started yet


def _state_problem(data: Dict[str, Any]) -> Optional[str]:
    """What makes ``monitor_state.json`` unusable (moved aside, logged critical), or ``None``."""
    for name in STATE_LISTS:
        if not isinstance(data.get(name, []), list):
            return f"{name!r} is not a list"
    return None


OWED_TEXT_CHARS = 4096  # of each text of a message kept for a command that has not started


def owed_copy(msg: Dict[str, Any]) -> Dict[str, Any]:
    """A message as :class:`MonitorState` keeps it for its command: texts cut at
    :data:`OWED_TEXT_CHARS` and lists at 20 items (then ``"truncated": true``; ``inbox.py show``
    has it whole), at most 40 fields."""
    copy: Dict[str, Any] = {}
    cut = False
    for key, value in list(msg.items())[:40]:
        if isinstance(value, str) and len(value) > OWED_TEXT_CHARS:
            value, cut = value[:OWED_TEXT_CHARS], True
        elif isinstance(value, list):
            short = [v[:OWED_TEXT_CHARS] if isinstance(v, str) else v for v in value[:20]
                     if not isinstance(v, (dict, list))]
            cut = cut or len(short) != len(value) or short != value
            value = short
        elif isinstance(value, dict):
            value, cut = None, True
        copy[str(key)[:200]] = value
    if cut:
        copy["truncated"] = True
    return copy


class MonitorState:
    """Processed message keys and read marks not yet pushed: ``<server>/state/monitor_state.json``.

    Written before a message is shown, so a restart never shows it twice; written only when it
    changed, so an idle monitor rewrites nothing. A file of the wrong shape is moved aside
    (``fleet_common.load_state_file``); a save that fails (a full disk) is logged and retried
    with the next change, and the monitor goes on.
    """

    def __init__(self, repo: Path, server: str) -> None:
        self.path = RuntimePaths(repo, server).monitor_state
        self.repo = repo
        self.server = server
        data = load_state_file(self.path, version=STATE_VERSION, fresh=self._fresh,
                               problem=_state_problem)
        self.processed: Dict[MessageKey, None] = {
            key_from_str(k): None for k in data.get("processed", []) if isinstance(k, str)}
        self.pending_marks: Set[MessageKey] = {
            key_from_str(k) for k in data.get("pending_marks", []) if isinstance(k, str)}
        self.pending_acks: Set[MessageKey] = {
            key_from_str(k) for k in data.get("pending_acks", []) if isinstance(k, str)}
        # Messages whose --on-message command has not started yet (a stop, a full slot list):
        # it starts after a restart too, and once it has started the message leaves this list.
        self.hook_owed: Dict[MessageKey, Dict[str, Any]] = {
            message_key(m): m for m in data.get("hook_owed", [])[-HOOK_OWED_CAP:]
            if isinstance(m, dict) and entry_problem(m) is None}
        self.extra: Dict[str, Any] = {k: v for k, v in data.items() if k not in (
            "version", "server", "updated_at", *STATE_LISTS)}
        self.dirty = False
        self.save_failed: Optional[str] = None

    def _fresh(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "server": self.server}

    def record(self, key: MessageKey, *, mark: bool = True, ack: bool = False) -> None:
        """Remember that the message was shown; queue a read mark (and an acknowledgement)."""
        self.processed[key] = None
        if mark or ack:
            self.pending_marks.add(key)
        if ack:
            self.pending_acks.add(key)
        self.dirty = True

    def owe_hook(self, msg: Dict[str, Any]) -> None:
        """The --on-message command is to run for ``msg`` (saved with the next :meth:`save`). The
        saved copy is bounded (:func:`owed_copy`): the state file stays small whatever the mail."""
        self.hook_owed[message_key(msg)] = owed_copy(msg)
        while len(self.hook_owed) > HOOK_OWED_CAP:
            dropped = next(iter(self.hook_owed))
            del self.hook_owed[dropped]
            log.warning("--on-message will not run for %s: more than %d messages wait for it", dropped[0],
                        HOOK_OWED_CAP, extra={"metadata": {"id": dropped[0]}})
        self.dirty = True

    def hook_started(self, msg: Dict[str, Any]) -> None:
        """Its command is starting: saved now, so that no restart starts it again."""
        if self.hook_owed.pop(message_key(msg), None) is not None:
            self.dirty = True
            self.save()

    def marks_pushed(self, keys: Set[MessageKey], acks: Set[MessageKey]) -> None:
        self.pending_marks -= keys
        self.pending_acks -= acks
        self.dirty = True

    def save(self) -> bool:
        """Write the state when it changed; False (logged as an error) when it could not be written."""
        if not self.dirty:
            return True
        while len(self.processed) > PROCESSED_CAP:
            oldest = next(iter(self.processed))
            if oldest in self.pending_marks:
                break
            del self.processed[oldest]
        data: Dict[str, Any] = {
            "version": STATE_VERSION, "server": self.server,
            "processed": [key_str(k) for k in self.processed],
            "pending_marks": sorted(key_str(k) for k in self.pending_marks),
            "pending_acks": sorted(key_str(k) for k in self.pending_acks),
            "hook_owed": list(self.hook_owed.values()),
            "updated_at": iso_utc(),
        }
        data.update(self.extra)
        try:
            runtime_dir(self.repo, self.server, "state")
            atomic_write_json(self.path, data)
        except OSError as exc:
            # A full disk or a read-only folder: the state stays in memory (dirty) and is written
            # with the next change; a restart meanwhile may show a message again, which is better
            # than a monitor that dies and delivers nothing.
            self.save_failed = str(exc)
            log.error("monitor state not saved to %s: %s; kept in memory, retried with the next "
                      "change", self.path, self.save_failed,
                      extra={"metadata": {"path": str(self.path), "error": self.save_failed}})
            return False
        if self.save_failed is not None:
            log.info("monitor state saved again to %s", self.path)
            self.save_failed = None
        self.dirty = False
        return True


# --------------------------------------------------------------------------- options


# --------------------------------------------------------------------------- monitor_status.json


def status_path(repo: "Path | str", server: str) -> Path:
    """Where ``monitor_status.json`` of ``server`` lives in the clone ``repo``."""
    return RuntimePaths(repo, server).status


def write_status(repo: Path, server: str, fields: Dict[str, Any]) -> None:
    """Replace ``monitor_status.json`` atomically with ``fields`` (plus its version)."""
    runtime_dir(repo, server, "state")
    atomic_write_json(status_path(repo, server), {"version": STATUS_VERSION, **fields})


def read_status(repo: "Path | str", server: str) -> Optional[Dict[str, Any]]:
    """``monitor_status.json`` of ``server``: ``None`` when no monitor has written it.

    Never through a symlink and within bounds (PROTOCOL.md, "Trust between servers"); raises
    :class:`fleet_common.SuiteError` (one line) when the file is there but cannot be used.
    """
    path = status_path(repo, server)
    raw = read_local_file(path, max_bytes=STATUS_FILE_MAX_BYTES)
    if raw is None:
        return None
    data = load_json_bounded(raw, what=path.name, max_bytes=STATUS_FILE_MAX_BYTES)
    if not isinstance(data, dict):
        raise BadInput(f"{path.name}: not a JSON object")
    return data


def read_status_or_none(repo: "Path | str", server: str) -> Optional[Dict[str, Any]]:
    """:func:`read_status`, with an unreadable file (or folder) counted as none."""
    try:
        return read_status(repo, server)
    except (OSError, SuiteError):
        return None
