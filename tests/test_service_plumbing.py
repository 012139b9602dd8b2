"""fleet_service's plumbing, piece by piece: sd_notify over real datagram sockets, real signals,
real lock holders, unit and task text. (The monitor run as a service end to end: test_monitor_service.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import uuid
from pathlib import Path
from typing import List

import pytest
from conftest import PYTHON_DIR, FakeClock, git

import fleet_service
from fleet_common import SuiteError, UsageError
from fleet_service import (
    WATCHDOG_SEC_DEFAULT,
    AlreadyRunning,
    InstanceLock,
    SystemdNotifier,
    install_stop_handlers,
    interruptible_sleep,
    render_systemd_unit,
    render_task_scheduler,
    self_check,
)

HAS_UNIX_DGRAM = os.name != "nt" and hasattr(socket, "AF_UNIX")
needs_unix = pytest.mark.skipif(not HAS_UNIX_DGRAM, reason="AF_UNIX datagrams (POSIX only)")
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="abstract sockets: Linux")


class Receiver:
    """The systemd side: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(10)

    def recv(self) -> List[str]:
        return self.sock.recv(4096).decode("utf-8").split("\n")

    def pending(self) -> List[List[str]]:
        """Every datagram already queued (a local datagram is queued before sendto returns)."""
        found = []
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    found.append(self.sock.recv(4096).decode("utf-8").split("\n"))
                except BlockingIOError:
                    return found
        finally:
            self.sock.settimeout(10)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path):
    # sun_path holds about 107 bytes; pytest's tmp_path can be longer.
    path = tmp_path / "n.sock"
    if len(str(path)) < 100:
        yield str(path)
        return
    short = tempfile.mkdtemp(prefix="fs")
    try:
        yield os.path.join(short, "n.sock")
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def receiver(sock_path):
    rec = Receiver(sock_path)
    yield rec
    rec.close()


# --------------------------------------------------------------------------- notifier


@needs_unix
def test_notify_messages_over_a_real_socket(receiver, sock_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "30000000"})
    assert n.enabled
    assert n.watchdog_interval() == 30.0

    assert n.ready("monitoring code2")
    assert receiver.recv() == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=monitoring code2"]
    assert n.ready()
    assert receiver.recv() == ["READY=1", f"MAINPID={os.getpid()}"]

    assert n.status("line one\nline two\r\n" + "x" * 300)
    (line,) = receiver.recv()
    assert line.startswith("STATUS=line one line two x")
    assert len(line) == len("STATUS=") + 200

    assert n.watchdog()
    assert receiver.recv() == ["WATCHDOG=1"]
    assert n.stopping()
    assert receiver.recv() == ["STOPPING=1"]
    assert n.reloading()
    reload_lines = receiver.recv()
    assert reload_lines[0] == "RELOADING=1" and reload_lines[1].startswith("MONOTONIC_USEC=")
    assert n.notify("EXTEND_TIMEOUT_USEC=1000", "STATUS=a")
    assert receiver.recv() == ["EXTEND_TIMEOUT_USEC=1000", "STATUS=a"]
    n.close()


@needs_unix
@linux_only
def test_notify_abstract_socket():
    name = f"fleet-test-{uuid.uuid4().hex}"
    rec = Receiver("\0" + name)
    n = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.ready()
        assert rec.recv()[0] == "READY=1"
        assert n.stopping()
        assert rec.recv() == ["STOPPING=1"]
    finally:
        n.close()
        rec.close()


@needs_unix
def test_watchdog_is_rate_limited(receiver, sock_path):
    clock = FakeClock(1000.0)
    n = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "4000000"}, clock=clock)
    assert n.watchdog() is True
    clock.now += 0.5
    assert n.watchdog() is False  # within a quarter of the 4 s interval
    n.keepalive()
    clock.now += 0.5
    assert n.watchdog() is True
    clock.now += 0.99
    n.keepalive()
    clock.now += 0.01
    n.keepalive()
    assert receiver.pending() == [["WATCHDOG=1"]] * 3


