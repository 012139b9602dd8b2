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
one-line reason on stderr (``--once``: the remote could not be reached or the mailbox is corrupt;
another monitor already runs for this repository and server); 2 bad usage or bad input; 130 a
one-shot command interrupted by Ctrl+C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from fleet_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SUITE_VERSION,
    SuiteError,
    UsageError,
    atomic_write_json,
    default_interval,
    default_repo_path,
    iso_utc,
    load_state_file,
    normalize_server_id,
    resolve_server_id,
    runtime_dir,
    state_dir,
)
from fleet_git import MAILBOX_PATH, Clone, GitError, RemoteUnavailable, run_git
from fleet_mailbox import (
    MailboxCorrupt,
    MessageKey,
    is_addressed_to,
    is_handled_by,
    key_from_str,
    key_str,
    mark_handled,
    message_key,
    parse_document,
    serialize,
    valid_messages,
)

log = logging.getLogger(__name__)

BACKOFF_DELAYS = (2.0, 4.0, 8.0)  # the seed's retry delays for a failed fetch
HEALTH_EVERY = 10  # iterations between health checks (the seed)
STATUS_REWRITE_IDLE = 60.0  # seconds between status-file rewrites while idle
PROCESSED_CAP = 20000  # local processed keys kept (the mailbox's read_by is the lasting record)
STATE_VERSION = 1


# --------------------------------------------------------------------------- local state


class MonitorState:
    """Processed message keys and read marks not yet pushed: ``<server>/state/monitor_state.json``.

    Written before a message is shown, so a restart never shows it twice; written only when it
    changed, so an idle monitor rewrites nothing.
    """

    def __init__(self, repo: Path, server: str) -> None:
        self.path = state_dir(repo, server) / "monitor_state.json"
        self.repo = repo
        self.server = server
        data = load_state_file(self.path, version=STATE_VERSION, fresh=self._fresh)
        self.processed: Dict[MessageKey, None] = {
            key_from_str(k): None for k in data.get("processed", []) if isinstance(k, str)}
        self.pending_marks: Set[MessageKey] = {
            key_from_str(k) for k in data.get("pending_marks", []) if isinstance(k, str)}
        self.pending_acks: Set[MessageKey] = {
            key_from_str(k) for k in data.get("pending_acks", []) if isinstance(k, str)}
        self.extra: Dict[str, Any] = {k: v for k, v in data.items() if k not in (
            "version", "server", "processed", "pending_marks", "pending_acks", "updated_at")}
        self.dirty = False

    def _fresh(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "server": self.server}

    def record(self, key: MessageKey, *, ack: bool = False) -> None:
        self.processed[key] = None
        self.pending_marks.add(key)
        if ack:
            self.pending_acks.add(key)
        self.dirty = True

    def marks_pushed(self, keys: Set[MessageKey], acks: Set[MessageKey]) -> None:
        self.pending_marks -= keys
        self.pending_acks -= acks
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        while len(self.processed) > PROCESSED_CAP:
            oldest = next(iter(self.processed))
            if oldest in self.pending_marks:
                break
            del self.processed[oldest]
        runtime_dir(self.repo, self.server, "state")
        data: Dict[str, Any] = {
            "version": STATE_VERSION, "server": self.server,
            "processed": [key_str(k) for k in self.processed],
            "pending_marks": sorted(key_str(k) for k in self.pending_marks),
            "pending_acks": sorted(key_str(k) for k in self.pending_acks),
            "updated_at": iso_utc(),
        }
        data.update(self.extra)
        atomic_write_json(self.path, data)
        self.dirty = False


# --------------------------------------------------------------------------- the cycle


class CycleReport:
    """What one cycle did (for tests, the status line and the systemd STATUS)."""

    def __init__(self) -> None:
        self.ok = True
        self.skipped: Optional[str] = None
        self.tip: Optional[str] = None
        self.fetched = False
        self.new_messages: List[Dict[str, Any]] = []
        self.marked = 0
        self.marks_pending = 0
        self.fast_forward: Optional[str] = None
        self.error: Optional[str] = None

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.error:
            return f"error: {self.error}"
        parts = [f"{len(self.new_messages)} new", f"{self.marked} marked read"]
        if self.marks_pending:
            parts.append(f"{self.marks_pending} marks pending")
        return ", ".join(parts)


