"""The one place where a command line turns the suite's exceptions into exit codes.

Every CLI's ``main`` parses its arguments, then hands the work to :func:`run_cli`, which maps
what escapes to one line on stderr and an exit code (PROTOCOL.md, "Command-line contract"):

* ``KeyboardInterrupt`` -> 130, ``prog: interrupted`` (the monitor's loop treats Ctrl-C as a
  requested stop and exits 0 itself, before anything reaches here);
* :class:`~fleet_common.UsageError` and every :class:`~fleet_common.SuiteError` -> its
  ``exit_code`` (2 for bad usage or bad input, 75 for "queued", else 1),
  ``prog: error: reason``; a :class:`~fleet_git.GitError` also logs git's argv, return code and
  output at debug level, where ``--verbose`` or the log file shows them;
* ``OSError`` (a disk that refuses a write, a missing file) -> 1, ``prog: error: reason``.

A monitoring plugin has its own failure contract (Nagios: anything unexpected is UNKNOWN, exit
3): it passes ``on_failure`` to word and number those failures itself, and ``catch_all`` to
include any other exception. Bad usage stays exit 2 either way.

Anchor: pre-commit ``pre_commit/error_handler.py`` (one handler, one message shape). This module
imports only :mod:`fleet_common` and :mod:`fleet_secrets`, so a one-shot command pays nothing for it.
It also owns how text from other machines is shown: :func:`sanitize` and :func:`preview`.

Start-up
--------
A short command (a send, an inbox read, a look at the fleet) lives for a few tens of
milliseconds, and without care most of them go to the interpreter's start and imports, not to git.
The rules, and where each is kept:

* A command's script (``send_message.py``, ``inbox.py``, ``fleet_status.py``) is a few lines that
  import its module (``fleet_send``, ``fleet_inbox``, ``fleet_report``): Python compiles the script
  it runs on every start and caches the bytecode only of what is imported.
* :mod:`typing` is for type checkers only: each module says ``TYPE_CHECKING = False`` and imports
  its type names under ``if TYPE_CHECKING:``; with ``from __future__ import annotations`` no
  annotation is evaluated at run time. ``mcp_server`` is the exception (its SDK reads annotations).
* Imported by the function that needs them, never at start: :mod:`logging` and ``structured_log``
  (``fleet_common.get_logger`` resolves on the first record), :mod:`random`
  (``fleet_common.sleep_jittered``, on a retry), :mod:`datetime` (``fleet_common``'s time
  functions; a send stamps its message with :mod:`time` alone), :mod:`shutil` (argparse's own
  formatter imports it for the terminal's width; :class:`HelpFormatter` gives the width itself,
  and every command builds its parser as :class:`ArgumentParser`, which uses it),
  :mod:`subprocess` and :mod:`threading` (``fleet_git`` names them through
  ``fleet_common.LazyModule``: a look whose git calls its script started needs neither).
* The secret check compiles a pattern only for text that holds one of its words
  (``fleet_secrets.LazyPattern``), as do the patterns only a repair, a failing fetch or a given
  duration needs; ``inbox.py`` builds only the named command's arguments.
* A listing sorts by seconds worked out without :mod:`datetime`
  (``fleet_common.timestamp_seconds``).
* The first network call does not wait for the imports: ``inbox.py`` and ``fleet_status.py``
  start it (and the reading of the clone's settings) before their module loads, and the command
  takes the started process when its own call is the same (:mod:`fleet_start`); the status also
  starts the fetch of the state refs that moved as soon as the listing is in, from a thread, while
  the imports run. Both hold the cyclic garbage collector off while their module loads and
  leave what it made to it no more, take a Ctrl+C meanwhile as one during the command
  (``fleet_start.Loading``), and end through ``fleet_start.leave``, without the interpreter's
  teardown.

``tests/test_startup.py`` runs each short command and fails when one of these is imported;
``bench/send.py``, ``bench/inbox.py`` and ``bench/fleet_status.py`` measure the result.
"""

from __future__ import annotations

import _thread
import argparse
import os
import sys

