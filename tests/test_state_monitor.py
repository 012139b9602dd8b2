"""The monitor on state refs: receipts, presence and the message hook, on real git and processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import PYTHON_DIR, aged_message, git, refuse_custom_refs, run_script

from fleet_git import Clone
from fleet_state import StateChange, StateStore
from message_monitor import Monitor, ReadingOptions
from send_message import send_message


def mon(path, server, shown=None, **kw) -> Monitor:
    return Monitor(Clone(path), server, 1.0, show=(shown.append if shown is not None else None),
                   one_shot=True, auto_reply=False, **kw)


def test_reading_a_broadcast_commits_nothing_on_the_shared_branch(fleet):
    b1 = fleet.clone("build1")
    servers = {s: fleet.clone(s) for s in ("code2", "build2", "build3")}
    send_message("deploy at 5", "Deploy", to="all", from_sender="build1", build_repo_path=str(b1))
    before = fleet.remote_commits()
    for server, path in servers.items():
        shown: list = []
        mon(path, server, shown).cycle()
        assert [m["subject"] for m in shown] == ["Deploy"]
    assert fleet.remote_commits() == before  # no read mark, no heartbeat on the shared branch
    assert fleet.readers(fleet.remote_messages()[0]) == set(servers)
    for server in servers:
        assert git(fleet.origin, "rev-list", "--count", f"refs/fleet/{server}") == "1"


def test_service_mode_shows_once_and_leaves_the_mail_unread(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("run the tests", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    mon(c2, "code2", shown, reading=ReadingOptions(mark_read="never")).cycle()
    assert len(shown) == 1
    assert fleet.readers(fleet.remote_messages()[0]) == set()  # the agent still finds it unread
    again: list = []
    mon(c2, "code2", again, reading=ReadingOptions(mark_read="never")).cycle()
    assert again == []  # shown once, recorded locally


def test_the_cli_marks_read_on_a_terminal_and_never_as_a_service(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("first", to="code2", from_sender="build1", build_repo_path=str(b1))
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert "first" in proc.stdout
    assert fleet.readers(fleet.remote_messages()[0]) == set()  # stdout is a pipe: a service
    if os.name == "nt":
        pytest.skip("a pseudo-terminal needs POSIX")
    import pty

    send_message("second", to="code2", from_sender="build1", build_repo_path=str(b1))
    master, slave = pty.openpty()
    try:
        done = subprocess.run([sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--repo", str(c2),
                               "--server", "code2", "--once", "--no-auto-reply"],
                              stdout=slave, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(slave)
        os.close(master)
    assert done.returncode == 0, done.stderr
    second = fleet.remote_messages()[1]
    assert fleet.readers(second) == {"code2"}  # a person at a terminal has read it


def test_presence_lives_in_the_state_ref(fleet):
    c2 = fleet.clone("code2")
    before = fleet.remote_commits()
    m = mon(c2, "code2", heartbeat_minutes=60)
    m.cycle()
    presence = fleet.state("code2")["presence"]
    assert presence["interval"] == 1.0 and presence["period"] == 3600.0
    assert presence["suite_version"] and presence["started"] and presence["timestamp"]
    assert set(presence["queue"]) == {"pending", "dead"} and presence["breaker"] == "CLOSED"
    tip = git(fleet.origin, "rev-parse", "refs/fleet/code2")
    m.cycle()
    assert git(fleet.origin, "rev-parse", "refs/fleet/code2") == tip  # not due: nothing pushed
    assert fleet.remote_commits() == before
    assert git(fleet.origin, "ls-tree", "--name-only", "main").split() == ["README.md", "coordination"]


def test_heartbeat_on_main_keeps_the_old_file(fleet):
    c2 = fleet.clone("code2")
    mon(c2, "code2", heartbeat_minutes=60, reading=ReadingOptions(heartbeat_on_main=True)).cycle()
    beat = json.loads(git(fleet.origin, "show", "main:code2/heartbeat.json"))
    assert beat["server"] == "code2"
    assert "presence" in fleet.state("code2")


def test_receipts_written_by_another_process_are_honoured(fleet):
    """An inbox command (another process of code2) marks mail read: the monitor never shows it."""
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    sent = send_message("read elsewhere", to="code2", from_sender="build1", build_repo_path=str(b1))
    StateStore(Clone(c2)).update("code2", StateChange(read=[(sent.message_id, "build1")]))
    shown: list = []
    mon(c2, "code2", shown).cycle()
    assert shown == []


def test_legacy_marks_mirror_receipts_into_the_mailbox(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for n in range(3):
        send_message(f"m{n}", to="code2", from_sender="build1", build_repo_path=str(b1))
    before = len(fleet.remote_commits())
    mon(c2, "code2", reading=ReadingOptions(legacy_marks=True)).cycle()
    msgs = fleet.remote_messages()
    assert all(m["read_by"] == ["code2"] and m["read"] is True for m in msgs)
    assert all(fleet.readers(m) == {"code2"} for m in msgs)
    assert len(fleet.remote_commits()) == before + 1  # one mailbox commit for the whole cycle


def test_mail_marked_read_by_older_tools_is_honoured(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("old", to="code2", from_sender="build1", build_repo_path=str(b1))
    mon(b1, "build1").cycle()  # nothing for build1
    # an older tool marks it read in the mailbox itself
    raw = json.loads(git(fleet.origin, "show", "main:coordination/messages.json"))
    raw["messages"][0]["read"] = True
    work = fleet.clone("oldtool")
    (work / "coordination" / "messages.json").write_text(json.dumps(raw, indent=2) + "\n")
    git(work, "commit", "-qam", "mark read (old tool)", "--no-gpg-sign")
    git(work, "push", "-q", "origin", "main")
    shown: list = []
    mon(c2, "code2", shown).cycle()
    assert shown == []


def test_a_host_that_refuses_custom_refs_gets_the_fallback_branch(fleet):
    refuse_custom_refs(fleet)
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("hello", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    mon(c2, "code2", shown).cycle()
    assert len(shown) == 1
    state = json.loads(git(fleet.origin, "show", "refs/heads/fleet-state/code2:state.json"))
    assert state["read"] == [[fleet.remote_messages()[0]["id"], "build1"]]
    again: list = []
    mon(c2, "code2", again).cycle()
    assert again == []


HOOK = """
import json, os, sys, time
msg = json.load(sys.stdin)
mode = os.environ["FLEET_MSG_SUBJECT"]
out = os.path.join(sys.argv[1], os.environ["FLEET_MSG_ID"] + ".json")
if mode == "hang":
    time.sleep(600)