@needs_unix
def test_watchdog_pid_of_another_process_disables_the_watchdog(receiver, sock_path):
    other = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "4000000",
                             "WATCHDOG_PID": str(os.getpid() + 1)})
    assert other.watchdog_interval() is None
    assert other.watchdog() is False
    assert other.ready()  # notifications other than the watchdog still go out
    assert receiver.recv()[0] == "READY=1"

    mine = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "4000000",
                            "WATCHDOG_PID": str(os.getpid())})
    assert mine.watchdog_interval() == 4.0
    assert mine.watchdog()
    assert receiver.recv() == ["WATCHDOG=1"]


def test_without_notify_socket_everything_is_a_no_op():
    n = SystemdNotifier({"WATCHDOG_USEC": "4000000"})
    assert not n.enabled
    assert n.watchdog_interval() is None
    assert n.notify("READY=1") is False
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.watchdog() is False
    assert n.stopping() is False
    assert n.reloading() is False
    n.keepalive()
    fleet_service.keepalive()  # process-wide notifier: the hermetic fixture cleared NOTIFY_SOCKET


@needs_unix
def test_missing_socket_returns_false_and_logs_once(tmp_path, caplog):
    n = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    with caplog.at_level("DEBUG", logger="fleet_service"):
        assert n.ready() is False
        assert n.status("x") is False
        assert n.stopping() is False
    notes = [r for r in caplog.records if "notify socket" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "DEBUG"


@needs_unix
def test_bad_watchdog_values_mean_no_watchdog(sock_path):
    for value in ("", "0", "-5", "soon"):
        n = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": value})
        assert n.watchdog_interval() is None


# --------------------------------------------------------------------------- sleeping


@needs_unix
def test_interruptible_sleep_feeds_the_watchdog_and_runs_to_the_end(receiver, sock_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
    stop = threading.Event()
    assert interruptible_sleep(0.5, stop, n) is False
    pings = receiver.pending()
    # Slices of at most 0.2/3 s: several pings over the sleep, never one per 0.5 s.
    assert len(pings) >= 3 and all(p == ["WATCHDOG=1"] for p in pings)


@needs_unix
def test_interruptible_sleep_returns_early_when_stopped(receiver, sock_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "200000"})
    stop = threading.Event()
    seen: List[List[str]] = []

    def stop_after_two_pings() -> None:
        for _ in range(2):
            seen.append(receiver.recv())
        stop.set()

    t = threading.Thread(target=stop_after_two_pings)
    t.start()
    assert interruptible_sleep(3600, stop, n) is True
    t.join(10)
    assert seen == [["WATCHDOG=1"], ["WATCHDOG=1"]]


def test_interruptible_sleep_without_notifier():
    stop = threading.Event()
    assert interruptible_sleep(0, stop) is False
    assert interruptible_sleep(-1, stop) is False
    stop.set()
    assert interruptible_sleep(3600, stop) is True
    assert interruptible_sleep(0, stop) is True


# --------------------------------------------------------------------------- stop signals


def test_stop_handlers_route_sigint_and_restore():
    calls: List[str] = []
    before_int = signal.getsignal(signal.SIGINT)
    before_term = signal.getsignal(signal.SIGTERM)
    restore = install_stop_handlers(calls.append)
    try:
        assert signal.getsignal(signal.SIGINT) is not before_int
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt
        assert calls == ["SIGINT"]
        if hasattr(signal, "SIGHUP"):
            assert signal.getsignal(signal.SIGHUP) is not signal.getsignal(signal.SIGTERM)
    finally:
        restore()
    assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before_term


@needs_unix
def test_stop_handler_may_notify_while_a_notify_is_in_progress(receiver, sock_path):
    n = SystemdNotifier({"NOTIFY_SOCKET": sock_path})
    restore = install_stop_handlers(lambda name: n.stopping(name))
    try:
        with n._lock:  # the signal arrives while the main thread is inside notify()
            signal.raise_signal(signal.SIGINT)
    finally:
        restore()
    assert receiver.recv() == ["STOPPING=1", "STATUS=SIGINT"]


def test_stop_handlers_are_a_no_op_outside_the_main_thread():
    before = signal.getsignal(signal.SIGTERM)
    result = {}

    def worker() -> None:
        result["restore"] = install_stop_handlers(lambda name: None)

    t = threading.Thread(target=worker)
    t.start()
    t.join(10)
    assert signal.getsignal(signal.SIGTERM) is before
    result["restore"]()
    assert signal.getsignal(signal.SIGTERM) is before


STOP_CHILD = textwrap.dedent("""
    import sys, threading
    sys.path.insert(0, sys.argv[1])
    import fleet_service
    stop = threading.Event()
    names = []
    def on_stop(name):
        names.append(name)
        stop.set()
    restore = fleet_service.install_stop_handlers(on_stop)
    print("ready", flush=True)
    while not fleet_service.interruptible_sleep(3600, stop):
        pass
    restore()
    print("stopped by " + names[0], flush=True)
    sys.exit(0)
""")


@posix_only
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_stops_a_real_process_cleanly(tmp_path, signame):
    script = tmp_path / "child.py"
    script.write_text(STOP_CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(PYTHON_DIR)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, getattr(signal, signame))
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip() == f"stopped by {signame}"
    assert "KeyboardInterrupt" not in err


# --------------------------------------------------------------------------- instance lock

HOLDER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from fleet_service import InstanceLock
    lock = InstanceLock(sys.argv[2], sys.argv[3]).acquire()  # a dropped lock is released
    print("locked", flush=True)
    time.sleep(600)
""")


def _start_holder(tmp_path: Path, repo: Path, server: str) -> subprocess.Popen:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(PYTHON_DIR), str(repo), server],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "locked":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"lock holder did not start: {err}")
    return proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_instance_lock_writes_and_removes_the_pid_file(fleet):
    clone = fleet.clone("code2")
    lock = InstanceLock(clone, "Code2")
    with lock:
        assert lock.held
        data = json.loads(lock.pid_path.read_text())
        assert data["pid"] == os.getpid()
        assert data["host"] == socket.gethostname()
        assert data["argv"] == sys.argv
        assert data["started_at"].endswith("Z")
        assert lock.pid_path == clone / "code2" / "state" / "monitor.pid"
        assert lock.lock_path.exists()
        # The runtime folder is never committed (PROTOCOL.md "The fleet repository").
        assert git(clone, "status", "--porcelain") == ""
        # A second monitor in the same process is refused too.
        with pytest.raises(AlreadyRunning, match=rf"\(pid {os.getpid()}\)"):
            InstanceLock(clone, "code2").acquire()
    assert not lock.held
    assert not lock.pid_path.exists()
    lock.release()  # releasing twice is harmless
    with InstanceLock(clone, "code2"):
        pass


def test_second_monitor_in_another_process_is_refused(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    holder = _start_holder(tmp_path, repo, "build1")
    try:
        with pytest.raises(AlreadyRunning) as info:
            InstanceLock(repo, "build1").acquire()
        assert str(info.value) == (
            f"a monitor for server build1 on {repo} is already running (pid {holder.pid})")
        assert info.value.exit_code == 1
        assert info.value.pid == holder.pid
        assert isinstance(info.value, SuiteError)
        # Another server on the same clone is independent.
        with InstanceLock(repo, "build2"):
            pass
    finally:
        _stop(holder)


def test_unreadable_pid_file_says_pid_unknown(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    holder = _start_holder(tmp_path, repo, "code2")
    try:
        pid_file = repo / "code2" / "state" / "monitor.pid"
        pid_file.write_text("{not json")
        with pytest.raises(AlreadyRunning, match=r"already running \(pid unknown\)$"):
            InstanceLock(repo, "code2").acquire()
        assert pid_file.read_text() == "{not json"  # the holder's file is left alone
    finally:
        _stop(holder)


@posix_only
def test_lock_of_a_killed_monitor_does_not_block_a_restart(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    holder = _start_holder(tmp_path, repo, "code2")
    try:
        with pytest.raises(AlreadyRunning, match=rf"\(pid {holder.pid}\)"):
            InstanceLock(repo, "code2").acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(30)
    finally:
        _stop(holder)
    state = repo / "code2" / "state"
    assert (state / "monitor.lock").exists()
    assert json.loads((state / "monitor.pid").read_text())["pid"] == holder.pid
    with InstanceLock(repo, "code2") as lock:
        assert json.loads(lock.pid_path.read_text())["pid"] == os.getpid()
    assert not (state / "monitor.pid").exists()


def test_instance_lock_refuses_bad_input(tmp_path):
    with pytest.raises(UsageError):
        InstanceLock(tmp_path, "../etc")
    with pytest.raises(UsageError, match="does not exist"):
        InstanceLock(tmp_path / "missing", "code2").acquire()


# --------------------------------------------------------------------------- systemd unit

SYNTAX_MARKERS = ("Unknown key", "Unknown section", "Invalid", "Failed to parse", "Missing '='",
                  "is not executable", "Unbalanced quoting", "bad unit file setting")


def _unit(tmp_path: Path, **kw) -> str:
    script = tmp_path / "fleet tools" / "message_monitor.py"
    script.parent.mkdir(exist_ok=True)
    script.write_text("")
    args = dict(python=sys.executable, script=str(script), repo=str(tmp_path), server="code2",
                interval=10)
    args.update(kw)
    return render_systemd_unit(**args)


def _unit_values(text: str, key: str) -> List[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "=")]


def test_systemd_unit_content(tmp_path):
    repo = tmp_path / "Build repo"
    repo.mkdir()
    text = _unit(tmp_path, repo=str(repo), user="fleet", interval=2.5, extra_args=["--verbose"])
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert sections == ["[Unit]", "[Service]", "[Install]"]
    assert _unit_values(text, "Type") == ["notify"]
    assert _unit_values(text, "NotifyAccess") == ["main"]
    assert _unit_values(text, "Restart") == ["always"]
    assert _unit_values(text, "RestartSec") == ["10"]
    assert _unit_values(text, "WatchdogSec") == [str(WATCHDOG_SEC_DEFAULT)]
    assert WATCHDOG_SEC_DEFAULT == 180
    assert _unit_values(text, "After") == ["network-online.target"]
    assert _unit_values(text, "Wants") == ["network-online.target"]
    assert _unit_values(text, "WantedBy") == ["multi-user.target"]
    assert _unit_values(text, "KillSignal") == ["SIGTERM"]
    assert _unit_values(text, "User") == ["fleet"]
    assert int(_unit_values(text, "StartLimitBurst")[0]) > 1
    assert int(_unit_values(text, "StartLimitIntervalSec")[0]) > 0
    assert int(_unit_values(text, "TimeoutStopSec")[0]) >= 60
    assert _unit_values(text, "WorkingDirectory") == [str(repo)]
    envs = _unit_values(text, "Environment")
    assert '"PYTHONUNBUFFERED=1"' in envs
    assert f'"BUILD_REPO_PATH={repo}"' in envs
    assert '"SERVER_ID=code2"' in envs
    (exec_start,) = _unit_values(text, "ExecStart")
    script = tmp_path / "fleet tools" / "message_monitor.py"
    assert exec_start == (f'{sys.executable} "{script}" --repo "{repo}" --server code2 '
                          f"--interval 2.5 --verbose")
    assert text.endswith("\n")


def test_systemd_unit_escaping_and_validation(tmp_path):
    text = _unit(tmp_path, repo="/srv/100%$HOME \"x\"", working_directory="/srv/work",
                 watchdog_sec=240)
    (exec_start,) = _unit_values(text, "ExecStart")
    assert '--repo "/srv/100%%$$HOME \\"x\\""' in exec_start
    assert '"BUILD_REPO_PATH=/srv/100%%$HOME \\"x\\""' in _unit_values(text, "Environment")
    assert _unit_values(text, "WorkingDirectory") == ["/srv/work"]
    assert _unit_values(text, "WatchdogSec") == ["240"]
    assert "User=" not in text
    with pytest.raises(UsageError, match="absolute"):
        _unit(tmp_path, python="python3")
    with pytest.raises(UsageError, match="absolute"):
        _unit(tmp_path, script="message_monitor.py")
    with pytest.raises(UsageError):
        _unit(tmp_path, server="bad/id")
    with pytest.raises(UsageError):
        _unit(tmp_path, interval=0)
    with pytest.raises(UsageError, match="control character"):
        _unit(tmp_path, repo="/srv/a\nExecStartPre=/bin/false")
    with pytest.raises(UsageError):
        _unit(tmp_path, user="root\nUser=x")


def _verify(unit_text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    folder.mkdir(exist_ok=True)
    path = folder / "fleet-monitor.service"
    path.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


def _own_problems(proc: subprocess.CompletedProcess[str]) -> List[str]:
    lines = (proc.stdout + proc.stderr).splitlines()
    return [line for line in lines
            if "fleet-monitor.service" in line and any(m in line for m in SYNTAX_MARKERS)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    repo = tmp_path / "Build repo"
    repo.mkdir()
    unit = _unit(tmp_path, repo=str(repo), extra_args=["--name", "100% $x"])
    proc = _verify(unit, tmp_path / "unit")
    problems = _own_problems(proc)
    assert not problems, "\n".join(problems)
    if proc.returncode != 0:
        pytest.skip(f"systemd-analyze cannot verify here: {(proc.stderr or proc.stdout).strip()[:300]}")

    # The check above can tell a broken unit: the same text with a typo must be caught.
    broken = _verify(unit.replace("RestartSec=10", "RestartSecs=10"), tmp_path / "broken")
    assert _own_problems(broken), broken.stderr


# --------------------------------------------------------------------------- Task Scheduler


def test_task_scheduler_script_with_windows_paths():
    text = render_task_scheduler(python="C:\\Python311\\python.exe",
                                 script="C:\\Fleet Tools\\message_monitor.py",
                                 repo="K:/Projects/Build", server="Code2", interval=10)
    assert ("New-ScheduledTaskAction -Execute 'C:\\Python311\\python.exe' "
            "-Argument '\"C:\\Fleet Tools\\message_monitor.py\" --repo K:/Projects/Build "
            "--server code2 --interval 10' -WorkingDirectory 'K:/Projects/Build'") in text
    assert "$taskName = 'FleetMessageMonitor'" in text
    assert "New-ScheduledTaskTrigger -AtStartup" in text
    assert "-RestartCount 999" in text
    assert "-RestartInterval (New-TimeSpan -Minutes 1)" in text
    assert "-ExecutionTimeLimit ([TimeSpan]::Zero)" in text
    assert "-StartWhenAvailable" in text
    assert "-MultipleInstances IgnoreNew" in text
    assert "New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest" in text
    assert "Register-ScheduledTask -TaskName $taskName" in text and "-Force" in text
    assert text.rstrip().splitlines()[-1] == "Start-ScheduledTask -TaskName $taskName"


def test_task_scheduler_quotes_apostrophes():
    text = render_task_scheduler(python="C:/Users/O'Brien/python.exe",
                                 script="D:/Bob's tools/message_monitor.py",
                                 repo="K:/O'Neil Build", server="build1", interval=30,
                                 task_name="Fleet 'build1'")
    assert "-Execute 'C:/Users/O''Brien/python.exe'" in text
    assert ("-Argument '\"D:/Bob''s tools/message_monitor.py\" --repo \"K:/O''Neil Build\" "
            "--server build1 --interval 30'") in text
    assert "-WorkingDirectory 'K:/O''Neil Build'" in text
    assert "$taskName = 'Fleet ''build1'''" in text
    curly = render_task_scheduler(python="C:/py.exe", script="C:/a\u2019b.py", repo="K:/B",
                                  server="build1", interval=10)
    assert "C:/a\u2019\u2019b.py" in curly
    with pytest.raises(UsageError):
        render_task_scheduler(python="C:/py.exe", script="C:/a.py", repo="K:/B", server="all",
                              interval=10)


# --------------------------------------------------------------------------- self-check, restart


def test_self_check_passes_and_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "never.sock"))
    good = tmp_path / "good.py"
    good.write_text("import os, sys\n"
                    "sys.exit(0 if sys.argv[1:] == ['--self-check'] and "
                    "'NOTIFY_SOCKET' not in os.environ else 9)\n")
    assert self_check(sys.executable, str(good)) is None

    bad = tmp_path / "bad.py"
    bad.write_text("import sys\n"
                   "sys.stderr.write('Traceback (most recent call last):\\n')\n"
                   "sys.stderr.write(\"ModuleNotFoundError: No module named 'fleet_nope'\\n\\n\")\n"
                   "sys.exit(3)\n")
    reason = self_check(sys.executable, str(bad))
    assert reason == "self-check failed (exit 3): ModuleNotFoundError: No module named 'fleet_nope'"

    silent = tmp_path / "silent.py"
    silent.write_text("raise SystemExit(4)\n")
    assert self_check(sys.executable, str(silent)) == "self-check failed (exit 4): no output on stderr"

    reason = self_check(str(tmp_path / "no-such-python"), str(good))
    assert reason is not None and "could not start" in reason and "\n" not in reason


def test_self_check_times_out(tmp_path):
    slow = tmp_path / "slow.py"
    slow.write_text("import time\ntime.sleep(60)\n")
    assert self_check(sys.executable, str(slow), timeout=0.5) == "self-check timed out after 0.5 s"


RESTART_CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    import fleet_service
    if sys.argv[2:] == ["second"]:
        print("second", os.getpid(), flush=True)
        sys.exit(0)
    print("first", os.getpid())  # left in the buffer: restart_process must flush it
    fleet_service.restart_process([sys.argv[0], sys.argv[1], "second"])
    sys.exit(0)
""")