from fleet_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    SuiteError,
    UsageError,
    get_logger,
    one_line,
    write_line,
)
from fleet_secrets import LazyPattern, redact

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import re
    from typing import Any, Callable, Dict, Final, List, Optional, Tuple

    # Words and numbers a failure that is not bad usage: returns (exit code, the whole stderr line).
    FailureRenderer = Callable[[BaseException], Tuple[int, str]]

log = get_logger(__name__)

DEFAULT_COLUMNS: Final = 80  # what shutil.get_terminal_size falls back to


class HelpFormatter(argparse.HelpFormatter):
    """argparse's own formatter, given the terminal's width up front.

    Left to find the width itself, argparse imports :mod:`shutil` (and with it :mod:`bz2` and
    :mod:`lzma`) whenever a parser is built, on every start of a command whose help is rarely
    printed. The width is found the way ``shutil.get_terminal_size`` finds it: ``COLUMNS``, else
    the terminal of stdout, else 80 columns.
    """

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position,
                         width if width is not None else terminal_columns() - 2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with :class:`HelpFormatter` as its formatter, for every command of the
    suite; its subcommands' parsers (``add_subparsers``) are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def terminal_columns(fallback: int = DEFAULT_COLUMNS) -> int:
    """The terminal's width: ``COLUMNS``, else the terminal of stdout, else ``fallback``."""
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or fallback
    except (AttributeError, ValueError, OSError):
        return fallback


def color_wanted(stream: object) -> bool:
    """Whether to colour ``stream``: a terminal, and ``NO_COLOR`` unset or empty.

    ``FORCE_COLOR`` (non-empty, not ``0``) colours a non-terminal too; ``NO_COLOR`` wins over it.
    """
    if os.environ.get("NO_COLOR"):
        return False
    force = os.environ.get("FORCE_COLOR")
    if force and force != "0":
        return True
    isatty = getattr(stream, "isatty", None)
    if isatty is None:
        return False
    try:
        return bool(isatty())
    except (OSError, ValueError):
        return False


# Console colours by level: colorama's (it also turns ANSI on in a Windows console), else plain ANSI.
_ANSI_FALLBACK: Final = {
    "DEBUG": "\x1b[2m",
    "INFO": "\x1b[32m",
    "WARNING": "\x1b[33m",
    "ERROR": "\x1b[31m",
    "CRITICAL": "\x1b[1m\x1b[31m",
    "RESET": "\x1b[0m",
}
_colorama_ready = False
_colorama_guard = _thread.allocate_lock()


def level_styles() -> Dict[str, str]:
    """ANSI styles per level, from colorama (which also enables ANSI on a Windows console)."""
    global _colorama_ready
    try:
        import colorama  # lazy: only a coloured console needs it
    except ImportError:  # pragma: no cover - colorama is a runtime requirement
        return dict(_ANSI_FALLBACK)
    with _colorama_guard:
        if not _colorama_ready:
            fix = getattr(colorama, "just_fix_windows_console", None)
            if fix is not None:
                fix()
            else:  # pragma: no cover - colorama < 0.4.6
                colorama.init()
            _colorama_ready = True
    fore, style = colorama.Fore, colorama.Style
    return {
        "DEBUG": style.DIM,
        "INFO": fore.GREEN,
        "WARNING": fore.YELLOW,
        "ERROR": fore.RED,
        "CRITICAL": style.BRIGHT + fore.RED,
        "RESET": style.RESET_ALL,
    }


def error_line(prog: str, reason: object) -> None:
    """Write ``prog: error: reason`` as one line on stderr (``reason`` may be an exception)."""
    write_line(f"{prog}: error: {one_line(reason)}", sys.stderr)


_DEPENDENCIES: Final = frozenset({"psutil", "requests", "colorama", "filelock"})  # requirements.txt


