"""send_message and message_monitor on real git: bare origins, one clone per server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON_DIR, QUIRKY, Fleet, git, run_script
from test_mailbox import CODE2_EXPECTED

from fleet_git import Clone
from message_monitor import Monitor, init_fleet
from send_message import send_message


def monitor_for(path: Path, server: str, shown: list, **kw) -> Monitor:
    return Monitor(Clone(path), server, 1.0, show=shown.append, one_shot=True, **kw)


def test_send_in_one_clone_receive_in_another(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    result = send_message("Build 4411 is green.", "Nightly build", to="code2", from_sender="build1",
                          build_repo_path=str(b1))
    assert result and result.status == "sent" and result.message_id.startswith("msg_")
    msgs = fleet.remote_messages()
    assert [m["id"] for m in msgs] == [result.message_id]
    assert list(msgs[0])[:10] == ["id", "from", "to", "subject", "body", "type", "priority",
                                  "timestamp", "read", "ack_required"]
    log = git(fleet.origin, "log", "-1", "--format=%s")
    assert log == "build1 -> code2: Nightly build"
    shown: list = []
    report = monitor_for(c2, "code2", shown).cycle()
    assert report.ok and [m["id"] for m in shown] == [result.message_id]
    after = fleet.remote_messages()[0]
    assert fleet.readers(after) == {"code2"}  # the receipt lives in code2's state ref
    assert after["read"] is False and "read_by" not in after  # the shared branch carries only mail
    assert len(fleet.remote_commits()) == 2


def test_cli_seed_usage_and_env_defaults(fleet):
    b1 = fleet.clone("build1")
    proc = run_script("send_message.py", "Hello fleet", "Test Subject", "--to", "all",
                      env={"BUILD_REPO_PATH": str(b1), "SERVER_ID": "Build1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Sent msg_") and "verified" in proc.stdout
    msg = fleet.remote_messages()[-1]
    assert msg["from"] == "build1" and msg["to"] == "all" and msg["subject"] == "Test Subject"
    proc = run_script("send_message.py", "Please check", "--to", "code2,build2", "--from", "build1",
                      "--repo", str(b1), "--priority", "HIGH", "--type", "request", "--ack-required")
    assert proc.returncode == 0, proc.stderr
    msg = fleet.remote_messages()[-1]
    assert msg["to"] == ["code2", "build2"] and msg["priority"] == "high"
    assert msg["type"] == "request" and msg["ack_required"] is True and msg["ack_status"] == "pending"
    proc = run_script("send_message.py", "-", "Log", "--to", "code2", "--repo", str(b1), "--from", "build1",
                      input="line one\nline two\n")
    assert proc.returncode == 0, proc.stderr
    assert fleet.remote_messages()[-1]["body"] == "line one\nline two"
    proc = run_script("send_message.py", "Got it", "--reply-to", msg["id"], "--repo", str(b1),
                      "--from", "code2")
    assert proc.returncode == 0, proc.stderr
    reply = fleet.remote_messages()[-1]
    assert reply["to"] == "build1" and reply["in_reply_to"] == msg["id"]
    assert reply["subject"] == "Re: Please check"


def test_quirky_mailbox_survives_a_round_trip(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    before = json.loads(QUIRKY.read_text(encoding="utf-8"))["messages"]
    shown: list = []
    monitor_for(c2, "code2", shown).cycle()
    assert [m["id"] for m in shown] == CODE2_EXPECTED
    b1 = quirky_fleet.clone("build1")
    assert send_message("after the quirks", to="code2", from_sender="build1", build_repo_path=str(b1))
    after = quirky_fleet.remote_messages()
    assert len(after) == len(before) + 1
    for old, new in zip(before, after):
        if isinstance(old, dict):
            assert {k: v for k, v in new.items() if k not in ("read", "read_by")} == \
                {k: v for k, v in old.items() if k not in ("read",)}
        else:
            assert new == old
    raw = git(quirky_fleet.origin, "show", "main:coordination/messages.json").encode()
    assert raw.isascii() and b'\\u4f60\\u597d' in raw


def test_restart_never_shows_a_message_twice(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("one", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    monitor_for(c2, "code2", shown).cycle()
    assert len(shown) == 1
    # a restarted monitor (new process state) with the read mark on the remote
    again: list = []
    monitor_for(c2, "code2", again).cycle()
    assert again == []
    send_message("two", to="code2", from_sender="build1", build_repo_path=str(b1))
    monitor_for(c2, "code2", again).cycle()
    assert [m["body"] for m in again] == ["two"]


def test_marks_that_could_not_be_pushed_are_kept_and_pushed_later(fleet, tmp_path):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("one", to="code2", from_sender="build1", build_repo_path=str(b1))
    hidden = tmp_path / "origin-away.git"

    def show_then_lose_the_remote(msg):
        fleet.origin.rename(hidden)  # the remote disappears between showing and marking

    mon = Monitor(Clone(c2), "code2", 1.0, show=show_then_lose_the_remote, one_shot=True)
    try:
        report = mon.cycle()
        assert report.marks_pending == 1
    finally:
        hidden.rename(fleet.origin)
    state = json.loads((c2 / "code2" / "state" / "monitor_state.json").read_text())
    assert len(state["pending_marks"]) == 1
    # a new process picks the pending mark up and pushes it, showing nothing again
    shown: list = []
    report = monitor_for(c2, "code2", shown).cycle()
    assert shown == [] and report.marked == 1
    assert fleet.readers(fleet.remote_messages()[0]) == {"code2"}


def test_long_history_of_handled_mail_is_not_new(tmp_path):
    messages = [{"id": f"msg_17000000{i:02d}_{i:012x}", "from": "build1", "to": "code2",
                 "subject": f"old {i}", "body": "x", "type": "info", "priority": "normal",
                 "timestamp": "2025-01-01T00:00:00Z", "read": True, "ack_required": False}
                for i in range(60)]
    messages += [{"id": "msg_1700000100_b", "from": "build1", "to": "all", "subject": "old bc",
                  "body": "x", "timestamp": "2025-01-01T00:00:00Z", "read": False,
                  "read_by": ["code2", "build2"]}]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": messages}, indent=2).encode())
    c2 = fleet.clone("code2")
    shown: list = []
    before = fleet.remote_commits()
    monitor_for(c2, "code2", shown).cycle()
    assert shown == [] and fleet.remote_commits() == before


def test_broadcast_reaches_everyone_and_stays_unread_for_the_others(fleet):
    b1 = fleet.clone("build1")
    clones = {s: fleet.clone(s) for s in ("code2", "build2", "build3")}
    send_message("deploy at 5", "Deploy", to="all", from_sender="build1", build_repo_path=str(b1))
    seen = {}
    for server in ("code2", "build2"):
        shown: list = []
        monitor_for(clones[server], server, shown).cycle()
        seen[server] = [m["subject"] for m in shown]
    assert seen == {"code2": ["Deploy"], "build2": ["Deploy"]}
    msg = fleet.remote_messages()[0]
    assert msg["read"] is False and fleet.readers(msg) == {"build2", "code2"}
    late: list = []
    monitor_for(clones["build3"], "build3", late).cycle()
    assert [m["subject"] for m in late] == ["Deploy"]
    own: list = []
    monitor_for(b1, "build1", own).cycle()
    assert own == []


def test_a_persons_work_in_the_clone_is_never_touched(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    (c2 / "README.md").write_text("Build repo\nlocal edit, not committed\n")
    (c2 / "notes.txt").write_text("untracked\n")
    (c2 / "wip.txt").write_text("staged\n")
    git(c2, "add", "wip.txt")
    status_before = git(c2, "status", "--porcelain")
    shown: list = []
    for i in range(3):
        assert send_message(f"m{i}", to="code2", from_sender="build1", build_repo_path=str(b1))
        monitor_for(c2, "code2", shown).cycle()
        assert git(c2, "status", "--porcelain") == status_before
        assert (c2 / "README.md").read_text().endswith("local edit, not committed\n")
    assert len(shown) == 3
    # the clean-path case: it fast-forwarded past mail commits while keeping the edits
    assert git(c2, "rev-parse", "HEAD") == git(c2, "rev-parse", "origin/main")
    # local commits: never rebased or reset, mail keeps flowing
    (c2 / "local.txt").write_text("commit\n")
    git(c2, "add", "local.txt")
    git(c2, "commit", "-q", "--no-gpg-sign", "-m", "local work", "--", "local.txt")
    head = git(c2, "rev-parse", "HEAD")
    assert send_message("m3", to="code2", from_sender="build1", build_repo_path=str(b1))
    monitor_for(c2, "code2", shown).cycle()
    assert git(c2, "rev-parse", "HEAD") == head and len(shown) == 4
    assert git(c2, "status", "--porcelain") == status_before
    for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply"):
        assert not (c2 / ".git" / marker).exists()


def test_conflicting_local_edit_blocks_fast_forward_not_mail(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    # someone pushes a change to README.md; code2 has an uncommitted edit of the same file
    (b1 / "README.md").write_text("changed upstream\n")
    git(b1, "commit", "-q", "-am", "upstream", "--no-gpg-sign")
    git(b1, "push", "-q", "origin", "main")
    (c2 / "README.md").write_text("my edit\n")
    assert send_message("hi", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    report = monitor_for(c2, "code2", shown).cycle()
    assert len(shown) == 1 and report.fast_forward == "refused"
    assert (c2 / "README.md").read_text() == "my edit\n"
    git(c2, "checkout", "-q", "-b", "feature")
    assert send_message("hi2", to="code2", from_sender="build1", build_repo_path=str(b1))
    report = monitor_for(c2, "code2", shown).cycle()
    assert len(shown) == 2 and report.fast_forward == "other-branch"


SENDER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {python!r})
    from send_message import send_message
    repo, server, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    for i in range(count):
        r = send_message(f"{{server}} #{{i}}", to="all", from_sender=server, build_repo_path=repo,
                         queue=False)
        if not r:
            print("FAILED", r.reason, file=sys.stderr)
            sys.exit(1)
""")


