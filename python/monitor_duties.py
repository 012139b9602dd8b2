"""The monitor's periodic duties: health check, presence, legacy heartbeat and archive.

Run after each cycle's mail (``PeriodicDuties.periodic``): the health check every
:data:`HEALTH_EVERY` cycles (a change of health is logged and announced), presence in this
server's state ref at start, on a change of health and at least every ``--heartbeat-minutes``
(PROTOCOL.md, "Per-server state refs"), ``<server>/heartbeat.json`` on the shared branch only
with ``--heartbeat-on-main``, and an archive pass once a day with ``--auto-archive-days``.
A duty that fails is logged and retried later; it never stops the cycle.
"""

from __future__ import annotations

import logging
import time

from fleet_common import SUITE_VERSION, BadInput, dump_json_bytes, iso_utc
from fleet_git import GitError, RemoteUnavailable
from fleet_mailbox import MailboxCorrupt
from fleet_state import StateChange, StateRefError, presence_doc
from monitor_files import STATUS_REWRITE_IDLE

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Dict, Final, Optional

log = logging.getLogger("message_monitor")  # the monitor's log, as before the split

HEALTH_EVERY: Final = 10  # iterations between health checks (the seed)
PRESENCE_SECONDS: Final = 300.0  # presence refreshed at least this often without --heartbeat-minutes
ARCHIVE_EVERY_SECONDS: Final = 86400.0  # --auto-archive-days runs a pass once a day
ARCHIVE_RETRY_SECONDS: Final = 3600.0  # a pass that failed (a corrupt archive file) waits this long


class PeriodicDuties:
    """The duties of :class:`monitor_cycle.Monitor` between cycles (a mixin: they read the
    monitor's state, queue, breaker and metrics, and record when each last ran in its
    ``MonitorState``)."""

    def periodic(self, report: Any) -> None:
        self.last_report = report
        if self.iterations % HEALTH_EVERY == 1 or HEALTH_EVERY == 1:
            self.health_check()
        self._maybe_presence()
        if self.reading.heartbeat_on_main:  # (every --heartbeat-minutes, else every 5 minutes)
            self._maybe_heartbeat(report)
        if self.auto_archive_days:
            self._maybe_archive()

    def health_check(self) -> Optional[Dict[str, Any]]:
        if self.remote.last_fetch_ok is not None and (
                self.written_fetch_ok is None
                or self.remote.last_fetch_ok - self.written_fetch_ok > STATUS_REWRITE_IDLE):
            # The health check reads the status file: it must not judge an old fetch (an idle
            # monitor still rewrites it at most once a minute).
            self.status_dirty = True
            self.write_status(self.last_report or self.new_report())
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
        health = self.health_check() or {}
        checks = health.get("checks", {})
        stats = self.queue.stats()
        return {
            "overall": health.get("overall"),
            "disk_free_gb": checks.get("disk", {}).get("free_gb"),
            "memory_percent": checks.get("memory", {}).get("percent"),
            "cpu_percent": checks.get("cpu", {}).get("percent"),
            "queue_pending": stats.get("pending"), "queue_dead": stats.get("dead"),
            "breaker": self.breaker.get_status().get("state"),
            "last_fetch_age_s": (time.time() - self.remote.last_fetch_ok) if self.remote.last_fetch_ok else None,
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
        except (RemoteUnavailable, GitError, StateRefError, BadInput) as exc:
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
        health = self.health_check() or {}
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

    def _maybe_heartbeat(self, report: Any) -> None:
        """``--heartbeat-on-main``: also the legacy ``<server>/heartbeat.json`` commit."""
        last = self.state.extra.get("last_heartbeat_at")
        now = time.time()
        if isinstance(last, (int, float)) and now - last < float(self.heartbeat_seconds or PRESENCE_SECONDS):
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
        health = self.health_check() or {}
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
        return self.mailbox.put_file(path, data, f"{self.server}: heartbeat", author=self.server,
                                     fresh_for=max(self.interval, 1.0))

    def _maybe_archive(self) -> None:
        last = self.state.extra.get("last_archive_at")
        tried = self.state.extra.get("last_archive_try_at")
        now = time.time()
        if isinstance(last, (int, float)) and now - last < ARCHIVE_EVERY_SECONDS:
            return
        if isinstance(tried, (int, float)) and now - tried < ARCHIVE_RETRY_SECONDS:
            return  # a pass that failed is tried again in an hour, not every cycle
        from fleet_archive import archive_pass

        self.state.extra["last_archive_try_at"] = now
        self.state.dirty = True
        try:
            result = archive_pass(self.clone, self.server, float(self.auto_archive_days or 0))
        except (RemoteUnavailable, MailboxCorrupt, GitError, StateRefError, BadInput) as exc:
            if self.state.extra.get("last_archive_error") != str(exc)[:300]:
                self.state.extra["last_archive_error"] = str(exc)[:300]
                log.warning("automatic archive pass failed (tried again in an hour): %s", exc)
            self.state.save()
            return
        self.state.extra.pop("last_archive_error", None)
        self.state.extra["last_archive_at"] = now
        self.state.dirty = True
        self.state.save()
        if result.get("archived"):
            log.info("archived %d messages", result["archived"], extra={"metadata": result})

    # ----------------------------------------------------------------- bookkeeping
