"""The local retry queue against real files, real locks and real processes (message_queue.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import T0, FakeClock

from fleet_common import SuiteError, UsageError, file_lock
from message_queue import (
    DEAD,
    PENDING,
    SENT,
    MessageQueue,
    QueueBusy,
    UnknownEntry,
    backoff_delay,
)

PYTHON_DIR = Path(__file__).resolve().parent.parent / "python"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def queue(tmp_path, clock) -> MessageQueue:
    return MessageQueue(tmp_path, "code2", clock=clock)


def message(n: int, sender: str = "code2") -> Dict[str, object]:
    return {
        "id": f"msg_1762254639_{n:012x}", "from": sender, "to": "build1",
        "subject": f"Subject {n}", "body": f"Body {n} \u00e9", "type": "info",
        "priority": "normal", "timestamp": "2025-11-04T11:10:39Z", "read": False,
        "ack_required": False,
    }


def file_items(q: MessageQueue) -> List[dict]:
    return json.loads(q.path.read_text(encoding="utf-8"))["items"]


def fingerprint(q: MessageQueue):
    """What a rewrite would change: the file's inode, mtime and size, and the folder's names."""
    st = q.path.stat()
    return (st.st_ino, st.st_mtime_ns, st.st_size, sorted(os.listdir(q.path.parent)))


def corrupt_copies(q: MessageQueue) -> List[Path]:
    return sorted(q.path.parent.glob("message_queue.json.corrupt-*"))


# ------------------------------------------------------------------------- basics


def test_constructing_and_reading_an_absent_queue_writes_nothing(tmp_path, queue):
    assert queue.path == tmp_path / "code2" / "queue" / "message_queue.json"
    assert queue.get_pending() == []
    assert queue.get_due() == []
    assert len(queue) == 0
    assert queue.stats() == {"pending": 0, "dead": 0, "sent": 0,
                             "oldest_pending_age_s": None, "next_due_in_s": None}
    assert queue.mark_sent("msg_x") is False
    assert queue.retry_dead() == 0
    with pytest.raises(UnknownEntry):
        queue.increment_attempts("msg_x", "boom")
    assert list(tmp_path.iterdir()) == []


def test_enqueue_get_pending_get_due_mark_sent(queue, clock):
    msg = message(1)
    assert queue.enqueue(msg, reason="network unreachable") == msg["id"]

    doc = json.loads(queue.path.read_text(encoding="utf-8"))
    assert doc["version"] == 1 and doc["server"] == "code2"
    (entry,) = doc["items"]
    assert entry == {
        "id": msg["id"], "from": "code2", "kind": "message", "message": msg,
        "status": PENDING, "attempts": 0, "queued_at": "2025-11-04T11:10:39.000Z",
        "next_attempt_at": T0, "last_error": "network unreachable",
        "last_attempt_at": None, "sent_at": None,
    }
    assert queue.path.read_bytes().isascii()  # ensure_ascii, as every suite file

    assert [e["id"] for e in queue.get_pending()] == [msg["id"]]
    assert [e["id"] for e in queue.get_due()] == [msg["id"]]  # due at once
    assert queue.get_due(now=T0 - 1) == []
    assert len(queue) == 1

    clock.advance(5)
    assert queue.mark_sent(msg["id"]) is True
    (entry,) = file_items(queue)
    assert entry["status"] == SENT
    assert entry["sent_at"] == "2025-11-04T11:10:44.000Z"
    assert queue.get_pending() == [] and queue.get_due() == [] and len(queue) == 0
    assert queue.stats()["sent"] == 1


def test_queue_keeps_order_and_a_private_copy_of_the_message(queue):
    first, second = message(1), message(2)
    queue.enqueue(first)
    queue.enqueue(second)
    first["body"] = "changed by the caller afterwards"
    assert [e["id"] for e in queue.get_due()] == [first["id"], second["id"]]
    assert queue.get_pending()[0]["message"]["body"] == "Body 1 \u00e9"


def test_duplicates_are_not_added(queue):
    msg = message(1)
    queue.enqueue(msg)
    before = fingerprint(queue)
    assert queue.enqueue(dict(msg)) == msg["id"]
    assert queue.enqueue(dict(msg, **{"from": "CODE2"})) == msg["id"]  # ids compare case-insensitively
    assert fingerprint(queue) == before  # nothing changed, nothing written
    assert len(file_items(queue)) == 1

    # Same id from another sender is another message (PROTOCOL.md "Identity").
    queue.enqueue(message(1, sender="build1"))
    assert sorted(e["from"] for e in queue.get_pending()) == ["build1", "code2"]
    queue.mark_sent(msg["id"], sender="code2")
    assert [e["from"] for e in queue.get_pending()] == ["build1"]


def test_sender_is_needed_when_an_id_is_ambiguous(queue):
    queue.enqueue(message(1, sender="code2"))
    queue.enqueue(message(1, sender="build1"))
    with pytest.raises(UsageError):
        queue.mark_sent(message(1)["id"])


def test_enqueue_refuses_messages_it_cannot_redeliver(tmp_path, queue):
    with pytest.raises(UsageError):
        queue.enqueue({"from": "code2", "body": "no id"})
    with pytest.raises(UsageError):
        queue.enqueue(dict(message(1), body={1, 2}))
    with pytest.raises(UsageError):
        queue.enqueue(["not", "a", "dict"])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_kind_is_free_and_from_defaults_to_this_server(queue):
    queue.enqueue({"id": "txn_1", "keys": ["a"]}, kind="mark_read")
    (entry,) = queue.get_pending()
    assert entry["kind"] == "mark_read" and entry["from"] == "code2"


# ------------------------------------------------------------------------- retries


def test_backoff_schedule_2_4_8_16(queue, clock):
    msg_id = queue.enqueue(message(1))
    for expected in (2.0, 4.0, 8.0, 16.0):
        entry = queue.increment_attempts(msg_id, "push failed")
        assert entry["next_attempt_at"] == clock.now + expected
        assert entry["status"] == PENDING and entry["last_error"] == "push failed"
        assert queue.get_due() == []
        assert queue.stats()["next_due_in_s"] == expected
        assert queue.get_due(now=clock.now + expected - 0.001) == []
        clock.advance(expected)
        assert [e["id"] for e in queue.get_due()] == [msg_id]
    assert file_items(queue)[0]["attempts"] == 4


def test_backoff_is_capped(tmp_path, clock):
    assert [backoff_delay(n) for n in range(1, 11)] == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert backoff_delay(10_000) == 300
    assert backoff_delay(4, max_backoff=5) == 5
    q = MessageQueue(tmp_path, "code2", max_attempts=20, clock=clock, max_backoff=10)
    msg_id = q.enqueue(message(1))
    delays = [q.increment_attempts(msg_id)["next_attempt_at"] - clock.now for _ in range(5)]
    assert delays == [2, 4, 8, 10, 10]


def test_dead_after_five_failures_stays_in_file_and_logs_one_error(queue, clock, caplog):
    caplog.set_level(logging.INFO, logger="message_queue")
    msg_id = queue.enqueue(message(1))
    queue.enqueue(message(2))
    for n in range(1, 6):
        clock.advance(1000)
        entry = queue.increment_attempts(msg_id, f"failure {n}")
    assert entry["status"] == DEAD and entry["attempts"] == 5

    items = {e["id"]: e for e in file_items(queue)}
    assert items[msg_id]["status"] == DEAD and items[msg_id]["message"] == message(1)
    assert [e["id"] for e in queue.get_due(now=clock.now + 10**6)] == [message(2)["id"]]
    assert queue.stats()["dead"] == 1 and len(queue) == 1

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].metadata == {"id": msg_id, "from": "code2", "kind": "message",
                                  "attempts": 5, "last_error": "failure 5"}

    # A further failure report changes nothing and is not logged again.
    before = fingerprint(queue)
    assert queue.increment_attempts(msg_id, "late")["attempts"] == 5
    assert fingerprint(queue) == before
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


def test_retry_dead(queue, clock):
    q_ids = [queue.enqueue(message(n)) for n in (1, 2, 3)]
    for msg_id in q_ids[:2]:
        for _ in range(5):
            queue.increment_attempts(msg_id, "outage")
    assert queue.stats()["dead"] == 2

    clock.advance(60)
    assert queue.retry_dead(q_ids[0]) == 1
    entry = next(e for e in queue.get_pending() if e["id"] == q_ids[0])
    assert entry["attempts"] == 0 and entry["next_attempt_at"] == clock.now
    assert queue.retry_dead() == 1
    assert {e["id"] for e in queue.get_due()} == set(q_ids)

    before = fingerprint(queue)
    assert queue.retry_dead() == 0
    assert fingerprint(queue) == before


def test_enqueue_revives_a_dead_or_sent_entry_without_a_second_one(queue):
    msg_id = queue.enqueue(message(1))
    for _ in range(5):
        queue.increment_attempts(msg_id, "outage")
    queue.enqueue(message(1), reason="sent again by hand")
    (entry,) = file_items(queue)
    assert entry["status"] == PENDING and entry["attempts"] == 0


def test_increment_attempts_of_an_unknown_message(queue):
    queue.enqueue(message(1))
    with pytest.raises(UnknownEntry):
        queue.increment_attempts("msg_unknown", "boom")
    assert queue.mark_sent("msg_unknown") is False


# ------------------------------------------------------------------------- pruning


def test_sent_entries_are_pruned_after_seven_days_dead_and_pending_never(queue, clock):
    sent_id, dead_id, pending_id = (queue.enqueue(message(n)) for n in (1, 2, 3))
    queue.mark_sent(sent_id)
    for _ in range(5):
        queue.increment_attempts(dead_id, "outage")
    clock.advance(6 * 86400)
    queue.enqueue(message(4))
    assert sent_id in {e["id"] for e in file_items(queue)}
    clock.advance(2 * 86400)
    queue.enqueue(message(5))
    ids = {e["id"]: e["status"] for e in file_items(queue)}
    assert sent_id not in ids
    assert ids[dead_id] == DEAD and ids[pending_id] == PENDING


def test_at_most_max_sent_entries_are_kept(queue, clock):
    queue.max_sent = 2
    ids = [queue.enqueue(message(n)) for n in range(5)]
    for msg_id in ids:
        clock.advance(1)
        queue.mark_sent(msg_id)
    assert [e["id"] for e in file_items(queue)] == ids[-2:]


# ------------------------------------------------------------------------- bad files


def test_corrupt_file_is_moved_aside_and_a_fresh_queue_works(queue, caplog):
    queue.path.parent.mkdir(parents=True)
    queue.path.write_bytes(b'{"version": 1, "items": [<<<<<<< HEAD\n')
    msg_id = queue.enqueue(message(1))

    (aside,) = corrupt_copies(queue)
    assert aside.read_bytes() == b'{"version": 1, "items": [<<<<<<< HEAD\n'
    assert [e["id"] for e in queue.get_pending()] == [msg_id]
    assert any(r.levelno == logging.CRITICAL for r in caplog.records)


def test_corrupt_file_found_by_a_read_is_moved_aside_too(queue):
    queue.path.parent.mkdir(parents=True)
    queue.path.write_bytes(b"\xff\xfe not json")
    assert queue.get_due() == []
    assert len(corrupt_copies(queue)) == 1 and not queue.path.exists()
    queue.enqueue(message(1))
    assert len(queue) == 1


def test_items_that_are_not_a_list_are_moved_aside(queue):
    queue.path.parent.mkdir(parents=True)
    queue.path.write_text('{"version": 1, "items": {"a": 1}}', encoding="utf-8")
    queue.enqueue(message(1))
    assert len(corrupt_copies(queue)) == 1 and len(queue) == 1


def test_unknown_items_are_kept_but_never_served(queue):
    queue.path.parent.mkdir(parents=True)
    queue.path.write_text('{"version": 1, "items": ["junk", {"no": "id"}]}', encoding="utf-8")
    queue.enqueue(message(1))
    assert [e["id"] for e in queue.get_pending()] == [message(1)["id"]]
    assert file_items(queue)[:2] == ["junk", {"no": "id"}]


def test_a_newer_format_is_refused_and_left_alone(queue):
    queue.path.parent.mkdir(parents=True)
    raw = b'{"version": 2, "items": []}'
    queue.path.write_bytes(raw)
    with pytest.raises(SuiteError):
        queue.get_pending()
    with pytest.raises(SuiteError):
        queue.enqueue(message(1))
    assert queue.path.read_bytes() == raw and corrupt_copies(queue) == []


# ------------------------------------------------------------------------- no needless writes


def test_reading_never_rewrites_the_file(queue, clock):
    msg_id = queue.enqueue(message(1))
    queue.enqueue(message(2))
    queue.increment_attempts(msg_id, "timeout")
    before = fingerprint(queue)
    for _ in range(3):
        clock.advance(1)
        queue.get_due()
        queue.get_pending()
        queue.get_dead()
        queue.get(msg_id)
        len(queue)
        stats = queue.stats()
    assert fingerprint(queue) == before
    assert stats["pending"] == 2 and stats["oldest_pending_age_s"] == 3.0
    assert stats["next_due_in_s"] == 0.0  # message 2 is overdue


def test_lock_is_held_with_a_timeout(queue):
    queue.enqueue(message(1))
    queue.lock_timeout = 0.05
    with file_lock(queue.lock_path, timeout=1):
        with pytest.raises(QueueBusy):
            queue.enqueue(message(2))
        assert len(queue) == 1  # reads take no lock
    queue.enqueue(message(2))
    assert len(queue) == 2


# ------------------------------------------------------------------------- processes

CHILD = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from message_queue import MessageQueue

repo, worker, go = sys.argv[2], int(sys.argv[3]), sys.argv[4]
deadline = time.monotonic() + 60
while not os.path.exists(go):  # start together, so the writes really overlap
    if time.monotonic() > deadline:
        sys.exit("no start signal")
    time.sleep(0.002)
queue = MessageQueue(repo, "code2")
for n in range(25):
    queue.enqueue({"id": "msg_%d_%02d" % (worker, n), "from": "code2", "to": "all",
                   "body": "worker %d message %d" % (worker, n)})
"""