def test_concurrent_senders_lose_and_duplicate_nothing(fleet, tmp_path):
    script = tmp_path / "sender.py"
    script.write_text(SENDER.format(python=str(PYTHON_DIR)))
    clones = [fleet.clone(f"s{i}") for i in range(4)]
    procs = [subprocess.Popen([sys.executable, str(script), str(c), f"s{i}", "10"],
                              stderr=subprocess.PIPE, text=True)
             for i, c in enumerate(clones)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
    bodies = [m["body"] for m in fleet.remote_messages()]
    assert sorted(bodies) == sorted(f"s{i} #{j}" for i in range(4) for j in range(10))
    ids = [m["id"] for m in fleet.remote_messages()]
    assert len(set(ids)) == 40
    for commit in fleet.remote_commits():
        raw = git(fleet.origin, "show", f"{commit}:coordination/messages.json")
        json.loads(raw)
    assert git(fleet.origin, "rev-list", "--merges", "main") == ""
    for c in clones:
        assert git(c, "status", "--porcelain") == ""
        for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply"):
            assert not (c / ".git" / marker).exists()


@pytest.mark.parametrize("bad", ["../x", "a b", "", "all", "x/y", "A" * 65])
def test_bad_server_ids_are_refused_before_anything(fleet, bad):
    c2 = fleet.clone("code2")
    before = sorted(p.name for p in c2.iterdir())
    proc = run_script("send_message.py", "hi", "--from", bad, "--repo", str(c2))
    assert proc.returncode == 2 and "invalid server id" in proc.stderr
    proc = run_script("send_message.py", "hi", "--to", bad if bad != "all" else "x y", "--repo", str(c2))
    assert proc.returncode == 2
    proc = run_script("message_monitor.py", "--server", bad, "--repo", str(c2), "--once")
    assert proc.returncode == 2 and "invalid server id" in proc.stderr
    assert sorted(p.name for p in c2.iterdir()) == before
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_repos_are_refused(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    git(tmp_path, "init", "-q", str(tmp_path / "noorigin"))
    for repo in (tmp_path / "missing", plain, tmp_path / "noorigin"):
        for script, args in (("send_message.py", ["hi"]), ("message_monitor.py", ["--once"])):
            proc = run_script(script, *args, "--repo", str(repo))
            assert proc.returncode == 2, (script, repo, proc.stderr)
            assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()
    assert sorted(p.name for p in plain.iterdir()) == []


def test_remote_branch_without_mailbox_is_an_empty_mailbox(tmp_path):
    origin = tmp_path / "o.git"
    git(tmp_path, "init", "--bare", "-q", "-b", "main", str(origin))
    c2 = tmp_path / "code2"
    git(tmp_path, "clone", "-q", str(origin), str(c2))
    # The branch exists (creating it is --init's job, never a send's); it has no mailbox file.
    (c2 / "README.md").write_text("Build repo\n")
    git(c2, "add", "README.md")
    git(c2, "commit", "-q", "--no-gpg-sign", "-m", "initial")
    git(c2, "push", "-q", "origin", "main")
    shown: list = []
    assert monitor_for(c2, "code2", shown).cycle().ok
    assert send_message("first ever", to="code2", from_sender="build1", build_repo_path=str(c2))
    monitor_for(c2, "code2", shown).cycle()
    assert [m["body"] for m in shown] == ["first ever"]


def test_init_creates_a_fleet_and_adds_a_mailbox_to_a_clone(tmp_path):
    repo = tmp_path / "demo" / "Build"
    proc = run_script("message_monitor.py", "--init", "--repo", str(repo))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "demo" / "Build.origin.git").is_dir()
    assert json.loads((repo / "coordination" / "messages.json").read_text()) == {"messages": []}
    proc = run_script("message_monitor.py", "--repo", str(repo), "--once")
    assert proc.returncode == 0, proc.stderr
    assert git(repo, "status", "--porcelain") == ""
    # an existing clone without a mailbox gets one by the transaction
    origin = tmp_path / "other.git"
    git(tmp_path, "init", "--bare", "-q", "-b", "main", str(origin))
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "-q", str(origin), str(seed))
    (seed / "src.txt").write_text("x\n")
    git(seed, "add", "src.txt")
    git(seed, "commit", "-q", "--no-gpg-sign", "-m", "project")
    git(seed, "push", "-q", "origin", "HEAD:main")
    assert init_fleet(seed) == "added a mailbox to the existing clone"
    assert init_fleet(seed) == "already a fleet repository"
    assert git(origin, "show", "main:src.txt") == "x"


