"""The monitor as operators meet it: automatic replies between real clones, heartbeats,
status, metrics, and consoles that mail cannot drive."""

from __future__ import annotations

import datetime as dt
import json
import logging

import pytest
from conftest import QUIRKY, Fleet, commit_and_push, git, run_script

from fleet_git import Clone
from message_monitor import Monitor
from send_message import send_message


def mon(path, server, shown=None, **kw) -> Monitor:
    return Monitor(Clone(path), server, 1.0, show=(shown.append if shown is not None else None),
                   one_shot=True, **kw)


def auto_messages(fleet):
    return [m for m in fleet.remote_messages() if isinstance(m, dict) and m.get("auto") is True]


def test_two_monitors_answer_once_and_never_loop(fleet):
    c2, b1 = fleet.clone("code2"), fleet.clone("build1")
    assert send_message("status report please?", "Status?", to="build1", from_sender="code2",
                        build_repo_path=str(c2))
    monitors = {"code2": mon(c2, "code2"), "build1": mon(b1, "build1")}
    for _ in range(20):
        for m in monitors.values():
            m.cycle()
    autos = auto_messages(fleet)
    assert len(autos) == 1
    reply = autos[0]
    assert reply["from"] == "build1" and reply["to"] == "code2" and reply["type"] == "response"
    assert reply["subject"] == "Re: Status?" and reply["in_reply_to"] == fleet.remote_messages()[0]["id"]
    assert "Status of build1" in reply["body"] and "Retry queue" in reply["body"]
    assert len(fleet.remote_messages()) == 2
    assert all(fleet.readers(m) for m in fleet.remote_messages())


def test_legacy_auto_responses_get_no_answer(quirky_fleet):
    c2, b1 = quirky_fleet.clone("code2"), quirky_fleet.clone("build1")
    send_message("BUILD1 responding automatically. Status: ONLINE. Please confirm and report.",
                 "Re: status", to="code2", from_sender="build1", build_repo_path=str(b1))
    send_message("Auto-response from monitor at 2025-11-04: are you there? status? ack?",
                 "Ping", to="code2", from_sender="build1", build_repo_path=str(b1))
    send_message("Please reply with your status report", "Auto", to="code2", from_sender="build1",
                 build_repo_path=str(b1), auto=True)
    shown: list = []
    for _ in range(3):
        mon(c2, "code2", shown).cycle()
    assert len(shown) == 15 + 3
    assert [m for m in auto_messages(quirky_fleet) if m["from"] == "code2"] == []


def test_broadcast_status_request_is_answered_to_the_sender_only(fleet):
    b1 = fleet.clone("build1")
    others = {s: fleet.clone(s) for s in ("code2", "build2")}
    send_message("Are you there? status please", "Roll call", to="all", from_sender="build1",
                 build_repo_path=str(b1))
    for _ in range(2):
        for server, path in others.items():
            mon(path, server).cycle()
        mon(b1, "build1").cycle()
    autos = auto_messages(fleet)
    assert sorted(m["from"] for m in autos) == ["build2", "code2"]
    assert all(m["to"] == "build1" and m["subject"] == "Re: Roll call" for m in autos)


def test_acknowledgement_in_the_same_transaction_as_the_read_mark(fleet, tmp_path):
    # The default rules acknowledge nothing; a rules file asks for acknowledgements.
    rules = tmp_path / "ack_rules.json"
    rules.write_text(json.dumps({"version": 1, "rules": [
        {"name": "ack-required", "kind": "acknowledge", "match": {"ack_required": True},
         "send_ack_message": True}]}))
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    sent = send_message("Deploy finished, please acknowledge", "Deploy", to="code2", from_sender="build1",
                        build_repo_path=str(b1), ack_required=True)
    mon(c2, "code2", rules_path=str(rules)).cycle()
    original = fleet.remote_messages()[0]
    assert fleet.ackers(original) == {"code2"} and fleet.readers(original) == {"code2"}
    # one state-ref push carried both the read mark and the acknowledgement; the shared branch
    # holds only the mail (and the automatic acknowledgement message, if any)
    assert all(not c.startswith("code2: mark")
               for c in git(fleet.origin, "log", "--format=%s", "main").splitlines())
    assert original["ack_status"] == "pending" and "acknowledged_by" in original
    acks = [m for m in auto_messages(fleet) if m["type"] == "ack"]
    assert len(acks) == 1 and acks[0]["in_reply_to"] == sent.message_id and acks[0]["to"] == "build1"


def test_per_sender_limit(fleet, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for i in range(5):
        send_message(f"status report {i}?", to="code2", from_sender="build1", build_repo_path=str(b1))
    caplog.set_level(logging.WARNING)
    mon(c2, "code2").cycle()
    assert len(auto_messages(fleet)) == 3
    assert any("limit" in r.getMessage().lower() for r in caplog.records)


def test_history_cut_off(tmp_path):
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    msg = {"id": "msg_1_dddddddddddd", "from": "build1", "to": "code2", "subject": "status?",
           "body": "status report please", "type": "request", "priority": "normal",
           "timestamp": old, "read": False, "ack_required": False}
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [msg]}, indent=2).encode())
    shown: list = []
    mon(fleet.clone("code2"), "code2", shown).cycle()
    assert len(shown) == 1 and auto_messages(fleet) == []


