"""Shared ground for the fleet suite: errors, exit codes, server ids, defaults, state files.

Every module of the suite imports this one and nothing heavier, so a one-shot command stays
fast to start. Contract: ``PROTOCOL.md`` (server ids, defaults, never-committed local paths).

Library code raises :class:`SuiteError` subclasses; only a CLI's ``main`` turns them into exit
codes (see :data:`EXIT_OK` and friends).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Final, List, Optional


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


_deferred_setup: List[Callable[[], None]] = []


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
EXIT_INTERRUPTED: Final = 130

DEFAULT_REPO: Final = "K:/Projects/Build"
DEFAULT_SERVER: Final = "code2"
DEFAULT_INTERVAL: Final = 10.0
BROADCAST: Final = "all"
SUITE_VERSION: Final = "1.0.0"

SERVER_ID_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

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
    if canon != value.lower() or not SERVER_ID_RE.match(canon) or canon in (".", ".."):
        raise UsageError(
            f"invalid server id {value!r}: use 1-64 characters a-z 0-9 . _ - starting with a "
            "letter or digit"
        )
    return canon


def is_valid_server_id(value: object) -> bool:
    try:
        normalize_server_id(value)
    except UsageError:
        return False
    return True


# --------------------------------------------------------------------------- defaults


def default_repo_path() -> str:
    return os.environ.get("BUILD_REPO_PATH") or DEFAULT_REPO


def default_server_id() -> str:
    return os.environ.get("SERVER_ID") or DEFAULT_SERVER


def resolve_server_id(server_id: Optional[str]) -> str:
    """The server id to use: the argument, else ``SERVER_ID``, else ``code2`` (validated)."""
    return normalize_server_id(server_id if server_id is not None else default_server_id())


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
    return server_dir(repo, server_id) / "state"


# --------------------------------------------------------------------------- time


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def iso_utc(moment: Optional[_dt.datetime] = None, *, fraction: bool = False) -> str:
    """ISO 8601 UTC with a ``Z``; whole seconds unless ``fraction``."""
    moment = (moment or utc_now()).astimezone(_dt.timezone.utc)
    if fraction:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


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
        moment = moment - sign * offset
    return moment


# --------------------------------------------------------------------------- files


def atomic_write_bytes(path: "os.PathLike[str] | str", data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old or the new file, never half.

    Temporary file in the same folder, flush, fsync, ``os.replace``; on Windows the replace is
    retried briefly while another process holds the target open.
    """
    import tempfile  # lazy: a send writes no state file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=str(target.parent))
    try:
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
        return json.loads(data.decode("utf-8-sig"), parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInput(f"{what} does not parse: {text[:200]}") from None


def dump_json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=True) + "\n").encode("ascii")


def atomic_write_json(path: "os.PathLike[str] | str", data: Any) -> None:
    atomic_write_bytes(path, dump_json_bytes(data))


def move_aside(path: Path, reason: str) -> Path:
    """Rename an unreadable file to ``<name>.corrupt-<UTC stamp>`` and log it as critical."""
    stamp = utc_now().strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    os.replace(path, aside)
    log.critical(
        "%s could not be read (%s); moved aside to %s and started afresh",
        path, reason, aside.name, extra={"metadata": {"path": str(path), "aside": str(aside)}},
    )
    return aside


def load_state_file(
    path: "os.PathLike[str] | str",
    *,
    version: int,
    fresh: Callable[[], Dict[str, Any]],
    migrate: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
) -> Dict[str, Any]:
    """Read a versioned JSON state file (STYLE.md rule 11).

    Missing: ``fresh()``. Unparseable or not an object: moved aside (never emptied), ``fresh()``.
    Older version: ``migrate``. Newer version: :class:`SuiteError`, so an old program never
    rewrites a newer program's state.
    """
    target = Path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return fresh()
    try:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        move_aside(target, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return fresh()
    found = data.get("version", 1)
    if not isinstance(found, int) or found > version:
        raise SuiteError(f"{target} has format version {found!r}, newer than this program's {version}")
    if found < version and migrate is not None:
        data = migrate(data)
    data["version"] = version
    return data


def file_lock(path: "os.PathLike[str] | str", timeout: float = 10.0):
    """A cross-process lock on ``path`` (a separate ``.lock`` file), Windows and POSIX."""
    from filelock import FileLock  # lazy: not every command needs it

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), timeout=timeout)


# --------------------------------------------------------------------------- runtime folders


def _info_exclude_path(repo: Path) -> Optional[Path]:
    """``info/exclude`` of the clone at ``repo`` (plain clone, worktree or submodule)."""
    dotgit = repo / ".git"
    if dotgit.is_dir():
        return dotgit / "info" / "exclude"
    if dotgit.is_file():
        text = dotgit.read_text(encoding="utf-8", errors="replace").strip()
        if text.startswith("gitdir:"):
            gitdir = Path(text[len("gitdir:"):].strip())
            if not gitdir.is_absolute():
                gitdir = (repo / gitdir).resolve()
            common = gitdir / "commondir"
            if common.is_file():
                base = Path(common.read_text(encoding="utf-8").strip())
                gitdir = base if base.is_absolute() else (gitdir / base).resolve()
            return gitdir / "info" / "exclude"
    return None


def ensure_excluded(repo: "os.PathLike[str] | str", server_id: str) -> None:
    """Keep ``<server>/logs|queue|state`` out of git via the clone's own ``info/exclude``.

    PROTOCOL.md: runtime files never dirty the shared repository and never need a commit.
    """
    exclude = _info_exclude_path(Path(repo))
    if exclude is None:
        return
    server = normalize_server_id(server_id)
    wanted = [f"/{server}/{sub}/" for sub in RUNTIME_SUBDIRS]
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
    created by accident on a machine where it means a relative path.
    """
    root = Path(repo)
    if not root.is_dir():
        raise UsageError(f"repository folder {root} does not exist (set --repo or BUILD_REPO_PATH)")
    folder = server_dir(root, server_id) / sub
    if not folder.is_dir():
        ensure_excluded(root, server_id)
        folder.mkdir(parents=True, exist_ok=True)
    return folder
