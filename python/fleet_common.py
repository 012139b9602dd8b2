"""Shared ground for the fleet suite: errors, exit codes, server ids, defaults, numbers from the
command line, runtime and state files.

Every module of the suite imports this one and nothing heavier, so a one-shot command stays
fast to start. Contract: ``PROTOCOL.md`` (server ids, defaults, never-committed local paths).

Library code raises :class:`SuiteError` subclasses; only a CLI's ``main`` turns them into exit
codes (see :data:`EXIT_OK` and friends).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
import sys
import time
from pathlib import Path

from fleet_start import (  # noqa: F401  (their one owner: a script reads them first)
    BROADCAST,
    DEFAULT_REPO,
    DEFAULT_SERVER,
    EXIT_INTERRUPTED,
    MAX_SERVER_ID_CHARS,
    own_id_problem,
    server_id_shape,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import datetime as _dt
    from typing import IO, Any, Callable, Dict, Final, List, Optional, Tuple


class LazyLogger:
    """``logging.getLogger(name)``, resolved on first use.

    A one-shot command that logs nothing (a successful send) never imports :mod:`logging`, which
    with its own imports costs more than the rest of the send's Python start. The first record
    from any module runs the setup a CLI deferred with :func:`defer_logging_setup`.
    """

    __slots__ = ("_name", "_logger")

    def __init__(self, name: str) -> None:
        self._name = name
        self._logger: Any = None

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import logging

            start_logging()
            self._logger = logging.getLogger(self._name)
        return getattr(self._logger, attr)


class LazyModule:
    """A module imported on first use of one of its names (``subprocess``, ``threading``): a short
    command whose every git call was started by its script (fleet_start) never needs them, and
    their imports cost 3 ms of its start."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(__import__(self._name), attr)


_deferred_setup: List[Callable[[], None]] = []


def sleep_jittered(low: float, high: float) -> None:
    """Sleep a random time between ``low`` and ``high`` seconds (a retry after a lost race, so
    that racing processes spread out). :mod:`random` is imported here, on a retry, not at start."""
    import random

    time.sleep(random.uniform(low, high))


def get_logger(name: str) -> LazyLogger:
    return LazyLogger(name)


def defer_logging_setup(setup: Callable[[], None]) -> None:
    """Run ``setup`` (a CLI's handler configuration) just before the first record is logged."""
    _deferred_setup[:] = [setup]


def start_logging() -> None:
    """Run a deferred logging setup now (before code that logs through :mod:`logging` directly)."""
    while _deferred_setup:
        _deferred_setup.pop()()


log = get_logger(__name__)

# Exit codes (PROTOCOL.md, "Command-line contract").
EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
EXIT_TEMPFAIL: Final = 75  # EX_TEMPFAIL: queued, the monitor delivers it later
# EXIT_INTERRUPTED (130, a Ctrl+C) is fleet_start's: a script's quick exit may need it before this loads.

DEFAULT_INTERVAL: Final = 10.0
SUITE_VERSION: Final = "1.0.0"


# Never-committed runtime paths, relative to the clone root (PROTOCOL.md, "The fleet repository").
RUNTIME_SUBDIRS: Final = ("logs", "queue", "state")


class SuiteError(Exception):
    """Base of every error the suite raises on purpose; ``str()`` is a one-line reason."""

    exit_code = EXIT_FAILURE


class UsageError(SuiteError):
    """Bad usage or bad input: exit 2."""

    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- console


def console_safe(text: str, stream: Optional[IO[str]] = None) -> str:
    """``text`` reduced to what ``stream.encoding`` can show, the rest as backslash escapes.

    Writing ``console_safe(line, sys.stdout)`` never raises ``UnicodeEncodeError`` on a code page
    such as cp1252. A stream without an encoding (``io.StringIO``) gets the text unchanged.
    """
    target = sys.stdout if stream is None else stream
    encoding = getattr(target, "encoding", None)
    if not encoding:
        return text
    try:
        return text.encode(encoding, errors="backslashreplace").decode(encoding, errors="replace")
    except LookupError:
        return text.encode("ascii", errors="backslashreplace").decode("ascii")


def write_line(text: str, stream: Optional[IO[str]] = None) -> None:
    """One line of a CLI's own output, safe for the stream's encoding (for ``main`` functions)."""
    target = sys.stdout if stream is None else stream
    target.write(console_safe(text, target) + "\n")
    target.flush()


