"""The monitor's cycle: poll, read the mailbox, show new mail, deliver the queue, push marks.

:class:`Monitor` is the polling loop of one server; :meth:`Monitor.cycle` runs one cycle and
returns a :class:`CycleReport`, :meth:`Monitor.run` cycles until asked to stop. Its collaborators
own the rest: :mod:`monitor_remote` (polling with backoff), :mod:`monitor_files` (local state and
status files), :mod:`monitor_duties` (health, presence, heartbeat, archive), :mod:`monitor_worktree`
(fast-forward and self-upgrade) and :class:`fleet_mailbox.Mailbox` (every mailbox change).
Library code: it logs and returns, never prints or exits.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import threading
import time

from fleet_common import (
    EXIT_OK,
    EXIT_USAGE,
    SUITE_VERSION,
    BadInput,
    RuntimePaths,
    UsageError,
    is_valid_server_id,
    iso_from_epoch,
    iso_utc,
    normalize_server_id,
    remove_stale_temp_files,
)
from fleet_git import (
    BranchMissing,
    GitError,
    LocalRefLocked,
    NotAFile,
    ObjectMissing,
    RemoteUnavailable,
    run_git,
)
from fleet_mailbox import (
    Mailbox,
    MailboxCorrupt,
    MailboxFull,
    entry_problem,
    is_addressed_to,
    is_handled_by,
    message_key,
    message_size_problem,
    new_message_id,
    valid_messages,
)
from fleet_state import STOPPED, StateChange, StateRefError, StateStore
from monitor_duties import PeriodicDuties
from monitor_files import STATUS_REWRITE_IDLE, MonitorState, write_status
from monitor_remote import BACKOFF_DELAYS, RemotePoller
from monitor_worktree import WorkTree

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

    from fleet_git import (
        Clone,
    )
    from fleet_mailbox import (
        MessageKey,
    )

log = logging.getLogger("message_monitor")  # the monitor's log, as before the split

RULES_PATH = "coordination/auto_reply_rules.json"
FF_MIN_INTERVAL = 5.0  # seconds between working-tree fast-forwards at short intervals
MARK_READ_MODES = ("on-show", "never")


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

@dataclasses.dataclass
class MonitorOptions:
    """How the loop behaves: one cycle or many, retry delays, breaker thresholds, duties."""

    one_shot: bool = False
    backoff: Sequence[float] = BACKOFF_DELAYS
    preflight_timeout: float = 5.0
    failure_threshold: int = 5
    open_seconds: float = 300.0
    auto_reply: bool = True
    rules_path: Optional[str] = None
    heartbeat_minutes: Optional[float] = None
    metrics_textfile: Optional[str] = None
    auto_archive_days: Optional[float] = None
    upgrade_signers: Optional[str] = None  # --upgrade-signed-by: git's allowed-signers file


@dataclasses.dataclass
class MonitorParts:
    """Collaborators given from outside (tests, the CLI); each is built from the clone when
    ``None``: the retry queue, the circuit breaker (persisted under ``<server>/state/``), the
    metrics, the automatic responder. ``show`` displays a new message; ``stop_event`` stops the
    loop; ``notifier`` talks to systemd."""

    show: Optional[Callable[[Dict[str, Any]], None]] = None
    stop_event: Optional[threading.Event] = None
    breaker: Any = None
    queue: Any = None
    metrics: Any = None
    notifier: Any = None
    responder: Any = None


def _split_keywords(options: Optional[MonitorOptions], parts: Optional[MonitorParts],
                    keywords: Dict[str, Any]) -> Tuple[MonitorOptions, MonitorParts]:
    """The option objects, with keyword arguments (``Monitor(..., one_shot=True)``) applied."""
    option_names = {f.name for f in dataclasses.fields(MonitorOptions)}
    part_names = {f.name for f in dataclasses.fields(MonitorParts)}
    unknown = sorted(set(keywords) - option_names - part_names)
    if unknown:
        raise TypeError(f"Monitor() got unexpected keyword argument(s): {', '.join(unknown)}")
    options = dataclasses.replace(options or MonitorOptions(),
                                  **{k: v for k, v in keywords.items() if k in option_names})
    parts = dataclasses.replace(parts or MonitorParts(),
                                **{k: v for k, v in keywords.items() if k in part_names})
    return options, parts


def queued_problem(entry: Dict[str, Any]) -> Optional[str]:
    """Why a queue entry's message can never be delivered (a queue file edited by hand, or one
    that came with the shared branch), or ``None``: it must be a valid message, from the sender
    and with the id its entry names, and no larger than a send may make one."""

    msg = entry.get("message")
    problem = entry_problem(msg)
    if problem is not None:
        return f"its message {problem}"
    if msg["id"] != entry["id"] or msg["from"].strip().lower() != str(entry.get("from", msg["from"])).strip().lower():
        return "its message's id or sender is not the entry's"
    if not is_valid_server_id(msg["from"].strip().lower()):
        return "its sender is no valid server id"
    try:
        too_large = message_size_problem(msg)
    except (TypeError, ValueError):
        return "its message is no JSON"
    return f"its message: {too_large}" if too_large else None


def reply_message(fields: Dict[str, Any], sender: str) -> Dict[str, Any]:
    """An automatic reply as a new message (PROTOCOL.md, "A message"): the ten fields every
    sender writes, then what the responder set (``in_reply_to``, ``auto``). Built here, not by
    ``send_message`` (a CLI module the monitor does not import); refused when it is not a valid
    message."""
    extra = dict(fields)
    msg: Dict[str, Any] = {
        "id": new_message_id(), "from": sender, "to": normalize_server_id(extra.pop("to")),
        "subject": str(extra.pop("subject")), "body": str(extra.pop("body")),
        "type": extra.pop("type", "response"), "priority": extra.pop("priority", "normal"),
        "timestamp": iso_utc(), "read": False, "ack_required": False,
    }
    for key, value in extra.items():
        msg.setdefault(key, value)
    problem = entry_problem(msg)
    if problem is not None:
        raise UsageError(f"automatic reply not built: {problem}")
    return msg


class Monitor(PeriodicDuties):
    """The polling loop of one server. Library code: it logs and returns, never prints.

    ``Monitor(clone, server, interval, options=MonitorOptions(...), reading=ReadingOptions(...),
    parts=MonitorParts(...))``; each field of the option objects may also be given as a keyword
    (``Monitor(clone, "code2", 1.0, one_shot=True, auto_reply=False)``). Tests pass small
    thresholds and an event to stop on.
    """

    def __init__(self, clone: Clone, server: str, interval: float = 10.0, *,
                 options: Optional[MonitorOptions] = None,
                 reading: Optional[ReadingOptions] = None,
                 parts: Optional[MonitorParts] = None,
                 **keywords: Any) -> None:
        from circuit_breaker import CircuitBreaker
        from message_queue import MessageQueue
        from monitoring_metrics import MetricsCollector

        options, parts = _split_keywords(options, parts, keywords)
        self.options = options
        self.clone = clone
        self.repo = clone.root
        self.server = normalize_server_id(server)
        self.interval = float(interval)
        self.show = parts.show or (lambda msg: None)
        self.one_shot = options.one_shot
        self.stop_event = parts.stop_event or threading.Event()
        paths = RuntimePaths(self.repo, self.server)
        for folder in (paths.queue_dir, paths.state_dir, paths.logs_dir):
            remove_stale_temp_files(folder)  # what a writer killed mid-write left behind
        self.state = MonitorState(self.repo, self.server)
        self.reading = reading or ReadingOptions()
        self.states = StateStore(clone)  # this server's receipts and presence (PROTOCOL.md)
        self.mailbox = Mailbox(clone)  # every read and change of the shared mailbox
        self.remote = RemotePoller(clone, self.server, self.states, backoff=options.backoff,
                                   one_shot=options.one_shot, preflight_timeout=options.preflight_timeout,
                                   timed=self._timed, sleep=self._sleep)
        self.worktree = WorkTree(clone, upgrade_signers=options.upgrade_signers,
                                 on_restart=self._request_restart)
        self.presence_due = True
        self.presence_published = False  # by this process: only then is a clean stop announced
        self.hook = None
        if self.reading.on_message:
            from fleet_hook import MessageHook

            self.hook = MessageHook(self.reading.on_message, self.reading.on_message_timeout,
                                    repo=self.repo, server=self.server, on_start=self.state.hook_started,
                                    owed=list(self.state.hook_owed.values()))
        self.queue = parts.queue if parts.queue is not None else MessageQueue(str(self.repo), self.server)
        self._other_queues: Dict[str, Any] = {}
        # The cycle records the poll's outcome itself (an unreachable remote is a failure; a
        # remote that answered, even without the branch, a success); pushes never reach the
        # breaker, so a lost push race cannot open it and no ``exclude`` is needed.
        self.breaker = parts.breaker if parts.breaker is not None else CircuitBreaker(
            options.failure_threshold, options.open_seconds,
            state_path=str(RuntimePaths(self.repo, self.server).breaker))
        self.breaker.add_listener(self._on_breaker_change)
        self.metrics = parts.metrics if parts.metrics is not None else MetricsCollector(
            str(self.repo), self.server)
        self.notifier = parts.notifier
        self.heartbeat_seconds = options.heartbeat_minutes * 60 if options.heartbeat_minutes else None
        self.metrics_textfile = options.metrics_textfile
        self.auto_archive_days = options.auto_archive_days
        self.iterations = 0
        self.processed_tip: Optional[str] = None
        self.ff_pending = False
        self.last_ff = float("-inf")
        self.seen_tip: Optional[str] = None
        self.cached_blob: Optional[str] = None
        self.corrupt_blob: Optional[str] = None
        self.corrupt_blobs_logged: Set[str] = set()
        self.warned_entries: Set[str] = set()
        self.marks_warned: Optional[str] = None
        self.started_at = time.time()
        self.written_fetch_ok: Optional[float] = None
        self.last_status_write = 0.0
        self.status_dirty = True
        self.last_health: Optional[str] = None
        self.last_report: Optional[CycleReport] = None
        self.restart_requested = False
        self.branch_seen_at: Optional[int] = None  # the cycle that last found the shared branch
        self.branch_missing_logged: Optional[int] = None
        self.rewrites_logged: Set[Tuple[str, str]] = set()
        self.responder = parts.responder
        if parts.responder is None and options.auto_reply:
            self.responder = self._make_responder(options.rules_path)

    # ----------------------------------------------------------------- collaborators

    def _make_responder(self, rules_path: Optional[str]):
        from auto_reply import AutoResponder, ReplyLedger, RuleSource

        ledger = ReplyLedger(RuntimePaths(self.repo, self.server).ledger)
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
            self.remote.preflight_needed = True
        polled, tip = self._poll(report)
        if not polled:
            return
        self.branch_seen_at = self.iterations
        self.breaker.record_success()
        self.metrics.increment("git_pull_success")
        report.tip = tip
        changed = tip != self.processed_tip
        self.seen_tip = tip
        if changed:
            self._read_new_mail(tip, report)
        self._drain_queue(report)
        self._push_marks(report)
        self.periodic(report)  # before the fast-forward, so that it includes a new heartbeat
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

    def _poll(self, report: CycleReport) -> Tuple[bool, Optional[str]]:
        """(True, the remote tip) when the remote answered with the shared branch; else the
        cycle ends here: (False, None), with the report finished."""
        try:
            return True, self.remote.poll_with_backoff()
        except RemoteUnavailable as exc:
            self.breaker.record_failure(exc.reason)
            self.metrics.increment("git_pull_failure")
            self.metrics.increment("errors")
            report.ok = False
            report.error = f"remote unreachable: {exc.reason}"
            log.warning("cannot reach the remote: %s", exc.reason,
                        extra={"metadata": {"step": "fetch", "error": exc.reason}})
            self._finish(report, busy=True)
        except LocalRefLocked as exc:
            # The remote answered: a lock in this clone is no outage, so no breaker failure. A
            # lock older than STALE_LOCK_AGE is removed at the start of a later cycle.
            self.breaker.record_success()
            report.skipped = f"a ref of this clone is locked: {exc.reason}"
            log.warning("cycle skipped: %s", exc.reason, extra={"metadata": {"step": "fetch",
                                                                              "error": exc.reason}})
            self._finish(report, busy=False)
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
        return False, None

    def _read_new_mail(self, tip: Optional[str], report: CycleReport) -> None:
        """Check for a forced rewrite, then show the new mail at ``tip``; a mailbox that cannot
        be read is the cycle's error (nothing is shown, nothing is written on top of it)."""
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

    def _after_missing_object(self, exc: Exception) -> None:
        """A tree or blob of the fetched tip cannot be read: the cycle reads nothing (an
        unreadable mailbox is no empty mailbox) and fetches every object again for the next."""
        self.metrics.increment("errors")
        log.error("%s; nothing read this cycle, fetching every object again", exc,
                  extra={"metadata": {"step": "read", "error": str(exc)}})
        try:
            self.remote.refetch()
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
            before = {message_key(m) for _, m in valid_messages(self.mailbox.read(old)[1], warn=False)}
            after = {message_key(m) for _, m in valid_messages(self.mailbox.read(new)[1], warn=False)}
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
        self.remote.known_tip = tx.commit
        if tx.base == self.seen_tip:
            self.seen_tip = tx.commit

    def _read_mailbox(self, tip: Optional[str]) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(blob id, document) at ``tip``; the document is ``None`` when the blob is unchanged."""
        try:
            blob, raw = self.mailbox.read_raw(tip)
        except MailboxCorrupt as exc:  # a folder or submodule where the mailbox should be
            self._note_corrupt(exc)
            raise
        if blob is not None and blob == self.cached_blob:
            self.corrupt_blob = None  # back to a version read before (a revert of a bad commit)
            return blob, None
        if blob is not None and blob == self.corrupt_blob:
            raise MailboxCorrupt(blob, "unchanged since it was found corrupt")
        try:
            data = self.mailbox.parse(raw, blob)
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
        answered: Set[MessageKey] = set()  # what this server answered automatically, as the mailbox shows
        for _, msg in valid_messages(data, warn=False):
            if msg.get("auto") is True and msg["from"].strip().lower() == self.server:
                target, to = msg.get("in_reply_to"), msg.get("to")
                if isinstance(target, str) and isinstance(to, str):
                    answered.add((target, to.strip().lower()))  # the key of the request it answered
                continue
            if not is_addressed_to(msg, self.server):
                continue
            if is_handled_by(msg, self.server, handled):
                continue
            self.state.record(message_key(msg), mark=False)
            if self.hook is not None:
                self.state.owe_hook(msg)
            report.new_messages.append(msg)
        if self.responder is not None:
            self.responder.answered = answered
            if report.new_messages:
                from fleet_roster import read_roster

                roster = read_roster(self.clone, tip)  # (a roster that cannot be used names nobody)
                self.responder.roster = set() if roster.problem else set(roster.servers)
        self.state.save()  # before showing: a restart never shows a message twice, nor forgets a command
        try:
            for msg in report.new_messages:
                log.info("new message %s from %s: %s", msg["id"], msg.get("from"), msg.get("subject"),
                         extra={"metadata": {"id": msg["id"], "from": msg.get("from"),
                                             "priority": msg.get("priority")}})
                self.metrics.increment("messages_received")
                if self.hook is not None:
                    self.hook.run(msg)
                shown = self._show(msg)
                self._auto_reply(msg, report)
                if mark and shown:  # only once it was shown: what was not stays unread, not hidden
                    self.state.record(message_key(msg), mark=True)
        finally:
            self.state.save()  # the marks of what was shown survive a failure on the next one
        self._queue_auto_replies(report)
        self.cached_blob = blob

    def finish_hook(self) -> None:
        """The monitor stops: a one-shot run (cron's) first runs every command it owes and waits
        for each up to its time limit; a loop's running commands are stopped, waiting ones stay
        owed for the next start (:class:`fleet_hook.MessageHook`)."""
        if self.hook is None:
            return
        try:
            if self.one_shot:
                self.hook.drain(stop=self.stop_event.is_set)
        finally:  # Ctrl+C in the drain too: nothing keeps running past the monitor
            self.hook.stop()

    def _show(self, msg: Dict[str, Any]) -> bool:
        """Show a message on the console; whether it was shown. A console that cannot be written
        (a closed pipe) is said once in the log and never stops the cycle: the message's command
        runs all the same, and it stays unread for the agent's inbox."""
        try:
            self.show(msg)
        except OSError as exc:
            if "console" not in self.warned_entries:
                self.warned_entries.add("console")
                log.warning("new messages cannot be shown: the console cannot be written (%s)", exc)
            return False
        return True

    def _refresh_rules(self, tip: Optional[str]) -> None:
        source = getattr(self, "rule_source", None)
        if source is None:
            return
        from auto_reply import MAX_RULES_BYTES  # imported with the rule source already
        try:
            blob, raw = self.clone.read_file(tip, RULES_PATH, MAX_RULES_BYTES)
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
        reply = reply_message(decision.reply, self.server) if decision.reply else None
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
        from message_queue import MessageQueue

        queues = [self.queue]
        for path in sorted(self.repo.glob("*/queue/message_queue.json")):
            name = path.parent.parent.name
            if name == self.server or not is_valid_server_id(name) or name != name.lower():
                continue
            try:
                if name not in self._other_queues:
                    self._other_queues[name] = MessageQueue(str(self.repo), name)
            except UsageError as exc:  # an id no server may act as now (an older version's queue)
                self._warn_once(f"queue:{name}", "%s is not delivered: %s", path.parent, exc)
                continue
            queues.append(self._other_queues[name])
        return queues

    def _warn_once(self, key: str, text: str, *args: Any) -> None:
        if key not in self.warned_entries:
            self.warned_entries.add(key)
            log.warning(text, *args)

    def _untracked(self, queues: List[Any]) -> List[Any]:
        """The queues whose file git does not track. One that git tracks came with the shared
        branch (someone committed it), not from a send here: it is skipped with a warning, never
        delivered as if this clone had queued it. When git cannot say, none is delivered now."""
        paths = {queue.path.relative_to(self.repo).as_posix(): queue for queue in queues}
        listed = run_git(self.repo, "ls-files", "-z", "--", *sorted(paths), check=False)
        if listed.returncode != 0:
            reason = listed.stderr.decode("utf-8", "replace").strip().splitlines()[:1] or ["no reason given"]
            log.warning("queued messages wait: git cannot say whether it tracks the queue files (%s)",
                        reason[0][:300])
            return []
        tracked = set(listed.stdout.decode("utf-8", "surrogateescape").split("\0"))
        for path in sorted(tracked & set(paths)):
            self._warn_once(f"tracked:{path}", "%s is tracked by git (it came with the shared branch); its "
                            "messages are not delivered from this clone", path)
        return [queue for path, queue in paths.items() if path not in tracked]

    def _drain_queue(self, report: CycleReport) -> None:
        """Deliver due queued messages (sends that found the remote down, automatic replies)."""
        if self.corrupt_blob is not None:
            return  # never write on top of a corrupt mailbox; attempts are not spent meanwhile
        due = {queue: entries for queue in self._queues() for entries in [queue.get_due()] if entries}
        if not due:
            return  # (the usual cycle: no git process for the queues)
        from fleet_archive import is_archived

        for queue in self._untracked(list(due)):
            for entry in due[queue]:
                if self.stop_event.is_set() and not self.one_shot:
                    return
                msg = entry.get("message")
                sender = entry.get("from")
                problem = queued_problem(entry)
                if problem is not None:  # a hand-edited or foreign file: kept, never retried
                    queue.increment_attempts(entry["id"], f"cannot be delivered: {problem}", sender=sender,
                                             final=True)
                    self.metrics.increment("errors")
                    continue
                archived = functools.partial(is_archived, self.clone, msg=msg, mailbox=self.mailbox)
                try:
                    tx = self._timed("send", lambda m=msg, a=archived: self.mailbox.deliver(
                        m, fresh_for=self.interval, elsewhere=a))
                except MailboxCorrupt:
                    return
                except MailboxFull as exc:  # room comes with an archive pass: no attempt is spent
                    queue.postpone(entry["id"], str(exc), sender=sender)
                    self._warn_once("mailbox-full", "queued messages wait: %s", exc)
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
        except (RemoteUnavailable, MailboxCorrupt, GitError, StateRefError, BadInput) as exc:
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
        tx = self.mailbox.mark(self.server, marks, acks, fresh_for=max(self.interval, 1.0))
        self._landed(tx)

    def new_report(self) -> CycleReport:
        return CycleReport()

    def _request_restart(self) -> None:
        self.restart_requested = True
        self.stop_event.set()

    # ----------------------------------------------------------------- the working tree

    def fast_forward(self) -> str:
        """Fast-forward the checked-out branch when nothing local can be touched
        (:meth:`monitor_worktree.WorkTree.fast_forward`)."""
        return self.worktree.fast_forward()


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
        write_status(self.repo, self.server, {
            "pid": os.getpid(), "server": self.server,
            "started_at": iso_from_epoch(self.started_at),
            "last_cycle_at": iso_from_epoch(now), "last_cycle_ok": report.ok,
            "last_cycle": report.summary(),
            "last_fetch_ok_at": iso_from_epoch(self.remote.last_fetch_ok) if self.remote.last_fetch_ok else None,
            "last_error": report.error, "iterations": self.iterations, "interval": self.interval,
            "remote_tip": report.tip, "suite_version": SUITE_VERSION,
        })
        self.last_status_write = now
        self.written_fetch_ok = self.remote.last_fetch_ok
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
        self.finish_hook()
        if not self.one_shot and self.presence_published and self.breaker.can_execute():
            self._maybe_presence(STOPPED)  # readers see a clean stop, not a silent server
        log.info("monitor stopped", extra={"metadata": {"iterations": self.iterations}})
        return code
