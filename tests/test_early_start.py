"""A short command starts its first git calls before its modules load (fleet_start), on real fleets.

The script of ``inbox.py`` and of ``fleet_status.py`` guesses, from the command line and the files
git keeps, the calls the command is about to make, and starts them; the command takes them when
its own calls are the same, word for word. These tests check that they are taken, that a wrong
guess only costs a call (its result is never used, the process is stopped and reaped), that the
guess starts nothing where it cannot be sure, and that the quick exit loses no output.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List

import psutil
import pytest
from conftest import PYTHON_DIR, Fleet, activities, count_commands, git, git_commands, publish_presence, run_script

import fleet_start
from fleet_common import parse_timestamp, timestamp_seconds
from fleet_git import Clone
from fleet_report import fleet_status
from inbox import Inbox
from send_message import send_message


@pytest.fixture(autouse=True)
def nothing_left_started() -> Iterator[None]:
    yield
    fleet_start.stop_unused()




def _reader(fleet: Fleet) -> Path:
    """code2's clone, with a state ref of its own (it has read mail), and new mail waiting."""
    b1 = fleet.clone("build1")
    c2 = fleet.clone("code2")
    assert send_message("first", "one", "code2", from_sender="build1", build_repo_path=str(b1))
    Inbox(str(c2), "code2").mark_read(all=True)
    assert send_message("second", "two", "code2", from_sender="build1", build_repo_path=str(b1))
    return c2


@pytest.mark.parametrize("spawn", [True, False], ids=["posix_spawn", "subprocess"])
def test_the_inbox_takes_the_fetch_and_the_settings_its_script_started(fleet, tmp_path, monkeypatch, spawn):
    if spawn and not fleet_start.POSIX_SPAWN:
        pytest.skip("os.posix_spawnp is POSIX's")
    monkeypatch.setattr(fleet_start, "POSIX_SPAWN", spawn)  # Windows starts them with subprocess
    c2 = _reader(fleet)
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "code2", "--json"], unless=("acks",))
    assert len(fleet_start._STARTED) == 2  # the poll's fetch and the reading of the clone's settings
    result = Inbox(str(c2), "code2").unread()
    assert not fleet_start._STARTED  # both taken
    assert [m["subject"] for m in result["messages"]] == ["two"]
    commands = git_commands(trace)
    assert count_commands(commands, "fetch") == 1 and count_commands(commands, "config") == 1, commands


def _over_the_network(clone: Path, daemon) -> Path:
    """``clone``, reaching its remote over the network (``git daemon``), as most fleets do."""
    git(clone, "remote", "set-url", "origin", daemon.url("origin.git"))
    return clone


def test_the_status_takes_the_listing_and_the_fetch_its_script_started(fleet, tmp_path, monkeypatch, git_daemon):
    c2 = _over_the_network(_reader(fleet), git_daemon)
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_look(["--repo", str(c2), "--json"])
    assert len(fleet_start._STARTED) == 3
    report = fleet_status(Clone(c2))
    assert not fleet_start._STARTED
    assert {row["id"] for row in report["servers"]} >= {"build1", "code2"}
    commands = git_commands(trace)
    assert count_commands(commands, "ls-remote") == 1 and count_commands(commands, "config") == 1, commands




def _looked_ahead() -> "fleet_start._LookAhead":
    """The look-ahead of the last start_look, once it has decided."""
    ahead = fleet_start._AHEAD
    assert ahead is not None and ahead.done.acquire(timeout=60)
    ahead.done.release()
    return ahead