def write_text(text: str, stream: Optional[IO[str]] = None) -> None:
    """Like :func:`write_line` for text that brings its own line ends (a report, a JSON dump)."""
    target = sys.stdout if stream is None else stream
    target.write(console_safe(text, target))
    target.flush()


ONE_LINE_LIMIT: Final = 300  # a reason longer than this is a dump, not a reason


def one_line(value: object, limit: int = ONE_LINE_LIMIT) -> str:
    """``value`` (text or an exception) as one line of at most ``limit`` characters.

    An exception gives the first line of its message (the summary; details follow it), or its
    type's name when the message is empty. Runs of whitespace, line ends included, become one
    space, so a reason can never spill onto a second line of stderr, a log record or a systemd
    status.
    """
    text = str(value)
    if isinstance(value, BaseException):
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[0] if lines else type(value).__name__
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: max(0, limit - 3)] + "..."


# --------------------------------------------------------------------------- server ids


def normalize_server_id(value: object, *, allow_broadcast: bool = False) -> str:
    """Return the canonical (lower-case) form of a server id, or raise :class:`UsageError`.

    Checked before any file or git operation, since a server id becomes a folder name.
    """
    if not isinstance(value, str):
        raise UsageError(f"invalid server id {value!r}: expected a string")
    canon = value.strip().lower()
    if canon == BROADCAST:
        if allow_broadcast:
            return canon
        raise UsageError(f"invalid server id {value!r}: 'all' is reserved for broadcast")
    if canon != value.lower() or not server_id_shape(canon):
        raise UsageError(
            f"invalid server id {value!r}: use 1-64 characters a-z 0-9 . _ - starting with a "
            "letter or digit"
        )
    return canon


_VALID_IDS: Dict[str, bool] = {}  # the verdicts so far: a look asks about the same few ids hundreds of times
_MAX_VALID_IDS: Final = 4096


def is_valid_server_id(value: object) -> bool:
    if type(value) is str:
        if len(value) > MAX_SERVER_ID_CHARS:  # no id (lower-casing never shortens a text); nothing kept
            return False
        known = _VALID_IDS.get(value)
        if known is not None:
            return known
    try:
        normalize_server_id(value)
        valid = True
    except UsageError:
        valid = False
    if type(value) is str and len(_VALID_IDS) < _MAX_VALID_IDS:
        _VALID_IDS[value] = valid
    return valid


# --------------------------------------------------------------------------- defaults


def default_repo_path() -> str:
    return os.environ.get("BUILD_REPO_PATH") or DEFAULT_REPO


def default_server_id() -> str:
    return os.environ.get("SERVER_ID") or DEFAULT_SERVER


def check_own_server_id(value: object, *, windows: bool = os.name == "nt") -> str:
    """A server id this process may act as (:func:`normalize_server_id`, then stricter).

    Acting as a server names a git ref (``refs/fleet/<id>``, PROTOCOL.md) and a folder
    (``<id>/logs``); some ids the pattern allows can name neither. Git refuses a ref name whose
    part ends with ``.`` or ``.lock`` or holds ``..``, so such a server could never publish its
    presence nor mark mail read; on Windows a device name (``con``, ``aux``, ``nul.x``) is no
    folder, and ``build1.`` would share ``build1``'s. Those are refused here, once, with the
    reason; mail to or from them (older tools) is still read and sent as before.
    """
    canon = normalize_server_id(value)
    problem = own_id_problem(canon, windows=windows)  # (fleet_start: a script checks it before loading)
    if problem is not None:
        raise UsageError(f"server id {canon!r} cannot name this server{problem}")
    return canon


def resolve_server_id(server_id: Optional[str]) -> str:
    """The server id to act as: the argument, else ``SERVER_ID``, else ``code2``
    (:func:`check_own_server_id`)."""
    return check_own_server_id(server_id if server_id is not None else default_server_id())


def default_interval() -> float:
    """``MONITOR_INTERVAL`` when set (checked as :func:`check_number`), else 10 seconds."""
    raw = os.environ.get("MONITOR_INTERVAL")
    if not raw:
        return DEFAULT_INTERVAL
    return check_number(raw, "MONITOR_INTERVAL", MIN_INTERVAL, MAX_INTERVAL)


# --------------------------------------------------------------------------- numbers

# A cycle more often than this is a busy loop against the remote (an interval of "nan" once made
# 145 ls-remote calls a second); less often than daily is no monitor at all.
MIN_INTERVAL: Final = 0.1
MAX_INTERVAL: Final = 86400.0