@pytest.mark.parametrize("odd", ["build1.", "a..b", "x.lock"])
def test_an_id_git_cannot_name_a_ref_for_is_refused_as_ones_own_but_its_mail_still_flows(fleet, odd):
    # The pattern allows these ids, but git refuses refs/fleet/<id>: acting as one, a server
    # could never publish presence nor mark mail read (every read failed with git's own error).
    c2 = fleet.clone("code2")
    before = sorted(p.name for p in c2.iterdir())
    for argv in (("message_monitor.py", "--server", odd, "--once"), ("inbox.py", "--server", odd),
                 ("send_message.py", "hi", "--from", odd), ("message_monitor.py", "--server", odd, "--retire")):
        proc = run_script(*argv, "--repo", str(c2))
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "cannot name this server" in proc.stderr
    assert sorted(p.name for p in c2.iterdir()) == before
    # An older tool's server may carry such an id: mail to it is sent, and the fleet sees it.
    assert run_script("send_message.py", "hi", "--to", odd, "--from", "code2", "--repo", str(c2)).returncode == 0
    status = run_script("fleet_status.py", "--repo", str(c2), "--json")
    assert odd in [row["id"] for row in json.loads(status.stdout)["servers"]]


def test_windows_device_names_cannot_name_a_server_there():
    from fleet_common import UsageError, check_own_server_id
    from fleet_service import render_task_scheduler

    for name in ("con", "nul.build", "com1", "lpt9", "aux"):
        with pytest.raises(UsageError, match="device name"):
            check_own_server_id(name, windows=True)
        assert check_own_server_id(name, windows=False) == name  # a Linux server may be "aux"
        with pytest.raises(UsageError, match="device name"):
            render_task_scheduler(python="C:/Python/python.exe", script="C:/fleet/python/message_monitor.py",
                                  repo="C:/Build", server=name, interval=10)
    for name in ("console", "com10", "build-con", "nullbuild"):
        assert check_own_server_id(name, windows=True) == name


