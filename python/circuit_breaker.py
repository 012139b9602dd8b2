"""Circuit breaker for the fleet's network git operations (fetch, push, ls-remote).

Contract (STYLE.md rule 12):

- States CLOSED, OPEN, HALF_OPEN (:class:`CircuitState`). After ``failure_threshold`` consecutive
  failures the breaker opens and refuses calls for ``timeout_seconds``; then it lets exactly one
  trial call through (the state becomes HALF_OPEN and further callers are refused while the trial
  is outstanding). A successful trial closes the breaker; a failed one re-opens it with a fresh
  timeout.
- ``call(fn, ...)`` and ``with breaker.guard(): ...`` run the guarded code without holding the
  internal lock, so concurrent calls run concurrently (pybreaker holds its lock across the call and
  serialises everything). Exceptions that are instances of ``exclude`` (a lost push race is not an
  outage, PROTOCOL.md step 5) and non-``Exception`` interrupts (Ctrl-C, SystemExit) count as
  neither failure nor success; they only give back a trial they held.
- Listeners ``fn(old_state, new_state, status)`` hear every transition once, in order; a
  listener that raises is logged and ignored. Each transition is logged once: WARNING when
  opening, INFO when half-opening or closing.
- The clock is injectable (epoch seconds, default :func:`time.time`). Wall-clock epoch is stored
  because the state survives restarts.

Storage (pybreaker's ``CircuitBreakerStorage`` split): the state machine keeps its persisted
fields in a :class:`BreakerStorage`, :class:`MemoryStorage` by default or :class:`FileStorage`
(``state_path=`` is short for ``storage=FileStorage(state_path)``). This module owns the file's
format; others read it only through :func:`read_state_file` (``system_health``) and
:func:`breaker_open` (the send path's cheap "is it open now?").

Persistence, when ``state_path`` is given (the monitor uses ``<repo>/<server>/state/
circuit_breaker.json``, never committed): loaded once on construction, written atomically
whenever a persisted field changes, except that a success while CLOSED with no failures does not
rewrite the file (an idle monitor must not write every cycle), so ``total_successes`` on disk
trails the in-memory count until the next write. Format::

    {"version": 1, "state": "OPEN", "failure_count": 5, "opened_at": 1762254639.5,
     "last_failure": "GitTimeout: ...", "total_failures": 9, "total_successes": 120,
     "times_opened": 2, "updated_at": "2025-11-04T11:10:39Z"}

An unreadable or malformed file is moved aside (``circuit_breaker.json.corrupt-<stamp>``) and
logged as critical, and the breaker starts CLOSED. HALF_OPEN on disk (a crash during a trial)
loads as OPEN with its ``opened_at``, so the next trial waits for the timeout. A file with a newer
``version`` is refused with :class:`~fleet_common.SuiteError`. One process owns a state file: it is
read only at construction.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
import time
from collections import deque
from pathlib import Path

from fleet_common import (
    BREAKER_FILE_NAME,
    EXIT_TEMPFAIL,
    MAX_JSON_DEPTH,
    BadInput,
    SuiteError,
    UsageError,
    atomic_write_json,
    get_logger,
    iso_from_epoch,
    load_json_bounded,
    load_state_file,
    move_aside,
    read_local_file,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Deque, Dict, Final, Iterator, List, Optional, Tuple, Type, TypeVar, Union

    T = TypeVar("T")

    Listener = Callable[["CircuitState", "CircuitState", Dict[str, Any]], Any]

    ExcludeSpec = Union[Type[BaseException], Tuple[Type[BaseException], ...]]

log = get_logger(__name__)  # lazy: the send path reads the state without logging

STATE_VERSION = 1
STATE_FILE_NAME = BREAKER_FILE_NAME  # the name lives in fleet_common.RuntimePaths
DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_TIMEOUT_SECONDS = 300
LAST_FAILURE_MAX_CHARS = 200

_COUNTERS = ("failure_count", "total_failures", "total_successes", "times_opened")



class CircuitState(str, enum.Enum):
    """Breaker states; the values are the strings written to the state file and the status."""

    CLOSED = "CLOSED"
    OPEN = "OPEN"
    HALF_OPEN = "HALF_OPEN"


class CircuitOpenError(SuiteError):
    """The breaker refused a call. ``status`` is :meth:`CircuitBreaker.get_status` at refusal.

    Exit code 75: the work is to be retried later, not abandoned.
    """

    exit_code = EXIT_TEMPFAIL

    def __init__(self, name: str, status: Dict[str, Any]) -> None:
        self.name = name
        self.status = status
        self.retry_at: Optional[str] = status.get("retry_at")
        if status.get("trial_in_progress"):
            text = f"{name} circuit breaker is half-open and a trial call is in progress; retry shortly"
        else:
            text = (
                f"{name} circuit breaker is open after {_failures(status.get('failure_count'))} "
                f"(last: {status.get('last_failure') or 'unknown'}); "
                f"next attempt at {self.retry_at}"
            )
        super().__init__(text)


def _iso_epoch(epoch: Optional[float], *, round_up: bool = False) -> Optional[str]:
    return None if epoch is None else iso_from_epoch(epoch, round_up=round_up)


def _failures(count: object) -> str:
    return f"{count} consecutive failure" + ("" if count == 1 else "s")


def _describe(error: object) -> str:
    """A short one-line description of a failure for the status and the state file."""
    if error is None:
        text = "unknown error"
    elif isinstance(error, BaseException):
        detail = str(error).strip().splitlines()
        text = type(error).__name__ + (f": {detail[0].strip()}" if detail else "")
    else:
        lines = str(error).strip().splitlines()
        text = lines[0].strip() if lines else "unknown error"
    if len(text) > LAST_FAILURE_MAX_CHARS:
        text = text[: LAST_FAILURE_MAX_CHARS - 3] + "..."
    return text


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _fresh_state() -> Dict[str, Any]:
    return {
        "version": STATE_VERSION, "state": CircuitState.CLOSED.value, "failure_count": 0,
        "opened_at": None, "last_failure": None, "total_failures": 0, "total_successes": 0,
        "times_opened": 0,
    }


def _validate(data: Dict[str, Any]) -> Dict[str, Any]:
    """Check a loaded state document; ``ValueError`` names the first bad field.

    A state's name is read in any case (``half_open``), as health checks always have.
    """
    state = data.get("state", CircuitState.CLOSED.value)
    if isinstance(state, str):
        state = data["state"] = state.upper()
    if state not in {s.value for s in CircuitState}:
        raise ValueError(f"unknown state {state!r}")
    for key in _COUNTERS:
        if not _is_count(data.get(key, 0)):
            raise ValueError(f"{key} is not a non-negative integer: {data.get(key)!r}")
    opened_at = data.get("opened_at")
    if opened_at is not None and (
        isinstance(opened_at, bool) or not isinstance(opened_at, (int, float))
        or not math.isfinite(opened_at)
    ):
        raise ValueError(f"opened_at is not an epoch number: {opened_at!r}")
    last_failure = data.get("last_failure")
    if last_failure is not None and not isinstance(last_failure, str):
        raise ValueError(f"last_failure is not text: {last_failure!r}")
    timeout = data.get("timeout_seconds")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout_seconds is not a positive number: {timeout!r}")
    return data


# --------------------------------------------------------------------------- storage
#
# The state machine below keeps its persisted fields in a storage object (pybreaker's
# CircuitBreakerStorage split): in memory for a breaker that lives as long as its process, in
# ``<server>/state/circuit_breaker.json`` for the monitor's. This module is the file's one owner:
# the monitor writes it through FileStorage, and everyone else reads it with read_state_file or
# breaker_open (read-only, never moving anything aside: that is the owner's job).

STATE_READ_MAX_BYTES: Final = 1024 * 1024  # the file is a few hundred bytes


class BreakerStorage:
    """Where a breaker keeps its persisted fields between transitions."""

    def load(self) -> Optional[Dict[str, Any]]:
        """The stored fields, checked, or ``None`` when nothing is stored yet."""
        raise NotImplementedError

    def save(self, snapshot: Dict[str, Any]) -> None:
        """Keep ``snapshot`` (may raise ``OSError``: the breaker logs it and carries on)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class MemoryStorage(BreakerStorage):
    """Fields kept in this process only (the default): a restart starts CLOSED."""

    def __init__(self) -> None:
        self.snapshot: Optional[Dict[str, Any]] = None

    def load(self) -> Optional[Dict[str, Any]]:
        return None if self.snapshot is None else dict(self.snapshot)

    def save(self, snapshot: Dict[str, Any]) -> None:
        self.snapshot = dict(snapshot)

    def describe(self) -> str:
        return "memory"