def check_number(value: object, name: str, low: float, high: float) -> float:
    """``value`` (a number or its text) as a float from ``low`` to ``high``, else :class:`UsageError`.

    ``nan``, ``inf`` and out-of-range numbers from a command line or the environment are refused
    here, once, instead of busy-looping, overflowing or committing every cycle later on.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, not {str(value)[:40]!r}") from None
    if not math.isfinite(number) or not low <= number <= high:
        raise UsageError(f"{name} must be a number from {low:g} to {high:g}, not {str(value)[:40]!r}")
    return number


def finite_number(name: str, low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type=`` that accepts finite numbers from ``low`` to ``high`` (exit 2 otherwise)."""

    def parse(text: str) -> float:
        try:
            return check_number(text, name, low, high)
        except UsageError as exc:
            import argparse  # lazy: only a bad command line needs it here

            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some of its messages
    return parse


def server_dir(repo: "os.PathLike[str] | str", server_id: str) -> Path:
    """``<repo>/<server>``: the folder of a server's logs, queue and state."""
    return Path(repo) / normalize_server_id(server_id)


def state_dir(repo: "os.PathLike[str] | str", server_id: str) -> Path:
    return server_dir(repo, server_id) / STATE_SUBDIR


# The never-committed runtime files of a server, each named once (PROTOCOL.md, "The fleet
# repository"); their formats belong to the modules named beside them.
LOGS_SUBDIR, QUEUE_SUBDIR, STATE_SUBDIR = RUNTIME_SUBDIRS
QUEUE_FILE_NAME: Final = "message_queue.json"  # message_queue
BREAKER_FILE_NAME: Final = "circuit_breaker.json"  # circuit_breaker
LEDGER_FILE_NAME: Final = "auto_reply.json"  # auto_reply.ReplyLedger
METRICS_FILE_NAME: Final = "metrics.json"  # monitoring_metrics
LOG_FILE_NAME: Final = "structured.log"  # structured_log
INSTANCE_LOCK_NAME: Final = "monitor.lock"  # fleet_service.InstanceLock
PID_FILE_NAME: Final = "monitor.pid"  # fleet_service.InstanceLock
MONITOR_STATE_FILE_NAME: Final = "monitor_state.json"  # the monitor's own memory
STATUS_FILE_NAME: Final = "monitor_status.json"  # the monitor's report for health checks


class RuntimePaths:
    """Where one server's runtime files live in a clone: ``<repo>/<server>/{logs,queue,state}/``.

    Paths only: nothing is created or read here (``runtime_dir`` makes a folder when a writer
    needs it). Anchor: pipx ``src/pipx/paths.py``, one object that names every location.
    """

    __slots__ = ("repo", "server", "server_dir")

    def __init__(self, repo: "os.PathLike[str] | str", server: str) -> None:
        self.repo = Path(repo)
        self.server = normalize_server_id(server)
        self.server_dir = self.repo / self.server

    def __repr__(self) -> str:
        return f"RuntimePaths({str(self.repo)!r}, {self.server!r})"

    @property
    def logs_dir(self) -> Path:
        return self.server_dir / LOGS_SUBDIR

    @property
    def queue_dir(self) -> Path:
        return self.server_dir / QUEUE_SUBDIR

    @property
    def state_dir(self) -> Path:
        return self.server_dir / STATE_SUBDIR

    @property
    def queue(self) -> Path:
        return self.queue_dir / QUEUE_FILE_NAME

    @property
    def breaker(self) -> Path:
        return self.state_dir / BREAKER_FILE_NAME

    @property
    def ledger(self) -> Path:
        return self.state_dir / LEDGER_FILE_NAME

    @property
    def metrics(self) -> Path:
        return self.logs_dir / METRICS_FILE_NAME

    @property
    def log(self) -> Path:
        return self.logs_dir / LOG_FILE_NAME

    @property
    def instance_lock(self) -> Path:
        return self.state_dir / INSTANCE_LOCK_NAME

    @property
    def pid(self) -> Path:
        return self.state_dir / PID_FILE_NAME

    @property
    def monitor_state(self) -> Path:
        return self.state_dir / MONITOR_STATE_FILE_NAME

    @property
    def status(self) -> Path:
        return self.state_dir / STATUS_FILE_NAME


# --------------------------------------------------------------------------- time


# datetime is imported by the functions that return or take one: a send stamps its message
# with iso_utc(), which needs only the time module.
_YEAR_10000: Final = 253402300800  # 10000-01-01T00:00:00Z, past what ISO 8601's four digits hold


