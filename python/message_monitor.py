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
import re
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from fleet_common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    MAX_INTERVAL,
    MIN_INTERVAL,
    RUNTIME_SUBDIRS,
    SUITE_VERSION,
    SuiteError,
    UsageError,
    atomic_write_json,
    default_interval,
    default_repo_path,
    dump_json_bytes,
    finite_number,
    is_link,
    is_valid_server_id,
    iso_utc,
    load_state_file,
    normalize_server_id,
    resolve_server_id,
    runtime_dir,
    state_dir,
    write_line,
)
from fleet_git import (
    MAILBOX_PATH,
    BranchMissing,
    Clone,
    GitError,
    LocalRefLocked,
    NotAFile,
    ObjectMissing,
    RemoteUnavailable,
    run_git,
)
from fleet_mailbox import (
    MailboxCorrupt,
    MessageKey,
    is_addressed_to,
    is_handled_by,
    key_from_str,
    key_str,
    mark_in_blob,
    message_key,
    parse_cached,
    parse_document,
    read_mailbox,
    serialize,
    valid_messages,
)
from fleet_state import RemoteView, StateChange, StateRefError, StateStore, presence_doc

log = logging.getLogger(__name__)

BACKOFF_DELAYS = (2.0, 4.0, 8.0)  # the seed's retry delays for a failed fetch
HEALTH_EVERY = 10  # iterations between health checks (the seed)
RULES_PATH = "coordination/auto_reply_rules.json"
STATUS_REWRITE_IDLE = 60.0  # seconds between status-file rewrites while idle
FF_MIN_INTERVAL = 5.0  # seconds between working-tree fast-forwards at short intervals
PRESENCE_SECONDS = 300.0  # presence refreshed at least this often without --heartbeat-minutes
MARK_READ_MODES = ("on-show", "never")
PROCESSED_CAP = 20000  # local processed keys kept (the mailbox's read_by is the lasting record)
STATE_VERSION = 1


# --------------------------------------------------------------------------- local state


STATE_LISTS = ("processed", "pending_marks", "pending_acks")


def _state_problem(data: Dict[str, Any]) -> Optional[str]:
    """What makes ``monitor_state.json`` unusable (moved aside, logged critical), or ``None``."""
    for name in STATE_LISTS:
        if not isinstance(data.get(name, []), list):
            return f"{name!r} is not a list"
    return None


class MonitorState:
    """Processed message keys and read marks not yet pushed: ``<server>/state/monitor_state.json``.

    Written before a message is shown, so a restart never shows it twice; written only when it
    changed, so an idle monitor rewrites nothing. A file of the wrong shape is moved aside
    (``fleet_common.load_state_file``); a save that fails (a full disk) is logged and retried
    with the next change, and the monitor goes on.
    """

    def __init__(self, repo: Path, server: str) -> None:
        self.path = state_dir(repo, server) / "monitor_state.json"
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


class ReadingOptions:
    """How this server reads and publishes: where receipts go, presence, the message hook.

    ``mark_read``: ``on-show`` records a read receipt in the state ref when the monitor shows a
    message; ``never`` only remembers locally that it was shown (a service whose journal nobody
    reads leaves the mail unread for the agent's inbox). ``legacy_marks`` also mirrors receipts
    into the mailbox fields for older tools; ``heartbeat_on_main`` also commits
    ``<server>/heartbeat.json``; ``on_message`` runs a command per new message.
    """

    __slots__ = ("mark_read", "legacy_marks", "heartbeat_on_main", "on_message", "on_message_timeout")

    def __init__(self, mark_read: str = "on-show", legacy_marks: bool = False,
                 heartbeat_on_main: bool = False, on_message: Optional[str] = None,
                 on_message_timeout: float = 60.0) -> None:
        if mark_read not in MARK_READ_MODES:
            raise UsageError(f"--mark-read must be one of {', '.join(MARK_READ_MODES)}")
        self.mark_read = mark_read
        self.legacy_marks = legacy_marks
        self.heartbeat_on_main = heartbeat_on_main
        self.on_message = on_message
        self.on_message_timeout = on_message_timeout


class _AnyOf:
    """Membership in any of several containers (local shown keys, state-ref receipts)."""

    __slots__ = ("parts",)

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def __contains__(self, key: object) -> bool:
        return any(key in part for part in self.parts)


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
        self.sent = 0
        self.replies = 0
        self.heartbeat = False
        self.fatal = False  # the shared branch was never there: a monitor stops (exit 2)
        self.rewritten: Optional[int] = None  # messages gone in a forced rewrite (-1: unknown)

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        if self.error:
            return f"error: {self.error}"
        parts = [f"{len(self.new_messages)} new", f"{self.marked} marked read"]
        if self.sent:
            parts.append(f"{self.sent} delivered from the queue")
        if self.marks_pending:
            parts.append(f"{self.marks_pending} marks pending")
        return ", ".join(parts)