def test_a_message_larger_than_a_message_may_be_is_refused_before_anything(fleet):
    c2 = fleet.clone("code2")
    before = fleet.remote_commits()
    big = "\u00e9" * 200_000  # 1.2 MB as the mailbox holds it (each one a 6-byte escape)
    proc = run_script("send_message.py", "-", "--to", "build1", "--from", "code2", "--repo", str(c2), input=big)
    assert proc.returncode == 2 and "more than the 1048576 a message may be" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert fleet.remote_commits() == before and not (c2 / "code2" / "queue").exists()


def test_a_send_that_would_grow_the_mailbox_past_what_readers_read_writes_nothing(fleet, monkeypatch):
    # Pushed, such a mailbox stopped every server at once, and --repair refused to rebuild it.
    import fleet_mailbox

    c2 = fleet.clone("code2")
    assert send_message("fits", to="build1", from_sender="code2", build_repo_path=str(c2))
    size = len(git(fleet.origin, "cat-file", "blob", "main:coordination/messages.json").encode())
    monkeypatch.setattr(fleet_mailbox, "MAX_MAILBOX_BYTES", size + 100)
    before = fleet.remote_commits()
    result = send_message("x" * 500, to="build1", from_sender="code2", build_repo_path=str(c2), queue=False)
    assert result.status == "failed" and "more than the" in result.reason and "--archive-days" in result.reason
    assert fleet.remote_commits() == before
    queued = send_message("x" * 500, to="build1", from_sender="code2", build_repo_path=str(c2))
    assert queued.status == "queued"  # kept for the monitor, which delivers once an archive made room
    assert [m["body"] for m in fleet.remote_messages()] == ["fits"]


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) stands for a full disk")
def test_a_send_on_a_full_disk_prints_the_message_it_could_neither_send_nor_queue(fleet):
    import resource
    import signal

    c2 = fleet.clone("code2")
    before = fleet.remote_commits()

    def full_disk() -> None:  # every write past 200 bytes fails with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    proc = run_script("send_message.py", "kept on stderr " + "x" * 400, "--to", "build1", "--from", "code2",
                      "--repo", str(c2), preexec_fn=full_disk)
    assert proc.returncode == 1, proc.stderr
    printed = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert [m["body"][:14] for m in printed] == ["kept on stderr"]
    assert fleet.remote_commits() == before