class FileStorage(BreakerStorage):
    """Fields in a JSON state file, written atomically (STYLE.md rules 9 and 11).

    Loading moves an unreadable or malformed file aside and starts fresh; a newer ``version`` is
    refused with :class:`~fleet_common.SuiteError`.
    """

    def __init__(self, path: Union[str, Path]) -> None:
        self.path = Path(path)

    def load(self) -> Optional[Dict[str, Any]]:
        try:
            data = load_state_file(self.path, version=STATE_VERSION, fresh=_fresh_state)
        except OSError as exc:
            raise SuiteError(f"cannot read circuit breaker state {self.path}: {exc}") from exc
        try:
            return _validate(data)
        except ValueError as exc:
            move_aside(self.path, str(exc))
            return None

    def save(self, snapshot: Dict[str, Any]) -> None:
        atomic_write_json(self.path, snapshot)

    def describe(self) -> str:
        return self.path.name


def read_state_file(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The state a breaker persisted at ``path``, read-only and bounded; ``None`` when there is
    none. :class:`~fleet_common.BadInput` when it cannot be used (the reason in one line),
    :class:`~fleet_common.NotARegularFile` for a symlink or folder, ``OSError`` when unreadable."""
    target = Path(path)
    raw = read_local_file(target, max_bytes=STATE_READ_MAX_BYTES)
    if raw is None:
        return None
    data = load_json_bounded(raw, what=target.name, max_bytes=STATE_READ_MAX_BYTES,
                             max_depth=MAX_JSON_DEPTH)
    if not isinstance(data, dict):
        raise BadInput(f"{target.name} is not a JSON object")
    try:
        return _validate(data)
    except ValueError as exc:
        raise BadInput(f"{target.name}: {exc}") from None


def breaker_open(path: Union[str, Path], now: Optional[float] = None) -> bool:
    """Whether the breaker persisted at ``path`` refuses calls at ``now`` (default: the time):
    OPEN and its timeout not yet over. For a send deciding to queue at once: a missing or
    unusable file never blocks a send."""
    try:
        data = read_state_file(path)
    except (OSError, SuiteError):
        return False
    if data is None or data.get("state") != CircuitState.OPEN.value or data.get("opened_at") is None:
        return False
    timeout = data.get("timeout_seconds") or DEFAULT_TIMEOUT_SECONDS
    return (time.time() if now is None else now) - data["opened_at"] < timeout


class CircuitBreaker:
    """A thread-safe circuit breaker, in memory or persisted to ``state_path``."""

    def __init__(
        self,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        state_path: Optional[Union[str, Path]] = None,
        clock: Optional[Callable[[], float]] = None,
        name: str = "git",
        exclude: ExcludeSpec = (),
        storage: Optional[BreakerStorage] = None,
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) \
                or failure_threshold < 1:
            raise UsageError(f"failure_threshold must be an integer >= 1, not {failure_threshold!r}")
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float)) \
                or not math.isfinite(timeout_seconds) or timeout_seconds <= 0:
            raise UsageError(f"timeout_seconds must be a positive number, not {timeout_seconds!r}")
        if isinstance(exclude, type):
            exclude = (exclude,)
        exclude = tuple(exclude)
        for item in exclude:
            if not (isinstance(item, type) and issubclass(item, BaseException)):
                raise UsageError(f"exclude must hold exception classes, not {item!r}")

        self._failure_threshold = failure_threshold
        self._timeout = timeout_seconds
        if state_path is not None and storage is not None:
            raise UsageError("give a breaker state_path or a storage, not both")
        if state_path is not None:
            storage = FileStorage(state_path)
        self._storage: BreakerStorage = storage if storage is not None else MemoryStorage()
        self._clock: Callable[[], float] = clock if clock is not None else time.time
        self._name = name
        self._exclude: Tuple[Type[BaseException], ...] = exclude

        # Guards the fields below; held only while they change, never across a guarded call,
        # a file write or a listener.
        self._lock = threading.Lock()
        self._state = CircuitState.CLOSED
        self._failure_count = 0
        self._opened_at: Optional[float] = None
        self._last_failure: Optional[str] = None
        self._total_failures = 0
        self._total_successes = 0
        self._times_opened = 0
        self._trial_started_at: Optional[float] = None  # HALF_OPEN: when the outstanding trial began
        self._trial_token = 0
        self._pending_save: Optional[Dict[str, Any]] = None
        self._pending_events: Deque[Tuple[CircuitState, CircuitState, Dict[str, Any]]] = deque()

        # Serialises file writes and listener calls so that they happen in transition order.
        # Re-entrant: a listener may itself record a result.
        self._flush_lock = threading.RLock()
        self._listeners: List[Listener] = []

        self._load()

    # ------------------------------------------------------------------ public API

    @property
    def name(self) -> str:
        return self._name

    @property
    def failure_threshold(self) -> int:
        return self._failure_threshold

    @property
    def timeout_seconds(self) -> float:
        return self._timeout

    @property
    def state_path(self) -> Optional[Path]:
        return self._storage.path if isinstance(self._storage, FileStorage) else None

    @property
    def storage(self) -> BreakerStorage:
        return self._storage

    @property
    def state(self) -> CircuitState:
        """The reported state: HALF_OPEN once an open breaker's timeout has elapsed."""
        return CircuitState(self.get_status()["state"])

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(old_state, new_state, status)`` after every transition."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def can_execute(self) -> bool:
        """True when a call may go ahead now; after the timeout, True once (the trial)."""
        return self._try_acquire()[0]

    def record_success(self) -> None:
        """A guarded operation succeeded."""
        with self._lock:
            now = self._now_locked()
            self._total_successes += 1
            if self._state is CircuitState.CLOSED:
                # Idle success: nothing persisted changes worth a write (module docstring).
                if self._failure_count:
                    self._failure_count = 0
                    self._queue_save_locked(now)
            elif self._state is CircuitState.HALF_OPEN or now >= self._retry_epoch_locked():
                self._close_locked(now)
            else:
                # OPEN before the timeout: the late result of a call that began before the
                # breaker opened; counted, but only the trial may close the breaker.
                self._queue_save_locked(now)
        self._flush()

    def record_failure(self, error: object = None) -> None:
        """A guarded operation failed; ``error`` (exception or text) becomes ``last_failure``."""
        with self._lock:
            now = self._now_locked()
            self._total_failures += 1
            self._failure_count += 1
            self._last_failure = _describe(error)
            if self._state is CircuitState.HALF_OPEN:
                self._open_locked(now)
            elif self._state is CircuitState.CLOSED:
                if self._failure_count >= self._failure_threshold:
                    self._open_locked(now)
                else:
                    self._queue_save_locked(now)
            else:
                if now >= self._retry_epoch_locked():
                    # Still failing after the timeout: wait a full timeout again, never hammer.
                    self._opened_at = now
                self._queue_save_locked(now)
        self._flush()

    def reset(self) -> None:
        """Force the breaker CLOSED (an operator's decision); totals are kept."""
        with self._lock:
            now = self._now_locked()
            if self._state is not CircuitState.CLOSED:
                self._close_locked(now)
            elif self._failure_count:
                self._failure_count = 0
                self._queue_save_locked(now)
        self._flush()

    def get_status(self) -> Dict[str, Any]:
        with self._lock:
            return self._status_locked(self._now_locked())

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` through the breaker; :class:`CircuitOpenError` if refused."""
        with self.guard():
            return fn(*args, **kwargs)

    @contextlib.contextmanager
    def guard(self) -> Iterator[CircuitBreaker]:
        """``with breaker.guard(): ...`` — the same semantics as :meth:`call`."""
        allowed, token, status = self._try_acquire()
        if not allowed:
            raise CircuitOpenError(self._name, status or {})
        try:
            yield self
        except BaseException as exc:
            if isinstance(exc, self._exclude) or not isinstance(exc, Exception):
                self._release_trial(token)
            else:
                self.record_failure(exc)
            raise
        else:
            self.record_success()

    def __repr__(self) -> str:
        status = self.get_status()
        return (
            f"CircuitBreaker(name={self._name!r}, state={status['state']}, "
            f"failures={status['failure_count']}/{self._failure_threshold})"
        )

    # ------------------------------------------------------------------ state machine

    def _now_locked(self) -> float:
        now = float(self._clock())
        if self._opened_at is not None and now < self._opened_at:
            # The clock went back (or the file came from a machine ahead of us): count the
            # timeout from now, so the breaker never stays open for longer than one timeout.
            self._opened_at = now
            self._queue_save_locked(now)
        return now

    def _retry_epoch_locked(self) -> float:
        return (self._opened_at if self._opened_at is not None else 0.0) + self._timeout

    def _try_acquire(self) -> Tuple[bool, int, Optional[Dict[str, Any]]]:
        """(allowed, trial token or 0, status when refused)."""
        lost_trial = None
        token = 0
        refused: Optional[Dict[str, Any]] = None
        with self._lock:
            now = self._now_locked()
            if self._state is CircuitState.OPEN:
                if now < self._retry_epoch_locked():
                    refused = self._status_locked(now)
                else:
                    self._trial_started_at = now
                    self._trial_token += 1
                    token = self._trial_token
                    self._transition_locked(CircuitState.HALF_OPEN, now)
            elif self._state is CircuitState.HALF_OPEN:
                started = self._trial_started_at
                if started is not None and now - started < self._timeout:
                    refused = self._status_locked(now)
                else:
                    if started is not None:
                        # A trial that never reported back must not wedge the breaker half-open.
                        lost_trial = now - started
                    self._trial_started_at = now
                    self._trial_token += 1
                    token = self._trial_token
        if lost_trial is not None:
            log.warning(
                "%s circuit breaker: the trial call has not reported for %.0f s; allowing another",
                self._name, lost_trial,
                extra={"metadata": {"breaker": self._name, "trial_age_seconds": lost_trial}},
            )
        self._flush()
        return refused is None, token, refused

    def _release_trial(self, token: int) -> None:
        """Give back a trial whose outcome says nothing about the service (excluded, interrupt)."""
        with self._lock:
            if token and self._state is CircuitState.HALF_OPEN and self._trial_token == token:
                self._trial_started_at = None

    def _open_locked(self, now: float) -> None:
        self._opened_at = now
        self._trial_started_at = None
        self._times_opened += 1
        self._transition_locked(CircuitState.OPEN, now)

    def _close_locked(self, now: float) -> None:
        self._failure_count = 0
        self._opened_at = None
        self._trial_started_at = None
        self._transition_locked(CircuitState.CLOSED, now)

    def _transition_locked(self, new: CircuitState, now: float) -> None:
        old = self._state
        self._state = new
        self._pending_events.append((old, new, self._status_locked(now)))
        self._queue_save_locked(now)

    def _status_locked(self, now: float) -> Dict[str, Any]:
        state = self._state
        retry = self._retry_epoch_locked() if self._opened_at is not None else None
        if state is CircuitState.OPEN and retry is not None and now >= retry:
            state = CircuitState.HALF_OPEN
        trial = self._state is CircuitState.HALF_OPEN and self._trial_started_at is not None
        return {
            "name": self._name,
            "state": state.value,
            "failure_count": self._failure_count,
            "failure_threshold": self._failure_threshold,
            "timeout_seconds": self._timeout,
            "opened_at": _iso_epoch(self._opened_at),
            "retry_at": _iso_epoch(retry, round_up=True),
            "seconds_until_retry": max(0.0, retry - now) if retry is not None else 0.0,
            "trial_in_progress": trial,
            "last_failure": self._last_failure,
            "total_failures": self._total_failures,
            "total_successes": self._total_successes,
            "times_opened": self._times_opened,
        }

    # ------------------------------------------------------------------ storage and events

    def _queue_save_locked(self, now: float) -> None:
        self._pending_save = {
            "version": STATE_VERSION,
            "state": self._state.value,
            "failure_count": self._failure_count,
            "opened_at": self._opened_at,
            "timeout_seconds": self._timeout,  # lets a reader tell when it half-opens
            "last_failure": self._last_failure,
            "total_failures": self._total_failures,
            "total_successes": self._total_successes,
            "times_opened": self._times_opened,
            "updated_at": _iso_epoch(now),
        }

    def _flush(self) -> None:
        """Write the latest snapshot and announce pending transitions, outside the state lock.

        Taking the snapshot inside ``_flush_lock`` keeps writes in order: a later flusher always
        writes a newer snapshot.
        """
        with self._flush_lock:
            with self._lock:
                snapshot, self._pending_save = self._pending_save, None
                events = list(self._pending_events)
                self._pending_events.clear()
                listeners = list(self._listeners)
            if snapshot is not None:
                try:
                    self._storage.save(snapshot)
                except OSError as exc:
                    # The in-memory breaker still protects this process; only a restart forgets.
                    where = self._storage.describe()
                    log.error(
                        "%s circuit breaker: cannot save %s: %s", self._name, where, exc,
                        extra={"metadata": {"breaker": self._name, "path": str(self.state_path or where)}},
                    )
            for old, new, status in events:
                self._announce(old, new, status, listeners)

    def _announce(
        self, old: CircuitState, new: CircuitState, status: Dict[str, Any], listeners: List[Listener],
    ) -> None:
        metadata = {
            "breaker": self._name, "from": old.value, "to": new.value,
            "failure_count": status["failure_count"], "last_failure": status["last_failure"],
            "opened_at": status["opened_at"], "retry_at": status["retry_at"],
            "times_opened": status["times_opened"],
        }
        if new is CircuitState.OPEN:
            reason = "the trial call failed" if old is CircuitState.HALF_OPEN else (
                _failures(status["failure_count"]))
            log.warning(
                "%s circuit breaker opened: %s (last: %s); calls refused until %s",
                self._name, reason, status["last_failure"], status["retry_at"],
                extra={"metadata": metadata},
            )
        elif new is CircuitState.HALF_OPEN:
            log.info(
                "%s circuit breaker half-open: allowing one trial call", self._name,
                extra={"metadata": metadata},
            )
        else:
            log.info("%s circuit breaker closed", self._name, extra={"metadata": metadata})
        for listener in listeners:
            try:
                listener(old, new, dict(status))
            except Exception:  # a listener must never break the breaker
                log.exception(
                    "%s circuit breaker: listener %r failed", self._name, listener,
                    extra={"metadata": {"breaker": self._name}},
                )

    def _load(self) -> None:
        data = self._storage.load()
        if data is None:
            return  # nothing stored: CLOSED, as constructed
        state = CircuitState(data.get("state", CircuitState.CLOSED.value))
        self._failure_count = data.get("failure_count", 0)
        self._total_failures = data.get("total_failures", 0)
        self._total_successes = data.get("total_successes", 0)
        self._times_opened = data.get("times_opened", 0)
        self._last_failure = data.get("last_failure")
        opened_at = data.get("opened_at")
        if state is CircuitState.CLOSED:
            self._state = CircuitState.CLOSED
            return
        # OPEN, or HALF_OPEN from a crash during a trial: open with the stored opened_at, so the
        # next trial waits for the timeout rather than hammering the remote.
        self._state = CircuitState.OPEN
        with self._lock:
            now = float(self._clock())
            self._opened_at = float(opened_at) if opened_at is not None else now
            now = self._now_locked()
            if opened_at is None or state is not CircuitState.OPEN:
                self._queue_save_locked(now)
            status = self._status_locked(now)
        self._flush()
        log.info(
            "%s circuit breaker restored %s from %s (opened at %s, retry at %s)",
            self._name, status["state"], self._storage.describe(), status["opened_at"], status["retry_at"],
            extra={"metadata": {"breaker": self._name, "path": str(self.state_path), "state": status["state"],
                                "failure_count": status["failure_count"]}},
        )