class Monitor:
    """The polling loop of one server. Library code: it logs and returns, never prints.

    Collaborators are created from the repository and server unless given: the retry queue,
    the circuit breaker (persisted under ``<server>/state/``), metrics, the systemd notifier and
    the automatic responder. Tests pass small thresholds and an event to stop on.
    """

    def __init__(self, clone: Clone, server: str, interval: float = 10.0, *,
                 show: Optional[Callable[[Dict[str, Any]], None]] = None,
                 one_shot: bool = False,
                 backoff: Sequence[float] = BACKOFF_DELAYS,
                 stop_event: Optional[threading.Event] = None,
                 breaker: Any = None,
                 failure_threshold: int = 5, open_seconds: float = 300.0,
                 queue: Any = None, metrics: Any = None, notifier: Any = None,
                 responder: Any = None, auto_reply: bool = True,
                 rules_path: Optional[str] = None,
                 heartbeat_minutes: Optional[float] = None,
                 metrics_textfile: Optional[str] = None,
                 auto_archive_days: Optional[float] = None,
                 preflight_timeout: float = 5.0,
                 reading: Optional[ReadingOptions] = None,
                 upgrade_signers: Optional[str] = None) -> None:
        from circuit_breaker import CircuitBreaker
        from fleet_git import PushRejected
        from message_queue import MessageQueue
        from monitoring_metrics import MetricsCollector

        self.clone = clone
        self.repo = clone.root
        self.server = normalize_server_id(server)
        self.interval = float(interval)
        self.show = show or (lambda msg: None)
        self.one_shot = one_shot
        self.backoff = tuple(backoff)
        self.stop_event = stop_event or threading.Event()
        self.state = MonitorState(self.repo, self.server)
        self.reading = reading or ReadingOptions()
        self.states = StateStore(clone)  # this server's receipts and presence (PROTOCOL.md)
        self.presence_due = True
        self.presence_published = False  # by this process: only then is a clean stop announced
        self.hook = None
        if self.reading.on_message:
            from fleet_hook import MessageHook

            self.hook = MessageHook(self.reading.on_message, self.reading.on_message_timeout,
                                    repo=self.repo, server=self.server)
        self.queue = queue if queue is not None else MessageQueue(str(self.repo), self.server)
        self._other_queues: Dict[str, Any] = {}
        self.breaker = breaker if breaker is not None else CircuitBreaker(
            failure_threshold, open_seconds,
            state_path=str(state_dir(self.repo, self.server) / "circuit_breaker.json"),
            exclude=(PushRejected,))
        self.breaker.add_listener(self._on_breaker_change)
        self.metrics = metrics if metrics is not None else MetricsCollector(str(self.repo), self.server)
        self.notifier = notifier
        self.preflight_timeout = preflight_timeout
        self.heartbeat_seconds = heartbeat_minutes * 60 if heartbeat_minutes else None
        self.metrics_textfile = metrics_textfile
        self.auto_archive_days = auto_archive_days
        self.upgrade_signers = upgrade_signers  # --upgrade-signed-by: git's allowed-signers file
        self.iterations = 0
        self.known_tip: Optional[str] = None
        self.processed_tip: Optional[str] = None
        self.ff_pending = False
        self.last_ff = float("-inf")
        self.seen_tip: Optional[str] = None
        self.cached_blob: Optional[str] = None
        self.corrupt_blob: Optional[str] = None
        self.corrupt_blobs_logged: Set[str] = set()
        self.warned_entries: Set[str] = set()
        self.ff_warned: Optional[str] = None
        self.marks_warned: Optional[str] = None
        self.started_at = time.time()
        self.last_fetch_ok: Optional[float] = None
        self.written_fetch_ok: Optional[float] = None
        self.last_status_write = 0.0
        self.status_dirty = True
        self.preflight_needed = False
        self.last_health: Optional[str] = None
        self.last_report: Optional[CycleReport] = None
        self.restart_requested = False
        self.failed_upgrades: Set[str] = set()
        self.branch_seen_at: Optional[int] = None  # the cycle that last found the shared branch
        self.branch_missing_logged: Optional[int] = None
        self.rewrites_logged: Set[Tuple[str, str]] = set()
        self.responder = responder
        if responder is None and auto_reply:
            self.responder = self._make_responder(rules_path)

    # ----------------------------------------------------------------- collaborators

    def _make_responder(self, rules_path: Optional[str]):
        from auto_reply import AutoResponder, ReplyLedger, RuleSource

        ledger = ReplyLedger(state_dir(self.repo, self.server) / "auto_reply.json")
        self.rule_source = RuleSource(rules_path)
        return AutoResponder(self.server, self.rule_source, ledger,
                             status_provider=self.status_snapshot, started_at=self.started_at,
                             version=SUITE_VERSION)

    def _on_breaker_change(self, old: Any, new: Any, status: Dict[str, Any]) -> None:
        self.status_dirty = True
        if self.notifier is not None:
            self.notifier.status(f"circuit breaker {getattr(new, 'value', new)}")

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop, feeding the systemd watchdog; True when stopping."""
        from fleet_service import interruptible_sleep

        return interruptible_sleep(seconds, self.stop_event, self.notifier)

    def _timed(self, op: str, fn: Callable[[], Any]) -> Any:
        started = time.monotonic()
        ok = False
        try:
            result = fn()
            ok = True
            return result
        finally:
            self.metrics.record_operation(op, (time.monotonic() - started) * 1000.0, ok)

    # ----------------------------------------------------------------- the remote

    def _poll_remote(self) -> Optional[str]:
        """The remote tip; fetch only when it moved. One network call when idle.

        The same ``ls-remote`` lists every state ref: this server's own is fetched when another
        of its processes (an inbox command, a second monitor) moved it.
        """
        view = self._timed("ls_remote", self.states.poll)
        self.last_fetch_ok = time.time()
        remote = view.branch_tip
        if remote is None:  # never created by a monitor (PROTOCOL.md): bad input, not an outage
            raise BranchMissing(self.clone.branch, ["git", "ls-remote", "origin", self.clone.branch], 0)
        self._follow_own_state(view)
        if remote is not None and remote == self.known_tip:
            return remote
        local = self.clone.tip()
        if remote is not None and remote != local:
            local = self._timed("git_fetch", self.clone.fetch)
        self.known_tip = local
        return local

    def _follow_own_state(self, view: RemoteView) -> None:
        if self.states.refspecs_to_fetch(view, [self.server]):
            self._timed("git_fetch", lambda: self.states.fetch([self.server], view))

    def _preflight(self) -> Optional[str]:
        """Why the remote cannot be reached (DNS, TCP, HTTP), or ``None`` when it can."""
        from network_check import test_connectivity

        try:
            result = test_connectivity(str(self.repo), timeout=self.preflight_timeout)
        except SuiteError as exc:
            return str(exc)
        if result.get("success"):
            return None
        return str(result.get("message") or "connectivity check failed")

    def _poll_with_backoff(self) -> Optional[str]:
        """Poll; after a failure retry after 2 s, 4 s and 8 s (never in a one-shot command)."""
        from fleet_git import RemoteUnavailable as Unavailable

        delays = () if self.one_shot else self.backoff
        last: Optional[Exception] = None
        for attempt, delay in enumerate((0.0, *delays)):
            if delay and self._sleep(delay):
                break
            if self.preflight_needed:
                problem = self._preflight()
                if problem is not None:
                    last = Unavailable(["network_check"], None, b"", b"", problem)
                    log.info("pre-flight %d failed: %s", attempt + 1, problem,
                             extra={"metadata": {"attempt": attempt + 1, "step": "preflight"}})
                    continue
            try:
                tip = self._poll_remote()
            except RemoteUnavailable as exc:
                last = exc
                self.preflight_needed = True
                log.info("fetch attempt %d failed: %s", attempt + 1, exc.reason,
                         extra={"metadata": {"attempt": attempt + 1}})
                continue
            self.preflight_needed = False
            return tip
        if last is None:  # stopped during the backoff
            raise RemoteUnavailable(["fetch"], None, b"", b"", "stopped during backoff")
        raise last

    # ----------------------------------------------------------------- one cycle

    def cycle(self) -> CycleReport:
        """One monitoring cycle. Whatever goes wrong inside it is that cycle's error (logged with
        its traceback, counted in ``errors``), never the end of the service: the next cycle
        runs as usual. Ctrl+C and SystemExit still stop it."""
        report = CycleReport()
        self.iterations += 1
        try:
            self._cycle(report)
        except Exception as exc:  # noqa: BLE001 - one bad cycle must not stop the monitor
            report.ok = False
            report.error = f"unexpected error: {type(exc).__name__}: {str(exc)[:200]}"
            self.metrics.increment("errors")
            log.error("cycle %d failed: %s", self.iterations, report.error, exc_info=True,
                      extra={"metadata": {"step": "cycle", "error": report.error}})
            try:
                self._finish(report, busy=True)
            except Exception:  # noqa: BLE001 - the bookkeeping itself failed: logged, carry on
                log.error("cycle %d: status not written", self.iterations, exc_info=True)
        return report

    def _cycle(self, report: CycleReport) -> None:
        if self.notifier is not None:
            self.notifier.watchdog()
        from fleet_git import remove_stale_locks

        remove_stale_locks(self.repo, self.clone.git_dir)
        if not self.breaker.can_execute():
            status = self.breaker.get_status()
            report.skipped = f"circuit breaker open until {status.get('retry_at')}"
            self._finish(report, busy=False)
            return
        if self.breaker.get_status().get("state") == "HALF_OPEN":
            self.preflight_needed = True
        try:
            tip = self._poll_with_backoff()
        except RemoteUnavailable as exc:
            self.breaker.record_failure(exc.reason)
            self.metrics.increment("git_pull_failure")
            self.metrics.increment("errors")
            report.ok = False
            report.error = f"remote unreachable: {exc.reason}"
            log.warning("cannot reach the remote: %s", exc.reason,
                        extra={"metadata": {"step": "fetch", "error": exc.reason}})
            self._finish(report, busy=True)
            return
        except LocalRefLocked as exc:
            # The remote answered: a lock in this clone is no outage, so no breaker failure. A
            # lock older than STALE_LOCK_AGE is removed at the start of a later cycle.
            self.breaker.record_success()
            report.skipped = f"a ref of this clone is locked: {exc.reason}"
            log.warning("cycle skipped: %s", exc.reason, extra={"metadata": {"step": "fetch",
                                                                              "error": exc.reason}})
            self._finish(report, busy=False)
            return
        except BranchMissing as exc:
            # The remote answered; the branch is not there. At start that is a mistyped
            # --branch (run() stops with exit 2); later, someone deleted it: report, keep going.
            self.breaker.record_success()
            report.ok = False
            report.error = str(exc)
            report.fatal = self.branch_seen_at is None
            if self.branch_missing_logged != self.iterations - 1:
                log.error("%s", exc, extra={"metadata": {"step": "fetch", "branch": exc.branch}})
            self.branch_missing_logged = self.iterations
            self.metrics.increment("errors")
            self._finish(report, busy=True)
            return
        self.branch_seen_at = self.iterations
        self.breaker.record_success()
        self.metrics.increment("git_pull_success")
        report.tip = tip
        changed = tip != self.processed_tip
        self.seen_tip = tip
        if changed:
            try:
                self._check_rewrite(tip, report)
                self._process_mailbox(tip, report)
            except MailboxCorrupt as exc:
                report.ok = False
                report.error = str(exc)
            except ObjectMissing as exc:
                report.ok = False
                report.error = str(exc)
                self._after_missing_object(exc)
            except GitError as exc:  # git itself failed while reading (a timeout, a broken clone)
                report.ok = False
                report.error = str(exc)
                self.metrics.increment("errors")
                log.error("mailbox not read: %s", exc, extra={"metadata": {"step": "read", "error": str(exc)}})
        self._drain_queue(report)
        self._push_marks(report)
        self._periodic(report)  # before the fast-forward, so that it includes a new heartbeat
        if (changed or report.heartbeat) and report.ok:
            self.ff_pending = True
        # Updating the working tree costs an index refresh: under heavy traffic at a short
        # interval it is done at most every FF_MIN_INTERVAL seconds (mail never waits for it).
        if self.ff_pending and time.monotonic() - self.last_ff >= max(self.interval, FF_MIN_INTERVAL) - 0.01:
            report.fast_forward = self.fast_forward()
            self.ff_pending = False
            self.last_ff = time.monotonic()
        if report.ok:
            self._set_processed_tip(self.seen_tip)
        self._finish(report, busy=bool(report.new_messages or report.marked or report.sent
                                        or report.error))

    def _after_missing_object(self, exc: Exception) -> None:
        """A tree or blob of the fetched tip cannot be read: the cycle reads nothing (an
        unreadable mailbox is no empty mailbox) and fetches every object again for the next."""
        self.metrics.increment("errors")
        log.error("%s; nothing read this cycle, fetching every object again", exc,
                  extra={"metadata": {"step": "read", "error": str(exc)}})
        try:
            self.known_tip = self.clone.fetch(refetch=True)
        except GitError as again:
            log.warning("refetch failed: %s", again, extra={"metadata": {"step": "refetch"}})

    def _set_processed_tip(self, tip: Optional[str]) -> None:
        """Remember the tip whose mail was processed, also across restarts (a rewrite of the
        branch while the monitor was stopped is still noticed)."""
        self.processed_tip = tip
        record = {"branch": self.clone.branch, "tip": tip}
        if tip is not None and self.state.extra.get("processed_tip") != record:
            self.state.extra["processed_tip"] = record
            self.state.dirty = True
            self.state.save()

    def _last_processed_tip(self) -> Optional[str]:
        if self.processed_tip is not None:
            return self.processed_tip
        record = self.state.extra.get("processed_tip")
        if not isinstance(record, dict) or record.get("branch") != self.clone.branch:
            return None
        tip = record.get("tip")
        return tip if isinstance(tip, str) and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", tip) else None

    def _check_rewrite(self, tip: Optional[str], report: CycleReport) -> None:
        """PROTOCOL.md: a shared branch rewritten by force is an error naming how many messages
        disappeared. Nothing local is discarded or reset because of it."""
        old = self._last_processed_tip()
        if old is None or not tip or old == tip or (old, tip) in self.rewrites_logged:
            return
        proc = run_git(self.repo, "merge-base", "--is-ancestor", old, tip, check=False)
        if proc.returncode != 1:
            return  # 0: it descends, as it should; else the old tip is unknown here: cannot tell
        self.rewrites_logged.add((old, tip))
        gone = self._messages_gone(old, tip)
        report.rewritten = -1 if gone is None else gone
        self.metrics.increment("errors")
        count = "an unknown number of" if gone is None else str(gone)
        log.error("the shared branch %s was rewritten by force: %s does not descend from %s, which "
                  "this monitor processed; %s message(s) that were there are gone (nothing local was "
                  "discarded; the working tree is left as it is)", self.clone.branch, tip[:12], old[:12],
                  count, extra={"metadata": {"step": "rewrite", "old_tip": old, "new_tip": tip,
                                             "messages_gone": gone}})

    def _messages_gone(self, old: str, new: str) -> Optional[int]:
        """How many (id, from) keys of the mailbox at ``old`` are neither in the mailbox nor in
        the archive at ``new``; ``None`` when either cannot be read."""
        from fleet_archive import archived_keys

        try:
            before = {message_key(m) for _, m in valid_messages(
                parse_document(self.clone.read_file(old, MAILBOX_PATH)[1]), warn=False)}
            after = {message_key(m) for _, m in valid_messages(
                parse_document(self.clone.read_file(new, MAILBOX_PATH)[1]), warn=False)}
            gone = before - after
            if gone:
                gone -= set(archived_keys(self.clone, new))  # archived (moved), not lost
        except (MailboxCorrupt, GitError):
            return None
        return len(gone)

    def _landed(self, tx: Any) -> None:
        """Follow our own commit. When it was built on the tip this cycle read, it holds nothing
        new but our change, so the next cycle need not read it; when it lost a race and was
        rebuilt on newer mail, the next cycle reads that mail."""
        if not tx.changed or not tx.commit:
            return
        self.known_tip = tx.commit
        if tx.base == self.seen_tip:
            self.seen_tip = tx.commit

    def _read_mailbox(self, tip: Optional[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(blob id, document) at ``tip``; the document is ``None`` when the blob is unchanged."""
        try:
            blob, raw = read_mailbox(self.clone, tip)
        except MailboxCorrupt as exc:  # a folder or submodule where the mailbox should be
            self._note_corrupt(exc)
            raise
        if blob is not None and blob == self.cached_blob:
            self.corrupt_blob = None  # back to a version read before (a revert of a bad commit)
            return blob, None
        if blob is not None and blob == self.corrupt_blob:
            raise MailboxCorrupt(blob, "unchanged since it was found corrupt")
        try:
            data = parse_cached(raw, blob)
        except MailboxCorrupt as exc:
            self._note_corrupt(exc)
            raise
        self.corrupt_blob = None
        return blob, data

    def _note_corrupt(self, exc: MailboxCorrupt) -> None:
        """Remember a corrupt mailbox (nothing is written on top of it); log it once per blob
        (PROTOCOL.md)."""
        self.corrupt_blob = exc.blob
        if str(exc.blob) not in self.corrupt_blobs_logged:
            self.corrupt_blobs_logged.add(str(exc.blob))
            log.critical("%s", exc, extra={"metadata": {"blob": exc.blob}})

    def _process_mailbox(self, tip: Optional[str], report: CycleReport) -> None:
        if self.responder is not None:
            self._refresh_rules(tip)
        blob, data = self._read_mailbox(tip)
        if data is None:
            return
        self._warn_invalid(data)
        own = self.states.read(self.server)
        handled = _AnyOf(self.state.processed, own.read, own.acks)
        mark = self.reading.mark_read == "on-show"
        for _, msg in valid_messages(data, warn=False):
            if not is_addressed_to(msg, self.server):
                continue
            if is_handled_by(msg, self.server, handled):
                continue
            self.state.record(message_key(msg), mark=mark)
            report.new_messages.append(msg)
        self.state.save()  # before showing: a restart never shows a message twice
        for msg in report.new_messages:
            log.info("new message %s from %s: %s", msg["id"], msg.get("from"), msg.get("subject"),
                     extra={"metadata": {"id": msg["id"], "from": msg.get("from"),
                                         "priority": msg.get("priority")}})
            self.metrics.increment("messages_received")
            self.show(msg)
            if self.hook is not None:
                self.hook.run(msg)
            self._auto_reply(msg, report)
        self._queue_auto_replies(report)
        self.cached_blob = blob

    def _refresh_rules(self, tip: Optional[str]) -> None:
        source = getattr(self, "rule_source", None)
        if source is None:
            return
        try:
            blob, raw = self.clone.read_file(tip, RULES_PATH)
        except NotAFile as exc:  # bad input: the rules in force stay, mail keeps flowing
            if exc.oid not in self.corrupt_blobs_logged:
                self.corrupt_blobs_logged.add(exc.oid)
                log.error("%s; keeping the auto-reply rules in force", exc.reason,
                          extra={"metadata": {"path": RULES_PATH}})
            return
        source.update_from_shared(blob, raw)

    def _auto_reply(self, msg: Dict[str, Any], report: CycleReport) -> None:
        """Decide on an automatic reply, in memory; :meth:`_queue_auto_replies` records and
        queues the cycle's replies together, and the queue delivers them in this cycle.

        The message is already recorded as processed, so no restart can decide on it again.
        """
        if self.responder is None:
            return
        decision = self.responder.decide(msg)
        if decision is None:
            return
        if decision.acknowledge:
            self.state.record(message_key(msg), ack=True)
        reply = None
        if decision.reply:
            from send_message import build_message

            fields = dict(decision.reply)
            reply = build_message(fields.pop("body"), fields.pop("subject"), fields.pop("to"),
                                  fields.pop("priority", "normal"), fields.pop("type", "response"),
                                  self.server, in_reply_to=fields.pop("in_reply_to", None),
                                  auto=bool(fields.pop("auto", True)), extra=fields)
        self.responder.hold(msg, decision, reply)

    def _queue_auto_replies(self, report: CycleReport) -> None:
        """One ledger write, then one queue write, for all of a cycle's automatic replies.

        The ledger first: at most one reply per message, even across a crash or with a second
        monitor (a reply that another process recorded meanwhile is dropped). Writing per message
        made a cycle quadratic in its requests.
        """
        if self.responder is None:
            return
        self.state.save()  # acknowledgements decided this cycle, before the ledger says so
        replies = self.responder.commit_held()
        if not replies:
            return
        self.queue.enqueue_many([reply for _, _, reply in replies], reason="automatic reply", kind="reply")
        for msg, decision, reply in replies:
            self.metrics.increment("auto_responses")
            report.replies += 1
            log.info("automatic %s reply %s to %s for %s", decision.kind, reply["id"], reply["to"],
                     msg["id"], extra={"metadata": {"rule": decision.rule, "in_reply_to": msg["id"]}})

    def _queues(self) -> List[Any]:
        """This server's retry queue first, then any other server's queue in this clone: a
        person may send ``--from`` another id through this clone, and nothing else would ever
        deliver that queue (delivery is idempotent, so two monitors sharing one is harmless)."""
        from fleet_common import is_valid_server_id
        from message_queue import MessageQueue

        queues = [self.queue]
        for path in sorted(self.repo.glob("*/queue/message_queue.json")):
            name = path.parent.parent.name
            if name != self.server and is_valid_server_id(name) and name == name.lower():
                queues.append(self._other_queues.setdefault(name, MessageQueue(str(self.repo), name)))
        return queues

    def _drain_queue(self, report: CycleReport) -> None:
        """Deliver due queued messages (sends that found the remote down, automatic replies)."""
        from send_message import deliver

        if self.corrupt_blob is not None:
            return  # never write on top of a corrupt mailbox; attempts are not spent meanwhile
        for queue in self._queues():
            for entry in queue.get_due():
                if self.stop_event.is_set() and not self.one_shot:
                    return
                msg = entry.get("message") or {}
                sender = entry.get("from")
                try:
                    tx = self._timed("send", lambda m=msg: deliver(self.clone, m, fresh_for=self.interval))
                except MailboxCorrupt:
                    return
                except (RemoteUnavailable, GitError) as exc:
                    updated = queue.increment_attempts(entry["id"], str(exc), sender=sender)
                    log.warning("queued message %s not delivered (attempt %s): %s", entry["id"],
                                updated.get("attempts"), exc, extra={"metadata": {"id": entry["id"]}})
                    self.metrics.increment("errors")
                    return  # the remote is struggling: the rest waits for the next cycle
                queue.mark_sent(entry["id"], sender=sender)
                self.metrics.increment("messages_sent")
                report.sent += 1
                self._landed(tx)
                log.info("delivered queued message %s", entry["id"], extra={"metadata": {"id": entry["id"]}})

    def _warn_invalid(self, data: Dict[str, Any]) -> None:
        from fleet_mailbox import split_entries

        entries = data.get("messages", [])
        for index, problem in split_entries(data)[1]:
            entry = entries[index]
            ident = f"{index}:{problem}:{entry.get('id') if isinstance(entry, dict) else entry!r}"[:300]
            if ident in self.warned_entries:
                continue
            self.warned_entries.add(ident)
            log.warning("mailbox entry #%d skipped: %s", index, problem,
                        extra={"metadata": {"position": index, "problem": problem}})

    def _push_marks(self, report: CycleReport) -> None:
        """Receipts and acknowledgements of this cycle: one push of this server's state ref
        (PROTOCOL.md), plus, with ``legacy_marks``, one mailbox commit for older tools. Whatever
        could not be pushed stays pending for a later cycle, across restarts."""
        marks = set(self.state.pending_marks)
        acks = set(self.state.pending_acks)
        if not marks and not acks:
            return
        change = StateChange(read=marks, acks=[{"id": k[0], "from": k[1]} for k in acks])
        try:
            if self.reading.legacy_marks:
                self._mirror_marks(marks, acks)
            pushed = self._timed("mark_read", lambda: self.states.update(self.server, change))
        except (RemoteUnavailable, MailboxCorrupt, GitError, StateRefError) as exc:
            report.marks_pending = len(marks)
            if self.marks_warned != str(exc):
                self.marks_warned = str(exc)
                log.warning("read marks kept for a later cycle: %s", exc,
                            extra={"metadata": {"pending": len(marks)}})
            return
        self.marks_warned = None
        if pushed:
            report.marked = len(marks)
            self.metrics.increment("messages_processed", len(marks))
        self.state.marks_pushed(marks, acks)
        self.state.save()

    def _mirror_marks(self, marks: Set[MessageKey], acks: Set[MessageKey]) -> None:
        """``--legacy-marks``: the same receipts in the mailbox fields, one commit at most."""
        if self.corrupt_blob is not None:
            raise MailboxCorrupt(self.corrupt_blob, "unchanged since it was found corrupt")
        server = self.server

        def change(tip: Optional[str]):
            blob, raw = read_mailbox(self.clone, tip)
            new_raw, changed = mark_in_blob(raw, blob, server, marks, acks)
            if new_raw is None:
                return None
            noun = "message" if changed == 1 else "messages"
            return {MAILBOX_PATH: new_raw}, f"{server}: mark {changed} {noun} read"

        tx = self.clone.transact(change, author=server, fresh_for=max(self.interval, 1.0))
        self._landed(tx)

    # ----------------------------------------------------------------- the working tree

    def fast_forward(self) -> str:
        """Fast-forward the checked-out branch when nothing local can be touched (PROTOCOL.md).

        Refused (a warning, once per reason) when the incoming commits touch a runtime path of
        any server: git replaces ignored files, so a committed ``code2/logs/structured.log``
        symlink or ``code2/queue/message_queue.json`` would take over that server's own files.
        Also refused when ``--upgrade-signed-by`` is set and the commits change the suite's
        files without a signature by an allowed key: the new code would run on the next start.
        """
        tip = self.clone.tip()
        proc = run_git(self.repo, "rev-parse", "HEAD", "--symbolic-full-name", "HEAD", check=False)
        lines = proc.stdout.decode().split()
        if proc.returncode != 0 or len(lines) != 2 or not tip:
            return self._ff_warn("no commit checked out or no fetched branch", "skipped")
        head, head_ref = lines
        if head == tip:
            return "current"
        if head_ref != f"refs/heads/{self.clone.branch}":
            return self._ff_warn(f"{head_ref if head_ref != 'HEAD' else 'a detached HEAD'} is "
                                 f"checked out, not {self.clone.branch}", "other-branch")
        git_dir = self.clone.git_dir
        for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD",
                       "REVERT_HEAD", "BISECT_LOG"):
            if (git_dir / marker).exists():
                return self._ff_warn(f"a {marker} is in progress in the working tree", "busy")
        try:
            touched = runtime_paths_changed(self.repo, head, tip)
        except GitError as exc:
            return self._ff_warn(f"the incoming changes cannot be listed: {exc}", "refused")
        if touched:
            more = f" and {len(touched) - 1} more" if len(touched) > 1 else ""
            return self._ff_warn(f"the incoming commits change {ascii(touched[0][:200])}{more}, a "
                                 "server's runtime path (logs, queue and state are never committed)",
                                 "runtime-path")
        refused = self._unsigned_release(head, tip)
        if refused is not None:
            self.ff_warned = refused
            return "unsigned"
        # --ff-only refuses, touching nothing, when the branch has diverged or local changes are
        # in the way; --no-autostash: a person's work is never stashed.
        merge = run_git(self.repo, "merge", "--ff-only", "--no-autostash", "--quiet", "--no-stat",
                        tip, check=False)
        if merge.returncode != 0:
            reason = merge.stderr.decode("utf-8", "replace").strip().splitlines()
            text = reason[0] if reason else "git merge --ff-only failed"
            if "not possible to fast-forward" in text.lower():
                return self._ff_warn("the local branch has commits the remote does not have", "diverged")
            return self._ff_warn(text, "refused")
        after = run_git(self.repo, "rev-parse", "HEAD", check=False).stdout.decode().strip()
        if after != tip:
            return self._ff_warn("the local branch has commits the remote does not have", "diverged")
        self.ff_warned = None
        log.info("working tree fast-forwarded to %s", tip[:12], extra={"metadata": {"tip": tip}})
        self._check_upgrade(head, tip)
        return "fast-forwarded"

    def _ff_warn(self, reason: str, outcome: str) -> str:
        if self.ff_warned != reason:  # once per reason, not every cycle
            self.ff_warned = reason
            log.warning("working tree not fast-forwarded: %s (mail is read from the fetched "
                        "branch and keeps flowing)", reason, extra={"metadata": {"reason": reason}})
        return outcome

    def _suite_folder(self) -> Optional[str]:
        """The suite's folder relative to the clone (``python``), or None when it lives elsewhere."""
        suite = Path(__file__).resolve().parent
        try:
            return suite.relative_to(self.repo.resolve()).as_posix() or "."
        except ValueError:
            return None

    def _suite_changed(self, old: str, new: str) -> bool:
        rel = self._suite_folder()
        if rel is None:
            return False  # the suite does not live in this clone
        diff = run_git(self.repo, "diff", "--quiet", old, new, "--", rel, check=False)
        return diff.returncode != 0

    def _unsigned_release(self, old: str, new: str) -> Optional[str]:
        """Why the commits ``old..new`` may not reach the working tree under ``--upgrade-signed-by``
        (they change the suite's files and ``new`` is not signed by an allowed key), else None.

        Logged as an error once per commit. The signature of the tip covers its whole tree, so
        a signed release on top of unsigned commits is a release its signer vouches for.
        """
        if self.upgrade_signers is None or not self._suite_changed(old, new):
            return None
        try:
            problem = release_signature_problem(self.repo, new, self.upgrade_signers)
        except GitError as exc:
            problem = str(exc)
        if problem is None:
            return None
        reason = (f"the suite's files change in {new[:12]}, which is not signed by a key in "
                  f"{self.upgrade_signers}: {problem}")
        if new not in self.failed_upgrades:
            self.failed_upgrades.add(new)
            log.error("new suite version not run and working tree not fast-forwarded: %s", reason,
                      extra={"metadata": {"commit": new, "problem": problem}})
        return reason

    def _check_upgrade(self, old: str, new: str) -> None:
        """When the fast-forward changed the suite's own files, restart into the new version
        after this cycle, unless the new version fails its self-check (then stay, and say so).
        Under ``--upgrade-signed-by`` nothing of the new version runs, not even its self-check,
        unless ``new`` carries a signature by an allowed key."""
        if new in self.failed_upgrades or not self._suite_changed(old, new):
            return
        if self.upgrade_signers is not None:
            try:
                problem = release_signature_problem(self.repo, new, self.upgrade_signers)
            except GitError as exc:
                problem = str(exc)
            if problem is not None:
                self.failed_upgrades.add(new)
                log.error("new suite version at %s is not run: not signed by a key in %s: %s",
                          new[:12], self.upgrade_signers, problem,
                          extra={"metadata": {"commit": new, "problem": problem}})
                return
        suite = Path(__file__).resolve().parent
        from fleet_service import self_check

        problem = self_check(sys.executable, str(suite / "message_monitor.py"))
        if problem is not None:
            self.failed_upgrades.add(new)
            log.error("new suite version at %s fails its self-check, staying on the running "
                      "version: %s", new[:12], problem, extra={"metadata": {"commit": new}})
            return
        log.warning("the suite's files changed in %s: restarting into the new version", new[:12],
                    extra={"metadata": {"commit": new}})
        self.restart_requested = True
        self.stop_event.set()

    # ----------------------------------------------------------------- periodic work

    def _periodic(self, report: CycleReport) -> None:
        self.last_report = report
        if self.iterations % HEALTH_EVERY == 1 or HEALTH_EVERY == 1:
            self._health_check()
        self._maybe_presence()
        if self.heartbeat_seconds and self.reading.heartbeat_on_main:
            self._maybe_heartbeat(report)
        if self.auto_archive_days:
            self._maybe_archive()

    def _health_check(self) -> Optional[Dict[str, Any]]:
        if self.last_fetch_ok is not None and (
                self.written_fetch_ok is None or self.last_fetch_ok - self.written_fetch_ok > STATUS_REWRITE_IDLE):
            # The health check reads the status file: it must not judge an old fetch (an idle
            # monitor still rewrites it at most once a minute).
            self.status_dirty = True
            self.write_status(self.last_report or CycleReport())
        try:
            from system_health import get_system_health

            health = get_system_health(str(self.repo), self.server)
        except Exception as exc:  # noqa: BLE001 - a health probe must never stop the monitor
            log.error("health check failed: %s", exc)
            return None
        overall = health.get("overall")
        if overall != self.last_health:
            level = logging.INFO if overall == "HEALTHY" else logging.WARNING
            problems = {k: v.get("message") for k, v in health.get("checks", {}).items()
                        if isinstance(v, dict) and v.get("status") != "HEALTHY"}
            detail = "; ".join(f"{name}: {text}" for name, text in problems.items())
            log.log(level, "health is %s%s", overall, f" ({detail})" if detail else "",
                    extra={"metadata": {"overall": overall, "was": self.last_health}})
            self.last_health = overall
            self.presence_due = True  # readers of the state ref learn of the change now
        return health

    def status_snapshot(self) -> Dict[str, Any]:
        """This server's real state, for automatic status replies."""
        health = self._health_check() or {}
        checks = health.get("checks", {})
        stats = self.queue.stats()
        return {
            "overall": health.get("overall"),
            "disk_free_gb": checks.get("disk", {}).get("free_gb"),
            "memory_percent": checks.get("memory", {}).get("percent"),
            "cpu_percent": checks.get("cpu", {}).get("percent"),
            "queue_pending": stats.get("pending"), "queue_dead": stats.get("dead"),
            "breaker": self.breaker.get_status().get("state"),
            "last_fetch_age_s": (time.time() - self.last_fetch_ok) if self.last_fetch_ok else None,
            "checks": {k: {"status": v.get("status"), "message": v.get("message")}
                       for k, v in checks.items() if isinstance(v, dict)},
        }

    def _maybe_presence(self, activity: Optional[str] = None) -> None:
        """Publish presence in this server's state ref: at start, when health changes, and at
        least every ``--heartbeat-minutes`` (default 5 minutes). No commit on the shared branch."""
        period = float(self.heartbeat_seconds or PRESENCE_SECONDS)
        last = self.state.extra.get("last_presence_at")
        now = time.time()
        if activity is None and not self.presence_due and isinstance(last, (int, float)) \
                and now - last < period:
            return
        try:
            self._timed("heartbeat", lambda: self.states.update(
                self.server, StateChange(presence=self.presence(activity, period))))
        except (RemoteUnavailable, GitError, StateRefError) as exc:
            log.warning("presence not published: %s", exc)
            return
        self.presence_due = False
        self.presence_published = True
        self.state.extra["last_presence_at"] = now
        self.state.dirty = True
        self.state.save()
        self.metrics.increment("heartbeats")

    def presence(self, activity: Optional[str], period: float) -> Dict[str, Any]:
        """This server's ``presence`` (PROTOCOL.md): health, queue, breaker, and how fresh to
        expect it (``interval`` between cycles, ``period`` between presence updates)."""
        health = self._health_check() or {}
        checks = health.get("checks", {})
        stats = self.queue.stats()
        report = self.last_report
        busy = report is not None and bool(report.new_messages or report.sent)
        return presence_doc(
            started=self.started_at, interval=self.interval,
            healthy=health.get("overall") != "CRITICAL" if health else None,
            activity=activity or ("busy" if busy else "idle"), version=SUITE_VERSION,
            extra={"health": health.get("overall"),
                   "system": {"cpu_usage": checks.get("cpu", {}).get("percent"),
                              "memory_used_gb": checks.get("memory", {}).get("used_gb"),
                              "disk_free_gb": checks.get("disk", {}).get("free_gb")},
                   "queue": {"pending": stats.get("pending"), "dead": stats.get("dead")},
                   "breaker": self.breaker.get_status().get("state"), "period": period})

    def _maybe_heartbeat(self, report: CycleReport) -> None:
        """``--heartbeat-on-main``: also the legacy ``<server>/heartbeat.json`` commit."""
        last = self.state.extra.get("last_heartbeat_at")
        now = time.time()
        if isinstance(last, (int, float)) and now - last < float(self.heartbeat_seconds or 0):
            return
        try:
            tx = self._timed("heartbeat", self.publish_heartbeat)
        except (RemoteUnavailable, GitError) as exc:
            log.warning("heartbeat not published: %s", exc)
            return
        self.state.extra["last_heartbeat_at"] = now
        self.state.dirty = True
        self.state.save()
        report.heartbeat = True
        self._landed(tx)

    def publish_heartbeat(self):
        """Write ``<server>/heartbeat.json`` (the fleet's format) by one transaction."""
        health = self._health_check() or {}
        checks = health.get("checks", {})
        memory = checks.get("memory", {})
        doc = {
            "server": self.server,
            "timestamp": iso_utc(),
            "uptime_seconds": int(time.time() - self.started_at),
            "healthy": health.get("overall") != "CRITICAL",
            "system": {
                "cpu_usage": checks.get("cpu", {}).get("percent"),
                "memory_used_gb": memory.get("used_gb"),
                "disk_free_gb": checks.get("disk", {}).get("free_gb"),
            },
        }
        data = dump_json_bytes(doc)
        path = f"{self.server}/heartbeat.json"
        return self.clone.transact(lambda tip: ({path: data}, f"{self.server}: heartbeat"),
                                   author=self.server, fresh_for=max(self.interval, 1.0))

    def _maybe_archive(self) -> None:
        last = self.state.extra.get("last_archive_at")
        now = time.time()
        if isinstance(last, (int, float)) and now - last < 86400:
            return
        from fleet_archive import archive_pass

        try:
            result = archive_pass(self.clone, self.server, float(self.auto_archive_days or 0))
        except (RemoteUnavailable, MailboxCorrupt, GitError, StateRefError) as exc:
            log.warning("automatic archive pass failed: %s", exc)
            return
        self.state.extra["last_archive_at"] = now
        self.state.dirty = True
        self.state.save()
        if result.get("archived"):
            log.info("archived %d messages", result["archived"], extra={"metadata": result})

    # ----------------------------------------------------------------- bookkeeping

    def _finish(self, report: CycleReport, *, busy: bool) -> None:
        self.last_report = report
        if self.hook is not None:
            self.hook.reap()
        self.write_status(report)
        self.metrics.maybe_flush(busy)
        if self.metrics_textfile:
            if busy or self.iterations % 6 == 1:
                try:
                    self.metrics.write_prometheus_textfile(self.metrics_textfile)
                except OSError as exc:
                    log.warning("metrics textfile not written: %s", exc)
        if self.notifier is not None:
            self.notifier.status(f"cycle {self.iterations}: {report.summary()}")
            self.notifier.watchdog()

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
            "remote_tip": report.tip, "suite_version": SUITE_VERSION,
        })
        self.last_status_write = now
        self.written_fetch_ok = self.last_fetch_ok
        self.status_dirty = False

    # ----------------------------------------------------------------- the loop

    def run(self) -> int:
        """Cycle until asked to stop; 0, or 2 when the shared branch is not on the remote at
        start (a mistyped ``--branch``: retrying would never deliver anything)."""
        code = EXIT_OK
        while not self.stop_event.is_set():
            started = time.monotonic()
            report = self.cycle()
            if report.fatal:
                code = EXIT_USAGE
                break
            if self.one_shot:
                break
            remaining = self.interval - (time.monotonic() - started)
            if remaining > 0 and self._sleep(remaining):
                break
        self.metrics.maybe_flush(True)
        if self.hook is not None:
            self.hook.stop()
        if not self.one_shot and self.presence_published and self.breaker.can_execute():
            self._maybe_presence("stopped")  # readers see a clean stop, not a silent server
        log.info("monitor stopped", extra={"metadata": {"iterations": self.iterations}})
        return code