@pytest.mark.skipif(not fleet_start.POSIX_SPAWN, reason="the look-ahead reads git's pipes where posix_spawnp starts it")
def test_the_status_fetches_the_state_refs_that_moved_while_it_loads(fleet, tmp_path, monkeypatch, git_daemon):
    """The listing is in before the suite has loaded: the script's thread starts the fetch of the
    state refs that moved (one that moved, one of a server never mirrored), and the command takes
    it, with the mirrors as they were before it."""
    c2 = _over_the_network(_reader(fleet), git_daemon)
    b1, b2 = fleet.clones["build1"], fleet.clone("build2")
    publish_presence(b1, "build1", "first")
    fleet_status(Clone(c2))  # build1's state mirrored
    before = git(c2, "for-each-ref", "--format=%(refname) %(objectname)", "refs/fleet/")
    publish_presence(b1, "build1", "compiling")
    publish_presence(b2, "build2", "testing")
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_look(["--repo", str(c2), "--json"])
    ahead = _looked_ahead()
    assert len(fleet_start._STARTED) == 4  # the listing, the branch, the settings, the state refs
    assert sorted(f"{ref} {oid}" for ref, oid in ahead.before.items()) == before.splitlines()
    report = fleet_status(Clone(c2))
    assert not fleet_start._STARTED  # all four taken
    assert activities(report)["build1"] == "compiling" and activities(report)["build2"] == "testing"
    commands = git_commands(trace)
    assert count_commands(commands, "fetch") == 2 and count_commands(commands, "ls-remote") == 1, commands


@pytest.mark.skipif(not fleet_start.POSIX_SPAWN, reason="the look-ahead reads git's pipes where posix_spawnp starts it")
def test_the_look_ahead_leaves_a_clone_that_negotiates_to_the_command(fleet, tmp_path, monkeypatch, git_daemon):
    """A clone that has seen a state ref carrying history fetches state refs with negotiation
    (fleet.negotiateStateRefs): the look-ahead, which fetches without, starts nothing there."""
    c2 = _over_the_network(_reader(fleet), git_daemon)
    b1 = fleet.clones["build1"]
    git(c2, "config", "fleet.negotiateStateRefs", "true")
    publish_presence(b1, "build1", "compiling")
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_look(["--repo", str(c2), "--json"])
    assert _looked_ahead().before is None and len(fleet_start._STARTED) == 3
    report = fleet_status(Clone(c2))
    assert not fleet_start._STARTED
    assert activities(report)["build1"] == "compiling"
    assert not any("negotiationAlgorithm=noop" in command for command in git_commands(trace))


@pytest.mark.skipif(not fleet_start.POSIX_SPAWN, reason="the look-ahead reads git's pipes where posix_spawnp starts it")
def test_a_listing_whose_output_a_leftover_holds_ends_the_look_ahead_with_the_command(fleet):
    """A process the listing leaves behind (an ssh master, say) holds its output open: the command
    judges that (fleet_git._drain); the look-ahead's thread, which waits in steps, ends once the
    command has taken over, gives the interpreter back its usual turns, and reads no other call's
    output from a pipe number the command closed and git reused."""
    c2 = _reader(fleet)
    b1 = fleet.clones["build1"]
    publish_presence(b1, "build1", "first")
    fleet_status(Clone(c2))
    git(c2, "config", "remote.origin.uploadpack",
        "sh -c '(sleep 120 </dev/null >/dev/null &); exec git-upload-pack \"$@\"' upload-pack")
    publish_presence(b1, "build1", "compiling")
    switching = sys.getswitchinterval()
    try:
        fleet_start.start_look(["--repo", str(c2), "--json"])
        ahead = fleet_start._AHEAD
        report = fleet_status(Clone(c2))
        assert ahead is not None and ahead.done.acquire(timeout=15)  # the thread has ended (the leftover lives on)
        assert sys.getswitchinterval() == switching
        assert activities(report)["build1"] == "compiling"
    finally:
        for proc in psutil.process_iter(["cmdline"]):
            if proc.info["cmdline"] == ["sleep", "120"]:
                proc.kill()


@pytest.mark.parametrize("reached", ["by a path", "over the network"])
def test_the_script_of_the_status_takes_every_call_it_started(fleet, tmp_path, reached, request):
    """The whole script, as cron runs it, one reading of the settings and nothing fetched twice.
    Over the network: one listing, one fetch of the branch, one of the state refs that moved. By
    a path: the remote's refs read from its files, and one fetch of the branch and those refs."""
    c2 = _reader(fleet)
    if reached != "by a path":
        _over_the_network(c2, request.getfixturevalue("git_daemon"))
    b1 = fleet.clones["build1"]
    publish_presence(b1, "build1", "compiling")
    trace = tmp_path / "trace"
    proc = run_script("fleet_status.py", "--repo", str(c2), "--json", env={"GIT_TRACE": str(trace)})
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    assert activities(report)["build1"] == "compiling"
    commands = git_commands(trace)
    expected = (1, 0, 1) if reached == "by a path" else (2, 1, 1)
    assert tuple(count_commands(commands, word) for word in ("fetch", "ls-remote", "config")) == expected, commands


