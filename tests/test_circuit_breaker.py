"""Tests for circuit_breaker: state machine, persistence, concurrency (injected clock, real files)."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import T0, FakeClock

import circuit_breaker
from circuit_breaker import CircuitBreaker, CircuitOpenError, CircuitState
from fleet_common import EXIT_TEMPFAIL, SuiteError


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class Boom(Exception):
    pass


class LostRace(Exception):
    """Stands in for a rejected push: another server won, the remote is fine."""


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            breaker.call(_raise, Boom("remote hung up"))


def _raise(exc: BaseException) -> None:
    raise exc


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "code2" / "state" / "circuit_breaker.json"


def transitions_recorder(breaker: CircuitBreaker) -> List[Tuple[str, str, Dict[str, Any]]]:
    seen: List[Tuple[str, str, Dict[str, Any]]] = []
    breaker.add_listener(lambda old, new, status: seen.append((old.value, new.value, status)))
    return seen


# ---------------------------------------------------------------------- state machine


def test_opens_after_threshold_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, timeout_seconds=60, clock=clock)
    fail(breaker, 2)
    assert breaker.can_execute()
    assert breaker.get_status()["state"] == "CLOSED"
    assert breaker.get_status()["failure_count"] == 2
    fail(breaker, 1)
    status = breaker.get_status()
    assert status["state"] == "OPEN"
    assert status["failure_count"] == 3
    assert status["times_opened"] == 1
    assert status["last_failure"] == "Boom: remote hung up"
    assert not breaker.can_execute()


def test_success_resets_consecutive_count(clock):
    breaker = CircuitBreaker(failure_threshold=3, timeout_seconds=60, clock=clock)
    fail(breaker, 2)
    assert breaker.call(lambda: "ok") == "ok"
    assert breaker.get_status()["failure_count"] == 0
    fail(breaker, 2)
    assert breaker.get_status()["state"] == "CLOSED"
    status = breaker.get_status()
    assert (status["total_failures"], status["total_successes"]) == (4, 1)


def test_open_refuses_then_one_trial_then_success_closes(clock):
    breaker = CircuitBreaker(failure_threshold=2, timeout_seconds=300, clock=clock)
    fail(breaker, 2)
    called = []
    with pytest.raises(CircuitOpenError) as info:
        breaker.call(called.append, 1)
    assert called == []
    assert isinstance(info.value, SuiteError)
    assert info.value.exit_code == EXIT_TEMPFAIL
    assert info.value.retry_at == "2025-11-04T11:15:39Z"
    assert "open after 2 consecutive failures" in str(info.value)

    clock.advance(299.5)
    assert not breaker.can_execute()
    assert breaker.get_status()["state"] == "OPEN"
    clock.advance(0.5)
    assert breaker.get_status()["state"] == "HALF_OPEN"  # reported before anyone asks
    assert breaker.can_execute()  # the one trial
    assert breaker.get_status()["state"] == "HALF_OPEN"
    assert breaker.get_status()["trial_in_progress"] is True
    assert not breaker.can_execute()
    assert not breaker.can_execute()
    breaker.record_success()
    status = breaker.get_status()
    assert status["state"] == "CLOSED"
    assert status["failure_count"] == 0
    assert status["opened_at"] is None and status["retry_at"] is None
    assert breaker.can_execute() and breaker.can_execute()


def test_failed_trial_reopens_with_fresh_timeout(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=100, clock=clock)
    fail(breaker, 1)
    first_opened = breaker.get_status()["opened_at"]
    clock.advance(150)
    fail(breaker, 1)  # the trial, through call()
    status = breaker.get_status()
    assert status["state"] == "OPEN"
    assert status["opened_at"] != first_opened
    assert status["opened_at"] == "2025-11-04T11:13:09Z"
    assert status["retry_at"] == "2025-11-04T11:14:49Z"
    assert status["times_opened"] == 2
    clock.advance(99)
    assert not breaker.can_execute()
    clock.advance(1)
    assert breaker.can_execute()


def test_status_fields_and_iso_times(clock):
    breaker = CircuitBreaker(clock=clock, name="git")
    status = breaker.get_status()
    for key in ("state", "failure_count", "failure_threshold", "timeout_seconds", "opened_at",
                "retry_at", "last_failure", "total_failures", "total_successes", "times_opened"):
        assert key in status
    assert (status["failure_threshold"], status["timeout_seconds"]) == (5, 300)
    assert status["opened_at"] is None and status["last_failure"] is None
    clock.advance(0.25)
    for _ in range(5):
        breaker.record_failure("fatal: unable to access 'https://example.invalid/': timeout\nmore")
    status = breaker.get_status()
    assert status["opened_at"] == "2025-11-04T11:10:39Z"
    assert status["retry_at"] == "2025-11-04T11:15:40Z"  # rounded up: never earlier than allowed
    assert status["last_failure"] == "fatal: unable to access 'https://example.invalid/': timeout"
    assert breaker.state is CircuitState.OPEN
    assert CircuitState.HALF_OPEN.value == "HALF_OPEN"


def test_record_failure_without_detail_and_long_text(clock):
    breaker = CircuitBreaker(clock=clock)
    breaker.record_failure()
    assert breaker.get_status()["last_failure"] == "unknown error"
    breaker.record_failure(Boom("x" * 1000))
    assert len(breaker.get_status()["last_failure"]) == circuit_breaker.LAST_FAILURE_MAX_CHARS


def test_guard_context_manager_has_call_semantics(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=10, clock=clock, exclude=(LostRace,))
    with breaker.guard():
        pass
    assert breaker.get_status()["total_successes"] == 1
    with pytest.raises(LostRace):
        with breaker.guard():
            raise LostRace("non-fast-forward")
    assert breaker.get_status()["failure_count"] == 0
    with pytest.raises(Boom):
        with breaker.guard():
            raise Boom("down")
    assert breaker.get_status()["state"] == "OPEN"
    ran = []
    with pytest.raises(CircuitOpenError):
        with breaker.guard():
            ran.append(1)
    assert ran == []


def test_excluded_exceptions_count_as_neither(clock):
    breaker = CircuitBreaker(failure_threshold=2, timeout_seconds=10, clock=clock, exclude=(LostRace,))
    for _ in range(10):
        with pytest.raises(LostRace):
            breaker.call(_raise, LostRace("rejected"))
    status = breaker.get_status()
    assert status["state"] == "CLOSED"
    assert (status["failure_count"], status["total_failures"], status["total_successes"]) == (0, 0, 0)


def test_excluded_exception_during_trial_gives_the_trial_back(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=10, clock=clock, exclude=(LostRace,))
    fail(breaker, 1)
    clock.advance(10)
    with pytest.raises(LostRace):
        breaker.call(_raise, LostRace("rejected"))
    assert breaker.get_status()["state"] == "HALF_OPEN"
    assert breaker.get_status()["trial_in_progress"] is False
    assert breaker.call(lambda: 42) == 42
    assert breaker.get_status()["state"] == "CLOSED"


def test_keyboard_interrupt_is_not_an_outage(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=10, clock=clock)
    with pytest.raises(KeyboardInterrupt):
        breaker.call(_raise, KeyboardInterrupt())
    assert breaker.get_status()["total_failures"] == 0
    fail(breaker, 1)
    clock.advance(10)
    with pytest.raises(KeyboardInterrupt):
        breaker.call(_raise, KeyboardInterrupt())
    assert breaker.can_execute()  # the interrupted trial was given back


def test_lost_trial_does_not_wedge_the_breaker(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=30, clock=clock)
    breaker.record_failure("down")
    clock.advance(30)
    assert breaker.can_execute()  # a caller takes the trial and never reports
    clock.advance(29)
    assert not breaker.can_execute()
    clock.advance(1)
    assert breaker.can_execute()
    assert not breaker.can_execute()


def test_late_success_while_open_does_not_close(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=30, clock=clock)
    breaker.record_failure("down")
    breaker.record_success()  # a call that began before the breaker opened
    assert breaker.get_status()["state"] == "OPEN"
    assert breaker.get_status()["total_successes"] == 1


def test_clock_going_back_never_extends_the_wait(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=60, clock=clock)
    breaker.record_failure("down")
    clock.advance(-3600)
    assert not breaker.can_execute()
    clock.advance(60)
    assert breaker.can_execute()


def test_reset_closes(clock):
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    seen = transitions_recorder(breaker)
    breaker.record_failure("down")
    breaker.reset()
    assert breaker.get_status()["state"] == "CLOSED"
    assert [(o, n) for o, n, _ in seen] == [("CLOSED", "OPEN"), ("OPEN", "CLOSED")]


@pytest.mark.parametrize("kwargs", [
    {"failure_threshold": 0}, {"failure_threshold": True}, {"timeout_seconds": 0},
    {"timeout_seconds": float("inf")}, {"exclude": ("not a class",)},
])
def test_bad_arguments_are_usage_errors(kwargs):
    from fleet_common import UsageError

    with pytest.raises(UsageError):
        CircuitBreaker(**kwargs)


# ---------------------------------------------------------------------- listeners and logs


def test_listener_called_once_per_transition(clock):
    breaker = CircuitBreaker(failure_threshold=2, timeout_seconds=10, clock=clock)
    seen = transitions_recorder(breaker)
    fail(breaker, 2)
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: None)  # a refusal is no transition
    assert [(o, n) for o, n, _ in seen] == [("CLOSED", "OPEN")]
    clock.advance(10)
    breaker.can_execute()
    breaker.record_failure(Boom("still down"))
    clock.advance(10)
    breaker.call(lambda: None)
    breaker.call(lambda: None)
    assert [(o, n) for o, n, _ in seen] == [
        ("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "OPEN"),
        ("OPEN", "HALF_OPEN"), ("HALF_OPEN", "CLOSED"),
    ]
    assert seen[0][2]["state"] == "OPEN" and seen[0][2]["failure_count"] == 2
    assert seen[2][2]["last_failure"] == "Boom: still down"
    assert seen[-1][2]["state"] == "CLOSED"


def test_listener_exception_does_not_break_the_breaker(clock, caplog):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=10, clock=clock)

    def bad(old, new, status):
        raise RuntimeError("metrics backend down")

    seen = []
    breaker.add_listener(bad)
    breaker.add_listener(lambda old, new, status: seen.append(new))
    with caplog.at_level(logging.ERROR, logger="circuit_breaker"):
        breaker.record_failure("down")
    assert breaker.get_status()["state"] == "OPEN"
    assert seen == [CircuitState.OPEN]
    assert any("listener" in r.getMessage() and r.exc_info for r in caplog.records)
    breaker.remove_listener(bad)


def test_listener_may_read_status_and_record(clock):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=10, clock=clock)
    statuses = []

    def listener(old, new, status):
        statuses.append(breaker.get_status()["state"])  # must not deadlock
        if new is CircuitState.HALF_OPEN:
            breaker.record_success()

    breaker.add_listener(listener)
    breaker.record_failure("down")
    clock.advance(10)
    assert breaker.can_execute()
    assert breaker.get_status()["state"] == "CLOSED"
    assert statuses[0] == "OPEN"


def test_each_transition_logged_once_with_level_and_metadata(clock, caplog):
    breaker = CircuitBreaker(failure_threshold=2, timeout_seconds=10, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="circuit_breaker"):
        fail(breaker, 2)
        for _ in range(3):
            breaker.can_execute()
        clock.advance(10)
        breaker.can_execute()
        breaker.can_execute()
        breaker.record_success()
        breaker.record_success()
    records = [r for r in caplog.records if r.name == "circuit_breaker"]
    assert [(r.levelno, r.metadata["from"], r.metadata["to"]) for r in records] == [
        (logging.WARNING, "CLOSED", "OPEN"),
        (logging.INFO, "OPEN", "HALF_OPEN"),
        (logging.INFO, "HALF_OPEN", "CLOSED"),
    ]
    assert records[0].metadata["breaker"] == "git"
    assert records[0].metadata["failure_count"] == 2
    assert records[0].metadata["retry_at"] == "2025-11-04T11:10:49Z"


# ---------------------------------------------------------------------- persistence


def test_state_persists_across_instances(clock, state_file):
    first = CircuitBreaker(failure_threshold=2, timeout_seconds=300, state_path=state_file, clock=clock)
    fail(first, 2)
    data = json.loads(state_file.read_text(encoding="ascii"))
    assert data["version"] == 1
    assert data["state"] == "OPEN"
    assert data["failure_count"] == 2
    assert data["opened_at"] == T0
    assert data["last_failure"] == "Boom: remote hung up"
    assert (data["total_failures"], data["total_successes"], data["times_opened"]) == (2, 0, 1)
    assert data["updated_at"] == "2025-11-04T11:10:39Z"

    clock.advance(100)
    second = CircuitBreaker(failure_threshold=2, timeout_seconds=300, state_path=state_file, clock=clock)
    assert second.get_status()["state"] == "OPEN"
    assert second.get_status()["times_opened"] == 1
    assert not second.can_execute()
    clock.advance(200)
    assert second.can_execute()
    assert not second.can_execute()
    second.record_success()

    third = CircuitBreaker(state_path=state_file, clock=clock)
    status = third.get_status()
    assert status["state"] == "CLOSED"
    assert (status["total_failures"], status["total_successes"], status["times_opened"]) == (2, 1, 1)


def test_half_open_on_disk_loads_as_open(clock, state_file):
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({
        "version": 1, "state": "HALF_OPEN", "failure_count": 5, "opened_at": T0 - 400,
        "last_failure": "GitTimeout: push", "total_failures": 5, "total_successes": 0,
        "times_opened": 1, "updated_at": "2025-11-04T11:04:00Z",
    }), encoding="ascii")
    breaker = CircuitBreaker(timeout_seconds=300, state_path=state_file, clock=clock)
    # The crashed trial's timeout has passed: exactly one new trial, never a burst.
    assert breaker.can_execute()
    assert not breaker.can_execute()

    recent = CircuitBreaker(timeout_seconds=300, state_path=state_file, clock=FakeClock(T0 - 350))
    assert recent.get_status()["state"] == "OPEN"
    assert not recent.can_execute()


def test_corrupt_state_file_is_moved_aside(clock, state_file, caplog):
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(b'{"version": 1, "state": "OPEN", <<<<<<< HEAD')
    with caplog.at_level(logging.CRITICAL):
        breaker = CircuitBreaker(state_path=state_file, clock=clock)
    assert breaker.get_status()["state"] == "CLOSED"
    assert breaker.can_execute()
    aside = list(state_file.parent.glob("circuit_breaker.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().endswith(b"<<<<<<< HEAD")
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


@pytest.mark.parametrize("document", [
    {"version": 1, "state": "AJAR"},
    {"version": 1, "state": "OPEN", "failure_count": -1},
    {"version": 1, "state": "OPEN", "opened_at": "yesterday"},
    {"version": 1, "state": "OPEN", "last_failure": 7},
    ["not", "an", "object"],
])
def test_malformed_state_file_is_moved_aside(clock, state_file, document):
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps(document), encoding="ascii")
    breaker = CircuitBreaker(state_path=state_file, clock=clock)
    assert breaker.get_status()["state"] == "CLOSED"
    assert len(list(state_file.parent.glob("circuit_breaker.json.corrupt-*"))) == 1


def test_newer_state_file_is_refused(clock, state_file):
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"version": 2, "state": "CLOSED"}), encoding="ascii")
    with pytest.raises(SuiteError, match="newer"):
        CircuitBreaker(state_path=state_file, clock=clock)
    assert state_file.exists()


def test_open_without_opened_at_waits_a_full_timeout(clock, state_file):
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"version": 1, "state": "OPEN", "failure_count": 5}),
                          encoding="ascii")
    breaker = CircuitBreaker(timeout_seconds=60, state_path=state_file, clock=clock)
    assert not breaker.can_execute()
    assert json.loads(state_file.read_text(encoding="ascii"))["opened_at"] == T0
    clock.advance(60)
    assert breaker.can_execute()


def test_idle_successes_do_not_rewrite_the_file(clock, state_file, monkeypatch):
    writes = []
    real_write = circuit_breaker.atomic_write_json

    def counting_write(path, data):
        writes.append(data)
        real_write(path, data)

    monkeypatch.setattr(circuit_breaker, "atomic_write_json", counting_write)
    breaker = CircuitBreaker(failure_threshold=3, state_path=state_file, clock=clock)
    for _ in range(20):
        breaker.call(lambda: None)
        clock.advance(10)
    assert writes == []
    assert not state_file.exists()

    breaker.record_failure("flaky")
    breaker.record_success()  # resets the count: written
    assert [w["failure_count"] for w in writes] == [1, 0]
    before = os.stat(state_file)
    for _ in range(20):
        breaker.record_success()
        clock.advance(10)
    after = os.stat(state_file)
    assert len(writes) == 2
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_save_failure_is_logged_and_the_breaker_keeps_working(clock, tmp_path, caplog):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    breaker = CircuitBreaker(failure_threshold=1, state_path=state_dir / "cb.json", clock=clock)
    state_dir.rmdir()
    state_dir.write_text("a file where the folder was", encoding="ascii")
    with caplog.at_level(logging.ERROR, logger="circuit_breaker"):
        breaker.record_failure("down")
    assert breaker.get_status()["state"] == "OPEN"
    assert not breaker.can_execute()
    assert any("cannot save" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------- threads


def test_lock_is_not_held_across_the_guarded_call(clock):
    parties = 8
    barrier = threading.Barrier(parties, timeout=10)
    breaker = CircuitBreaker(failure_threshold=1, clock=clock)
    results: List[Any] = []
    errors: List[BaseException] = []

    def guarded(i: int) -> int:
        breaker.get_status()  # the state lock is free while guarded code runs
        barrier.wait()  # returns only when every caller is inside the guarded call at once
        return i

    def worker(i: int) -> None:
        try:
            results.append(breaker.call(guarded, i))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert sorted(results) == list(range(parties))
    status = breaker.get_status()
    assert (status["state"], status["total_successes"], status["total_failures"]) == ("CLOSED", parties, 0)


def test_concurrent_callers_after_timeout_get_exactly_one_trial(clock, state_file):
    parties = 16
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=5, state_path=state_file, clock=clock)
    seen = transitions_recorder(breaker)
    breaker.record_failure("down")
    clock.advance(5)
    barrier = threading.Barrier(parties, timeout=10)
    answers: List[bool] = []

    def worker() -> None:
        barrier.wait()
        answers.append(breaker.can_execute())

    threads = [threading.Thread(target=worker) for _ in range(parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(answers) == [False] * (parties - 1) + [True]
    assert [(o, n) for o, n, _ in seen] == [("CLOSED", "OPEN"), ("OPEN", "HALF_OPEN")]
    assert json.loads(state_file.read_text(encoding="ascii"))["state"] == "HALF_OPEN"


def test_concurrent_failures_open_once_and_count_every_failure(clock, state_file):
    parties = 12
    breaker = CircuitBreaker(failure_threshold=3, timeout_seconds=60, state_path=state_file, clock=clock)
    seen = transitions_recorder(breaker)
    barrier = threading.Barrier(parties, timeout=10)

    def guarded() -> None:
        barrier.wait()  # everyone is past can_execute before anyone fails
        raise Boom("down")

    def worker() -> None:
        with pytest.raises(Boom):
            breaker.call(guarded)

    threads = [threading.Thread(target=worker) for _ in range(parties)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    status = breaker.get_status()
    assert status["state"] == "OPEN"
    assert status["total_failures"] == parties
    assert status["times_opened"] == 1
    assert [(o, n) for o, n, _ in seen] == [("CLOSED", "OPEN")]
    on_disk = json.loads(state_file.read_text(encoding="ascii"))
    assert (on_disk["state"], on_disk["failure_count"]) == ("OPEN", parties)
    assert on_disk["total_failures"] == parties


# ---------------------------------------------------------------------- storage and its readers


def test_the_state_machine_keeps_its_fields_in_a_storage(clock):
    storage = circuit_breaker.MemoryStorage()
    breaker = CircuitBreaker(failure_threshold=2, timeout_seconds=60, clock=clock, storage=storage)
    fail(breaker, 2)
    assert storage.snapshot is not None and storage.snapshot["state"] == "OPEN"
    again = CircuitBreaker(failure_threshold=2, timeout_seconds=60, clock=clock, storage=storage)
    assert again.get_status()["state"] == "OPEN" and not again.can_execute()
    assert again.state_path is None and again.storage is storage


def test_a_path_and_a_storage_together_are_refused(state_file):
    with pytest.raises(SuiteError):
        CircuitBreaker(state_path=state_file, storage=circuit_breaker.MemoryStorage())


def test_readers_see_what_the_file_storage_wrote(clock, state_file):
    breaker = CircuitBreaker(failure_threshold=1, timeout_seconds=60, state_path=state_file, clock=clock)
    assert isinstance(breaker.storage, circuit_breaker.FileStorage) and breaker.state_path == state_file
    assert circuit_breaker.read_state_file(state_file) is None
    assert not circuit_breaker.breaker_open(state_file, now=clock())
    fail(breaker, 1)
    data = circuit_breaker.read_state_file(state_file)
    assert data is not None and (data["state"], data["timeout_seconds"]) == ("OPEN", 60)
    assert circuit_breaker.breaker_open(state_file, now=clock())
    assert circuit_breaker.breaker_open(state_file, now=clock() + 59)
    assert not circuit_breaker.breaker_open(state_file, now=clock() + 61)  # the trial may go


@pytest.mark.parametrize("content", [b"{not json", b'{"version": 1, "state": "AJAR"}', b"[1]",
                                     b'{"version": 1, "state": "OPEN", "opened_at": 1, "timeout_seconds": "x"}'])
def test_an_unusable_state_file_never_blocks_a_send_and_is_left_alone(state_file, content):
    state_file.parent.mkdir(parents=True)
    state_file.write_bytes(content)
    assert not circuit_breaker.breaker_open(state_file)
    with pytest.raises(SuiteError):
        circuit_breaker.read_state_file(state_file)
    assert state_file.read_bytes() == content  # moving aside is the owner's job


def test_state_names_are_read_in_any_case(state_file, clock):
    state_file.parent.mkdir(parents=True)
    state_file.write_text(json.dumps({"version": 1, "state": "open", "opened_at": clock(),
                                      "failure_count": 5}), encoding="ascii")
    assert circuit_breaker.breaker_open(state_file, now=clock() + 1)
    assert CircuitBreaker(state_path=state_file, clock=clock).get_status()["state"] == "OPEN"