def _dt_from_epoch(epoch: float):
    import datetime as _dt

    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc)


# --------------------------------------------------------------------------- trust in commits


def runtime_paths_changed(repo: Path, old: str, new: str) -> List[str]:
    """Paths that the commits from ``old`` to ``new`` change in any server's runtime folders.

    That is ``<id>/logs/...``, ``<id>/queue/...`` and ``<id>/state/...`` for any valid id (the
    folders themselves included, in any letter case, for case-insensitive file systems), and a
    top-level ``<id>`` that becomes a symlink or submodule, or a file where this clone has a
    folder: a fast-forward would put it in place of that server's runtime files (PROTOCOL.md,
    "Trust between servers").
    """
    out = run_git(repo, "diff-tree", "-r", "-z", "--no-renames", old, new).stdout
    fields = out.split(b"\0")
    found: List[str] = []
    for meta, raw_path in zip(fields[0::2], fields[1::2]):
        parts = meta.decode("ascii", "replace").lstrip(":").split()
        new_mode = parts[1] if len(parts) > 1 else ""
        path = raw_path.decode("utf-8", "surrogateescape")
        names = path.split("/")
        top = names[0].lower()
        if not is_valid_server_id(top):
            continue
        if len(names) > 1:
            if names[1].lower() in RUNTIME_SUBDIRS:
                found.append(path)
        elif new_mode in ("120000", "160000") or (new_mode != "000000" and _is_real_folder(repo / names[0])):
            found.append(path)
    return found