def utc_now() -> _dt.datetime:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc)


def iso_utc(moment: Optional[_dt.datetime] = None, *, fraction: bool = False) -> str:
    """ISO 8601 UTC with a ``Z``; whole seconds unless ``fraction``; now when no ``moment``."""
    if moment is None:
        return iso_from_epoch(time.time(), fraction=fraction)
    import datetime as _dt

    moment = moment.astimezone(_dt.timezone.utc)
    if fraction:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def datetime_from_epoch(epoch: float) -> _dt.datetime:
    """An aware UTC datetime for a Unix time."""
    import datetime as _dt

    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)


def iso_from_epoch(epoch: float, *, fraction: bool = False, round_up: bool = False) -> str:
    """:func:`iso_utc` of a Unix time; ``round_up`` gives the next whole second (a retry time
    shown rounded down would be a moment at which the retry is still refused)."""
    if not fraction:
        epoch = math.ceil(epoch) if round_up else math.floor(epoch)
    whole = math.floor(epoch)
    micro = round((epoch - whole) * 1_000_000)  # to the microsecond, as datetime rounds a Unix time
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    if not 0 <= whole < _YEAR_10000:
        raise ValueError(f"{epoch!r} is not a time between 1970 and 9999")
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{text}.{micro // 1000:03d}Z" if fraction else text + "Z"


def format_duration(seconds: Optional[float]) -> str:
    """``4 s``, ``3 min 5 s``, ``2 h 13 min``, ``3 d 4 h``; ``unknown`` for no value.

    The one way a duration is written for people (replies, the inbox, system_health); the
    compact column form of ``fleet_status.short_age`` is for tables only.
    """
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "unknown"
    total = max(0, int(seconds))
    if total < 60:
        return f"{total} s"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    if total < 86400:
        hours, rest = divmod(total, 3600)
        return f"{hours} h {rest // 60} min"
    days, rest = divmod(total, 86400)
    return f"{days} d {rest // 3600} h"


_TS_RE = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?"
    r"\s*(Z|[+-]\d{2}:?\d{2})?\s*$",
    re.IGNORECASE,
)


def parse_timestamp(value: object) -> Optional[_dt.datetime]:
    """Parse every timestamp form seen in real fleets; ``None`` when it cannot be read.

    Accepted: ``2025-11-04T11:10:39Z``, 1 to 9 fractional digits, ``2025-11-04 20:45`` (UTC),
    an explicit offset. A value without zone is UTC (PROTOCOL.md, "A message").
    """
    if not isinstance(value, str):
        return None
    import datetime as _dt

    if (len(value) == 20 and value[19] == "Z" and value[10] == "T" and value[4] == value[7] == "-"
            and value[13] == value[16] == ":" and value.isascii()
            and len(digits := value[:19].replace("-", "").replace(":", "").replace("T", "")) == 14
            and digits.isdigit()):
        # The suite's own form (iso_utc), most of what a look reads, ASCII digits wherever the
        # pattern wants one: datetime's parser takes it in half the time (anything it refuses, or
        # reads otherwise, such as 24:00, takes the pattern's way).
        try:
            moment = _dt.datetime.fromisoformat(value[:19] + "+00:00")
        except ValueError:
            moment = None
        if moment is not None and moment.hour == int(value[11:13]):
            return moment
    m = _TS_RE.match(value)
    if not m:
        return None
    year, month, day, hour, minute, second, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        moment = _dt.datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micro,
            tzinfo=_dt.timezone.utc,
        )
    except ValueError:
        return None
    if zone and zone.upper() != "Z":
        sign = 1 if zone[0] == "+" else -1
        digits = zone[1:].replace(":", "")
        offset = _dt.timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        try:
            moment = moment - sign * offset
        except OverflowError:  # "9999-12-31T23:59:59-23:59" lies past the last date there is
            return None
    return moment


