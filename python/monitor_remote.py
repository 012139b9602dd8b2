"""Polling the remote for the monitor: one network call when idle, backoff and pre-flight.

:class:`RemotePoller` asks the remote for the shared branch's tip and this server's state ref,
fetches what moved, and retries a failed poll after the backoff delays (2 s, 4 s, 8 s by
default; tests and benchmarks pass shorter ones). After a failure the next attempt first runs a
pre-flight connectivity check (DNS, TCP, HTTP), so an outage is named, not only timed out.
Raises ``RemoteUnavailable`` when every attempt failed, ``BranchMissing`` when the remote
answered without the shared branch (PROTOCOL.md: that is bad input, not a root commit).
"""

from __future__ import annotations

import time

from fleet_common import SuiteError, UsageError, check_number, get_logger
from fleet_git import BranchMissing, RemoteUnavailable
from fleet_start import POLL_OPTIONS, branch_refspec, own_state_refspecs

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Final, List, Optional, Sequence

    from fleet_git import Clone
    from fleet_state import RemoteView, StateStore

log = get_logger("message_monitor")  # the monitor's log, as before the split

BACKOFF_DELAYS: Final = (2.0, 4.0, 8.0)  # the seed's retry delays for a failed fetch
BACKOFF_ENV: Final = "MONITOR_BACKOFF"  # e.g. "2,4,8"; "" or unset: the seed's delays
MAX_BACKOFF_STEPS: Final = 10
MAX_BACKOFF_DELAY: Final = 3600.0  # an hour: a longer wait is an outage for the breaker


def backoff_delays(text: Optional[str]) -> Sequence[float]:
    """Retry delays from ``MONITOR_BACKOFF`` (seconds, comma-separated; ``0`` alone: retry
    never), or :data:`BACKOFF_DELAYS` when unset. Raises ``UsageError`` (exit 2) for bad input."""
    if text is None or not text.strip():
        return BACKOFF_DELAYS
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > MAX_BACKOFF_STEPS:
        raise UsageError(f"{BACKOFF_ENV}: at most {MAX_BACKOFF_STEPS} delays")
    delays = [check_number(part, BACKOFF_ENV, 0.0, MAX_BACKOFF_DELAY) for part in parts]
    return tuple(delay for delay in delays if delay > 0)