def test_concurrent_processes_lose_and_duplicate_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    go = tmp_path / "go"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(PYTHON_DIR), str(repo), str(worker), str(go)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        )
        for worker in range(4)
    ]
    reader = MessageQueue(repo, "code2")
    try:
        go.touch()
        while any(p.poll() is None for p in procs):
            reader.get_pending()  # atomic replace: a reader never sees half a file
    finally:
        outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err.decode("utf-8", "replace")

    ids = [e["id"] for e in file_items(reader)]
    expected = {f"msg_{w}_{n:02d}" for w in range(4) for n in range(25)}
    assert len(ids) == 100 and set(ids) == expected
    assert corrupt_copies(reader) == []


# ------------------------------------------------------------------------- paths and ids


def test_default_repo_and_server(tmp_path, monkeypatch):
    monkeypatch.setenv("BUILD_REPO_PATH", str(tmp_path))
    monkeypatch.delenv("SERVER_ID", raising=False)
    q = MessageQueue()
    assert q.path == tmp_path / "code2" / "queue" / "message_queue.json"
    assert list(tmp_path.iterdir()) == []
    q.enqueue(message(1))
    assert (tmp_path / "code2" / "queue" / "message_queue.json").is_file()
    assert (tmp_path / "code2" / "queue" / "message_queue.json.lock").exists()

    monkeypatch.setenv("SERVER_ID", "Build1")
    assert MessageQueue().path == tmp_path / "build1" / "queue" / "message_queue.json"