def timestamp_seconds(value: object) -> Optional[float]:
    """:func:`parse_timestamp` as seconds since the epoch (the same number as its
    ``.timestamp()``, ``None`` for the same values), worked out without :mod:`datetime`: sorting
    a listing needs no more, and a short command then never imports it."""
    if not isinstance(value, str):
        return None
    m = _TS_RE.match(value)
    if not m:
        return None
    year, month, day, hour, minute, second = (int(part or 0) for part in m.groups()[:6])
    if not (1 <= year <= 9999 and 1 <= month <= 12 and 1 <= day <= _days_in_month(year, month)
            and hour <= 23 and minute <= 59 and second <= 59):
        return None
    frac, zone = m.group(7), m.group(8)
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second
    if zone and zone.upper() != "Z":
        digits = zone[1:].replace(":", "")
        offset = int(digits[:2]) * 3600 + int(digits[2:]) * 60
        seconds -= offset if zone[0] == "+" else -offset
        if not _FIRST_SECOND <= seconds <= _LAST_SECOND:
            return None  # past the dates there are (datetime's OverflowError)
    return (seconds * 10**6 + int((frac or "0")[:6].ljust(6, "0"))) / 10**6  # as timedelta.total_seconds


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        return 29 if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0) else 28
    return 30 if month in (4, 6, 9, 11) else 31


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to that date of the proleptic Gregorian calendar (H. Hinnant's
    ``days_from_civil``)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year - 719468


_FIRST_SECOND: Final = _days_from_civil(1, 1, 1) * 86400  # 0001-01-01T00:00:00Z
_LAST_SECOND: Final = _days_from_civil(9999, 12, 31) * 86400 + 86399  # 9999-12-31T23:59:59Z


# --------------------------------------------------------------------------- files

# Local runtime files (``<repo>/<server>/{logs,queue,state}/...``) are opened without following
# symlinks and checked with lstat (PROTOCOL.md, "Trust between servers"): a symlink that another
# member committed there once made the monitor append its log to ~/.bashrc. A symlink, folder or
# device where a runtime file belongs (or a file or symlink where a runtime folder belongs) is
# logged as critical and moved aside, never followed, then a fresh one is made. The checks guard
# against what a shared repository can place in the working tree; a local user who can swap files
# between the check and the use can already write the files themselves.
# A time stamped further ahead than this was written by a clock that was wrong (health, status).
CLOCK_SKEW_TOLERANCE: Final = 300.0
MAX_STATE_BYTES: Final = 128 * 1024 * 1024  # a local state file larger than this is not ours
_O_NOFOLLOW: Final = getattr(os, "O_NOFOLLOW", 0)  # POSIX; Windows relies on the lstat check
_O_NONBLOCK: Final = getattr(os, "O_NONBLOCK", 0)  # a FIFO must not block the open
_O_BINARY: Final = getattr(os, "O_BINARY", 0)  # Windows: no newline translation


class NotARegularFile(SuiteError):
    """A runtime path is a symlink, or a file where a folder belongs, or the other way round."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_NAME_SURROGATE: Final = 0x20000000  # Windows reparse tags of links and junctions have this bit


def is_link(info: os.stat_result) -> bool:
    """Whether an ``os.lstat`` result is a symlink, or a Windows junction (which lstat does not
    call a link); cloud-file placeholders and other reparse points are files like any other."""
    return stat.S_ISLNK(info.st_mode) or bool(getattr(info, "st_reparse_tag", 0) & _NAME_SURROGATE)


def _kind(info: os.stat_result) -> str:
    if is_link(info):
        return "a symbolic link"
    if stat.S_ISDIR(info.st_mode):
        return "a folder"
    if stat.S_ISREG(info.st_mode):
        return "a file"
    return "a special file"


def _lstat(path: Path) -> Optional[os.stat_result]:
    """``os.lstat`` or ``None`` when nothing is there (a file where a parent folder belongs too)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def runtime_folders(path: "os.PathLike[str] | str") -> Optional[Tuple[Path, Path]]:
    """``(<repo>/<server>, <repo>/<server>/<sub>)`` when ``path`` names a runtime file in a clone.

    Only a clone's working tree receives files from other machines, so only there are the
    folders themselves checked; any other path is written as given.
    """
    target = Path(path)
    sub = target.parent
    server = sub.parent.name
    if (sub.name in RUNTIME_SUBDIRS and server == server.lower() and is_valid_server_id(server)
            and os.path.lexists(sub.parent.parent / ".git")):
        return sub.parent, sub
    return None


def _check_folder(folder: Path) -> Optional[os.stat_result]:
    """lstat of a runtime folder; :class:`NotARegularFile` when it is anything but a real folder."""
    info = _lstat(folder)
    if info is not None and (is_link(info) or not stat.S_ISDIR(info.st_mode)):
        raise NotARegularFile(folder, f"it is {_kind(info)}, not a folder")
    return info