def _is_real_folder(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and not is_link(info)


SSH_SIGNATURE_START = b"-----BEGIN SSH SIGNATURE-----"


def release_signature_problem(repo: Path, commit: str, allowed_signers: str) -> Optional[str]:
    """Why ``commit`` is not signed by a key in ``allowed_signers`` (git's allowed-signers file,
    ``gpg.ssh.allowedSignersFile``), or None when it is.

    Only SSH signatures count: a GPG signature would be judged by whatever keyring the service
    account happens to have, not by the operator's list.
    """
    raw = run_git(repo, "cat-file", "commit", commit).stdout
    headers = raw.split(b"\n\n", 1)[0]
    signature = next((line.split(b" ", 1)[1] for line in headers.split(b"\n")
                      if line.startswith((b"gpgsig ", b"gpgsig-sha256 ")) and b" " in line), None)
    if signature is None:
        return "the commit is not signed"
    if not signature.strip().startswith(SSH_SIGNATURE_START):
        return "the commit is not signed with an SSH key"
    proc = run_git(repo, "-c", "gpg.format=ssh", "-c", f"gpg.ssh.allowedSignersFile={allowed_signers}",
                   "verify-commit", commit, check=False)
    if proc.returncode == 0:
        return None
    lines = [line.strip() for line in proc.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    bad = [line for line in lines if not line.lower().startswith("good ")]
    return " ".join((bad or lines or ["git verify-commit failed"])[-1].split())[:200]


# --------------------------------------------------------------------------- --init


def init_fleet(path: "os.PathLike[str] | str", branch: str = "main") -> str:
    """Create ``path`` as a clone of a new bare ``<path>.origin.git`` with an empty mailbox.

    On an existing clone without a mailbox, add one by the transaction. Returns what was done.
    """
    from fleet_git import check_branch_name

    check_branch_name(branch)
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--init: {target} is a file, not a folder")
    if target.exists() and (target / ".git").exists():
        clone = Clone(target, None)
        clone.fetch(allow_missing=True)

        def change(tip: Optional[str]):
            _, raw = clone.read_file(tip, MAILBOX_PATH)
            if raw is not None:
                return None
            return {MAILBOX_PATH: serialize({"messages": []})}, "fleet: create the mailbox"

        tx = clone.transact(change, author="fleet", create_branch=True)  # --init alone may create it
        return "added a mailbox to the existing clone" if tx.changed else "already a fleet repository"
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"--init: {target} exists and is not a git clone")
    origin = target.with_name(target.name + ".origin.git")
    if origin.exists():
        raise UsageError(f"--init: {origin} already exists")
    if target.parent.exists() and not target.parent.is_dir():
        raise UsageError(f"--init: {target.parent} is a file, not a folder")
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
                        help="once a day, archive messages older than N days that are done with")
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
    commands.add_argument("--print-systemd-unit", action="store_true", help="print a systemd unit for this machine")
    commands.add_argument("--service-user", default=None, metavar="USER",
                          help="with --print-systemd-unit: the account the service runs as (owner of the clone)")
    commands.add_argument("--print-task-scheduler", action="store_true",
                          help="print the PowerShell that registers a Windows scheduled task")
    commands.add_argument("--self-check", action="store_true", help=argparse.SUPPRESS)
    return parser