with open(out, "w") as handle:
    json.dump({"body": msg["body"], "env": {k: v for k, v in os.environ.items() if k.startswith("FLEET_")}}, handle)
sys.exit(3 if mode == "fail" else 0)
"""


@pytest.mark.timeout(120)
def test_on_message_runs_once_per_message_and_never_stalls_the_cycle(fleet, tmp_path, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    out = tmp_path / "out"
    out.mkdir()
    command = f'"{sys.executable}" "{script}" "{out}"'
    sent = {}
    for subject in ("ok", "fail", "hang", "$(touch pwned)"):
        sent[subject] = send_message(f"body of {subject}", subject, to="code2", from_sender="build1",
                                     build_repo_path=str(b1)).message_id
    m = mon(c2, "code2", reading=ReadingOptions(on_message=command, on_message_timeout=2.0))
    m.one_shot = False
    report = m.cycle()
    assert len(report.new_messages) == 4
    hung = [p for p, _d, mid in m.hook.running if mid == sent["hang"]]
    assert hung and hung[0].poll() is None  # the cycle came back while the command still runs

    def finished() -> bool:
        m.hook.reap()
        return not m.hook.running

    deadline = time.monotonic() + 60
    while not finished():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert hung[0].poll() is not None  # stopped at its time limit
    results = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(results) == {sent["ok"], sent["fail"], sent["$(touch pwned)"]}
    env = results[sent["ok"]]["env"]
    assert env["FLEET_MSG_FROM"] == "build1" and env["FLEET_MSG_PRIORITY"] == "normal"
    assert results[sent["ok"]]["body"] == "body of ok"
    assert not (c2 / "pwned").exists() and not (tmp_path / "pwned").exists()
    text = caplog.text
    assert f"--on-message for {sent['fail']} exited with 3" in text
    assert f"--on-message for {sent['hang']} ran past 2 s" in text
    # a new monitor (a restart) never runs the command again for these messages
    again = mon(c2, "code2", reading=ReadingOptions(on_message=command, on_message_timeout=2.0))
    assert again.cycle().new_messages == [] and not again.hook.running


TOUCH = """
import os, sys, time
open(os.path.join(sys.argv[1], os.environ["FLEET_MSG_ID"]), "a").write("ran\\n")
time.sleep(float(sys.argv[2]))
"""


def _hook_fleet(fleet, tmp_path, count: int, sleep: float):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    script, out = tmp_path / "touch.py", tmp_path / "out"
    script.write_text(TOUCH)
    out.mkdir()
    ids = [send_message(f"m{i}", to="code2", from_sender="build1", build_repo_path=str(b1)).message_id
           for i in range(count)]
    return c2, f'"{sys.executable}" "{script}" "{out}" {sleep}', out, ids


def _runs(out) -> dict:
    return {p.name: p.read_text().count("ran") for p in out.iterdir()}


@pytest.mark.timeout(120)
def test_once_runs_the_command_for_every_new_message_and_waits_within_the_time_limit(fleet, tmp_path):
    # Cron's --once used to start four commands, drop the rest and leave a hung one running.
    c2, command, out, ids = _hook_fleet(fleet, tmp_path, 6, 30)
    started = time.monotonic()
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply",
                      "--on-message", command, "--on-message-timeout", "1")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 25  # two rounds of four slots, each stopped at 1 s
    assert _runs(out) == {i: 1 for i in ids}
    assert proc.stderr.count("ran past 1 s and was stopped") == 6


@pytest.mark.timeout(120)
def test_a_stop_leaves_waiting_commands_owed_and_the_next_start_runs_them_once(fleet, tmp_path):
    c2, command, out, ids = _hook_fleet(fleet, tmp_path, 6, 30)
    reading = ReadingOptions(on_message=command, on_message_timeout=60)
    first = mon(c2, "code2", reading=reading)
    first.one_shot = False
    assert len(first.cycle().new_messages) == 6
    first.finish_hook()  # a service stop: four were running (stopped), two waited for a slot
    assert sorted(_runs(out)) == sorted(ids[:4])
    again = mon(c2, "code2", reading=reading)
    again.one_shot = False
    assert again.cycle().new_messages == []

    def all_started() -> bool:
        again.hook.reap()
        return len(_runs(out)) == 6

    deadline = time.monotonic() + 30
    while not all_started():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    again.finish_hook()
    assert _runs(out) == {i: 1 for i in ids}
    third = mon(c2, "code2", reading=reading)
    assert not third.hook.waiting and third.cycle().new_messages == []


def test_a_console_that_cannot_be_written_never_costs_a_message_its_command(fleet, tmp_path, caplog):
    c2, command, out, ids = _hook_fleet(fleet, tmp_path, 3, 0)

    class Broken(list):  # a console whose pipe closed
        def append(self, msg) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    m = mon(c2, "code2", Broken(), reading=ReadingOptions(on_message=command, on_message_timeout=20))
    assert m.cycle().ok
    m.finish_hook()
    assert _runs(out) == {i: 1 for i in ids}
    assert "console cannot be written" in caplog.text


def _aged(i: int, to, days: float = 40, **extra) -> dict:
    return aged_message(i, days, to, **extra)


def test_archive_folds_receipts_in_then_the_state_refs_drop_them(tmp_path):
    from conftest import Fleet

    from fleet_archive import archive_pass, find_anywhere
    from inbox import Inbox

    direct = _aged(1, "code2", ack_required=True, ack_status="pending", acknowledged_by=[])
    broadcast = _aged(2, "all")
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [direct, broadcast]}, indent=2).encode())
    c2, b2 = fleet.clone("code2"), fleet.clone("build2")
    StateStore(Clone(b2)).update("build2", StateChange(presence={"timestamp": "2026-01-01T00:00:00Z"}))
    mon(c2, "code2").cycle()
    Inbox(str(c2), "code2").acknowledge(direct["id"], note="done", message=False)
    first = archive_pass(Clone(c2), "code2", 30)
    assert first["archived"] == 1  # build2 has not read the broadcast: it stays
    assert first["pruned"] == 1  # the direct message's receipt and ack are in the archive now
    assert [tuple(k) for k in fleet.state("code2")["read"]] == [(broadcast["id"], "build1")]
    mon(b2, "build2").cycle()
    result = archive_pass(Clone(b2), "build2", 30)
    assert result["archived"] == 1 and result["pruned"] == 1
    assert fleet.remote_messages() == []
    archived = {m["id"]: m for m in (find_anywhere(Clone(c2), Clone(c2).fetch(), k["id"]) for k in (direct, broadcast))}
    assert archived[direct["id"]]["read_by"] == ["code2"]
    assert archived[direct["id"]]["acknowledged_by"] == ["code2"]
    assert archived[direct["id"]]["ack_status"] == "acknowledged"
    assert sorted(archived[broadcast["id"]]["read_by"]) == ["build2", "code2"]
    # build2 dropped its receipt; code2 keeps the broadcast's until its own next pass
    assert fleet.state("build2")["read"] == []
    assert len(fleet.state("code2")["read"]) == 1
    assert archive_pass(Clone(c2), "code2", 30)["pruned"] == 1
    assert fleet.state("code2")["read"] == [] and fleet.state("code2")["acks"] == []
    # nothing read became unread
    everything = Inbox(str(c2), "code2").unread(include_archive=True, include_read=True)["messages"]
    assert {m["id"]: (m["read"], m["acknowledged"]) for m in everything} == {
        direct["id"]: (True, True), broadcast["id"]: (True, False)}
    assert Inbox(str(c2), "code2").unread(include_archive=True)["count"] == 0


def test_a_command_reads_whole_json_however_long_the_message():
    from fleet_hook import STDIN_LIMIT, _stdin_json

    msg = {"id": "m1", "from": "build1", "to": "code2", "subject": "s" * 9_000_000, "body": "\u00e9" * 2_000_000,
           "read_by": ["x" * 100] * 200_000}
    data = _stdin_json(msg)
    seen = json.loads(data)
    assert len(data) <= STDIN_LIMIT and seen["truncated"] is True and seen["id"] == "m1"
    assert seen["body"].startswith("\u00e9") and len(seen["read_by"]) == 100
    small = {"id": "m2", "from": "b", "to": "c", "body": "hi"}
    assert json.loads(_stdin_json(small)) == small


def test_a_windows_command_line_loses_the_quotes_around_its_words():
    import subprocess as sp

    from fleet_hook import split_command

    line = '"C:\\Program Files\\Python311\\python.exe" "C:\\agent\\wake.py" --fast'
    argv = split_command(line, windows=True)
    assert argv == ["C:\\Program Files\\Python311\\python.exe", "C:\\agent\\wake.py", "--fast"]
    assert sp.list2cmdline(argv) == line.replace('"C:\\agent\\wake.py"', "C:\\agent\\wake.py")  # quoted where needed
    assert split_command("python3 'a b.py' c", windows=False) == ["python3", "a b.py", "c"]


def test_what_a_command_is_owed_is_kept_small_whatever_the_mail():
    from monitor_files import OWED_TEXT_CHARS, owed_copy

    msg = {"id": "m1", "from": "build1", "to": ["code2"] * 500, "subject": "s", "body": "b" * 1_000_000,
           "extra": {"deep": "x" * 10}}
    copy = owed_copy(msg)
    assert len(json.dumps(copy)) < 3 * OWED_TEXT_CHARS and copy["truncated"] is True
    assert copy["id"] == "m1" and len(copy["to"]) == 20 and copy["extra"] is None
    small = {"id": "m2", "from": "b", "to": "c", "body": "hi"}
    assert owed_copy(small) == small


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.name != "posix", reason="SIGINT stands for Ctrl+C")
def test_ctrl_c_in_once_stops_the_commands_it_started(fleet, tmp_path):
    import signal

    import psutil

    c2, command, out, ids = _hook_fleet(fleet, tmp_path, 1, 300)
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--repo", str(c2),
                             "--server", "code2", "--once", "--no-auto-reply", "--on-message", command,
                             "--on-message-timeout", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not _runs(out):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    script = str(tmp_path / "touch.py")
    deadline = time.monotonic() + 10
    while any(script in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "the command outlived the monitor"
        time.sleep(0.1)