def test_restart_process_runs_the_new_version(tmp_path):
    script = tmp_path / "restart.py"
    script.write_text(RESTART_CHILD)
    proc = subprocess.run([sys.executable, str(script), str(PYTHON_DIR)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines()]
    assert [line[0] for line in lines] == ["first", "second"]
    if os.name != "nt":
        assert lines[0][1] == lines[1][1]  # exec keeps the pid (NotifyAccess=main)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_a_python_path_systemd_would_not_start_is_refused_or_written_as_it_starts(tmp_path):
    """systemd takes the program's path as written: "$$" there is no dollar sign, and a quote or a
    backslash makes it refuse the unit. A "$" path is written as it is; a quote is refused here."""
    folder = tmp_path / "py$env"
    folder.mkdir()
    python = folder / "python3"
    python.symlink_to(sys.executable)
    unit = _unit(tmp_path, python=str(python))
    assert f"ExecStart={python} " in unit
    proc = _verify(unit, tmp_path / "unit")
    assert not [line for line in (proc.stdout + proc.stderr).splitlines()
                if "fleet-monitor.service" in line and "not executable" in line], proc.stderr
    for bad in ('/opt/py"thon/bin/python3', "/opt/py'thon/bin/python3", "/opt/py\\thon/bin/python3"):
        with pytest.raises(UsageError, match="quote or a backslash"):
            _unit(tmp_path, python=bad)
