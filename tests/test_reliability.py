"""Fault injection against real git servers on 127.0.0.1 that go down and come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PYTHON_DIR, QUIRKY, FakeClock, git, run_script

from circuit_breaker import CircuitBreaker
from fleet_git import Clone, PushRejected, remove_stale_locks
from message_monitor import Monitor, repair_mailbox
from message_queue import MessageQueue
from send_message import send_message

FAST = (0.01, 0.01, 0.01)  # the backoff shape with tiny delays: tests never sleep for seconds


def served_clone(fleet, server, name: str) -> Path:
    path = fleet.clone(name)
    git(path, "remote", "set-url", "origin", server.url("origin.git"))
    return path


def monitor(path: Path, name: str, breaker=None, shown=None, **kw) -> Monitor:
    return Monitor(Clone(path), name, 0.05, show=(shown.append if shown is not None else None),
                   backoff=FAST, breaker=breaker, preflight_timeout=1.0, auto_reply=False, **kw)


def bodies(fleet):
    return sorted(m["body"] for m in fleet.remote_messages())


def test_outage_queues_opens_the_breaker_and_drains_exactly_once(fleet, git_daemon):
    b1 = served_clone(fleet, git_daemon, "build1")
    c2 = served_clone(fleet, git_daemon, "code2")
    assert send_message("before", to="code2", from_sender="build1", build_repo_path=str(b1))
    git_daemon.stop()
    # sends while the remote is down: queued at once, exit 75, a line that says so
    proc = run_script("send_message.py", "during 1", "--to", "code2", "--from", "build1", "--repo", str(b1))
    assert proc.returncode == 75, proc.stderr
    assert "queued" in proc.stderr and "monitor will deliver" in proc.stderr
    logged = [json.loads(line) for line in (b1 / "build1" / "logs" / "structured.log").read_text().splitlines()]
    assert any(r["level"] == "WARNING" and "queued" in r["message"] for r in logged)
    assert send_message("during 2", to="code2", from_sender="build1", build_repo_path=str(b1)).status == "queued"
    clock = FakeClock(time.time())
    breaker = CircuitBreaker(2, 60, clock=clock, exclude=(PushRejected,),
                             state_path=str(b1 / "build1" / "state" / "circuit_breaker.json"))
    mon = monitor(b1, "build1", breaker)
    assert not mon.cycle().ok
    assert breaker.get_status()["state"] == "CLOSED"
    assert not mon.cycle().ok
    assert breaker.get_status()["state"] == "OPEN"
    # while open: no network call at all, the cycle is skipped (nothing busy-loops)
    requests_before = git_daemon.log_text().count("Connection from")
    for _ in range(5):
        assert mon.cycle().skipped
    assert git_daemon.log_text().count("Connection from") == requests_before
    # a send while the breaker is open queues without trying the network
    assert send_message("during 3", to="code2", from_sender="build1", build_repo_path=str(b1)).status == "queued"
    assert len(MessageQueue(str(b1), "build1").get_pending()) == 3
    git_daemon.start()
    clock.now += 61
    assert breaker.get_status()["state"] == "HALF_OPEN"
    report = mon.cycle()
    assert report.ok and report.sent == 3
    assert breaker.get_status()["state"] == "CLOSED"
    assert bodies(fleet) == ["before", "during 1", "during 2", "during 3"]
    assert MessageQueue(str(b1), "build1").stats()["pending"] == 0
    shown: list = []
    monitor(c2, "code2", shown=shown).cycle()
    assert sorted(m["body"] for m in shown) == ["before", "during 1", "during 2", "during 3"]


def test_breaker_state_survives_a_restart(fleet, git_daemon):
    b1 = served_clone(fleet, git_daemon, "build1")
    git_daemon.stop()
    path = str(b1 / "build1" / "state" / "circuit_breaker.json")
    first = monitor(b1, "build1", CircuitBreaker(1, 300, state_path=path, exclude=(PushRejected,)))
    assert not first.cycle().ok
    again = monitor(b1, "build1", CircuitBreaker(1, 300, state_path=path, exclude=(PushRejected,)))
    assert again.cycle().skipped  # a crash-looping service cannot hammer the remote


def test_http_server_errors_and_auth_failures_queue(fleet, http_git_server):
    b1 = served_clone(fleet, http_git_server, "build1")
    for status in (500, 401):
        http_git_server.fail_with = status
        result = send_message(f"during {status}", to="code2", from_sender="build1", build_repo_path=str(b1))
        assert result.status == "queued", result.reason
    http_git_server.fail_with = None
    report = monitor(b1, "build1").cycle()
    assert report.ok and report.sent == 2
    assert bodies(fleet) == ["during 401", "during 500"]


def test_preflight_names_the_failed_step(fleet, git_daemon, caplog):
    b1 = served_clone(fleet, git_daemon, "build1")
    git_daemon.stop()
    mon = monitor(b1, "build1")
    report = mon.cycle()
    assert not report.ok and "TCP connect" in report.error


def test_dead_after_five_attempts_and_kept(fleet, git_daemon, caplog):
    b1 = served_clone(fleet, git_daemon, "build1")
    clock = FakeClock(time.time())
    queue = MessageQueue(str(b1), "build1", clock=clock)
    msg = {"id": "msg_1_bbbbbbbbbbbb", "from": "build1", "to": "code2", "subject": "s", "body": "b",
           "type": "info", "priority": "normal", "timestamp": "2025-11-04T08:00:00Z", "read": False,
           "ack_required": False}
    queue.enqueue(msg, reason="test")
    # the remote answers ls-remote but refuses every push: a server-side hook rejects it
    hooks = fleet.origin / "hooks"
    hooks.mkdir(exist_ok=True)
    hook = hooks / "pre-receive"
    hook.write_text("#!/bin/sh\necho 'disk full' >&2\nexit 1\n")
    hook.chmod(0o755)
    if os.name == "nt":
        pytest.skip("shell hooks")
    mon = monitor(b1, "build1", queue=queue)
    delays = []
    for _ in range(5):
        entry = queue.get_pending()[0]
        clock.now = entry["next_attempt_at"]
        mon.cycle()
        after = (queue.get_pending() or queue.get_dead())[0]
        delays.append(round(after["next_attempt_at"] - clock.now))
    assert delays[:4] == [2, 4, 8, 16]
    dead = queue.get_dead()
    assert len(dead) == 1 and dead[0]["attempts"] == 5
    assert any(r.levelname == "ERROR" and "msg_1_bbbbbbbbbbbb" in r.getMessage() + str(getattr(r, "metadata", ""))
               for r in caplog.records)
    data = json.loads((b1 / "build1" / "queue" / "message_queue.json").read_text())
    assert [i["status"] for i in data["items"]] == ["dead"]
    hook.unlink()
    assert queue.retry_dead() == 1
    clock.now += 1
    assert mon.cycle().sent == 1
    assert "b" in bodies(fleet)


MONITOR_LOOP = [sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--server", "build1",
                "--interval", "0.2", "--no-auto-reply"]


def test_sigkill_between_commit_and_push_loses_and_duplicates_nothing(fleet, http_git_server):
    if os.name == "nt":
        pytest.skip("SIGKILL")
    b1 = served_clone(fleet, http_git_server, "build1")
    queue = MessageQueue(str(b1), "build1")
    for i in range(3):
        queue.enqueue({"id": f"msg_1_{i:012x}", "from": "build1", "to": "code2", "subject": "s",
                       "body": f"queued {i}", "type": "info", "priority": "normal",
                       "timestamp": "2025-11-04T08:00:00Z", "read": False, "ack_required": False})
    http_git_server.delay = 1.5
    proc = subprocess.Popen([*MONITOR_LOOP, "--repo", str(b1)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        # wait until a push is in flight: the commit exists, the remote has not answered
        while time.monotonic() < deadline:
            if any(r.method == "POST" and "receive-pack" in r.path for r in http_git_server.requests) \
                    or http_git_server.active_connections and len(http_git_server.requests) > 3:
                break
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    http_git_server.delay = 0
    code = subprocess.run([*MONITOR_LOOP, "--repo", str(b1), "--once"], capture_output=True, text=True)
    assert code.returncode == 0, code.stderr
    code = subprocess.run([*MONITOR_LOOP, "--repo", str(b1), "--once"], capture_output=True, text=True)
    assert bodies(fleet) == ["queued 0", "queued 1", "queued 2"]


def test_corrupt_queue_and_state_files_are_moved_aside(fleet, caplog):
    b1 = fleet.clone("build1")
    for sub, name in (("queue", "message_queue.json"), ("state", "monitor_state.json"),
                      ("state", "circuit_breaker.json")):
        folder = b1 / "build1" / sub
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{ not json")
    assert send_message("hi", to="build1", from_sender="code2", build_repo_path=str(b1))
    shown: list = []
    report = Monitor(Clone(b1), "build1", 1, show=shown.append, one_shot=True, auto_reply=False).cycle()
    assert report.ok and len(shown) == 1
    for sub, name in (("queue", "message_queue.json"), ("state", "monitor_state.json"),
                      ("state", "circuit_breaker.json")):
        aside = list((b1 / "build1" / sub).glob(name + ".corrupt-*"))
        assert len(aside) == 1 and aside[0].read_text() == "{ not json"
    assert sum(r.levelname == "CRITICAL" for r in caplog.records) >= 2
    assert git(b1, "status", "--porcelain") == ""


def test_stale_locks_are_removed_fresh_and_busy_ones_kept(fleet):
    c2 = fleet.clone("code2")
    git_dir = c2 / ".git"
    old = time.time() - 600
    stale = [git_dir / "index.lock", git_dir / "refs" / "heads" / "main.lock"]
    for path in stale:
        path.write_text("")
        os.utime(path, (old, old))
    fresh = git_dir / "HEAD.lock"
    fresh.write_text("")
    removed = remove_stale_locks(c2, git_dir)
    assert sorted(p for p, _ in removed) == sorted(stale)
    assert fresh.exists() and not any(p.exists() for p in stale)
    # a running git process in the repository: nothing is removed, even when old
    fresh.unlink()
    stale[0].write_text("")
    os.utime(stale[0], (old, old))
    busy = subprocess.Popen(["git", "cat-file", "--batch"], cwd=str(c2), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        assert remove_stale_locks(c2, git_dir) == []
        assert stale[0].exists()
    finally:
        busy.stdin.close()
        busy.wait(timeout=10)
    # the monitor removes them before its git operations
    shown: list = []
    assert Monitor(Clone(c2), "code2", 1, show=shown.append, one_shot=True, auto_reply=False).cycle().ok
    assert not stale[0].exists()


CONFLICTED = b"""{
  "messages": [
    {
      "id": "msg_1762250000_0001",
      "from": "architect",
      "to": "code2",
      "subject": "Kick-off",
      "body": "Welcome aboard.",
      "timestamp": "2025-11-04T08:00:00Z",
      "read": false
    },
<<<<<<< HEAD
    {
      "id": "msg_1762250100_aaaa",
      "from": "build1",
      "to": "all",
      "subject": "ours",
      "body": "written on one side",
      "timestamp": "2025-11-04T08:01:40Z",
      "read": false
    }
=======
    {
      "id": "msg_1762250101_bbbb",
      "from": "build2",
      "to": "code2",
      "subject": "theirs",
      "body": "written on the other side",
      "timestamp": "2025-11-04T08:01:41Z",
      "read": false
    }
>>>>>>> origin/main
  ]
}
"""


def test_committed_conflict_markers_are_refused_then_repaired(fleet, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    good = json.loads(QUIRKY.read_text(encoding="utf-8"))
    good["messages"] = good["messages"][:1]
    (b1 / "coordination" / "messages.json").write_text(json.dumps(good, indent=2) + "\n")
    git(b1, "commit", "-qam", "good", "--no-gpg-sign")
    (b1 / "coordination" / "messages.json").write_bytes(CONFLICTED)
    git(b1, "commit", "-qam", "legacy merge with markers", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    before = fleet.remote_commits()
    # monitors keep running, log it once, refuse to write on top of it
    mon = Monitor(Clone(c2), "code2", 1, one_shot=True, auto_reply=False)
    assert not mon.cycle().ok
    assert not mon.cycle().ok
    critical = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert len(critical) == 1 and "--repair" in critical[0].getMessage()
    proc = run_script("send_message.py", "while broken", "--to", "code2", "--from", "build1", "--repo", str(b1))
    assert proc.returncode == 75 and "--repair" in proc.stderr
    assert fleet.remote_commits() == before
    result = repair_mailbox(Clone(b1), "build1")
    assert result["repaired"] and result["kept"] == 1 and result["salvaged"] == 2
    ids = [m["id"] for m in fleet.remote_messages()]
    assert ids == ["msg_1762250000_0001", "msg_1762250100_aaaa", "msg_1762250101_bbbb"]
    assert repair_mailbox(Clone(b1), "build1")["repaired"] is False
    # the queued send goes out once the mailbox parses again, and the monitor recovers
    Monitor(Clone(b1), "build1", 1, one_shot=True, auto_reply=False).cycle()
    assert "while broken" in [m["body"] for m in fleet.remote_messages()]
    shown: list = []
    assert Monitor(Clone(c2), "code2", 1, show=shown.append, one_shot=True, auto_reply=False).cycle().ok
    assert {m["subject"] for m in shown} >= {"ours", "theirs", "Kick-off"}


def test_repair_after_a_real_legacy_merge_keeps_both_sides_and_leaves_archived_mail_archived(fleet):
    """An older tool, behind an archive pass, appends a message, pulls (git conflicts on the lines
    both appended), commits the markers and pushes. git leaves the lines both sides share outside
    the markers, so no message is whole between them: repair reads each side."""
    from fleet_state import StateChange, StateStore

    def old_msg(i: int, subject: str, days_ago: float, sender: str = "build1") -> dict:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - days_ago * 86400))
        return {"id": f"msg_{1700000000 + i}_{i:012x}", "from": sender, "to": "code2", "subject": subject,
                "body": subject, "type": "info", "priority": "normal", "timestamp": when,
                "read": False, "ack_required": False}

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    m1, m2 = old_msg(1, "m1", 40), old_msg(2, "m2", 1)
    (b1 / "coordination" / "messages.json").write_text(json.dumps({"messages": [m1, m2]}, indent=2) + "\n")
    git(b1, "commit", "-qam", "two messages", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    legacy = fleet.clone("legacy")  # an older tool's clone: it will not see the archive pass
    StateStore(Clone(c2)).update("code2", StateChange(read=[("msg_1700000001_000000000001", "build1")]))
    assert run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--archive-days", "30",
                      ).returncode == 0  # m1 moves to the archive, its receipt leaves the state ref
    assert send_message("m3", "m3", to="code2", from_sender="build1", build_repo_path=str(b1))
    path = legacy / "coordination" / "messages.json"
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["messages"].append(old_msg(4, "m4", 0, sender="legacy"))
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    git(legacy, "commit", "-qam", "legacy -> code2: m4", "--no-gpg-sign")
    git(legacy, "pull", "-q", "--no-rebase", "--no-edit", "origin", "main", check=False)
    assert "<<<<<<<" in path.read_text(encoding="utf-8")
    git(legacy, "commit", "-qam", "merge, markers and all", "--no-gpg-sign")
    git(legacy, "push", "-q", "origin", "HEAD:main")

    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--repair")
    assert proc.returncode == 0, proc.stderr
    assert "left out 1 the archive holds already" in proc.stdout + proc.stderr
    assert sorted(m["subject"] for m in fleet.remote_messages()) == ["m2", "m3", "m4"]
    unread = json.loads(run_script("inbox.py", "--repo", str(c2), "--server", "code2", "--json").stdout)
    assert sorted(m["subject"] for m in unread["messages"]) == ["m2", "m3", "m4"]  # m1 stays read, archived


def test_a_send_queued_from_another_server_id_is_delivered_by_this_clones_monitor(fleet, git_daemon):
    c2 = served_clone(fleet, git_daemon, "code2")
    git_daemon.stop()
    proc = run_script("send_message.py", "from a person", "--to", "code3", "--from", "build1", "--repo", str(c2))
    assert proc.returncode == 75, proc.stderr
    git_daemon.start()
    assert monitor(c2, "code2").cycle().sent == 1
    assert bodies(fleet) == ["from a person"]
    assert MessageQueue(str(c2), "build1").stats()["pending"] == 0


def test_a_queue_entry_that_is_no_message_dies_alone_and_the_rest_is_delivered(fleet):
    c2 = fleet.clone("code2")
    good = {"id": "msg_1762250000_900d", "from": "code2", "to": "build1", "subject": "behind it",
            "body": "still goes", "type": "info", "priority": "normal",
            "timestamp": "2025-11-04T10:00:00Z", "read": False, "ack_required": False}
    queue = MessageQueue(str(c2), "code2")
    queue.enqueue(good)
    doc = json.loads(queue.path.read_text(encoding="utf-8"))
    pending = dict(doc["items"][0], status="pending", attempts=0, next_attempt_at=0)
    doc["items"][:0] = [dict(pending, id="bad1", message="oops"),  # hand-edited: no message at all
                        dict(pending, id="bad2", message={"id": "bad2", "to": "build1"}),  # no sender
                        dict(pending, id="msg_1762250000_f0f0", from_="x",
                             message=dict(good, id="msg_1762250000_f0f0", **{"from": "build1"}))]
    queue.path.write_text(json.dumps(doc), encoding="utf-8")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert bodies(fleet) == ["still goes"]
    dead = {e["id"]: e["last_error"] for e in MessageQueue(str(c2), "code2").get_dead()}
    assert sorted(dead) == ["bad1", "bad2", "msg_1762250000_f0f0"]
    assert "cannot be delivered" in dead["bad1"] and "not the entry's" in dead["msg_1762250000_f0f0"]


def test_a_queue_file_that_came_with_the_shared_branch_is_not_delivered(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    forged = {"id": "msg_1762250000_0bad", "from": "ghost", "to": "all", "subject": "forged",
              "body": "delivered by whoever pulls", "type": "info", "priority": "normal",
              "timestamp": "2025-11-04T10:00:00Z", "read": False, "ack_required": False}
    MessageQueue(str(b1), "ghost").enqueue(forged)
    git(b1, "add", "-f", "ghost/queue/message_queue.json")
    git(b1, "commit", "-qm", "a queue file, committed", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    git(c2, "pull", "-q", "--ff-only", "origin", "main")  # a person's pull brings it into the clone
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert "forged" not in [m.get("subject") for m in fleet.remote_messages()]
    assert "ghost/queue/message_queue.json is tracked by git" in proc.stderr
    assert git(c2, "status", "--porcelain") == ""  # the tracked file is left as the branch has it


def test_writes_resume_when_a_corrupt_mailbox_is_reverted(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    mon = Monitor(Clone(c2), "code2", 1, auto_reply=False)
    assert mon.cycle().ok
    (b1 / "coordination" / "messages.json").write_bytes(CONFLICTED)
    git(b1, "commit", "-qam", "broken", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    assert not mon.cycle().ok
    send_message("waits", to="build1", from_sender="code2", build_repo_path=str(c2))
    git(b1, "revert", "--no-edit", "HEAD")  # back to exactly the blob the monitor read before
    git(b1, "push", "-q", "origin", "main")
    report = mon.cycle()
    assert report.ok and report.sent == 1
    assert bodies(fleet) == ["waits"]


def test_a_conflict_is_read_as_each_of_its_sides_diff3_base_left_out():
    from fleet_mailbox import conflict_sides

    text = ("a\n<<<<<<< HEAD\nours\n||||||| base\nbase\n=======\ntheirs\n>>>>>>> 1234\n"
            "b\n<<<<<<< x\n1\n=======\n2\n>>>>>>> y\n")
    assert conflict_sides(text) == ["a\nours\nb\n1\n", "a\ntheirs\nb\n2\n"]
    assert conflict_sides("no markers\n=======\n") == []


def test_queues_a_clone_cannot_deliver_never_stop_its_own_from_going_out(fleet, caplog):
    """An older version's queue under an id no server may act as now, a queue file the shared
    branch brought (this server's own included), git unable to say what it tracks: each is said,
    and what can go out goes out."""
    c2 = fleet.clone("code2")
    mine = {"id": "msg_1762250000_000a", "from": "code2", "to": "build1", "subject": "mine", "body": "goes out",
            "type": "info", "priority": "normal", "timestamp": "2025-11-04T10:00:00Z", "read": False,
            "ack_required": False}
    odd = c2 / "build1." / "queue"
    odd.mkdir(parents=True)
    (odd / "message_queue.json").write_text(json.dumps({"version": 1, "items": []}))
    MessageQueue(str(c2), "code2").enqueue(mine)
    assert monitor(c2, "code2").cycle().sent == 1
    assert "build1." in caplog.text and "cannot name this server" in caplog.text

    forged = dict(mine, id="msg_1762250000_000b", subject="forged", **{"from": "code2"})
    evil = fleet.clone("evil")
    MessageQueue(str(evil), "code2").enqueue(forged)  # a member commits code2's queue file
    git(evil, "add", "-f", "code2/queue/message_queue.json")
    git(evil, "commit", "-qm", "a queue file, committed", "--no-gpg-sign")
    git(evil, "push", "-q", "origin", "main")
    c3 = fleet.clone("code3")
    assert monitor(c3, "code2").cycle().sent == 0
    assert "forged" not in [m.get("subject") for m in fleet.remote_messages()]
    assert "code2/queue/message_queue.json is tracked by git" in caplog.text
    assert git(c3, "status", "--porcelain") == ""


def test_a_send_waiting_for_room_in_a_full_mailbox_spends_no_attempt(fleet, monkeypatch):
    import fleet_mailbox

    c2 = fleet.clone("code2")
    size = len(git(fleet.origin, "cat-file", "blob", "main:coordination/messages.json").encode())
    monkeypatch.setattr(fleet_mailbox, "MAX_MAILBOX_BYTES", size + 50)
    assert send_message("x" * 300, to="build1", from_sender="code2", build_repo_path=str(c2)).status == "queued"
    queue = MessageQueue(str(c2), "code2")
    for _ in range(6):
        monitor(c2, "code2").cycle()
        for entry in queue.get_pending():  # due again at once, as if the wait had passed
            entry_id = entry["id"]
        doc = json.loads(queue.path.read_text())
        doc["items"][0]["next_attempt_at"] = 0
        queue.path.write_text(json.dumps(doc))
    [entry] = queue.get_pending()
    assert entry["id"] == entry_id and entry["attempts"] == 0 and "--archive-days" in entry["last_error"]
    monkeypatch.setattr(fleet_mailbox, "MAX_MAILBOX_BYTES", 128 * 1024 * 1024)  # an archive made room
    assert monitor(c2, "code2").cycle().sent == 1