def _make_real_folder(folder: Path) -> None:
    """``folder`` as a real directory: created when missing, moved aside first when it is not one."""
    try:
        info = _check_folder(folder)
    except NotARegularFile as exc:
        move_aside(folder, exc.reason)
        info = None
    if info is None:
        try:
            os.mkdir(folder)
        except FileExistsError:
            _check_folder(folder)  # made meanwhile by another process: a folder, or refuse


def _prepare_target(target: Path) -> None:
    """Before ``target`` is written or locked: real runtime folders, and no symlink in its place."""
    folders = runtime_folders(target)
    if folders is not None:
        server, sub = folders
        if _lstat(sub) is None:
            server.parent.mkdir(parents=True, exist_ok=True)
            ensure_excluded(server.parent, server.name)
        _make_real_folder(server)
        _make_real_folder(sub)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
    info = _lstat(target)
    if info is not None and (is_link(info) or not stat.S_ISREG(info.st_mode)):
        # Replacing a symlink would not write through it, but a folder cannot be replaced and a
        # lock file is opened in place: both are set aside first, and reported.
        move_aside(target, f"it is {_kind(info)}, not a file")


def read_local_file(path: "os.PathLike[str] | str", *, max_bytes: int = MAX_STATE_BYTES) -> Optional[bytes]:
    """The bytes of a local regular file, ``None`` when it does not exist. Reads only, moves nothing.

    Never follows a symlink in the file's place (``O_NOFOLLOW``, and an lstat check where that flag
    does not exist) nor, for a runtime file, in the place of its two folders. Raises
    :class:`NotARegularFile` for a symlink, folder or device, :class:`BadInput` for a file larger
    than ``max_bytes``, and ``OSError`` when the file cannot be read.
    """
    target = Path(path)
    for folder in runtime_folders(target) or ():
        if _check_folder(folder) is None:
            return None
    info = _lstat(target)
    if info is None:
        return None
    if is_link(info) or not stat.S_ISREG(info.st_mode):
        raise NotARegularFile(target, f"it is {_kind(info)}, not a file")
    try:
        fd = os.open(target, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_BINARY)
    except FileNotFoundError:
        return None  # replaced or removed since the lstat
    except OSError as exc:
        if _O_NOFOLLOW and exc.errno == errno.ELOOP:
            raise NotARegularFile(target, "it is a symbolic link, not a file") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise NotARegularFile(target, "it is not a regular file")
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise BadInput(f"{target} is more than {max_bytes} bytes")
    return data


def atomic_write_bytes(path: "os.PathLike[str] | str", data: bytes, *, mode: Optional[int] = None) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half.

    Temporary file in the same folder, flush, fsync, ``os.replace``; on Windows the replace is
    retried briefly while another process holds the target open. A runtime file's folders must
    be real folders and the target a regular file: anything else is moved aside first (critical).
    """
    target = Path(path)
    _prepare_target(target)
    replace_file(target, data, mode=mode)


def replace_file(target: Path, data: bytes, *, mode: Optional[int] = None) -> None:
    """The write half of :func:`atomic_write_bytes`, for a folder the caller chose (a metrics
    textfile for node_exporter): creates no folder and moves nothing aside. ``mode``: the new
    file's permissions on POSIX (a temporary file is created private, 0600)."""
    import tempfile  # lazy: a send writes no state file

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _replace_with_retry(tmp_name, target)
        tmp_name = ""
    finally:
        if tmp_name:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


STALE_TEMP_AGE: Final = 600.0  # a write's temporary file lives for a moment; older is a killed writer's


def remove_stale_temp_files(folder: "os.PathLike[str] | str", max_age: float = STALE_TEMP_AGE) -> int:
    """Remove the temporary files (``.<name>.*.tmp``) that writers killed mid-write left in
    ``folder`` (:func:`replace_file` removes its own otherwise); how many. Only regular files
    older than ``max_age`` seconds, never through a link."""
    removed = 0
    now = time.time()
    here = Path(folder)
    if here.is_symlink() or here.parent.is_symlink():
        return 0  # a runtime folder is never a link (a fast-forward's, say): nothing in it is ours
    try:
        entries = list(os.scandir(here))
    except OSError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > max_age:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to remove
    return removed


def _replace_with_retry(src: str, dst: Path) -> None:
    deadline = time.monotonic() + 2.0
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            # Windows: a reader holding the target open makes replace fail for a moment.
            if os.name != "nt" or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# Bounds on JSON read from another machine (PROTOCOL.md, "Trust between servers"). A document
