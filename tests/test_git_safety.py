"""The git core never loses mail and is never misled, on real git:

- an unexpected error in a monitor cycle
- hostile mailboxes (deep nesting, long numbers)
- missing or damaged objects, gc racing sends, a submodule where the mailbox is
- unknown and malformed branches, the push as a compare-and-swap
- local ref locks
- forced rewrites of the shared branch
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import Fleet, commit_and_push, git, run_script

from fleet_git import MAILBOX_PATH, BranchMissing, Clone, ObjectMissing, PushRejected, run_git
from message_monitor import Monitor, repair_mailbox
from message_queue import MessageQueue
from send_message import send_message

SEND = "send_message.py"
MONITOR = "message_monitor.py"


def loose(repo: Path, oid: str) -> Path:
    return repo / ".git" / "objects" / oid[:2] / oid[2:]


def drop_objects(repo: Path, *specs: str) -> List[str]:
    """Delete the loose objects these specs name in ``repo`` (all resolved first)."""
    oids = [git(repo, "rev-parse", spec) for spec in specs]
    for oid in oids:
        path = loose(repo, oid)
        assert path.exists(), f"{oid} is not a loose object"
        path.unlink()
    return oids


TIP_PATH = ("origin/main^{tree}", "origin/main:coordination", "origin/main:coordination/messages.json")


def bodies(fleet: Fleet) -> List[str]:
    return sorted(m["body"] for m in fleet.remote_messages())


def monitor(path: Path, server: str, shown=None, **kw) -> Monitor:
    kw.setdefault("auto_reply", False)
    return Monitor(Clone(path), server, 0.05, show=(shown.append if shown is not None else None),
                   one_shot=True, backoff=(0.01, 0.01, 0.01), preflight_timeout=1.0, **kw)


def served_clone(fleet: Fleet, server, name: str) -> Path:
    path = fleet.clone(name)
    git(path, "remote", "set-url", "origin", server.url("origin.git"))
    return path


# --------------------------------------------------------------------------- missing objects


def test_a_missing_object_is_never_an_empty_mailbox(fleet):
    b1 = fleet.clone("build1")
    for i in range(3):
        assert send_message(f"earlier {i}", to="code2", from_sender="build1", build_repo_path=str(b1))
    c2 = fleet.clone("code2")
    drop_objects(c2, *TIP_PATH)
    proc = run_script(SEND, "after the loss", "--to", "build1", "--from", "code2", "--repo", str(c2))
    assert proc.returncode == 0, proc.stderr
    # the send fetched every object again and built on the real mailbox: nothing dropped
    assert bodies(fleet) == ["after the loss", "earlier 0", "earlier 1", "earlier 2"]
    assert run_git(c2, "cat-file", "-e", git(fleet.origin, "rev-parse", "main~1:coordination/messages.json"),
                   check=False).returncode == 0


def test_absent_is_told_from_missing_by_the_trees_along_the_path(fleet):
    c2 = fleet.clone("code2")
    tip = Clone(c2).tip()
    clone = Clone(c2)
    assert clone.read_file(tip, "coordination/nothing.json") == (None, None)
    assert clone.read_file(tip, "nowhere/x.json") == (None, None)
    assert clone.read_file(tip, "README.md/x.json") == (None, None)  # a file where a folder would be
    assert clone.read_tree(tip, "coordination/archive") is None
    drop_objects(c2, f"{tip}:coordination/messages.json")
    with pytest.raises(ObjectMissing, match="missing or unreadable"):
        Clone(c2).read_file(tip, MAILBOX_PATH)
    assert Clone(c2).read_file(tip, "coordination/other.json") == (None, None)  # its tree was read
    drop_objects(c2, f"{tip}:coordination")
    readers = [lambda c: c.read_file(tip, MAILBOX_PATH),
               lambda c: c.read_file(tip, "coordination/other.json"),
               lambda c: c.read_tree(tip, "coordination"),
               lambda c: c.build_tree(tip, {"coordination/x.json": b"{}\n"})]
    for read in readers:
        with pytest.raises(ObjectMissing):
            read(Clone(c2))
    assert Clone(c2).read_file(tip, "README.md")[1] == b"Build repo\n"
    drop_objects(c2, f"{tip}^{{tree}}")
    with pytest.raises(ObjectMissing):
        Clone(c2).read_file(tip, "README.md")


def test_a_damaged_object_is_unreadable_not_absent(fleet):
    c2 = fleet.clone("code2")
    tip = Clone(c2).tip()
    path = loose(c2, git(c2, "rev-parse", f"{tip}:coordination/messages.json"))
    path.unlink()  # a clone of a local path shares the origin's files: replace, never write into
    path.write_bytes(b"not zlib at all")
    with pytest.raises(ObjectMissing):
        Clone(c2).read_file(tip, MAILBOX_PATH)
    before = fleet.remote_commits()
    # git cannot fetch over a damaged object: the send stops, queued, and says why
    proc = run_script(SEND, "waits", "--to", "build1", "--from", "code2", "--repo", str(c2))
    assert proc.returncode == 75 and "unreadable in this clone" in proc.stderr, proc.stderr
    assert "unreachable" not in proc.stderr and fleet.remote_commits() == before
    path.unlink()  # what git fsck points an operator to; the monitor then fetches it again
    mon = monitor(c2, "code2")
    for _ in range(3):
        if not MessageQueue(str(c2), "code2").get_pending():
            break
        mon.cycle()
    assert bodies(fleet) == ["waits"]


def test_objects_that_stay_missing_stop_the_send_and_the_queue_delivers_later(fleet, git_daemon):
    b1 = served_clone(fleet, git_daemon, "build1")
    assert send_message("earlier", to="code2", from_sender="build1", build_repo_path=str(b1))
    c2 = served_clone(fleet, git_daemon, "code2")
    git(c2, "fetch", "-q", "origin")  # a fresh FETCH_HEAD: the send reads without fetching
    drop_objects(c2, *TIP_PATH)
    git_daemon.stop()  # the refetch cannot bring them back
    before = fleet.remote_commits()
    proc = run_script(SEND, "waits", "--to", "build1", "--from", "code2", "--repo", str(c2))
    assert proc.returncode == 75, proc.stderr
    assert fleet.remote_commits() == before
    git_daemon.start()
    shown: list = []
    first = monitor(c2, "code2", shown).cycle()
    assert not first.ok and "missing" in first.error and shown == []  # never "an empty mailbox"
    mon = monitor(c2, "code2", shown)
    for _ in range(3):
        if not MessageQueue(str(c2), "code2").get_pending():
            break
        mon.cycle()
    assert bodies(fleet) == ["earlier", "waits"]
    assert monitor(c2, "code2", shown).cycle().ok and [m["body"] for m in shown] == ["earlier"]


@pytest.mark.parametrize("lost", ["auto_reply_rules.json", "messages.json"])
def test_a_monitor_with_a_missing_mailbox_or_rules_blob_reads_nothing_that_cycle(fleet, lost):
    b1 = fleet.clone("build1")
    (b1 / "coordination" / "auto_reply_rules.json").write_text(json.dumps({"version": 1, "rules": [
        {"name": "pong", "kind": "presence", "match": {"words": ["ping"]}}]}))
    commit_and_push(b1, "rules")
    assert send_message("ping", to="code2", from_sender="build1", build_repo_path=str(b1))
    c2 = fleet.clone("code2")
    drop_objects(c2, f"origin/main:coordination/{lost}")
    shown: list = []
    mon = monitor(c2, "code2", shown, auto_reply=True)
    report = mon.cycle()
    assert not report.ok and "missing" in report.error and shown == []  # no defaults, no "empty"
    assert mon.cycle().ok and [m["body"] for m in shown] == ["ping"]
    assert [m["subject"] for m in fleet.remote_messages() if m.get("auto")] == ["Re: ping"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gc_racing_sends_in_the_same_clone_loses_nothing(fleet):
    b1 = fleet.clone("build1")
    for i in range(3):
        assert send_message(f"earlier {i}", to="code2", from_sender="build1", build_repo_path=str(b1))
    c2 = fleet.clone("code2")
    stop = threading.Event()
    rounds = [0]

    def collect_garbage() -> None:
        while not stop.is_set():
            for args in (("gc", "-q", "--prune=now"), ("repack", "-adq")):
                subprocess.run(["git", *args], cwd=str(c2), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=120)
            rounds[0] += 1

    gc = threading.Thread(target=collect_garbage)
    gc.start()
    codes = []
    try:
        for i in range(20):
            proc = run_script(SEND, f"during gc {i:02d}", "--to", "build1", "--from", "code2",
                              "--repo", str(c2), "-q")
            assert proc.returncode in (0, 75), proc.stderr
            codes.append(proc.returncode)
    finally:
        stop.set()
        gc.join(timeout=180)
    assert rounds[0] > 0
    mon = monitor(c2, "code2")
    for _ in range(10):
        if not MessageQueue(str(c2), "code2").get_pending():
            break
        mon.cycle()
    expected = sorted([f"earlier {i}" for i in range(3)] + [f"during gc {i:02d}" for i in range(20)])
    assert bodies(fleet) == expected, codes  # every one exactly once, the earlier ones kept


@pytest.mark.parametrize("kind", ["submodule", "folder"])
def test_a_submodule_or_folder_at_the_mailbox_path_is_corrupt_not_absent(fleet, kind):
    b1 = fleet.clone("build1")
    assert send_message("earlier", to="code2", from_sender="build1", build_repo_path=str(b1))
    hostile = fleet.clone("hostile")
    git(hostile, "rm", "-q", "--cached", "coordination/messages.json")
    if kind == "submodule":  # a gitlink to a commit nobody has: a "missing object" by commit
        git(hostile, "update-index", "--add", "--cacheinfo",
            f"160000,{'ab' * 20},coordination/messages.json")
    else:
        (hostile / "coordination" / "messages.json").unlink()
        (hostile / "coordination" / "messages.json").mkdir()
        (hostile / "coordination" / "messages.json" / "x").write_text("x\n")
        git(hostile, "add", "coordination/messages.json/x")
    git(hostile, "commit", "-qm", "hostile", "--no-gpg-sign")
    git(hostile, "push", "-q", "origin", "main")
    before = fleet.remote_commits()
    proc = run_script(SEND, "waits", "--to", "code2", "--from", "build1", "--repo", str(b1))
    assert proc.returncode == 75 and "--repair" in proc.stderr, proc.stderr
    assert fleet.remote_commits() == before  # the mailbox was not written afresh
    c2 = fleet.clone("code2")
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 1 and "not a file" in proc.stderr, proc.stderr
    assert repair_mailbox(Clone(b1), "build1")["repaired"]
    assert monitor(b1, "build1").cycle().sent == 1
    assert bodies(fleet) == ["earlier", "waits"]


# --------------------------------------------------------------------------- branches


@pytest.mark.parametrize("branch", ["../../x", "-x", "a..b", "a b", "x.lock", "a//b", "HEAD", "a@{1}", ""])
def test_a_malformed_branch_is_refused_before_any_git_call(fleet, branch):
    c2 = fleet.clone("code2")
    before = sorted(p.name for p in (c2 / ".git").iterdir())
    for script, args in ((SEND, ["hi", "--from", "code2"]), (MONITOR, ["--server", "code2", "--once"]),
                         (MONITOR, ["--server", "code2"])):
        proc = run_script(script, *args, "--repo", str(c2), f"--branch={branch}", timeout=60)
        assert proc.returncode == 2, (script, proc.stderr)
        assert "invalid --branch" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in (c2 / ".git").iterdir()) == before  # no FETCH_HEAD, nothing
    assert not (c2 / "code2").exists()


def test_a_branch_the_remote_does_not_have_is_never_created(fleet):
    c2 = fleet.clone("code2")
    proc = run_script(SEND, "typo", "--to", "build1", "--from", "code2", "--repo", str(c2), "--branch", "mian")
    assert proc.returncode == 2 and "'mian' does not exist" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert MessageQueue(str(c2), "code2").stats()["pending"] == 0  # it would never deliver
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--branch", "mian", "--once")
    assert proc.returncode == 1 and "'mian' does not exist" in proc.stderr, proc.stderr
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--branch", "mian",
                      "--interval", "0.1", "--no-auto-reply", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert git(fleet.origin, "for-each-ref", "--format=%(refname)") == "refs/heads/main"
    with pytest.raises(BranchMissing):
        Clone(c2, "mian").transact(lambda tip: ({"x": b"x"}, "x"), author="code2", fresh_for=10)


def test_a_deleted_branch_is_not_recreated_and_the_monitor_keeps_running(fleet):
    c2 = fleet.clone("code2")
    git(fleet.origin, "branch", "spare", "main")
    clone = Clone(c2, "spare")
    mon = Monitor(clone, "code2", 0.05, one_shot=True, auto_reply=False)
    assert mon.cycle().ok
    git(fleet.origin, "branch", "-D", "spare")
    report = mon.cycle()
    assert not report.ok and not report.fatal and "'spare' does not exist" in report.error
    # a send from the tip this clone knows (no fetch): the push's lease refuses to create it
    with pytest.raises(BranchMissing):
        send_message("late", to="build1", from_sender="code2", clone=Clone(c2, "spare"))
    assert "refs/heads/spare" not in git(fleet.origin, "for-each-ref", "--format=%(refname)")


def test_the_push_is_a_compare_and_swap_on_the_tip_it_was_built_on(fleet):
    c2 = fleet.clone("code2")
    assert send_message("one", to="build1", from_sender="code2", build_repo_path=str(c2))
    clone = Clone(c2)
    tip = clone.fetch()
    base = git(c2, "rev-parse", f"{tip}~1")
    git(fleet.origin, "update-ref", "refs/heads/main", base)  # rewound behind our tip
    commit = clone.commit_tree(clone.build_tree(tip, {"x.txt": b"x"}), tip, "x", "code2")
    with pytest.raises(PushRejected):
        clone.push(commit, tip)  # a fast-forward of the remote, but not from the tip we read
    assert git(fleet.origin, "rev-parse", "main") == base


# --------------------------------------------------------------------------- local ref locks


def test_a_young_local_ref_lock_is_no_outage(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    assert send_message("new mail", to="code2", from_sender="build1", build_repo_path=str(b1))
    lock = c2 / ".git" / "refs" / "remotes" / "origin" / "main.lock"
    lock.write_text("")
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert "locked" in proc.stderr and "unreachable" not in proc.stderr
    state = c2 / "code2" / "state" / "circuit_breaker.json"
    breaker = json.loads(state.read_text()) if state.exists() else {}
    assert breaker.get("state", "CLOSED") == "CLOSED" and not breaker.get("total_failures")
    # a send builds on the tip its fetch brought (FETCH_HEAD), and its push lands
    proc = run_script(SEND, "despite the lock", "--to", "build1", "--from", "code2", "--repo", str(c2))
    assert proc.returncode == 0, proc.stderr
    assert bodies(fleet) == ["despite the lock", "new mail"]
    assert lock.exists()  # young: nobody may remove it
    old = time.time() - 600
    os.utime(lock, (old, old))
    shown: list = []
    assert monitor(c2, "code2", shown).cycle().ok and not lock.exists()
    assert [m["body"] for m in shown] == ["new mail"]


# --------------------------------------------------------------------------- forced rewrites


def test_a_forced_rewrite_is_reported_with_the_count_and_nothing_local_is_reset(fleet, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for i in range(3):
        assert send_message(f"m{i}", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    mon = monitor(c2, "code2", shown)
    assert mon.cycle().ok and len(shown) == 3
    head = git(c2, "rev-parse", "HEAD")
    hostile = fleet.clone("hostile")
    first = git(fleet.origin, "rev-list", "--reverse", "main").split()[1]  # holds m0 only
    git(hostile, "reset", "-q", "--hard", first)
    (hostile / "README.md").write_text("rewritten\n")
    git(hostile, "commit", "-qam", "rewrite", "--no-gpg-sign")
    git(hostile, "push", "-q", "--force", "origin", "main")
    caplog.set_level(logging.ERROR)
    report = mon.cycle()
    assert report.rewritten == 2
    errors = [r.getMessage() for r in caplog.records if "rewritten by force" in r.getMessage()]
    assert len(errors) == 1 and " 2 message(s)" in errors[0]
    mon.cycle()
    assert len([r for r in caplog.records if "rewritten by force" in r.getMessage()]) == 1  # once
    assert git(c2, "rev-parse", "HEAD") == head  # the local branch is never reset
    # a restarted monitor still knows the tip it processed and reports a later rewrite
    git(hostile, "reset", "-q", "--hard", f"{first}~1")
    git(hostile, "commit", "-q", "--allow-empty", "-m", "again", "--no-gpg-sign")
    git(hostile, "push", "-q", "--force", "origin", "main")
    assert monitor(c2, "code2").cycle().rewritten == 1


# --------------------------------------------------------------------------- hostile mailboxes


def _hostile_mailbox(fleet: Fleet, entry: str) -> None:
    hostile = fleet.clone("hostile")
    good = json.dumps({"id": "msg_1_aaaaaaaaaaaa", "from": "build1", "to": "code2", "subject": "kept",
                       "body": "kept", "timestamp": "2025-11-04T08:00:00Z", "read": False})
    (hostile / "coordination" / "messages.json").write_text('{"messages": [' + good + ", " + entry + "]}\n")
    git(hostile, "commit", "-qam", "hostile", "--no-gpg-sign")
    git(hostile, "push", "-q", "origin", "main")


@pytest.mark.parametrize("entry", ["[" * 5000 + "]" * 5000, "9" * 5000,
                                   '{"id": "x", "from": "a", "to": "b", "n": ' + "[" * 900 + "]" * 900 + "}"])
def test_a_deeply_nested_or_huge_number_mailbox_is_corrupt_not_a_crash(fleet, entry):
    _hostile_mailbox(fleet, entry)
    c2, b1 = fleet.clone("code2"), fleet.clone("build1")
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 1 and "does not parse" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(SEND, "queued", "--to", "code2", "--from", "build1", "--repo", str(b1))
    assert proc.returncode == 75 and "--repair" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(MONITOR, "--repo", str(b1), "--server", "build1", "--repair")
    assert proc.returncode == 0, proc.stderr
    assert [m["body"] for m in fleet.remote_messages()] == ["kept"]
    assert monitor(b1, "build1").cycle().sent == 1
    shown: list = []
    assert monitor(c2, "code2", shown).cycle().ok
    assert sorted(m["body"] for m in shown) == ["kept", "queued"]


def test_an_unexpected_error_in_a_cycle_is_logged_and_the_monitor_carries_on(fleet, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    assert send_message("trips the display", to="code2", from_sender="build1", build_repo_path=str(b1))
    calls = []

    def show(msg):
        calls.append(msg)
        raise RuntimeError("the display broke")

    stop = threading.Event()
    mon = Monitor(Clone(c2), "code2", 0.02, show=show, stop_event=stop, auto_reply=False)
    watcher = threading.Thread(target=_stop_after, args=(mon, stop, 3))
    watcher.start()
    caplog.set_level(logging.ERROR)
    assert mon.run() == 0
    watcher.join()
    assert mon.iterations >= 3 and len(calls) == 1
    failed = [r for r in caplog.records if "the display broke" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "ERROR" and failed[0].exc_info
    assert mon.metrics.get_summary(hours=1)["counters"].get("errors", 0) >= 1

    def interrupt(msg):
        raise KeyboardInterrupt

    send_message("another", to="code2", from_sender="build1", build_repo_path=str(b1))
    with pytest.raises(KeyboardInterrupt):
        Monitor(Clone(c2), "code2", 0.02, show=interrupt, one_shot=True, auto_reply=False).run()


def _stop_after(mon: Monitor, stop: threading.Event, cycles: int) -> None:
    deadline = time.monotonic() + 60
    while mon.iterations < cycles and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()


def test_repair_salvages_around_deep_text(fleet):
    good = json.dumps({"id": "msg_2_bbbbbbbbbbbb", "from": "build2", "to": "code2", "body": "salvaged"})
    _hostile_mailbox(fleet, good + ', {"id": "deep", "from": "a", "to": "b", "x": ' + "[" * 5000)
    b1 = fleet.clone("build1")
    result = repair_mailbox(Clone(b1), "build1")
    assert result["repaired"]
    assert sorted(m["body"] for m in fleet.remote_messages()) == ["kept", "salvaged"]


def test_a_lock_a_live_git_holds_in_a_linked_worktree_is_never_taken_for_stale(tmp_path):
    """A linked worktree (``git worktree add``) shares the clone's refs and their locks: a git at
    work there for over two minutes (a slow reference-transaction hook, a shallow fetch) keeps
    its lock."""
    from fleet_git import remove_stale_locks

    repo = tmp_path / "clone"
    git(tmp_path, "init", "-q", "-b", "main", str(repo))
    (repo / "f").write_text("x")
    git(repo, "add", "f")
    git(repo, "commit", "-qm", "i", "--no-gpg-sign")
    worktree = tmp_path / "wt"
    git(repo, "worktree", "add", "-q", "-b", "topic", str(worktree))
    target = git(worktree, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "work").strip()
    holder = subprocess.Popen(["git", "update-ref", "--stdin"], cwd=worktree, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        holder.stdin.write(f"start\nupdate refs/heads/topic {target}\nprepare\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "start: ok"
        assert holder.stdout.readline().strip() == "prepare: ok"
        lock = repo / ".git" / "refs" / "heads" / "topic.lock"
        old = time.time() - 600
        os.utime(lock, (old, old))  # ten minutes old, and still held
        assert remove_stale_locks(repo, repo / ".git") == []
        assert lock.exists()
        out, _ = holder.communicate("commit\n", timeout=30)
        assert holder.returncode == 0 and "commit: ok" in out
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate()
    assert git(repo, "rev-parse", "topic").strip() == target


@pytest.mark.skipif(os.name == "nt", reason="a shell hook")
def test_the_remotes_own_hooks_still_run_for_the_suites_pushes(fleet):
    """No hook runs in the suite's git calls in the clone; a remote on a local path still runs its
    own (a pre-receive policy), since git starts its receive-pack without those settings."""
    c2 = fleet.clone("code2")
    hook = fleet.origin / "hooks" / "pre-receive"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text("#!/bin/sh\necho 'policy: no pushes today' >&2\nexit 1\n")
    hook.chmod(0o755)
    before = fleet.remote_commits()
    proc = run_script("send_message.py", "refused by the remote's policy", "--to", "build1", "--from", "code2",
                      "--repo", str(c2), "--no-queue")
    assert proc.returncode == 1 and fleet.remote_commits() == before, proc.stderr


def test_a_clone_of_one_topic_branch_never_takes_it_for_the_shared_branch(tmp_path):
    """A single-branch clone of a person's topic branch has no origin/HEAD and fetched only that
    branch: mail still goes to the shared branch (main), never onto the topic branch."""
    fleet = Fleet(tmp_path)
    b1 = fleet.clone("build1")
    git(b1, "push", "-q", "origin", "main:dev")
    single = tmp_path / "single"
    git(tmp_path, "clone", "-q", "--single-branch", "-b", "dev", str(fleet.origin), str(single))
    assert Clone(single).branch == "main"