@pytest.mark.skipif(not fleet_start.POSIX_SPAWN, reason="os.posix_spawnp is POSIX's")
def test_a_git_read_by_two_threads_gives_both_the_same_whole_output(tmp_path):
    """The look-ahead's thread and the command may both wait for one call: one reads it while the
    other waits (a timeout keeps its meaning), and both get all of it."""
    import threading

    git(tmp_path, "init", "-q")
    slow = fleet_start.spawn_git(str(tmp_path), ["-c", "alias.slow=!sleep 0.5; seq 1 20000; echo done >&2", "slow"])
    seen = []
    reader = threading.Thread(target=lambda: seen.append(slow.communicate()))
    reader.start()
    time.sleep(0.1)
    with pytest.raises(subprocess.TimeoutExpired):
        slow.communicate(timeout=0.1)
    out, err = slow.communicate(timeout=60)
    reader.join(60)
    assert seen == [(out, err)] and out.split() == [str(n).encode() for n in range(1, 20001)]
    assert err == b"done\n" and slow.returncode == 0


def test_a_wrong_guess_costs_a_call_and_never_its_result(fleet, tmp_path, monkeypatch):
    """The script's guess fetched another branch: the command fetches its own and reads only that;
    the call it did not take is stopped and reaped."""
    c2 = _reader(fleet)
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "code2", "--branch", "elsewhere"])
    started = list(fleet_start._STARTED.values())
    result = Inbox(str(c2), "code2").unread()
    assert [m["subject"] for m in result["messages"]] == ["two"]
    assert len(fleet_start._STARTED) == 1  # the settings were the same and were taken; the fetch was not
    assert fleet_start.stop_unused() == 1
    assert all(proc.returncode is not None for proc in started)
    assert git(c2, "for-each-ref", "refs/remotes/origin/elsewhere") == ""


def test_a_fetch_started_early_is_followed_by_the_maintenance_it_owes(fleet, tmp_path, monkeypatch):
    """Whether git's maintenance is due is asked after a fetch that brought something; the fetch
    started early has moved the ref before the command reads it, and it counts all the same."""
    c2 = _reader(fleet)
    git(c2, "config", "maintenance.strategy", "none")  # a setting of the user's: git decides, every time
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "code2"])
    for proc in list(fleet_start._STARTED.values()):
        proc.wait(timeout=60)  # the early fetch is over before the command looks
    assert [m["subject"] for m in Inbox(str(c2), "code2").unread()["messages"]] == ["two"]
    assert count_commands(git_commands(trace), "maintenance") == 1


@pytest.mark.parametrize("argv", [
    ["list", "--rep", "{c2}"],  # argparse takes an abbreviation: this reading would not
    ["list", "--repo", "{c2}", "--help"],
    ["list", "--", "--repo", "{c2}"],
    ["acks", "--repo", "{c2}"],  # its first network call is another
    ["list", "--repo", "{c2}", "--server", "Code2"],  # the suite decides what it makes of that
    ["list", "--repo", "{c2}", "--server", "code2.lock"],
    ["list", "--repo", "{c2}", "--branch", "-x"],
    ["list", "--repo", "{c2}/coordination"],  # a subfolder: git says where the clone is
    ["list", "--repo"],
], ids=["abbreviated", "help", "double-dash", "acks", "upper-case", "lock", "option-branch",
        "subfolder", "no-value"])
def test_the_guess_starts_nothing_it_cannot_be_sure_of(fleet, argv):
    c2 = _reader(fleet)
    fleet_start.start_poll([arg.format(c2=c2) for arg in argv], unless=("acks",))
    assert not fleet_start._STARTED


def test_a_server_without_a_state_ref_yet_takes_the_listing_its_script_started(fleet, tmp_path, monkeypatch):
    c2 = _reader(fleet)
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "build1", "--json"])
    result = Inbox(str(c2), "build1").unread()
    assert not fleet_start._STARTED and result["count"] == 0
    assert count_commands(git_commands(trace), "ls-remote") == 1