def test_restart_between_reading_and_replying_gives_one_reply(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("status report please?", to="code2", from_sender="build1", build_repo_path=str(b1))
    first = Monitor(Clone(c2), "code2", 1.0, one_shot=False)
    first.stop_event.set()  # stopping: the queue is not drained in this cycle
    first.cycle()
    assert auto_messages(fleet) == []
    for _ in range(3):  # restarted monitors deliver the queued reply once, and decide nothing new
        mon(c2, "code2").cycle()
    assert len(auto_messages(fleet)) == 1


def test_rule_file_errors(fleet, tmp_path, caplog):
    c2 = fleet.clone("code2")
    bad = tmp_path / "rules.json"
    bad.write_text('{"version": 1, "rules": [{"name": "x", "kind": "shout", "match": {}}]}')
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--rules", str(bad))
    assert proc.returncode == 2 and "rules.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # a shared rule file that turns invalid: logged, the last good rules stay in force
    b1 = fleet.clone("build1")
    (b1 / "coordination" / "auto_reply_rules.json").write_text(json.dumps({"version": 1, "rules": [
        {"name": "pong", "kind": "presence", "match": {"words": ["ping"]}}]}))
    commit_and_push(b1, "rules")
    monitor = mon(c2, "code2")
    monitor.cycle()
    (b1 / "coordination" / "auto_reply_rules.json").write_text("{ broken")
    git(b1, "commit", "-qam", "broken rules", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    send_message("ping", to="code2", from_sender="build1", build_repo_path=str(b1))
    send_message("status report please", to="code2", from_sender="build1", build_repo_path=str(b1))
    caplog.set_level(logging.ERROR)
    monitor.cycle()
    monitor.cycle()
    autos = auto_messages(fleet)
    assert [m["subject"] for m in autos] == ["Re: ping"]  # "status" is not in the good rules
    assert sum("auto_reply_rules.json" in r.getMessage() for r in caplog.records if r.levelname == "ERROR") == 1


def test_secrets_and_escape_sequences_never_reach_the_console(quirky_fleet):
    c2, b1 = quirky_fleet.clone("code2"), quirky_fleet.clone("build1")
    send_message("evil \x1b]0;pwned\x07 \x1b[2J\x1b[31mred\x1b[0m \u202eabc token=s3cr3t-value",
                 "\x1b[1mbold subject", to="code2", from_sender="build1", build_repo_path=str(b1),
                 allow_secret=True)
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    for secret in ("Hunter2-secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789", "s3cr3t-value"):
        assert secret not in out
    logfile = (c2 / "code2" / "logs" / "structured.log").read_text()
    for line in logfile.splitlines():
        record = json.loads(line)
        assert set(record) >= {"timestamp", "level", "message", "server", "metadata"}
    assert "Hunter2-secret" not in logfile and "s3cr3t-value" not in logfile
    assert out.count("NEW MESSAGE") == 16
    assert git(c2, "status", "--porcelain") == ""


def test_heartbeat_respects_its_interval(fleet):
    c2 = fleet.clone("code2")
    from message_monitor import ReadingOptions

    first = mon(c2, "code2", heartbeat_minutes=60, reading=ReadingOptions(heartbeat_on_main=True))
    assert first.cycle().heartbeat
    assert not first.cycle().heartbeat
    beat = json.loads(git(fleet.origin, "show", "main:code2/heartbeat.json"))
    assert beat["server"] == "code2" and isinstance(beat["uptime_seconds"], int)
    assert set(beat["system"]) == {"cpu_usage", "memory_used_gb", "disk_free_gb"}
    assert isinstance(beat["healthy"], bool)
    restarted = mon(c2, "code2", heartbeat_minutes=60, reading=ReadingOptions(heartbeat_on_main=True))
    assert not restarted.cycle().heartbeat  # survives a restart
    assert git(fleet.origin, "log", "--format=%s", "main").count("code2: heartbeat") == 1
    assert git(c2, "status", "--porcelain") == ""


def test_status_view_and_metrics_textfile(fleet, tmp_path):
    prom = pytest.importorskip("prometheus_client.parser")
    c2, b1 = fleet.clone("code2"), fleet.clone("build1")
    send_message("hello", to="code2", from_sender="build1", build_repo_path=str(b1))
    textfile = tmp_path / "fleet.prom"
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--metrics-textfile", str(textfile))
    assert proc.returncode == 0, proc.stderr
    families = {f.name: f for f in prom.text_string_to_metric_families(textfile.read_text())}
    assert families
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--status")
    assert proc.returncode == 0, proc.stderr
    for part in ("Health:", "Retry queue:", "Last 24 hours:", "messages received 1"):
        assert part in proc.stdout, proc.stdout
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--status", "--json")
    data = json.loads(proc.stdout)
    assert data["metrics"]["counters"]["messages_received"] == 1
    assert git(c2, "status", "--porcelain") == ""


def test_cp1252_console_never_crashes(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      env={"PYTHONIOENCODING": "cp1252"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("NEW MESSAGE") == 15
    proc = run_script("send_message.py", "\u2713 \u4f60\u597d \U0001f680", "\u2192 subject", "--repo", str(c2),
                      "--from", "code2", env={"PYTHONIOENCODING": "cp1252"})
    assert proc.returncode == 0, proc.stderr


def test_quirky_fixture_is_the_shared_one():
    assert json.loads(QUIRKY.read_text(encoding="utf-8"))["messages"][0]["id"] == "msg_1762250000_0001"


def test_a_status_reply_reports_this_cycles_fetch(fleet):
    c2, b1 = fleet.clone("code2"), fleet.clone("build1")
    stale = c2 / "code2" / "state"
    stale.mkdir(parents=True)
    (stale / "monitor_status.json").write_text(json.dumps(
        {"version": 1, "last_fetch_ok_at": "2020-01-01T00:00:00Z", "interval": 10}))
    send_message("status report please?", to="code2", from_sender="build1", build_repo_path=str(b1))
    mon(c2, "code2").cycle()
    reply = auto_messages(fleet)[0]
    assert "Last fetch: 0 s ago" in reply["body"] and "last_fetch" not in reply["body"]
