"""Structured logging for the fleet suite: JSON lines on disk, one safe line per event on the console.

Contract
--------
* File: ``<repo>/<server>/logs/structured.log`` (never committed, PROTOCOL.md "The fleet
  repository"), UTF-8 JSON lines, ASCII-escaped. Every line is one object::

      {"timestamp": "2025-11-04T11:10:39.123Z", "level": "INFO", "message": "...",
       "server": "code2", "metadata": {"logger": "fleet_git", ...}}

  ``timestamp`` is UTC ISO 8601 with milliseconds and a ``Z``; ``level`` is one of DEBUG, INFO,
  WARNING, ERROR, CRITICAL (custom levels map to the standard level below them); ``metadata``
  holds ``extra={"metadata": {...}}`` from the record, the ``logger`` name, ``exception`` (the
  formatted traceback) when the record has ``exc_info`` and ``stack`` when it has ``stack_info``.
  Every string in a line is redacted, bounded and neutralised (PROTOCOL.md, "Trust between
  servers"): the message and each metadata string are cut at :data:`MAX_FIELD_CHARS` characters
  (``…`` and the original length mark a cut; the string arguments of the format share that
  first, each keeping at least :data:`MAX_ARG_CHARS`), tracebacks keep their last
  :data:`MAX_TRACEBACK_CHARS`, lists and mappings their first :data:`MAX_ITEMS` entries, and
  control characters (newlines too) are written as :func:`sanitize` escapes, so
  ``jq -r .message`` replays nothing. A line stays under :data:`MAX_LINE_CHARS`.
* The file is opened without following symlinks (:func:`open_runtime_file`): a symlink, folder or
  FIFO at its path is moved aside with one warning and a regular file started. When the file
  cannot be written (a read-only folder, a full disk), one warning goes to stderr, not a traceback
  per record, and logging goes on.
* Several processes (the CLI and the monitor) append to the same file: each record is one
  ``write()`` of one complete line on a file opened in append mode, and the file is opened per
  record so that a rotation by another process (or Windows' refusal to rename an open file) never
  strands a writer. Rotation is size based (:data:`DEFAULT_MAX_BYTES`, :data:`DEFAULT_BACKUP_COUNT`
  backups ``structured.log.1`` ...) and done only by the process that takes the lock
  ``structured.log.lock`` without waiting; a process that cannot take it skips rotating this time.
* Console: ``HH:MM:SS LEVEL message`` (local time), one line per record: newlines in the message
  (and the traceback) are shown as `` | ``, and the whole line goes through :func:`sanitize`, so a
  message from another server can never drive the operator's terminal or split a journald entry;
  the message and traceback are bounded as in the file.
  Colour by level through colorama only when the stream is a terminal and ``NO_COLOR`` is unset or
  empty (``FORCE_COLOR`` set to anything but ``0`` forces it; an explicit ``color=`` wins over both).
  Output goes through :func:`console_safe`, so a code page such as cp1252 never makes it crash.
* Redaction: both formatters pass the message and every string in the metadata through
  :func:`redact`; string or number values under a credential-like key (``password``,
  ``client_secret``, ``auth_token`` ...) are replaced by ``***`` whatever they look like.
  :func:`find_secret` is the same detector as a question (which kind of secret does a text hold?),
  for ``send_message`` to refuse a body that holds one.
* :func:`sanitize` shows each control character as a visible escape: newline, carriage return and
  tab as ``\\n``, ``\\r``, ``\\t``; other C0/C1 controls, DEL and lone surrogates as ``\\xNN`` /
  ``\\uNNNN``; Unicode bidi controls and line/paragraph separators as ``\\uNNNN``. An escape
  sequence such as ``ESC [31m`` thus reads ``\\x1b[31m`` and does nothing.

Library code here never prints; :func:`setup_logging` configures the root logger for a CLI's
``main`` (the suite's modules log through ``logging.getLogger(__name__)`` with top-level names such
as ``fleet_git``). :class:`StructuredLogger` keeps the earlier script's API.
"""

from __future__ import annotations

import collections.abc
import datetime as _dt
import itertools
import json
import logging
import math
import os
import stat
import sys
import threading
from pathlib import Path