class RemotePoller:
    """The remote as one server's monitor sees it: the shared branch and its own state ref.

    ``timed(op, fn)`` runs a network call and records its duration (metrics); ``sleep(seconds)``
    waits between attempts and returns True when the monitor is asked to stop.
    """

    def __init__(self, clone: Clone, server: str, states: StateStore, *,
                 backoff: Sequence[float] = BACKOFF_DELAYS, one_shot: bool = False,
                 discover_own_state: bool = False, preflight_timeout: float = 5.0,
                 timed: Callable[[str, Callable[[], Any]], Any] = lambda op, fn: fn(),
                 sleep: Callable[[float], bool] = lambda seconds: False) -> None:
        self.clone = clone
        self.server = server
        self.states = states
        self.backoff = tuple(backoff)
        self.one_shot = one_shot
        # A reader (the inbox) lists the remote while this clone mirrors no state ref of its own:
        # another clone of the same server may have written one, and its read marks count.
        self.discover_own_state = discover_own_state
        self.preflight_timeout = preflight_timeout
        self.timed = timed
        self.sleep = sleep
        self.known_tip: Optional[str] = None  # the remote tip as last fetched (or pushed by us)
        self.last_fetch_ok: Optional[float] = None
        self.preflight_needed = False

    def poll(self) -> Optional[str]:
        """The remote tip, fetched together with this server's own state ref: ONE network call,
        busy or idle (issue 16: an empty fetch costs what ``ls-remote`` costs, so finding what
        moved and fetching it are one round trip, not two).

        The shared branch is a plain refspec, so a branch the remote lacks is
        ``BranchMissing`` (PROTOCOL.md), never a root commit; the own state ref is asked for only
        once this clone mirrors it (:meth:`refspecs`), so a server without one yet is no error.
        With ``discover_own_state`` and no such mirror, the remote is listed instead
        (:meth:`poll_by_listing`). ``--no-write-fetch-head`` keeps an idle cycle from
        rewriting files; ``FETCH_HEAD``'s time is touched instead, so a standalone send in this
        clone still sees a fresh fetch. A failure that is not plainly the remote's (a ref lock of
        this clone, a damaged object) takes the listed path, which tells them apart.
        """
        specs = self.refspecs()
        if self.discover_own_state and len(specs) == 1:
            return self.poll_by_listing()
        before = self.clone.tip()
        proc = self.timed("git_fetch", lambda: self.clone.fetch_git(*POLL_OPTIONS, *specs, maintain=False))
        if proc.returncode != 0:
            text = proc.stderr.decode("utf-8", "replace")
            lowered = text.lower()
            if "couldn't find remote ref" in lowered and f"refs/heads/{self.clone.branch}" in text:
                raise BranchMissing(self.clone.branch, ["git", "fetch", "origin", self.clone.branch],
                                    proc.returncode, proc.stdout, proc.stderr)
            if not _local_fault(lowered):  # the remote's (network, auth, server): back off now
                raise RemoteUnavailable(["git", "fetch", "origin", self.clone.branch], proc.returncode,
                                        proc.stdout, proc.stderr)
            # A ref lock of this clone, a damaged object, or our own state ref gone from the
            # remote: the listed path tells them apart (and drops a vanished mirror).
            return self.poll_by_listing()
        self.last_fetch_ok = time.time()
        tip = self.states.local_tip(self.clone.remote_ref)
        self.clone.note_fetched(tip)
        if tip != before:  # an idle cycle runs no process besides the fetch
            self.known_tip = tip
            self.clone.maintain()
        return tip

    def refspecs(self) -> List[str]:
        """The shared branch and this server's own state ref, by its exact name (under either name,
        PROTOCOL.md) once this clone has it: no pattern, so no other server's ref (``code20`` for
        ``code2``) or ref nested below ours is ever fetched. Before our first write there is
        nothing of ours to follow (that first write takes its lease from the remote itself)."""
        return [branch_refspec(self.clone.branch), *own_state_refspecs(self.server, self.states.local_tip)]

    def poll_by_listing(self) -> Optional[str]:
        """The remote tip by ``ls-remote`` (the branch and every state ref), then a fetch of
        what moved: two network calls when busy, one when idle. ``Clone.fetch`` waits for a
        busy ref lock of this clone and classifies what fails (``LocalRefLocked``,
        ``ObjectMissing``, ``RemoteUnavailable``)."""
        view = self.timed("ls_remote", self.states.poll)
        self.last_fetch_ok = time.time()
        remote = view.branch_tip
        if remote is None:  # never created by a monitor (PROTOCOL.md): bad input, not an outage
            raise BranchMissing(self.clone.branch, ["git", "ls-remote", "origin", self.clone.branch], 0)
        self._follow_own_state(view)
        if remote == self.known_tip:
            return remote
        local = self.clone.tip()
        if remote != local:
            local = self.timed("git_fetch", self.clone.fetch)
        self.known_tip = local
        return local

    def _follow_own_state(self, view: RemoteView) -> None:
        self.states.drop_vanished(view, [self.server])
        if self.states.refspecs_to_fetch(view, [self.server]):
            self.timed("git_fetch", lambda: self.states.fetch([self.server], view))

    def preflight(self) -> Optional[str]:
        """Why the remote cannot be reached (DNS, TCP, HTTP), or ``None`` when it can."""
        from network_check import test_connectivity

        try:
            result = test_connectivity(str(self.clone.root), timeout=self.preflight_timeout)
        except SuiteError as exc:
            return str(exc)
        if result.get("success"):
            return None
        return str(result.get("message") or "connectivity check failed")

    def poll_with_backoff(self) -> Optional[str]:
        """Poll; after a failure retry after each backoff delay (never in a one-shot command)."""
        delays = () if self.one_shot else self.backoff
        last: Optional[Exception] = None
        for attempt, delay in enumerate((0.0, *delays)):
            if delay and self.sleep(delay):
                break
            if self.preflight_needed:
                problem = self.preflight()
                if problem is not None:
                    last = RemoteUnavailable(["network_check"], None, b"", b"", problem)
                    log.info("pre-flight %d failed: %s", attempt + 1, problem,
                             extra={"metadata": {"attempt": attempt + 1, "step": "preflight"}})
                    continue
            try:
                tip = self.poll()
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

    def refetch(self) -> None:
        """Fetch every object again (a tree or blob of the fetched tip could not be read)."""
        self.known_tip = self.clone.fetch(refetch=True)


def _local_fault(stderr: str) -> bool:
    """Whether a failed fetch failed here, not at the remote: a ref lock or a ref that moved under
    it in this clone, a damaged object, or a ref it was asked for that the remote no longer has."""
    return any(mark in stderr for mark in (
        "cannot lock ref", "unable to update local ref", ".lock", "but expected", "couldn't find remote ref",
        "missing object", "bad object", "corrupt", "unable to read", "did not send all necessary objects"))