class Monitor:
    """The polling loop of one server. Library code: it logs and returns, never prints."""

    def __init__(self, clone: Clone, server: str, interval: float = 10.0, *,
                 show: Optional[Callable[[Dict[str, Any]], None]] = None,
                 one_shot: bool = False,
                 backoff: Sequence[float] = BACKOFF_DELAYS,
                 stop_event: Optional[threading.Event] = None) -> None:
        self.clone = clone
        self.repo = clone.root
        self.server = normalize_server_id(server)
        self.interval = float(interval)
        self.show = show or (lambda msg: None)
        self.one_shot = one_shot
        self.backoff = tuple(backoff)
        self.stop_event = stop_event or threading.Event()
        self.state = MonitorState(self.repo, self.server)
        self.iterations = 0
        self.known_tip: Optional[str] = None
        self.processed_tip: Optional[str] = None
        self.cached_blob: Optional[str] = None
        self.corrupt_blobs_logged: Set[str] = set()
        self.warned_entries: Set[str] = set()
        self.ff_warned: Optional[str] = None
        self.started_at = time.time()
        self.last_fetch_ok: Optional[float] = None
        self.last_status_write = 0.0
        self.status_dirty = True
        self.last_report: Optional[CycleReport] = None

    # ----------------------------------------------------------------- helpers

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when a stop was requested."""
        return self.stop_event.wait(seconds)

    def _poll_remote(self) -> Optional[str]:
        """The remote tip; fetch only when it moved. One network call when idle."""
        remote = self.clone.remote_tip()
        self.last_fetch_ok = time.time()
        if remote is not None and remote == self.known_tip:
            return remote
        local = self.clone.tip()
        if remote is not None and remote != local:
            local = self.clone.fetch()
        self.known_tip = local
        return local

    def _poll_with_backoff(self) -> Optional[str]:
        delays = () if self.one_shot else self.backoff
        last: Optional[RemoteUnavailable] = None
        for attempt, delay in enumerate((0.0, *delays)):
            if delay and self._sleep(delay):
                break
            try:
                return self._poll_remote()
            except RemoteUnavailable as exc:
                last = exc
                log.info("fetch attempt %d failed: %s", attempt + 1, exc.reason,
                         extra={"metadata": {"attempt": attempt + 1}})
        assert last is not None
        raise last

    # ----------------------------------------------------------------- one cycle

    def cycle(self) -> CycleReport:
        report = CycleReport()
        self.iterations += 1
        try:
            tip = self._poll_with_backoff()
        except RemoteUnavailable as exc:
            report.ok = False
            report.error = f"remote unreachable: {exc.reason}"
            log.warning("cannot reach the remote: %s", exc.reason,
                        extra={"metadata": {"step": "fetch", "error": exc.reason}})
            self._finish(report)
            return report
        report.tip = tip
        if tip != self.processed_tip:
            try:
                self._process_mailbox(tip, report)
            except MailboxCorrupt as exc:
                report.ok = False
                report.error = str(exc)
        if not self.stop_event.is_set() or self.one_shot:
            self._push_marks(report)
        if tip != self.processed_tip and report.ok:
            report.fast_forward = self.fast_forward()
            self.processed_tip = self.clone.tip()
        self._finish(report)
        return report

    def _process_mailbox(self, tip: Optional[str], report: CycleReport) -> None:
        blob = self.clone.blob_id(tip, MAILBOX_PATH)
        if blob is not None and blob == self.cached_blob:
            return
        _, raw = self.clone.read_file(tip, MAILBOX_PATH)
        try:
            data = parse_document(raw, blob)
        except MailboxCorrupt as exc:
            if blob not in self.corrupt_blobs_logged:
                self.corrupt_blobs_logged.add(str(blob))
                log.critical("%s", exc, extra={"metadata": {"blob": blob}})
            raise
        self._warn_invalid(data)
        for _, msg in valid_messages(data, warn=False):
            if not is_addressed_to(msg, self.server):
                continue
            if is_handled_by(msg, self.server, self.state.processed):
                continue
            self.state.record(message_key(msg))
            report.new_messages.append(msg)
        self.state.save()  # before showing: a restart never shows a message twice
        for msg in report.new_messages:
            log.info("new message %s from %s: %s", msg["id"], msg.get("from"), msg.get("subject"),
                     extra={"metadata": {"id": msg["id"], "from": msg.get("from"),
                                         "priority": msg.get("priority")}})
            self.show(msg)
        self.cached_blob = blob

    def _warn_invalid(self, data: Dict[str, Any]) -> None:
        from fleet_mailbox import entry_problem

        for index, entry in enumerate(data.get("messages", [])):
            problem = entry_problem(entry)
            if problem is None:
                continue
            ident = f"{index}:{problem}:{entry.get('id') if isinstance(entry, dict) else entry!r}"[:300]
            if ident in self.warned_entries:
                continue
            self.warned_entries.add(ident)
            log.warning("mailbox entry #%d skipped: %s", index, problem,
                        extra={"metadata": {"position": index, "problem": problem}})

    def _push_marks(self, report: CycleReport) -> None:
        marks = set(self.state.pending_marks)
        acks = set(self.state.pending_acks)
        if not marks and not acks:
            return
        server = self.server

        def change(tip: Optional[str]):
            blob, raw = self.clone.read_file(tip, MAILBOX_PATH)
            data = parse_document(raw, blob)
            changed = mark_handled(data, server, marks, acks)
            if not changed:
                return None
            noun = "message" if changed == 1 else "messages"
            return {MAILBOX_PATH: serialize(data)}, f"{server}: mark {changed} {noun} read"

        try:
            tx = self.clone.transact(change, author=server, fresh_for=max(self.interval, 1.0))
        except (RemoteUnavailable, MailboxCorrupt, GitError) as exc:
            report.marks_pending = len(marks)
            log.warning("read marks kept for a later cycle: %s", exc,
                        extra={"metadata": {"pending": len(marks)}})
            return
        if tx.changed:
            report.marked = len(marks)
            self.known_tip = tx.commit
        self.state.marks_pushed(marks, acks)
        self.state.save()

    def fast_forward(self) -> str:
        """Fast-forward the checked-out branch when nothing local can be touched (PROTOCOL.md)."""
        proc = run_git(self.repo, "rev-parse", "-q", "--verify", "HEAD", check=False)
        head = proc.stdout.decode().strip()
        tip = self.clone.tip()
        if not head or not tip:
            return self._ff_warn("no commit checked out or no fetched branch", "skipped")
        if head == tip:
            return "current"
        head_ref = run_git(self.repo, "symbolic-ref", "-q", "HEAD", check=False).stdout.decode().strip() or "HEAD"
        if head_ref != f"refs/heads/{self.clone.branch}":
            return self._ff_warn(f"{head_ref if head_ref != 'HEAD' else 'a detached HEAD'} is "
                                 f"checked out, not {self.clone.branch}", "other-branch")
        git_dir = self.clone.git_dir
        for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD",
                       "REVERT_HEAD", "BISECT_LOG"):
            if (git_dir / marker).exists():
                return self._ff_warn(f"a {marker} is in progress in the working tree", "busy")
        if run_git(self.repo, "merge-base", "--is-ancestor", head, tip, check=False).returncode != 0:
            return self._ff_warn("the local branch has commits the remote does not have", "diverged")
        merge = run_git(self.repo, "merge", "--ff-only", "--no-autostash", "--quiet", "--no-stat",
                        tip, check=False)
        if merge.returncode != 0:
            reason = merge.stderr.decode("utf-8", "replace").strip().splitlines()
            return self._ff_warn(reason[0] if reason else "git merge --ff-only failed", "refused")
        self.ff_warned = None
        log.info("working tree fast-forwarded to %s", tip[:12], extra={"metadata": {"tip": tip}})
        return "fast-forwarded"

    def _ff_warn(self, reason: str, outcome: str) -> str:
        if self.ff_warned != reason:  # once per reason, not every cycle
            self.ff_warned = reason
            log.warning("working tree not fast-forwarded: %s (mail is read from the fetched "
                        "branch and keeps flowing)", reason, extra={"metadata": {"reason": reason}})
        return outcome

    def _finish(self, report: CycleReport) -> None:
        self.last_report = report
        self.write_status(report)

    def write_status(self, report: CycleReport) -> None:
        """``<server>/state/monitor_status.json``, for health checks and ``--status``."""
        now = time.time()
        busy = bool(report.new_messages or report.marked or report.error or not report.ok)
        if not (busy or self.status_dirty or now - self.last_status_write >= STATUS_REWRITE_IDLE):
            return
        runtime_dir(self.repo, self.server, "state")
        atomic_write_json(state_dir(self.repo, self.server) / "monitor_status.json", {
            "version": 1, "pid": os.getpid(), "server": self.server,
            "started_at": iso_utc(_dt_from_epoch(self.started_at)),
            "last_cycle_at": iso_utc(), "last_cycle_ok": report.ok,
            "last_cycle": report.summary(),
            "last_fetch_ok_at": iso_utc(_dt_from_epoch(self.last_fetch_ok)) if self.last_fetch_ok else None,
            "last_error": report.error, "iterations": self.iterations, "interval": self.interval,
            "remote_tip": report.tip, "version_suite": SUITE_VERSION,
        })
        self.last_status_write = now
        self.status_dirty = False

    # ----------------------------------------------------------------- the loop

    def run(self) -> int:
        while not self.stop_event.is_set():
            started = time.monotonic()
            self.cycle()
            if self.one_shot:
                break
            remaining = self.interval - (time.monotonic() - started)
            if remaining > 0 and self._sleep(remaining):
                break
        log.info("monitor stopped", extra={"metadata": {"iterations": self.iterations}})
        return EXIT_OK


def _dt_from_epoch(epoch: float):
    import datetime as _dt

    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)


# --------------------------------------------------------------------------- --init


def init_fleet(path: "os.PathLike[str] | str", branch: str = "main") -> str:
    """Create ``path`` as a clone of a new bare ``<path>.origin.git`` with an empty mailbox.

    On an existing clone without a mailbox, add one by the transaction. Returns what was done.
    """
    target = Path(path).expanduser()
    if target.exists() and (target / ".git").exists():
        clone = Clone(target, None)
        clone.fetch()

        def change(tip: Optional[str]):
            _, raw = clone.read_file(tip, MAILBOX_PATH)
            if raw is not None:
                return None
            return {MAILBOX_PATH: serialize({"messages": []})}, "fleet: create the mailbox"

        tx = clone.transact(change, author="fleet")
        return "added a mailbox to the existing clone" if tx.changed else "already a fleet repository"
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"--init: {target} exists and is not a git clone")
    origin = target.with_name(target.name + ".origin.git")
    if origin.exists():
        raise UsageError(f"--init: {origin} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    run_git(target.parent, "init", "--bare", "--quiet", str(origin))
    run_git(origin, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    blob = run_git(origin, "hash-object", "-w", "--stdin",
                   input=serialize({"messages": []})).stdout.decode().strip()
    sub = run_git(origin, "mktree", input=f"100644 blob {blob}\tmessages.json\n".encode()).stdout.decode().strip()
    root = run_git(origin, "mktree", input=f"040000 tree {sub}\tcoordination\n".encode()).stdout.decode().strip()
    env = {"GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "fleet"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "fleet@fleet.invalid"),
           "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "fleet"),
           "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "fleet@fleet.invalid")}
    commit = run_git(origin, "-c", "commit.gpgsign=false", "commit-tree", root, "-m",
                     "fleet: create the mailbox", env=env).stdout.decode().strip()
    run_git(origin, "update-ref", f"refs/heads/{branch}", commit)
    run_git(target.parent, "clone", "--quiet", str(origin.resolve()), str(target))
    return f"created {target} (origin: {origin})"


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="message_monitor.py",
        description="Watch the fleet mailbox in the shared git repository.",
        epilog="Exit codes: 0 done or stopped on request, 1 failure, 2 bad usage, 130 interrupted.",
    )
    parser.add_argument("--repo", default=None, help="fleet clone (default: $BUILD_REPO_PATH or K:/Projects/Build)")
    parser.add_argument("--server", default=None, help="this server's id (default: $SERVER_ID or code2)")
    parser.add_argument("--interval", type=float, default=None,
                        help="seconds between cycles (default: $MONITOR_INTERVAL or 10)")
    parser.add_argument("--branch", default=None, help="shared branch (default: the remote's default)")
    parser.add_argument("--once", action="store_true", help="run one cycle and exit")
    parser.add_argument("--init", action="store_true",
                        help="create --repo as a clone of a new local bare origin with an empty mailbox")
    parser.add_argument("--quiet", action="store_true", help="log warnings and errors only")
    return parser


def _console(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    try:
        from structured_log import console_safe

        text = console_safe(text, stream)
    except ImportError:  # pragma: no cover
        pass
    stream.write(text + "\n")
    stream.flush()


def render_message(msg: Dict[str, Any], *, terminal: bool) -> str:
    """How a new message is shown: a block on a terminal, one line for journald and pipes."""
    try:
        from structured_log import preview, sanitize
    except ImportError:  # pragma: no cover
        def sanitize(text, max_len=None):  # type: ignore[misc]
            return str(text)

        def preview(text, length=120):  # type: ignore[misc]
            return str(text)[:length]
    to = msg.get("to")
    to_text = ", ".join(map(str, to)) if isinstance(to, list) else str(to)
    fields = {
        "from": sanitize(str(msg.get("from"))), "to": sanitize(to_text),
        "priority": sanitize(str(msg.get("priority") or "normal")).upper(),
        "type": sanitize(str(msg.get("type") or "info")),
        "subject": preview(str(msg.get("subject") or "(no subject)"), 100),
        "body": preview(str(msg.get("body") or ""), 200),
        "id": sanitize(str(msg.get("id"))), "when": sanitize(str(msg.get("timestamp") or "?")),
    }
    if not terminal:
        return ("NEW MESSAGE id={id} from={from} to={to} priority={priority} type={type} "
                "subject=\"{subject}\" preview=\"{body}\"").format(**fields)
    return ("\n=== NEW MESSAGE [{priority}] from {from} to {to} ({type}, {when})\n"
            "    Subject: {subject}\n    {body}\n    id: {id}").format(**fields)


def _nothing() -> None:
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        repo = args.repo or default_repo_path()
        if args.init:
            if args.server is not None:
                normalize_server_id(args.server)
            _console(init_fleet(repo, args.branch or "main"))
            return EXIT_OK
        server = resolve_server_id(args.server)
        interval = args.interval if args.interval is not None else default_interval()
        if interval <= 0:
            raise UsageError("--interval must be positive")
        clone = Clone(repo, args.branch)
    except UsageError as exc:
        _console(f"message_monitor: error: {exc}", sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except SuiteError as exc:
        _console(f"message_monitor: error: {exc}", sys.stderr)
        return EXIT_FAILURE
    try:
        from structured_log import setup_logging

        setup_logging(str(clone.root), server,
                      console_level=logging.WARNING if args.quiet else logging.INFO)
    except ImportError:  # pragma: no cover
        logging.basicConfig(level=logging.INFO)
    terminal = sys.stdout.isatty()
    stop = threading.Event()
    monitor = Monitor(clone, server, interval, one_shot=args.once, stop_event=stop,
                      show=lambda m: _console(render_message(m, terminal=terminal)))
    restore: Callable[[], None] = _nothing
    if not args.once:
        from fleet_service import install_stop_handlers

        restore = install_stop_handlers(lambda name: stop.set())
    try:
        if args.once:
            report = monitor.cycle()
            if not report.ok:
                _console(f"message_monitor: error: {report.error}", sys.stderr)
                return EXIT_FAILURE
            return EXIT_OK
        log.info("monitoring %s as %s every %gs (branch %s)", clone.root, server, interval,
                 clone.branch, extra={"metadata": {"interval": interval, "branch": clone.branch}})
        return monitor.run()
    except KeyboardInterrupt:
        _console("message_monitor: interrupted", sys.stderr)
        return EXIT_INTERRUPTED if args.once else EXIT_OK
    except SuiteError as exc:
        _console(f"message_monitor: error: {exc}", sys.stderr)
        return EXIT_FAILURE
    finally:
        restore()


if __name__ == "__main__":
    raise SystemExit(main())