def test_a_linked_worktree_or_a_clone_without_origin_head_starts_nothing(fleet, tmp_path):
    c2 = _reader(fleet)
    linked = tmp_path / "linked"
    git(c2, "worktree", "add", "-q", "--detach", str(linked))
    fleet_start.start_poll(["list", "--repo", str(linked), "--server", "code2"])
    assert not fleet_start._STARTED
    git(c2, "symbolic-ref", "--delete", "refs/remotes/origin/HEAD")
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "code2"])
    assert not fleet_start._STARTED
    fleet_start.start_poll(["list", "--repo", str(c2), "--server", "code2", "--branch", "main"])
    assert len(fleet_start._STARTED) == 2


@pytest.mark.parametrize("script", ["inbox.py", "fleet_status.py"])
def test_a_branch_the_suite_refuses_is_never_fetched_early(fleet, script):
    """A member pushed a commit as refs/heads/HEAD: fetched as "--branch HEAD" it would land on
    origin/HEAD, the symbolic ref, and so move origin/main to it."""
    c2 = _reader(fleet)
    stray = git(fleet.origin, "commit-tree", git(fleet.origin, "rev-parse", "main^{tree}"), "-m", "stray")
    git(fleet.origin, "update-ref", "refs/heads/HEAD", stray)
    before = git(c2, "rev-parse", "refs/remotes/origin/main")
    args = ["list", "--server", "code2"] if script == "inbox.py" else []
    proc = run_script(script, *args, "--repo", str(c2), "--branch", "HEAD")
    assert proc.returncode == 2 and "invalid --branch" in proc.stderr, proc.stderr
    assert git(c2, "rev-parse", "refs/remotes/origin/main") == before