# that breaks one is bad input: one clear line, never a RecursionError or a minutes-long parse.
MAX_JSON_DEPTH: Final = 32  # a mailbox entry needs 4 levels; rules and state files fewer
MAX_INT_DIGITS: Final = 30  # json turns digits into int in quadratic time on Python < 3.11


class BadInput(SuiteError):
    """A document from the shared repository or a local file breaks a bound or does not parse."""


_STRING_BODY = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[]{}')
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number with {len(text)} digits")
    return int(text)


def json_depth_exceeds(raw: bytes, max_depth: int) -> bool:
    """Whether JSON text nests deeper than ``max_depth``, found in C-speed passes (no recursion).

    Strings are blanked first; then each pass removes the innermost empty pairs, so a document
    of depth d is empty after d passes. Unbalanced text is left to the parser to refuse.
    """
    # Escaped backslashes, then escaped quotes, go first (left to right, as JSON reads them), so
    # every quote left delimits a string; then only quotes and brackets are kept, and strings go.
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    if text.count(b'"') % 2 == 0:  # every quote has a partner (as in any JSON text)
        # Two quotes side by side (an empty string, or the end of one and the start of the
        # next) can go first: every other quote keeps its partner, and the pattern below is left
        # a tenth of the work.
        text = text.replace(b'""', b"")
    brackets = _STRING_BODY.sub(b"", text)
    for _ in range(max_depth):
        if not brackets:
            return False
        shorter = _EMPTY_PAIR.sub(b"", brackets)
        if shorter == brackets:
            return False  # unbalanced: not JSON, the parser says so
        brackets = shorter
    return bool(brackets) and _EMPTY_PAIR.search(brackets) is not None