# Re-exported: the console's colour rule and inert text live with the command line's output.
from fleet_cli import ELLIPSIS, REDACTION_MARGIN, color_wanted, level_styles, preview, sanitize
from fleet_common import (  # console_safe and write_line live there: a send needs no logging
    LOG_FILE_NAME,
    LOGS_SUBDIR,
    RuntimePaths,
    SuiteError,
    console_safe,
    file_lock,
    iso_utc,
    resolve_server_id,
    runtime_dir,
)
from fleet_secrets import REDACTED, LazyPattern, find_secret, is_secret_key, redact  # the one detector

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import IO, Any, Dict, Final, List, Mapping, Optional, Union

__all__ = [
    "DEFAULT_BACKUP_COUNT",
    "DEFAULT_MAX_BYTES",
    "LOG_FILE_NAME",
    "ConsoleFormatter",
    "ConsoleHandler",
    "JsonFormatter",
    "StructuredFileHandler",
    "StructuredLogger",
    "bounded_data",
    "clip",
    "color_wanted",
    "console_safe",
    "cut",
    "find_secret",
    "log_file_path",
    "open_runtime_file",
    "preview",
    "record_message",
    "redact",
    "sanitize",
    "set_aside_unsafe",
    "setup_logging",
    "teardown_logging",
]

LOCK_SUFFIX: Final = ".lock"
DEFAULT_MAX_BYTES: Final = 5 * 1024 * 1024
DEFAULT_BACKUP_COUNT: Final = 5
LINE_JOIN: Final = " | "  # a newline inside one console record

_OWNED_ATTR: Final = "_structured_log_owned"

# --------------------------------------------------------------------------- sanitizing

_NEWLINE_RE = LazyPattern(r"\r\n|\r|\n")


# --------------------------------------------------------------------------- bounds

# Text from another machine is bounded before it is shown or logged (PROTOCOL.md, "Trust between
# servers"): a 2 MB subject must not make a 2 MB log line that rotates the history away.
MAX_FIELD_CHARS: Final = 1000  # the message and each string in the metadata
MAX_ARG_CHARS: Final = 200  # the least a string argument of a %-format keeps when several share
_CUT_NOTE_CHARS: Final = 30  # what "… (2000000 characters)" adds to a cut text
MAX_TRACEBACK_CHARS: Final = 4000  # tracebacks keep their end, where the error is
MAX_KEY_CHARS: Final = 100
MAX_ITEMS: Final = 20  # items of a list and keys of a mapping in the metadata
MAX_DEPTH: Final = 6
MAX_LINE_CHARS: Final = 16 * 1024  # a JSON line over this is written again with tighter bounds


class _Bounds:
    __slots__ = ("text", "items", "depth")

    def __init__(self, text: int, items: int, depth: int) -> None:
        self.text, self.items, self.depth = text, items, depth


_NORMAL_BOUNDS: Final = _Bounds(MAX_FIELD_CHARS, MAX_ITEMS, MAX_DEPTH)
_TIGHT_BOUNDS: Final = _Bounds(100, 5, 3)


def cut(text: object, limit: int = MAX_FIELD_CHARS, *, keep_end: bool = False) -> str:
    """``text`` redacted and cut to ``limit`` characters; not sanitized.

    A cut is marked by ``…`` and the original length: ``abc… (2000000 characters)``; with
    ``keep_end`` the end is kept instead (``…(5123 characters) ...end``).
    """
    value = text if isinstance(text, str) else str(text)
    window = max(limit, 0) + REDACTION_MARGIN
    part = value if len(value) <= window else (value[-window:] if keep_end else value[:window])
    shown = redact(part)
    if len(shown) <= limit and len(part) == len(value):
        return shown
    note = f"({len(value)} characters)"
    if keep_end:
        return f"{ELLIPSIS}{note} {shown[-limit:] if limit > 0 else ''}"
    return f"{shown[:max(limit, 0)]}{ELLIPSIS} {note}"


def clip(text: object, limit: int = MAX_FIELD_CHARS, *, keep_end: bool = False) -> str:
    """``text`` redacted, cut to ``limit`` characters (see :func:`cut`) and sanitized: one inert
    line of bounded length, for any field that is shown or logged."""
    return sanitize(cut(text, limit, keep_end=keep_end))