def test_author_falls_back_to_the_server_id(fleet, monkeypatch):
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("EMAIL", "")
    b1 = fleet.clone("build1")
    assert send_message("hi", from_sender="build1", build_repo_path=str(b1))
    assert git(fleet.origin, "log", "-1", "--format=%an <%ae>") == "build1 <build1@fleet.invalid>"
    git(b1, "config", "user.name", "Build One")
    git(b1, "config", "user.email", "b1@example.org")
    assert send_message("hi", from_sender="build1", build_repo_path=str(b1))
    assert git(fleet.origin, "log", "-1", "--format=%an <%ae>") == "Build One <b1@example.org>"


def test_redelivery_of_the_same_message_lands_once(fleet):
    b1 = fleet.clone("build1")
    first = send_message("once", to="code2", from_sender="build1", build_repo_path=str(b1),
                         message_id="msg_1_aaaaaaaaaaaa")
    again = send_message("once", to="code2", from_sender="build1", build_repo_path=str(b1),
                         message_id="msg_1_aaaaaaaaaaaa")
    assert first and again
    assert [m["id"] for m in fleet.remote_messages()] == ["msg_1_aaaaaaaaaaaa"]


def test_stale_known_tip_costs_only_a_retry(fleet):
    b1, b2 = fleet.clone("build1"), fleet.clone("build2")
    assert send_message("from b1", from_sender="build1", build_repo_path=str(b1))
    # b2's last fetch is recent, so it pushes from its known (stale) tip, is rejected, refetches
    clone = Clone(b2)
    clone.fetch()
    assert send_message("from b1 again", from_sender="build1", build_repo_path=str(b1))
    result = send_message("from b2", from_sender="build2", clone=clone)
    assert result and result.attempts == 2
    assert [m["body"] for m in fleet.remote_messages()] == ["from b1", "from b1 again", "from b2"]