# What a shown message may take of a console line: every field comes from another machine
# (PROTOCOL.md, "Trust between servers"), so each is cut, not only the previews.
RENDER_ID_CHARS = 100  # id, from and each recipient (a valid server id has at most 64)
RENDER_WORD_CHARS = 40  # priority, type, timestamp
RENDER_RECIPIENTS = 5  # then "+N more"


def _render_to(to: Any) -> str:
    from structured_log import clip

    if not isinstance(to, list):
        return clip(to, RENDER_ID_CHARS)
    shown = ", ".join(clip(item, RENDER_ID_CHARS) for item in to[:RENDER_RECIPIENTS])
    more = len(to) - RENDER_RECIPIENTS
    return f"{shown} +{more} more" if more > 0 else shown


def render_message(msg: Dict[str, Any], *, terminal: bool) -> str:
    """How a new message is shown: a block on a terminal, one line for journald and pipes.

    Every field is redacted, neutralised and cut (``…``), so the whole stays a few hundred
    characters whatever the message holds.
    """
    from structured_log import clip, preview

    fields = {
        "from": clip(msg.get("from"), RENDER_ID_CHARS), "to": _render_to(msg.get("to")),
        "priority": clip(msg.get("priority") or "normal", RENDER_WORD_CHARS).upper(),
        "type": clip(msg.get("type") or "info", RENDER_WORD_CHARS),
        "subject": preview(str(msg.get("subject") or "(no subject)"), 100),
        "body": preview(str(msg.get("body") or ""), 200),
        "id": clip(msg.get("id"), RENDER_ID_CHARS),
        "when": clip(msg.get("timestamp") or "?", RENDER_WORD_CHARS),
    }
    if not terminal:
        return ("NEW MESSAGE id={id} from={from} to={to} priority={priority} type={type} "
                "subject=\"{subject}\" preview=\"{body}\"").format(**fields)
    return ("\n=== NEW MESSAGE [{priority}] from {from} to {to} ({type}, {when})\n"
            "    Subject: {subject}\n    {body}\n    id: {id}").format(**fields)


