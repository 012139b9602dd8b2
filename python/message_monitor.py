"""Watch the fleet mailbox: show new mail for this server, mark it read, keep the clone current.

Usage::

    python3 python/message_monitor.py --init --repo ~/fleet/Build      # a local fleet to try
    python3 python/message_monitor.py --repo ~/fleet/Build --server code2
    python3 python/message_monitor.py --once                             # one cycle (cron, scripts)

Each cycle asks the remote for the shared branch's tip (one network call when nothing changed),
fetches when it moved, reads ``coordination/messages.json`` from the fetched ref (never from the
working tree), shows each new message addressed to this server, records it locally before showing
it (a restart never shows a message twice), marks everything processed in the cycle as read in one
transaction (PROTOCOL.md), and fast-forwards the working tree only when that cannot touch local
work. Read marks that could not be pushed are kept and pushed on a later cycle.

Exit codes: 0 stopped on request (Ctrl+C, SIGTERM) or the one-shot command ran; 1 failure with a
one-line reason on stderr (``--once``: the remote could not be reached, the mailbox is corrupt or
the shared branch is not on the remote; another monitor already runs for this repository and
server); 2 bad usage or bad input (a running monitor whose shared branch is not on the remote at
start stops with 2: creating it is ``--init``'s job); 130 a one-shot command interrupted by Ctrl+C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from fleet_cli import ArgumentParser, error_line, run_cli
from fleet_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    MAX_INTERVAL,
    MIN_INTERVAL,
    SuiteError,
    UsageError,
    default_interval,
    default_repo_path,
    finite_number,
    normalize_server_id,
    resolve_server_id,
    write_line,
)
from fleet_git import Clone

# What tests and users import from here (the seed's API), re-exported from the monitor_* modules
# that own it since the split: the cycle, its options, local files, the one-shot commands.
from monitor_admin import (  # noqa: F401 - re-exported
    init_fleet,
    option_name,
    render_message,
    repair_mailbox,
    run_one_shot,
    status_report,
)
from monitor_cycle import (  # noqa: F401 - re-exported
    MARK_READ_MODES,
    CycleReport,
    Monitor,
    MonitorOptions,
    MonitorParts,
    ReadingOptions,
)
from monitor_duties import HEALTH_EVERY, PRESENCE_SECONDS  # noqa: F401 - re-exported
from monitor_files import MonitorState  # noqa: F401 - re-exported
from monitor_remote import BACKOFF_DELAYS, BACKOFF_ENV, backoff_delays  # noqa: F401 - re-exported
from monitor_worktree import release_signature_problem, runtime_paths_changed  # noqa: F401 - re-exported

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- CLI


# Archive by default (issue 16): the archive never hides unread mail, and an unarchived mailbox
# makes every send and cycle cost what its size costs. Applied in the loop, not as argparse's
# default, so that one-shot commands still refuse a --auto-archive-days that was really given.
DEFAULT_AUTO_ARCHIVE_DAYS = 30.0


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="message_monitor.py",
        description="Watch the fleet mailbox in the shared git repository.",
        epilog="Exit codes: 0 done or stopped on request, 1 failure, 2 bad usage, 130 interrupted.",
    )
    parser.add_argument("--repo", default=None, help="fleet clone (default: $BUILD_REPO_PATH or K:/Projects/Build)")
    parser.add_argument("--server", default=None, help="this server's id (default: $SERVER_ID or code2)")
    parser.add_argument("--interval", type=finite_number("--interval", MIN_INTERVAL, MAX_INTERVAL),
                        default=None, metavar="SEC",
                        help="seconds between cycles (default: $MONITOR_INTERVAL or 10)")
    parser.add_argument("--branch", default=None, help="shared branch (default: the remote's default)")
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    parser.add_argument("--rules", default=None, metavar="FILE",
                        help="automatic-reply rules (overrides coordination/auto_reply_rules.json)")
    parser.add_argument("--no-auto-reply", action="store_true", help="never reply automatically")
    parser.add_argument("--heartbeat-minutes", default=None, metavar="N",
                        type=finite_number("--heartbeat-minutes", 0, MAX_HEARTBEAT_MINUTES),
                        help="publish presence in this server's state ref every N minutes (default 5)")
    parser.add_argument("--heartbeat-on-main", action="store_true",
                        help="also commit <server>/heartbeat.json to the shared branch (older dashboards)")
    parser.add_argument("--mark-read", choices=MARK_READ_MODES, default=None,
                        help="whether showing a message marks it read (default: on-show on a "
                             "terminal, never as a service)")
    parser.add_argument("--legacy-marks", action="store_true",
                        help="also write read marks and acknowledgements into the mailbox (older tools)")
    parser.add_argument("--on-message", default=None, metavar="CMD",
                        help="run CMD for each new message (JSON on stdin, FLEET_MSG_* variables)")
    parser.add_argument("--on-message-timeout", default=60.0, metavar="SEC",
                        type=finite_number("--on-message-timeout", 0.1, 86400),
                        help="seconds CMD may run before it is stopped (default 60)")
    parser.add_argument("--metrics-textfile", default=None, metavar="PATH",
                        help="write Prometheus metrics for node_exporter's textfile collector")
    parser.add_argument("--auto-archive-days", default=None, metavar="N",
                        type=finite_number("--auto-archive-days", 0, MAX_ARCHIVE_DAYS),
                        help="once a day, archive messages older than N days that are done with "
                             f"(default {DEFAULT_AUTO_ARCHIVE_DAYS:g}; 0 turns it off)")
    parser.add_argument("--upgrade-signed-by", default=None, metavar="FILE",
                        help="restart into a new suite version pushed to the repository only when "
                             "its commit is signed by a key in FILE (git's allowed-signers format)")
    commands = parser.add_argument_group("one-shot commands (run and exit)")
    commands.add_argument("--init", action="store_true",
                          help="create --repo as a clone of a new local bare origin with an empty mailbox")
    commands.add_argument("--status", action="store_true", help="show health, breaker, queue and metrics")
    commands.add_argument("--json", action="store_true", help="with --status: print JSON")
    commands.add_argument("--repair", action="store_true",
                          help="rebuild an unparseable mailbox from its last good version plus salvage")
    commands.add_argument("--archive-days", default=None, metavar="N",
                          type=finite_number("--archive-days", 0, MAX_ARCHIVE_DAYS),
                          help="archive messages older than N days that are done with, then exit")
    commands.add_argument("--retry-dead", action="store_true",
                          help="give dead messages in the retry queue five more attempts")
    commands.add_argument("--retire", action="store_true",
                          help="record that --server has left the fleet for good (its monitor stopped): "
                               "the status and the archive stop waiting for it")
    commands.add_argument("--print-systemd-unit", action="store_true", help="print a systemd unit for this machine")
    commands.add_argument("--service-user", default=None, metavar="USER",
                          help="with --print-systemd-unit: the account the service runs as (owner of the clone)")
    commands.add_argument("--print-task-scheduler", action="store_true",
                          help="print the PowerShell that registers a Windows scheduled task")
    commands.add_argument("--self-check", action="store_true", help=argparse.SUPPRESS)
    return parser



# One-shot commands: each runs and exits, so at most one may be given (a second one would be
# ignored in silence). The loop's options make no sense with most of them either; the two
# service definitions carry them into the service's command line instead.
ONE_SHOT_COMMANDS = ("init", "status", "repair", "archive_days", "retry_dead", "retire", "print_systemd_unit",
                     "print_task_scheduler", "self_check")
SERVICE_DEFINITIONS = ("print_systemd_unit", "print_task_scheduler")
LOOP_OPTIONS = ("once", "heartbeat_minutes", "auto_archive_days", "metrics_textfile", "rules",
                "no_auto_reply", "upgrade_signed_by", "mark_read", "legacy_marks", "heartbeat_on_main",
                "on_message")
MAX_HEARTBEAT_MINUTES = 7 * 24 * 60.0  # a week: beyond that a heartbeat tells nothing
MAX_ARCHIVE_DAYS = 36500.0  # a century; larger ages overflow the date arithmetic


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest)
    return value is not None and value is not False  # 0 (as in --archive-days 0) is given


def _check_combination(args: argparse.Namespace) -> None:
    """Refuse options that cannot run together (exit 2), rather than run one and drop the rest."""
    commands = [dest for dest in ONE_SHOT_COMMANDS if _given(args, dest)]
    if len(commands) > 1:
        raise UsageError(f"{' and '.join(option_name(c) for c in commands)} cannot run together; "
                         "give one command at a time")
    command = commands[0] if commands else None
    if args.json and command != "status":
        raise UsageError("--json goes with --status only")
    if args.service_user is not None and command != "print_systemd_unit":
        raise UsageError("--service-user goes with --print-systemd-unit only")
    if command is None:
        return
    loop = [dest for dest in LOOP_OPTIONS if _given(args, dest)
            and (command not in SERVICE_DEFINITIONS or dest == "once")]
    if loop:
        raise UsageError(f"{option_name(loop[0])} is an option of the monitoring loop and cannot go "
                         f"with {option_name(command)}")


def _allowed_signers(path: str) -> str:
    """``--upgrade-signed-by FILE`` as an absolute path to a readable regular file (else exit 2)."""
    target = Path(path).expanduser().resolve()
    try:
        with open(target, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise UsageError(f"--upgrade-signed-by {path}: {exc.strerror or exc}") from None
    if not target.is_file():
        raise UsageError(f"--upgrade-signed-by {path}: not a file")
    return str(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli("message_monitor", lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    _check_combination(args)
    repo = args.repo or default_repo_path()
    if args.init:
        if args.server is not None:
            normalize_server_id(args.server)
        write_line(init_fleet(repo, args.branch or "main"))
        return EXIT_OK
    server = resolve_server_id(args.server)
    interval = args.interval if args.interval is not None else default_interval()
    backoff = backoff_delays(os.environ.get(BACKOFF_ENV))
    if args.metrics_textfile:
        from monitoring_metrics import check_textfile_path

        check_textfile_path(args.metrics_textfile)  # a missing folder is refused, not created
    text = run_one_shot(args, repo, server, interval)
    if text is not None:
        if text:
            write_line(text)
        return EXIT_OK
    if args.upgrade_signed_by:
        args.upgrade_signed_by = _allowed_signers(args.upgrade_signed_by)
    clone = Clone(repo, args.branch)
    _setup_logging(clone.root, server, args.quiet)
    if args.rules:
        from auto_reply import RuleSource

        RuleSource(args.rules)  # an invalid local rule file is an error at start (exit 2)
    from fleet_service import InstanceLock

    lock = InstanceLock(clone.root, server).acquire()
    try:
        # The loop maps its own stops: Ctrl-C or SIGTERM is a requested stop (exit 0).
        return _run_monitor(args, clone, server, interval, backoff)
    finally:
        lock.release()


def _setup_logging(root: Path, server: str, quiet: bool) -> None:
    from structured_log import setup_logging

    setup_logging(str(root), server, console_level=logging.WARNING if quiet else logging.INFO)


def _nothing() -> None:
    return None


def _run_monitor(args: argparse.Namespace, clone: Clone, server: str, interval: float,
                 backoff: Sequence[float]) -> int:
    from fleet_service import default_notifier, install_stop_handlers, restart_process

    terminal = sys.stdout.isatty()
    stop = threading.Event()
    notifier = default_notifier()
    clone.add_network_hook(notifier.keepalive)  # a slow git call never starves the watchdog
    restore: Callable[[], None] = _nothing
    try:
        # Inside the handlers: a state file of a newer version, or a disk that refuses the first
        # write, is one line and exit 1, not a traceback.
        monitor = Monitor(clone, server, interval,
                          options=MonitorOptions(
                              one_shot=args.once, backoff=backoff, auto_reply=not args.no_auto_reply,
                              rules_path=args.rules, heartbeat_minutes=args.heartbeat_minutes,
                              metrics_textfile=args.metrics_textfile,
                              auto_archive_days=(DEFAULT_AUTO_ARCHIVE_DAYS if args.auto_archive_days is None
                                                 else args.auto_archive_days),
                              upgrade_signers=args.upgrade_signed_by),
                          parts=MonitorParts(
                              stop_event=stop, notifier=notifier,
                              show=lambda m: write_line(render_message(m, terminal=terminal))),
                          reading=ReadingOptions(
                              mark_read=args.mark_read or ("on-show" if terminal else "never"),
                              legacy_marks=args.legacy_marks, heartbeat_on_main=args.heartbeat_on_main,
                              on_message=args.on_message, on_message_timeout=args.on_message_timeout))
        if not args.once:
            restore = install_stop_handlers(lambda name: stop.set())
        if args.once:
            try:
                report = monitor.cycle()
            except BaseException:  # interrupted in the cycle: the commands it started stop with it
                if monitor.hook is not None:
                    monitor.hook.stop()
                raise
            monitor.finish_hook()  # runs what it owes, each up to its limit (Ctrl+C: stops them)
            monitor.metrics.maybe_flush(True)
            if not report.ok:
                error_line("message_monitor", report.error)
                return EXIT_FAILURE
            return EXIT_OK
        from fleet_service import compile_suite

        compile_suite()  # the bytecode that a send or an inbox read on this server starts from
        notifier.ready(f"monitoring {clone.root} as {server}")
        log.info("monitoring %s as %s every %gs (branch %s)", clone.root, server, interval,
                 clone.branch, extra={"metadata": {"interval": interval, "branch": clone.branch}})
        code = monitor.run()
        notifier.stopping()
        if monitor.restart_requested:
            restart_process(sys.argv)
        return code
    except KeyboardInterrupt:
        write_line("message_monitor: interrupted", sys.stderr)
        return EXIT_INTERRUPTED if args.once else EXIT_OK
    except (SuiteError, OSError) as exc:  # exit 1 whatever the error's own code (as before run_cli)
        error_line("message_monitor", exc)
        return EXIT_FAILURE
    finally:
        restore()


if __name__ == "__main__":
    raise SystemExit(main())