def _clip_arg(arg: Any, share: int) -> Any:
    if isinstance(arg, str) and len(arg) > share:
        return cut(arg, share)
    return arg


def record_message(record: logging.LogRecord) -> str:
    """``record.getMessage()`` with long string arguments cut first: they share
    :data:`MAX_FIELD_CHARS` (at least :data:`MAX_ARG_CHARS` each), so a huge id does not push the
    rest of the message out of the bounded field, and a lone long argument keeps the whole field."""
    args = record.args
    if args:
        values = list(args.values()) if isinstance(args, collections.abc.Mapping) else list(args)
        strings = sum(isinstance(value, str) for value in values)
        room = MAX_FIELD_CHARS - len(str(record.msg))
        share = max(MAX_ARG_CHARS, room // max(strings, 1) - _CUT_NOTE_CHARS)
        if isinstance(args, collections.abc.Mapping):
            bounded: Any = {key: _clip_arg(value, share) for key, value in args.items()}
        elif isinstance(args, tuple):
            bounded = tuple(_clip_arg(value, share) for value in args)
        else:  # pragma: no cover - logging makes args a tuple or a mapping
            bounded = args
        try:
            return str(record.msg) % bounded
        except (TypeError, ValueError, KeyError):
            pass  # getMessage raises the same error for the handler to report
    return record.getMessage()


def _collection_note(value: Any) -> str:
    return f"<{type(value).__name__} of {len(value)} items>"


def bounded_data(value: Any, bounds: _Bounds = _NORMAL_BOUNDS, _depth: int = 0) -> Any:
    """A JSON-ready copy of ``value`` for the log: every string redacted, sanitized and cut,
    secret-keyed values masked, lists and mappings cut to their first items (plus a note of how
    many more), nesting cut at a fixed depth, numbers that JSON cannot carry written as text."""
    if isinstance(value, str):
        return clip(value, bounds.text)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python refuses to print an int of more than 4300 digits; a log never needs one.
        return value if value.bit_length() <= 64 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    is_mapping = isinstance(value, collections.abc.Mapping)
    if is_mapping or isinstance(value, (list, tuple, set, frozenset)):
        if _depth >= bounds.depth:
            return _collection_note(value)
        extra = len(value) - bounds.items
        if is_mapping:
            out: Dict[str, Any] = {}
            for key, item in itertools.islice(value.items(), bounds.items):
                raw_key = key if isinstance(key, str) else str(key)
                name = clip(raw_key, MAX_KEY_CHARS)
                # The key's end names what it holds ("jira_password"), so that is what is checked.
                secret_key = is_secret_key(raw_key[-MAX_KEY_CHARS:])
                if secret_key and isinstance(item, (str, int, float)) and not isinstance(item, bool):
                    out[name] = REDACTED
                else:
                    out[name] = bounded_data(item, bounds, _depth + 1)
            if extra > 0:
                out[ELLIPSIS] = f"+{extra} more"
            return out
        items = [bounded_data(item, bounds, _depth + 1) for item in itertools.islice(value, bounds.items)]
        if extra > 0:
            items.append(f"{ELLIPSIS} +{extra} more")
        return items
    return clip(value, bounds.text)


# --------------------------------------------------------------------------- formatters


def _standard_level(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "CRITICAL"
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARNING"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring), redacted, on one ASCII line."""

    def __init__(self, server_id: Optional[str] = None) -> None:
        super().__init__()
        self.server_id = resolve_server_id(server_id)

    def to_dict(self, record: logging.LogRecord, bounds: _Bounds = _NORMAL_BOUNDS) -> Dict[str, Any]:
        raw = getattr(record, "metadata", None)
        if raw is None:
            metadata: Dict[str, Any] = {}
        elif isinstance(raw, collections.abc.Mapping):
            metadata = bounded_data(raw, bounds)
        else:
            metadata = {"value": bounded_data(raw, bounds)}
        metadata["logger"] = clip(record.name, MAX_KEY_CHARS)
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            metadata["exception"] = clip(record.exc_text, MAX_TRACEBACK_CHARS, keep_end=True)
        if record.stack_info:
            metadata["stack"] = clip(self.formatStack(record.stack_info), MAX_TRACEBACK_CHARS,
                                     keep_end=True)
        moment = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        return {
            "timestamp": iso_utc(moment, fraction=True),
            "level": _standard_level(record.levelno),
            "message": clip(record_message(record)),
            "server": self.server_id,
            "metadata": metadata,
        }

    def format(self, record: logging.LogRecord) -> str:
        # ensure_ascii also escapes U+2028/U+2029, so a line is always exactly one line.
        line = json.dumps(self.to_dict(record), ensure_ascii=True, default=str)
        if len(line) <= MAX_LINE_CHARS:
            return line
        # Many long strings in the metadata: again with tighter bounds, and without the
        # metadata if even that is too long (escapes can make a string up to 12 times longer).
        entry = self.to_dict(record, _TIGHT_BOUNDS)
        line = json.dumps(entry, ensure_ascii=True, default=str)
        if len(line) <= MAX_LINE_CHARS:
            return line
        entry["metadata"] = {"logger": entry["metadata"]["logger"],
                             ELLIPSIS: f"metadata of {len(line)} characters left out"}
        return json.dumps(entry, ensure_ascii=True, default=str)


class ConsoleFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL message``: one redacted, sanitized line, optionally coloured by level."""

    def __init__(self, color: bool = False) -> None:
        super().__init__(datefmt="%H:%M:%S")
        self.color = color
        self._styles: Optional[Dict[str, str]] = level_styles() if color else None

    def format(self, record: logging.LogRecord) -> str:
        parts = [cut(record_message(record))]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(cut(record.exc_text, MAX_TRACEBACK_CHARS, keep_end=True))
        if record.stack_info:
            parts.append(cut(self.formatStack(record.stack_info), MAX_TRACEBACK_CHARS, keep_end=True))
        message = LINE_JOIN.join(_NEWLINE_RE.sub(LINE_JOIN, part.strip("\r\n")) for part in parts)
        line = sanitize(f"{self.formatTime(record, self.datefmt)} {record.levelname} {message}")
        if not self._styles:
            return line
        style = self._styles.get(_standard_level(record.levelno), "")
        return f"{style}{line}{self._styles['RESET']}"


# --------------------------------------------------------------------------- runtime files

# Runtime files are opened without following symlinks (PROTOCOL.md, "Trust between servers"): a
# member may commit <server>/logs/structured.log as a link to ~/.bashrc. O_NOFOLLOW refuses a link
# where the OS has it, O_NONBLOCK keeps a FIFO from blocking the open, and on every OS the opened
# file must be a regular file that the path still names (Windows has no O_NOFOLLOW).
_NO_FOLLOW_FLAGS: Final = (getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                           | getattr(os, "O_BINARY", 0))
UNSAFE_SUFFIX: Final = ".unsafe-"


def _unsafe_kind(path: str) -> Optional[str]:
    """What is at ``path`` when it is neither missing nor a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "a special file"


def set_aside_unsafe(path: "Union[str, os.PathLike[str]]") -> Optional[str]:
    """Move a symlink or any other non-regular file at ``path`` aside (renaming the link itself,
    never its target), with one warning; the name it now has, or ``None`` when nothing was there."""
    name = os.fspath(path)
    kind = _unsafe_kind(name)
    if kind is None:
        return None
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = f"{name}{UNSAFE_SUFFIX}{stamp}"
    os.replace(name, aside)
    logging.getLogger(__name__).warning(
        "%s was %s, not a regular file: moved aside to %s, never written through", name, kind,
        os.path.basename(aside), extra={"metadata": {"path": name, "aside": aside, "kind": kind}})
    return aside


def _check_opened(path: str, fd: int) -> None:
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode):
        raise OSError(f"{path} is not a regular file")
    if not getattr(os, "O_NOFOLLOW", 0):
        # No O_NOFOLLOW (Windows): the path must still name, itself, the file that was opened.
        named = os.lstat(path)
        if stat.S_ISLNK(named.st_mode) or (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino):
            raise OSError(f"{path} changed while it was opened")


def open_runtime_file(path: "Union[str, os.PathLike[str]]", flags: int, mode: int = 0o666) -> int:
    """``os.open`` for a runtime file that never follows a symlink; returns the descriptor.

    A symlink, folder, FIFO or device at ``path`` is first moved aside (:func:`set_aside_unsafe`);
    one that appears while opening is refused and moved aside once more. Raises
    ``FileNotFoundError`` when there is no file and ``flags`` do not create one, ``OSError`` when
    no regular file can be opened.
    """
    name = os.fspath(path)
    for attempt in (1, 2):
        set_aside_unsafe(name)
        try:
            fd = os.open(name, flags | _NO_FOLLOW_FLAGS, mode)
        except FileNotFoundError:
            raise
        except OSError:
            # ELOOP: a symlink appeared after the check.
            if attempt == 1 and _unsafe_kind(name) is not None:
                continue
            raise
        try:
            _check_opened(name, fd)
        except OSError:
            os.close(fd)
            if attempt == 1:
                continue
            raise
        return fd
    raise OSError(f"{name} could not be opened as a regular file")  # pragma: no cover


# --------------------------------------------------------------------------- handlers


class ConsoleHandler(logging.StreamHandler):
    """A stream handler (stderr by default) with :class:`ConsoleFormatter` and :func:`console_safe`.

    ``color=None`` decides once, from the stream and the environment (:func:`color_wanted`).
    """

    def __init__(self, stream: Optional[IO[str]] = None, color: Optional[bool] = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self.color = color_wanted(self.stream) if color is None else bool(color)
        self.setFormatter(ConsoleFormatter(color=self.color))

    def emit(self, record: logging.LogRecord) -> None:
        stream = self.stream
        if stream is None:  # pythonw on Windows has no console
            return
        try:
            line = self.format(record) + self.terminator
            stream.write(console_safe(line, stream))
            self.flush()
        except RecursionError:  # pragma: no cover - as logging.StreamHandler does
            raise
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)


class StructuredFileHandler(logging.Handler):
    """JSON lines to a file shared by several processes, with bounded size-based rotation.

    Each record is appended as one ``write()`` of one line to a file opened (binary, append,
    unbuffered) for that record. Before writing, if the line would take the file past
    ``max_bytes``, the handler tries the lock ``<file>.lock`` with timeout 0 and rotates only when
    it holds it and the file is still too big; otherwise it writes without rotating this time.
    Rotation renames ``structured.log`` to ``.1``, ``.1`` to ``.2`` and so on, dropping the oldest
    beyond ``backup_count`` (the layout of logging's RotatingFileHandler, whose module a command
    need not import); it renames links themselves and never opens a rotated file.

    The file is opened with :func:`open_runtime_file`, so a symlink or other non-regular file at
    its path is moved aside (one warning) and never written through. When writing fails (a
    read-only log folder, a full disk) one warning goes to stderr and records are dropped until a
    write succeeds again.
    """

    def __init__(self, filename: "Union[str, os.PathLike[str]]", server_id: Optional[str] = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, backup_count: int = DEFAULT_BACKUP_COUNT) -> None:
        super().__init__()
        self.baseFilename = os.path.abspath(os.fspath(filename))
        self.maxBytes = max_bytes
        self.backupCount = backup_count
        self.lock_path = self.baseFilename + LOCK_SUFFIX
        self._rotation_lock: Any = None
        self._rotating = threading.local()
        self._failing = False  # warned about a failing write; quiet until one succeeds
        self.setFormatter(JsonFormatter(server_id))

    def doRollover(self) -> None:  # noqa: N802 - logging's name
        for index in range(self.backupCount - 1, 0, -1):
            older = f"{self.baseFilename}.{index}"
            if os.path.lexists(older):
                os.replace(older, f"{self.baseFilename}.{index + 1}")
        if os.path.lexists(self.baseFilename):
            os.replace(self.baseFilename, self.baseFilename + ".1")

    def _file_size(self) -> int:
        try:
            return os.lstat(self.baseFilename).st_size
        except FileNotFoundError:
            return 0

    def _too_big(self, incoming: int) -> bool:
        # As with logging's own handler, max_bytes or backup_count of 0 means never rotate.
        if self.maxBytes <= 0 or self.backupCount <= 0:
            return False
        size = self._file_size()
        return size > 0 and size + incoming > self.maxBytes

    def _rotate_if_owner(self, incoming: int) -> None:
        if getattr(self._rotating, "active", False):
            return  # a record logged while rotating (by the lock library, say) just appends
        self._rotating.active = True
        try:
            if self._rotation_lock is None:
                self._rotation_lock = file_lock(self.lock_path, timeout=0)
            try:
                with self._rotation_lock:
                    # Another process may have rotated between our check and the lock.
                    if self._too_big(incoming):
                        self.doRollover()
            except TimeoutError:
                pass  # another process holds the lock and is rotating: skip this time
            except OSError:
                pass  # Windows: a file still open elsewhere cannot be renamed; retry next record
        finally:
            self._rotating.active = False

    def _append(self, data: bytes) -> None:
        fd = open_runtime_file(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "ab", buffering=0) as handle:
            view = memoryview(data)
            while view:
                written = handle.write(view)
                if not written:  # pragma: no cover - a regular file takes everything
                    raise OSError(f"could not append to {self.baseFilename}")
                view = view[written:]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8")
            if self._too_big(len(data)):
                self._rotate_if_owner(len(data))
            self._append(data)
            self._failing = False
        except RecursionError:  # pragma: no cover - as logging's handlers do
            raise
        except Exception:  # noqa: BLE001 - logging must never take the program down
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """One line on stderr when writing the file starts failing, instead of logging's
        ``--- Logging error ---`` traceback for every record; other errors (a bad format string)
        get logging's usual report."""
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if self._failing:
            return
        self._failing = True
        stream = sys.stderr
        if stream is None:  # pythonw on Windows has no console
            return
        reason = error.strerror or str(error)
        line = sanitize(f"structured_log: warning: cannot write {self.baseFilename}: {reason}; "
                        "log records are not saved until it can be written")
        try:
            stream.write(console_safe(line, stream) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stderr must not stop the program either
            pass


# --------------------------------------------------------------------------- root setup

_installed: List[logging.Handler] = []
_saved_root_level: Optional[int] = None
_setup_guard = threading.Lock()


def log_file_path(repo: "Union[str, os.PathLike[str]]", server_id: Optional[str] = None) -> Path:
    """``<repo>/<server>/logs/structured.log``; creates the (git-excluded) folder, not the repo."""
    server = resolve_server_id(server_id)
    runtime_dir(repo, server, LOGS_SUBDIR)
    return RuntimePaths(repo, server).log


def _own(handler: logging.Handler) -> logging.Handler:
    setattr(handler, _OWNED_ATTR, True)
    return handler


def teardown_logging() -> None:
    """Remove and close the handlers :func:`setup_logging` installed; restore the root level."""
    global _saved_root_level
    root = logging.getLogger()
    with _setup_guard:
        for handler in list(root.handlers):
            if getattr(handler, _OWNED_ATTR, False) or handler in _installed:
                root.removeHandler(handler)
        for handler in _installed:
            handler.close()
        _installed.clear()
        if _saved_root_level is not None:
            root.setLevel(_saved_root_level)
            _saved_root_level = None


def setup_logging(
    repo: "Union[str, os.PathLike[str], None]" = None,
    server_id: Optional[str] = None,
    *,
    console: bool = True,
    console_level: int = logging.INFO,
    file_level: int = logging.DEBUG,
    stream: Optional[IO[str]] = None,
    color: Optional[bool] = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backup_count: int = DEFAULT_BACKUP_COUNT,
) -> logging.Logger:
    """Configure the root logger for a CLI: console handler and, with a repo, the JSON file.

    Idempotent: handlers from an earlier call are removed first. The file handler is added only
    when ``repo`` names an existing folder (``<repo>/<server>/logs`` is created and git-excluded
    by :func:`fleet_common.runtime_dir`). Raises :class:`fleet_common.UsageError` for an invalid
    server id. Returns the root logger.
    """
    global _saved_root_level
    teardown_logging()
    server = resolve_server_id(server_id)
    root = logging.getLogger()
    handlers: List[logging.Handler] = []
    if console:
        console_handler = ConsoleHandler(stream if stream is not None else sys.stderr, color=color)
        console_handler.setLevel(console_level)
        handlers.append(_own(console_handler))
    problem, missing_repo = "", ""
    if repo is not None:
        if Path(repo).is_dir():
            try:
                path = log_file_path(repo, server)
            except (OSError, SuiteError) as exc:
                problem = f"no log file under {repo}: {exc}"
            else:
                file_handler = StructuredFileHandler(path, server, max_bytes=max_bytes,
                                                     backup_count=backup_count)
                file_handler.setLevel(file_level)
                handlers.append(_own(file_handler))
        else:
            # The command itself reports a missing repository; here it only means "no file".
            missing_repo = f"no log file: repository folder {repo} does not exist"
    with _setup_guard:
        _saved_root_level = root.level
        for handler in handlers:
            root.addHandler(handler)
            _installed.append(handler)
        if handlers:
            root.setLevel(min(handler.level for handler in handlers))
    # The lock library logs each acquisition at DEBUG; that would fill the file on every rotation.
    filelock_logger = logging.getLogger("filelock")
    if filelock_logger.level == logging.NOTSET:
        filelock_logger.setLevel(logging.WARNING)
    if problem:
        logging.getLogger(__name__).warning(problem)
    if missing_repo:
        logging.getLogger(__name__).debug(missing_repo)
    return root


# --------------------------------------------------------------------------- seed API


class StructuredLogger:
    """The earlier script's logger: ``.info(message, metadata=None)`` and friends.

    Writes the same JSON lines as :class:`StructuredFileHandler` to ``log_path`` (default
    ``<BUILD_REPO_PATH or cwd>/<server>/logs/structured.log``; when that repository folder does
    not exist, nothing is created and only the console gets the records) and the console
    (stderr). Independent of the root logger, so it never duplicates :func:`setup_logging`.
    """

    def __init__(self, log_path: "Union[str, os.PathLike[str], None]" = None,
                 server_id: Optional[str] = None, *, console: bool = True,
                 console_level: int = logging.INFO, stream: Optional[IO[str]] = None,
                 color: Optional[bool] = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 backup_count: int = DEFAULT_BACKUP_COUNT) -> None:
        self.server_id = resolve_server_id(server_id)
        self.log_path: Optional[Path] = self._choose_path(log_path)
        # A logger outside the logging registry: many instances leak nothing and never propagate.
        self._logger = logging.Logger("structured_log", logging.DEBUG)
        self._logger.propagate = False
        if self.log_path is not None:
            file_handler = StructuredFileHandler(self.log_path, self.server_id, max_bytes=max_bytes,
                                                 backup_count=backup_count)
            self._logger.addHandler(file_handler)
        if console:
            console_handler = ConsoleHandler(stream if stream is not None else sys.stderr, color=color)
            console_handler.setLevel(console_level)
            self._logger.addHandler(console_handler)

    def _choose_path(self, log_path: "Union[str, os.PathLike[str], None]") -> Optional[Path]:
        if log_path is not None:
            path = Path(log_path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError:
                return None
            return path
        repo = Path(os.environ.get("BUILD_REPO_PATH") or os.getcwd())
        if not repo.is_dir():
            return None
        try:
            return log_file_path(repo, self.server_id)
        except (OSError, SuiteError):
            return None

    def log(self, level: int, message: object, metadata: Optional[Mapping[str, Any]] = None,
            *, exc_info: Any = None) -> None:
        extra = {"metadata": dict(metadata)} if metadata else None
        self._logger.log(level, "%s", message, extra=extra, exc_info=exc_info)

    def debug(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.log(logging.DEBUG, message, metadata)

    def info(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.log(logging.INFO, message, metadata)

    def warning(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.log(logging.WARNING, message, metadata)

    def error(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.log(logging.ERROR, message, metadata)

    def critical(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        self.log(logging.CRITICAL, message, metadata)

    def exception(self, message: object, metadata: Optional[Mapping[str, Any]] = None) -> None:
        """An ERROR record with the current exception's traceback under ``metadata.exception``."""
        self.log(logging.ERROR, message, metadata, exc_info=True)

    def close(self) -> None:
        for handler in list(self._logger.handlers):
            self._logger.removeHandler(handler)
            handler.close()