def _nothing() -> None:
    return None


# One-shot commands: each runs and exits, so at most one may be given (a second one would be
# ignored in silence). The loop's options make no sense with most of them either; the two
# service definitions carry them into the service's command line instead.
ONE_SHOT_COMMANDS = ("init", "status", "repair", "archive_days", "retry_dead", "print_systemd_unit",
                     "print_task_scheduler", "self_check")
SERVICE_DEFINITIONS = ("print_systemd_unit", "print_task_scheduler")
LOOP_OPTIONS = ("once", "heartbeat_minutes", "auto_archive_days", "metrics_textfile", "rules",
                "no_auto_reply", "upgrade_signed_by", "mark_read", "legacy_marks", "heartbeat_on_main",
                "on_message")
MAX_HEARTBEAT_MINUTES = 7 * 24 * 60.0  # a week: beyond that a heartbeat tells nothing
MAX_ARCHIVE_DAYS = 36500.0  # a century; larger ages overflow the date arithmetic


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _given(args: argparse.Namespace, dest: str) -> bool:
    value = getattr(args, dest)
    return value is not None and value is not False  # 0 (as in --archive-days 0) is given


def _check_combination(args: argparse.Namespace) -> None:
    """Refuse options that cannot run together (exit 2), rather than run one and drop the rest."""
    commands = [dest for dest in ONE_SHOT_COMMANDS if _given(args, dest)]
    if len(commands) > 1:
        raise UsageError(f"{' and '.join(_option(c) for c in commands)} cannot run together; "
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
        raise UsageError(f"{_option(loop[0])} is an option of the monitoring loop and cannot go "
                         f"with {_option(command)}")


def _absolute(path: str) -> str:
    return path if _looks_windows_absolute(path) else str(Path(path).expanduser().resolve())


def _service_args(args: argparse.Namespace) -> List[str]:
    """The loop's options as given, for the command line of a service definition."""
    extra: List[str] = []
    if args.branch:
        extra += ["--branch", args.branch]
    for dest in ("heartbeat_minutes", "auto_archive_days"):
        if getattr(args, dest) is not None:
            extra += [_option(dest), f"{getattr(args, dest):g}"]
    for dest in ("metrics_textfile", "rules", "upgrade_signed_by"):
        if getattr(args, dest):
            extra += [_option(dest), _absolute(getattr(args, dest))]
    if args.mark_read:
        extra += ["--mark-read", args.mark_read]
    if args.on_message:
        extra += ["--on-message", args.on_message, "--on-message-timeout", f"{args.on_message_timeout:g}"]
    for dest in ("no_auto_reply", "legacy_marks", "heartbeat_on_main"):
        if getattr(args, dest):
            extra.append(_option(dest))
    if args.quiet:
        extra.append("--quiet")
    return extra


def _one_shot_command(args: argparse.Namespace, repo: str, server: str, interval: float) -> Optional[int]:
    """Run a command that does not start the loop; ``None`` when none was asked for."""
    if args.self_check:
        for module in ("fleet_common", "fleet_git", "fleet_mailbox", "send_message", "message_queue",
                       "circuit_breaker", "structured_log", "network_check", "system_health",
                       "monitoring_metrics", "fleet_service", "auto_reply", "fleet_archive"):
            __import__(module)
        return EXIT_OK
    if args.print_systemd_unit or args.print_task_scheduler:
        from fleet_service import render_systemd_unit, render_task_scheduler

        common = {"python": sys.executable, "script": str(Path(__file__).resolve()),
                  "repo": _absolute(repo), "server": server, "interval": interval,
                  "extra_args": _service_args(args)}
        if args.print_systemd_unit:
            text = render_systemd_unit(user=args.service_user, **common)
        else:
            text = render_task_scheduler(**common)
        write_line(text.rstrip("\n"))
        return EXIT_OK
    if args.status:
        write_line(status_report(repo, server, as_json=args.json))
        return EXIT_OK
    if args.retry_dead:
        from message_queue import MessageQueue

        count = MessageQueue(str(Clone(repo).root), server).retry_dead()
        write_line(f"{count} dead message(s) will be retried by the monitor")
        return EXIT_OK
    if args.repair:
        result = repair_mailbox(Clone(repo, args.branch), server)
        write_line(result["summary"])
        return EXIT_OK
    if args.archive_days is not None:
        from fleet_archive import archive_pass

        result = archive_pass(Clone(repo, args.branch), server, args.archive_days)
        write_line(result["summary"])
        return EXIT_OK
    return None


def _looks_windows_absolute(path: str) -> bool:
    return len(path) > 2 and path[1] == ":" and path[2] in "/\\"


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
    parser = _parser()
    args = parser.parse_args(argv)
    lock = None
    try:
        _check_combination(args)
        repo = args.repo or default_repo_path()
        if args.init:
            if args.server is not None:
                normalize_server_id(args.server)
            write_line(init_fleet(repo, args.branch or "main"))
            return EXIT_OK
        server = resolve_server_id(args.server)
        interval = args.interval if args.interval is not None else default_interval()
        if args.metrics_textfile:
            from monitoring_metrics import check_textfile_path

            check_textfile_path(args.metrics_textfile)  # a missing folder is refused, not created
        done = _one_shot_command(args, repo, server, interval)
        if done is not None:
            return done
        if args.upgrade_signed_by:
            args.upgrade_signed_by = _allowed_signers(args.upgrade_signed_by)
        clone = Clone(repo, args.branch)
        _setup_logging(clone.root, server, args.quiet)
        if args.rules:
            from auto_reply import RuleSource

            RuleSource(args.rules)  # an invalid local rule file is an error at start (exit 2)
        from fleet_service import InstanceLock

        lock = InstanceLock(clone.root, server).acquire()
    except UsageError as exc:
        write_line(f"message_monitor: error: {exc}", sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        write_line("message_monitor: interrupted", sys.stderr)
        return EXIT_INTERRUPTED
    except (SuiteError, OSError) as exc:
        write_line(f"message_monitor: error: {_one_line(exc)}", sys.stderr)
        return EXIT_FAILURE
    try:
        return _run_monitor(args, clone, server, interval)
    finally:
        lock.release()


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]


def _setup_logging(root: Path, server: str, quiet: bool) -> None:
    from structured_log import setup_logging

    setup_logging(str(root), server, console_level=logging.WARNING if quiet else logging.INFO)


def _run_monitor(args: argparse.Namespace, clone: Clone, server: str, interval: float) -> int:
    from fleet_service import default_notifier, install_stop_handlers, restart_process

    terminal = sys.stdout.isatty()
    stop = threading.Event()
    notifier = default_notifier()
    clone.add_network_hook(notifier.keepalive)  # a slow git call never starves the watchdog
    restore: Callable[[], None] = _nothing
    try:
        # Inside the handlers: a state file of a newer version, or a disk that refuses the first
        # write, is one line and exit 1, not a traceback.
        monitor = Monitor(clone, server, interval, one_shot=args.once, stop_event=stop,
                          show=lambda m: write_line(render_message(m, terminal=terminal)),
                          notifier=notifier, auto_reply=not args.no_auto_reply, rules_path=args.rules,
                          heartbeat_minutes=args.heartbeat_minutes,
                          metrics_textfile=args.metrics_textfile,
                          auto_archive_days=args.auto_archive_days,
                          upgrade_signers=args.upgrade_signed_by,
                          reading=ReadingOptions(
                              mark_read=args.mark_read or ("on-show" if terminal else "never"),
                              legacy_marks=args.legacy_marks, heartbeat_on_main=args.heartbeat_on_main,
                              on_message=args.on_message, on_message_timeout=args.on_message_timeout))
        if not args.once:
            restore = install_stop_handlers(lambda name: stop.set())
        if args.once:
            report = monitor.cycle()
            monitor.metrics.maybe_flush(True)
            if not report.ok:
                write_line(f"message_monitor: error: {report.error}", sys.stderr)
                return EXIT_FAILURE
            return EXIT_OK
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
    except (SuiteError, OSError) as exc:
        write_line(f"message_monitor: error: {_one_line(exc)}", sys.stderr)
        return EXIT_FAILURE
    finally:
        restore()


# --------------------------------------------------------------------------- --repair and --status


def repair_mailbox(clone: Clone, server: str, *, max_history: int = 500) -> Dict[str, Any]:
    """Rebuild an unparseable mailbox on the remote (:meth:`fleet_mailbox.Mailbox.repair`)."""
    from fleet_mailbox import Mailbox

    return Mailbox(clone).repair(server, max_history=max_history)


STATUS_FILE_MAX_BYTES = 1024 * 1024  # monitor_status.json is a few hundred bytes


def _read_status_file(path: Path) -> Optional[Dict[str, Any]]:
    """``monitor_status.json`` when it can be read (never through a symlink), else None."""
    from fleet_common import load_json_bounded, read_local_file

    try:
        raw = read_local_file(path, max_bytes=STATUS_FILE_MAX_BYTES)
        data = load_json_bounded(raw, what=path.name, max_bytes=STATUS_FILE_MAX_BYTES) if raw else None
    except (OSError, SuiteError):
        return None
    return data if isinstance(data, dict) else None


def status_report(repo: str, server: str, *, as_json: bool = False) -> str:
    """One screen: health, breaker, queue, last cycle and the 24-hour metrics summary."""
    import json

    from fleet_service import deliver_command, monitor_running
    from message_queue import MessageQueue
    from monitoring_metrics import MetricsCollector
    from system_health import get_system_health

    root = Clone(repo).root
    health = get_system_health(str(root), server)
    last = _read_status_file(state_dir(root, server) / "monitor_status.json")
    queue = MessageQueue(str(root), server).stats()
    metrics = MetricsCollector(str(root), server).get_summary(hours=24)
    running = monitor_running(root, server)
    if last is not None:
        last["running"] = running
    data = {"server": server, "repo": str(root), "health": health, "monitor": last,
            "queue": queue, "metrics": metrics}
    if as_json:
        return json.dumps(data, indent=2, default=str)
    lines = [f"Fleet monitor status for {server} at {root}",
             f"Health: {health['overall']}"]
    for name, check in health.get("checks", {}).items():
        lines.append(f"  {name:<16}{check.get('status', '?'):<9}{check.get('message', '')}")
    if last:
        state = {True: "running", False: "not running"}.get(running, "unknown")
        cycles = last.get("iterations")
        lines.append(f"Monitor: {state} (pid {last.get('pid')}), started {last.get('started_at')}, "
                     f"{cycles} cycle{'' if cycles == 1 else 's'}, every {last.get('interval')} s")
        lines.append(f"  last cycle {last.get('last_cycle_at')}: {last.get('last_cycle')}")
        lines.append(f"  last successful fetch: {last.get('last_fetch_ok_at')}")
    else:
        lines.append("Monitor: has not run on this clone yet")
    lines.append(f"Retry queue: {queue.get('pending')} pending, {queue.get('dead')} dead, "
                 f"{queue.get('sent')} recently sent")
    if queue.get("pending") and running is False:
        lines.append("  WARNING: no monitor runs on this clone, so nothing will deliver them; run: "
                     + deliver_command(root, server))
    lines.append("Last 24 hours:")
    counters = metrics.get("counters", {})
    lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()))
    for op, st in sorted(metrics.get("operations", {}).items()):
        lines.append(f"  {op:<12} {st['count']:>6} runs, {st['success_rate'] * 100:5.1f} % ok, "
                     f"p50 {st['p50_ms']:.0f} ms, p95 {st['p95_ms']:.0f} ms, max {st['max_ms']:.0f} ms")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