def run_cli(prog: str, body: Callable[[], int], *, on_failure: Optional[FailureRenderer] = None,
            catch_all: bool = False, failure_stream: Any = None) -> int:
    """Run ``body`` (the CLI's work after argument parsing) and return its exit code, or the code
    for the exception that stopped it, after writing one line on stderr (``on_failure``'s line
    on ``failure_stream`` when given: a Nagios plugin's status line belongs on stdout).

    ``argparse`` errors are not seen here: they happen before, in ``parse_args`` (exit 2).
    """
    try:
        return body()
    except KeyboardInterrupt:
        write_line(f"{prog}: interrupted", sys.stderr)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        error_line(prog, exc)
        return exc.exit_code
    except ModuleNotFoundError as exc:  # a dependency of requirements.txt, not installed
        if exc.name not in _DEPENDENCIES:
            raise
        write_line(f"{prog}: error: the Python package {exc.name} is not installed: "
                   "pip install -r requirements.txt (in the venv the command runs from)", sys.stderr)
        return EXIT_FAILURE
    except (SuiteError, OSError) as exc:
        return _failed(prog, exc, on_failure, failure_stream)
    except Exception as exc:  # noqa: BLE001 - only for tools whose contract says so (catch_all)
        if not catch_all:
            raise
        return _failed(prog, exc, on_failure, failure_stream)


def _failed(prog: str, exc: BaseException, on_failure: Optional[FailureRenderer], stream: Any = None) -> int:
    details = getattr(exc, "details", None)
    if callable(details):  # a GitError: argv, return code, stdout and stderr for the log
        log.debug("git failure: %s", details())
    if on_failure is not None:
        code, line = on_failure(exc)
        write_line(line, stream or sys.stderr)
        return code
    error_line(prog, exc)
    return exc.exit_code if isinstance(exc, SuiteError) else EXIT_FAILURE


# --------------------------------------------------------------------------- inert text
#
# Text from another machine is shown only through these (PROTOCOL.md, "Trust between servers"),
# by the commands and by structured_log's console and files alike.

ELLIPSIS: Final = "\u2026"
# Redaction reads this much beyond what is kept, so a secret that starts in the kept part is still
# recognised whole; nothing further is read, so a huge text costs no more than a small one.
REDACTION_MARGIN: Final = 64 * 1024

# C0 controls (tab and newline included), DEL, C1 controls, Arabic letter mark, LRM/RLM,
# line/paragraph separators, bidi embeddings/overrides/isolates, lone surrogates.
_UNSAFE_RE = LazyPattern(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_NAMED_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape_match(match: "re.Match[str]") -> str:
    return _escape_char(match.group())


def _plain(text: str) -> bool:
    """Printable ASCII alone (space to ``~``), which holds nothing :data:`_UNSAFE_RE` matches:
    told at C speed, without the pattern (most text is so)."""
    return text.isascii() and text.isprintable()


def sanitize(text: object, max_len: Optional[int] = None) -> str:
    """``text`` with every control character shown as a visible, inert escape.

    Newline, carriage return and tab become ``\\n``, ``\\r``, ``\\t`` (two characters each); ESC
    becomes the four characters ``\\x1b``, so ANSI CSI/OSC sequences lose their lead byte and read
    as plain text. With ``max_len``, the result is at most that long, cut between escapes and
    ending in ``…`` when cut.
    """
    value = text if isinstance(text, str) else str(text)
    if max_len is None:
        return value if _plain(value) else _UNSAFE_RE.sub(_escape_match, value)
    if max_len <= 0:
        return ""
    # Every source character yields at least one output character, so looking at max_len + 1 of
    # them is enough to know whether the result must be cut.
    head = value[: max_len + 1]
    if _plain(head) or _UNSAFE_RE.search(head) is None:  # the common case: nothing to escape, one for one
        return head if len(head) <= max_len else head[: max_len - 1] + ELLIPSIS
    pieces: List[str] = []
    total = 0
    for char in value[: max_len + 1]:
        piece = _escape_char(char) if _UNSAFE_RE.match(char) else char
        pieces.append(piece)
        total += len(piece)
    if total <= max_len:
        return "".join(pieces)
    kept: List[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > max_len - 1:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + ELLIPSIS


def preview(text: object, length: int = 120) -> str:
    """A one-line, redacted, inert preview of message text, at most ``length`` characters.

    Redaction runs on the raw text (where a newline still ends a secret value), then
    :func:`sanitize` escapes what is left and cuts it with ``…``; the result is safe either way.
    Only the start of a long text is read (:data:`REDACTION_MARGIN` beyond what is shown).
    """
    value = text if isinstance(text, str) else str(text)
    return sanitize(redact(value[: max(length, 0) + REDACTION_MARGIN]), max_len=length)