def test_monitor_stops_on_sigterm_with_exit_0(fleet):
    if os.name == "nt":
        pytest.skip("POSIX signal delivery")
    import signal
    import time

    c2 = fleet.clone("code2")
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--repo", str(c2),
                             "--server", "code2", "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    status = c2 / "code2" / "state" / "monitor_status.json"
    deadline = time.monotonic() + 30
    while not status.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert git(c2, "status", "--porcelain") == ""


def test_idle_cycles_cost_one_network_call_and_write_nothing(fleet, tmp_path, monkeypatch):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("wake up", to="code2", from_sender="build1", build_repo_path=str(b1))
    mon = Monitor(Clone(c2), "code2", 1.0, one_shot=True, auto_reply=False)
    assert len(mon.cycle().new_messages) == 1
    runtime = {p: p.stat().st_mtime_ns for p in (c2 / "code2").rglob("*") if p.is_file()}
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    for _ in range(5):
        report = mon.cycle()
        assert report.ok and not report.new_messages
    monkeypatch.delenv("GIT_TRACE")
    commands = [line.split("built-in: git ", 1)[1] for line in trace.read_text().splitlines()
                if "built-in: git " in line]
    # the remote's side (upload-pack) and the fetch's own connectivity check are no calls of ours
    top = [c for c in commands if not c.startswith(("upload-pack", "rev-list --objects --stdin"))]
    assert [c.split()[0] for c in top] == ["fetch"] * 5, top  # one fetch finds (and fetches) what moved
    after = {p: p.stat().st_mtime_ns for p in (c2 / "code2").rglob("*") if p.is_file()}
    assert after == runtime


def test_mail_that_lands_while_marks_are_pushed_is_shown_next_cycle(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("A", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []

    def show(msg):
        shown.append(msg["body"])
        if msg["body"] == "A":  # another server's mail lands before the read marks are pushed
            send_message("B", to="code2", from_sender="build1", build_repo_path=str(b1))

    mon = Monitor(Clone(c2), "code2", 1.0, show=show, one_shot=True, auto_reply=False)
    mon.cycle()
    assert shown == ["A"]
    mon.cycle()
    assert shown == ["A", "B"]
    mon.cycle()
    assert shown == ["A", "B"]
    assert all(fleet.readers(m) == {"code2"} for m in fleet.remote_messages())


def test_a_busy_local_ref_lock_is_waited_for_not_an_outage(fleet):
    import threading

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("new", to="code2", from_sender="build1", build_repo_path=str(b1))
    lock = c2 / ".git" / "refs" / "remotes" / "origin" / "main.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text("")  # another process of this clone is updating the ref right now
    timer = threading.Timer(0.5, lock.unlink)
    timer.start()
    try:
        assert Clone(c2).fetch() == git(fleet.origin, "rev-parse", "main")
    finally:
        timer.join()