def test_missing_repo_folder_raises_usage_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-repo"
    q = MessageQueue(missing, "code2")
    with pytest.raises(UsageError):
        q.enqueue(message(1))
    assert not missing.exists()
    assert q.get_pending() == [] and not missing.exists()


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "all", "has space", ".."])
def test_server_ids_are_validated(tmp_path, bad):
    with pytest.raises(UsageError):
        MessageQueue(tmp_path, bad)


def test_queue_folder_stays_out_of_git(fleet):
    from conftest import git

    clone = fleet.clone("code2")
    MessageQueue(clone, "code2").enqueue(message(1))
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""


def test_a_queue_that_would_outgrow_what_it_reads_back_is_left_as_it_was(tmp_path, monkeypatch):
    import message_queue

    q = MessageQueue(tmp_path, "code2")
    q.enqueue(message(1))
    before = q.path.read_bytes()
    monkeypatch.setattr(message_queue, "MAX_STATE_BYTES", len(before) + 50)
    with pytest.raises(SuiteError, match="reads back"):
        q.enqueue(message(2))
    assert q.path.read_bytes() == before


def test_a_writer_killed_mid_write_leaves_no_temporary_file_behind_for_long(fleet):
    from conftest import run_script

    clone = fleet.clone("code2")
    MessageQueue(clone, "code2").enqueue(message(1))
    queue_dir = clone / "code2" / "queue"
    old, fresh = queue_dir / ".message_queue.json.abc123.tmp", queue_dir / ".message_queue.json.def456.tmp"
    for path in (old, fresh):
        path.write_text("{half a")
    os.utime(old, (1_000_000_000, 1_000_000_000))  # long ago: its writer is gone
    proc = run_script("message_monitor.py", "--repo", str(clone), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert not old.exists() and fresh.exists()  # a fresh one may be a writer at work