def load_json_bounded(raw: "bytes | str", *, what: str, max_bytes: int,
                      max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON that another machine (or a damaged disk) may have written, within bounds.

    Refuses, with :class:`BadInput` and a one-line reason naming ``what``: more than
    ``max_bytes``, nesting deeper than ``max_depth``, integers longer than
    :data:`MAX_INT_DIGITS` digits, text that is not UTF-8 JSON. A UTF-8 BOM is allowed
    (PowerShell 5 writes one).
    """
    data = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    if len(data) > max_bytes:
        raise BadInput(f"{what} is {len(data)} bytes, more than the {max_bytes} allowed")
    if json_depth_exceeds(data, max_depth):
        raise BadInput(f"{what} nests deeper than {max_depth} levels")
    try:
        text = data.decode("utf-8")  # (as "utf-8-sig" does, without loading that codec's module)
        return json.loads(text[1:] if text.startswith("\ufeff") else text, parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BadInput(f"{what} does not parse: {one_line(exc, 200)}") from None


def dump_json_text(data: Any) -> str:
    """The suite's one JSON layout for files and ``--json`` reports: 2-space indent, ASCII only
    (any console and any code page shows it), a final newline."""
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def dump_json_bytes(data: Any) -> bytes:
    return dump_json_text(data).encode("ascii")


def atomic_write_json(path: "os.PathLike[str] | str", data: Any) -> None:
    atomic_write_bytes(path, dump_json_bytes(data))


def move_aside(path: Path, reason: str) -> Path:
    """Rename an unreadable file (or a symlink or folder where it does not belong) to
    ``<name>.corrupt-<UTC stamp>`` and log it as critical. A symlink is renamed, never followed.

    When another process has moved it already, nothing is renamed and nothing logged.
    """
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return aside
    log.critical(
        "%s could not be used (%s); moved aside to %s and started afresh",
        path, reason, aside.name, extra={"metadata": {"path": str(path), "aside": str(aside)}},
    )
    return aside


def load_state_file(
    path: "os.PathLike[str] | str",
    *,
    version: int,
    fresh: Callable[[], Dict[str, Any]],
    migrate: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
    problem: Optional[Callable[[Dict[str, Any]], Optional[str]]] = None,
    max_bytes: int = MAX_STATE_BYTES,
) -> Dict[str, Any]:
    """Read a versioned JSON state file (STYLE.md rule 11).

    Missing: ``fresh()``. Moved aside (never emptied), then ``fresh()``: a file that does not parse
    or breaks the bounds of :func:`load_json_bounded`, that is not an object, whose ``version`` is
    not a whole number, for which ``problem(data)`` names a problem (a wrong shape), or that is a
    symlink, folder or device (a runtime file's folders likewise, see :func:`read_local_file`).
    Older version: ``migrate``. Newer version: :class:`SuiteError`, so an old program never
    rewrites a newer program's state. ``OSError`` when the file cannot be read.
    """
    target = Path(path)
    try:
        raw = read_local_file(target, max_bytes=max_bytes)
    except NotARegularFile as exc:
        move_aside(exc.path, exc.reason)
        return fresh()
    except BadInput as exc:
        move_aside(target, str(exc))
        return fresh()
    if raw is None:
        return fresh()
    try:
        data = load_json_bounded(raw, what=target.name, max_bytes=max_bytes)
    except BadInput as exc:
        move_aside(target, str(exc))
        return fresh()
    found = data.get("version", 1) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        wrong: Optional[str] = "not a JSON object"
    elif isinstance(found, bool) or not isinstance(found, int) or found < 1:
        wrong = f"format version {found!r} is not a whole number from 1"
    else:
        wrong = None
    if wrong is not None:
        move_aside(target, wrong)
        return fresh()
    if found > version:
        raise SuiteError(f"{target} has format version {found!r}, newer than this program's {version}")
    if found < version and migrate is not None:
        data = migrate(data)
    wrong = problem(data) if problem is not None else None
    if wrong is not None:
        move_aside(target, wrong)
        return fresh()
    data["version"] = version
    return data


def file_lock(path: "os.PathLike[str] | str", timeout: float = 10.0):
    """A cross-process lock on ``path`` (a separate ``.lock`` file), Windows and POSIX.

    A symlink or folder in the lock file's place is moved aside first: some lock libraries open
    the file with ``O_TRUNC``, which through a symlink would empty the file it points to.
    """
    from filelock import FileLock  # lazy: not every command needs it

    _prepare_target(Path(path))
    return FileLock(str(path), timeout=timeout)


# --------------------------------------------------------------------------- runtime folders


def _info_exclude_path(repo: Path) -> Optional[Path]:
    """``info/exclude`` of the clone at ``repo`` (plain clone, worktree or submodule)."""
    from fleet_git import git_layout  # the owner of the git-dir layout; it imports this module

    layout = git_layout(repo)
    return None if layout is None else layout.common_dir / "info" / "exclude"


def ensure_excluded(repo: "os.PathLike[str] | str", server_id: str) -> None:
    """Keep ``<server>/logs|queue|state`` (and runtime folders moved aside, ``<server>/*.corrupt-*``)
    out of git via the clone's own ``info/exclude``.

    PROTOCOL.md: runtime files never dirty the shared repository and never need a commit.
    """
    exclude = _info_exclude_path(Path(repo))
    if exclude is None:
        return
    server = normalize_server_id(server_id)
    # Runtime folders moved aside (a symlink or file in their place) stay out of git too.
    wanted = [f"/{server}/{sub}/" for sub in RUNTIME_SUBDIRS] + [f"/{server}/*.corrupt-*"]
    try:
        current = exclude.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        current = ""
    lines = set(current.splitlines())
    missing = [line for line in wanted if line not in lines]
    if not missing:
        return
    prefix = "" if not current or current.endswith("\n") else "\n"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    with open(exclude, "a", encoding="utf-8") as handle:
        handle.write(prefix + "# fleet monitor runtime files (never committed)\n")
        handle.write("".join(line + "\n" for line in missing))


def runtime_dir(repo: "os.PathLike[str] | str", server_id: str, sub: str) -> Path:
    """``<repo>/<server>/<sub>`` (``logs``, ``queue`` or ``state``), created and git-excluded.

    The repository folder itself must exist: a default such as ``K:/Projects/Build`` is never
    created by accident on a machine where it means a relative path. ``<server>`` and ``<sub>``
    must be real folders: a file or symlink in their place is moved aside (critical) and a folder
    made, so nothing is ever written through a link (PROTOCOL.md, "Trust between servers").
    """
    root = Path(repo)
    if not root.is_dir():
        raise UsageError(f"repository folder {root} does not exist (set --repo or BUILD_REPO_PATH)")
    server = server_dir(root, server_id)
    folder = server / sub
    info = _lstat(folder)
    if info is not None and stat.S_ISDIR(info.st_mode) and not is_link(info):
        parent = _lstat(server)
        if parent is not None and stat.S_ISDIR(parent.st_mode) and not is_link(parent):
            return folder
    ensure_excluded(root, server_id)
    _make_real_folder(server)
    _make_real_folder(folder)
    return folder
