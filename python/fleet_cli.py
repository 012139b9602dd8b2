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
imports only :mod:`fleet_common`, so a one-shot command pays nothing for it.
"""

from __future__ import annotations

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

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Callable, Final, Optional, Tuple

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


def terminal_columns() -> int:
    try:
        columns = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or DEFAULT_COLUMNS
    except (AttributeError, ValueError, OSError):
        return DEFAULT_COLUMNS




def error_line(prog: str, reason: object) -> None:
    """Write ``prog: error: reason`` as one line on stderr (``reason`` may be an exception)."""
    write_line(f"{prog}: error: {one_line(reason)}", sys.stderr)


def run_cli(prog: str, body: Callable[[], int], *, on_failure: Optional[FailureRenderer] = None,
            catch_all: bool = False) -> int:
    """Run ``body`` (the CLI's work after argument parsing) and return its exit code, or the code
    for the exception that stopped it, after writing one line on stderr.

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
    except (SuiteError, OSError) as exc:
        return _failed(prog, exc, on_failure)
    except Exception as exc:  # noqa: BLE001 - only for tools whose contract says so (catch_all)
        if not catch_all:
            raise
        return _failed(prog, exc, on_failure)


def _failed(prog: str, exc: BaseException, on_failure: Optional[FailureRenderer]) -> int:
    details = getattr(exc, "details", None)
    if callable(details):  # a GitError: argv, return code, stdout and stderr for the log
        log.debug("git failure: %s", details())
    if on_failure is not None:
        code, line = on_failure(exc)
        write_line(line, sys.stderr)
        return code
    error_line(prog, exc)
    return exc.exit_code if isinstance(exc, SuiteError) else EXIT_FAILURE