@pytest.mark.usefixtures("no_proxy")
def test_a_command_that_fails_before_its_fetch_does_not_wait_for_the_started_one(fleet, http_git_server):
    c2 = _reader(fleet)
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 30.0  # every answer of the remote takes 30 s
    started = time.monotonic()
    proc = run_script("inbox.py", "list", "--since", "yesterday-ish", "--repo", str(c2), "--server", "code2")
    took = time.monotonic() - started
    assert proc.returncode == 2 and "--since" in proc.stderr, proc.stderr
    assert took < 15, took
    deadline = time.monotonic() + 10
    while _gits_in(c2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _gits_in(c2)


@pytest.mark.skipif(os.name != "posix", reason="SIGINT stands for Ctrl+C")
@pytest.mark.usefixtures("no_proxy")
def test_ctrl_c_while_a_refused_command_stops_its_started_calls_leaves_no_git(fleet, http_git_server):
    import signal

    c2 = _reader(fleet)
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 60.0
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    for _attempt in range(3):  # the signal must land within the grace: a loaded machine may miss it
        proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "inbox.py"), "list", "--since", "yesterday-ish",
                                 "--repo", str(c2), "--server", "code2"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env)
        os.set_blocking(proc.stderr.fileno(), False)
        said = b""
        deadline = time.monotonic() + 30
        while b"--since" not in said and time.monotonic() < deadline:  # refused: now in its calls' grace
            said += proc.stderr.read() or b""
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        os.set_blocking(proc.stderr.fileno(), True)
        err = (said + proc.stderr.read()).decode("utf-8", "replace")
        if proc.returncode != 2:  # 2: the grace was over before the signal came
            break
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "--since" in err
    deadline = time.monotonic() + 5
    while _gits_in(c2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _gits_in(c2)


# Ctrl+C while the script's module loads, stood in for by the import raising it.
_INTERRUPT_IMPORT = """
import sys
class _Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name in ("fleet_report", "fleet_inbox"):
            raise KeyboardInterrupt
        return None
sys.meta_path.insert(0, _Interrupt())
"""


@pytest.mark.usefixtures("no_proxy")
@pytest.mark.parametrize("script, prog", [("fleet_status.py", "fleet_status"), ("inbox.py", "inbox")])
def test_ctrl_c_while_the_suite_loads_is_an_interruption_not_a_crash(fleet, http_git_server, tmp_path, script, prog):
    c2 = _reader(fleet)
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 30.0  # the calls the script started are still waiting when the signal comes
    (tmp_path / "sitecustomize.py").write_text(_INTERRUPT_IMPORT, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    argv = ["--repo", str(c2)] + (["list", "--server", "code2"] if script == "inbox.py" else [])
    if script == "inbox.py":
        argv = argv[2:] + argv[:2]
    proc = subprocess.run([sys.executable, str(PYTHON_DIR / script), *argv], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == f"{prog}: interrupted\n" and proc.stdout == ""
    deadline = time.monotonic() + 5
    while _gits_in(c2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _gits_in(c2)


def _gits_in(folder: Path) -> List[int]:
    found = []
    for proc in psutil.process_iter(["name", "cwd"]):
        try:
            if (proc.info["name"] or "").startswith("git") and proc.info["cwd"] == str(folder.resolve()):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.skipif(not fleet_start.POSIX_SPAWN, reason="os.posix_spawnp is POSIX's")
def test_a_git_started_without_subprocess_answers_as_popen_would(tmp_path):
    import signal

    root = str(tmp_path)
    git(tmp_path, "init", "-q")
    for args in (["version"], ["rev-parse", "--verify", "no-such-ref"]):
        spawned, popen = fleet_start.spawn_git(root, args), fleet_start.popen_git(root, args)
        assert spawned.communicate(timeout=30) == popen.communicate(timeout=30)
        assert spawned.returncode == popen.returncode and spawned.args == popen.args
    slow = fleet_start.spawn_git(root, ["-c", "alias.slow=!echo early; sleep 1; echo late >&2", "slow"])
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        slow.communicate(timeout=0.3)
    assert caught.value.stdout == b"early\n"  # what was read so far, and kept for the next call
    assert slow.communicate(timeout=30) == (b"early\n", b"late\n") and slow.returncode == 0
    hung = fleet_start.spawn_git(root, ["-c", "alias.hang=!sleep 30", "hang"])
    assert hung.poll() is None
    os.killpg(hung.pid, signal.SIGKILL)  # git leads a session of its own, helpers included
    hung.communicate(timeout=30)
    assert hung.returncode == -signal.SIGKILL


@pytest.mark.skipif(not (fleet_start.POSIX_SPAWN and os.path.isdir("/proc/self/fd")), reason="Linux's /proc")
def test_a_git_started_without_subprocess_gets_the_files_and_signals_popen_gives(tmp_path):
    """Only the three streams (a pipe the caller handed down must not stay open in a daemon a
    helper leaves), and the signals Python ignores acting again (SIGPIPE, SIGXFSZ)."""
    root = str(tmp_path)
    git(tmp_path, "init", "-q")
    kept_read, kept_write = os.pipe()
    os.set_inheritable(kept_write, True)
    try:
        show = ["-c", "alias.fds=!ls /proc/$$/fd; grep SigIgn /proc/$$/status", "fds"]
        spawned, popen = fleet_start.spawn_git(root, show), fleet_start.popen_git(root, show)
        seen, expected = (_files_and_ignored(proc.communicate(timeout=30)[0]) for proc in (spawned, popen))
        assert seen == expected and str(kept_write) not in seen[0]
    finally:
        os.close(kept_read)
        os.close(kept_write)


def _files_and_ignored(said: bytes):
    """(the open files, the ignored signals among 1 to 31) from ``ls /proc/PID/fd`` and
    ``SigIgn``; glibc's own signals (32 and 33) are its business."""
    lines = said.decode().split()
    mask = int(lines[lines.index("SigIgn:") + 1], 16)
    return [line for line in lines[:lines.index("SigIgn:")]], mask & 0x7FFFFFFF


def test_a_sha256_clone_reads_its_packed_refs_for_what_they_are(tmp_path):
    """git clone packs origin/<branch>: read as absent, the command's idea of its tip before the
    fetch was wrong (and a packed state ref of its own was missed)."""
    seed = tmp_path / "seed"
    git(tmp_path, "init", "-q", "--object-format=sha256", "-b", "main", str(seed))
    (seed / "coordination").mkdir()
    (seed / "coordination" / "messages.json").write_text('{\n  "messages": []\n}\n', encoding="utf-8")
    git(seed, "add", "-A")
    git(seed, "-c", "user.name=t", "-c", "user.email=t@x.invalid", "commit", "-q", "-m", "create")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    c2 = tmp_path / "code2"
    git(tmp_path, "clone", "-q", str(origin), str(c2))
    tip = git(c2, "rev-parse", "refs/remotes/origin/main")
    assert len(tip) == 64 and not (c2 / ".git" / "refs" / "remotes" / "origin" / "main").exists()  # packed
    fleet_start.start_look(["--repo", str(c2)])
    assert fleet_start.tip_at_start(os.path.realpath(c2), "refs/remotes/origin/main") == tip


def test_the_quick_exit_writes_every_byte_and_keeps_the_exit_status(fleet):
    b1 = fleet.clone("build1")
    c2 = fleet.clone("code2")
    for i in range(3):
        assert send_message("x" * 60_000, f"long {i}", "code2", from_sender="build1", build_repo_path=str(b1))
    listed = run_script("inbox.py", "list", "--bodies", "--json", "--repo", str(c2), "--server", "code2")
    assert listed.returncode == 0, listed.stderr
    assert [len(m["body"]) for m in json.loads(listed.stdout)["messages"]] == [60_000] * 3  # > a pipe's buffer
    counted = run_script("inbox.py", "list", "--count", "--repo", str(c2), "--server", "code2")
    assert (counted.returncode, counted.stdout) == (3, "3\n")


def test_a_profiler_or_a_debugger_still_gets_the_end_of_the_command(fleet, tmp_path):
    c2 = fleet.clone("code2")
    out = tmp_path / "profile.out"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    command = [str(PYTHON_DIR / "inbox.py"), "list", "--repo", str(c2), "--server", "code2"]
    proc = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), *command],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    debugged = subprocess.run([sys.executable, "-m", "pdb", *command], input="c\nq\n", stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert "The program exited via sys.exit(). Exit status: 0" in debugged.stdout, debugged.stdout
    inspected = subprocess.run([sys.executable, "-i", *command], input="print('still here')\n",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert "still here" in inspected.stdout, inspected.stderr


def test_seconds_from_a_timestamp_are_what_datetime_makes_of_it():
    edges = ["2025-11-04T11:10:39Z", "2025-11-04 20:45", "2024-02-29T00:00:00Z", "2023-02-29T00:00:00Z",
             "1900-02-29T00:00:00Z", "2000-02-29T00:00:00Z", "0001-01-01T00:00:00+00:01",
             "0001-01-01T00:00:00-00:01", "9999-12-31T23:59:59-00:01", "9999-12-31T23:59:59+00:01",
             "0000-01-01T00:00:00Z", "2025-13-01T00:00:00Z", "2025-11-04T24:00:00Z", "2025-11-04T23:59:60Z",
             "2025-11-04T11:10:39.123456789Z", "2025-11-04T11:10:39.1+05:30", "2025-11-04T11:10:39+0530",
             "2025-11-04T11:10:39+99:99", " 2025-11-04T11:10Z ", "1969-12-31T23:59:59.999999Z", None, 5, "x"]
    rng = random.Random(7)

    def made_up() -> str:
        text = (f"{rng.choice([1, 1582, 1900, 1970, 2000, 2100, 9999, rng.randint(0, 9999)]):04d}-"
                f"{rng.randint(0, 13):02d}-{rng.randint(0, 32):02d}{rng.choice('T ')}"
                f"{rng.randint(0, 25):02d}:{rng.randint(0, 61):02d}")
        if rng.random() < 0.8:
            text += f":{rng.randint(0, 61):02d}"
        if rng.random() < 0.4:
            text += "." + str(rng.randint(0, 10 ** rng.randint(1, 9)))
        zone = rng.random()
        if zone < 0.3:
            text += "Z"
        elif zone < 0.7:
            text += f"{rng.choice('+-')}{rng.randint(0, 99):02d}{rng.choice([':', ''])}{rng.randint(0, 99):02d}"
        return text

    for value in edges + [made_up() for _ in range(20_000)]:
        moment = parse_timestamp(value)
        assert timestamp_seconds(value) == (moment.timestamp() if moment is not None else None), value
