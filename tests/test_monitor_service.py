"""The monitor as a service: systemd notify and watchdog over a real socket, single instance,
clean stops, unit and Task Scheduler output, and upgrade by push."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import PYTHON_DIR, Fleet, git, run_script

from send_message import send_message

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX signals and AF_UNIX datagrams")


def monitor_cmd(repo: Path, *extra: str, script: Path = PYTHON_DIR / "message_monitor.py") -> List[str]:
    return [sys.executable, str(script), "--repo", str(repo), "--server", "code2", *extra]


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class NotifySocket:
    """systemd's side of the notify protocol: a real AF_UNIX datagram socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.received: List[Tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.received.append((time.monotonic(), line))

    def lines(self, prefix: str) -> List[Tuple[float, str]]:
        return [(t, line) for t, line in self.received if line.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@posix_only
def test_notify_ready_status_watchdog_stopping(fleet, tmp_path, git_daemon):
    c2 = fleet.clone("code2")
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="3000000",
               MONITOR_BACKOFF="2,4")
    proc = subprocess.Popen(monitor_cmd(c2, "--interval", "0.3"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: notify.lines("READY=1") and len(notify.lines("STATUS=cycle")) >= 2)
        # the remote goes away: the monitor sits in its 2 s / 4 s backoff (MONITOR_BACKOFF), and
        # must keep feeding the watchdog through those sleeps until the cycle reports the outage
        git(c2, "remote", "set-url", "origin", git_daemon.url("origin.git"))
        git_daemon.stop()
        start = time.monotonic()
        assert wait_for(lambda: [t for t, line in notify.lines("STATUS=cycle")
                                 if t >= start and "remote unreachable" in line])
        pings = [t for t, _ in notify.lines("WATCHDOG=1") if t >= start]
        gaps = [b - a for a, b in zip([start, *pings], pings)]
        assert pings and max(gaps) < 3.0, gaps
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert notify.lines("STOPPING=1")
        assert any(line.startswith("MAINPID=") for _, line in notify.received)
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def test_single_instance_refusal_and_stale_lock_recovery(fleet):
    c2 = fleet.clone("code2")
    first = subprocess.Popen(monitor_cmd(c2, "--interval", "0.5"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        pid_file = c2 / "code2" / "state" / "monitor.pid"
        assert wait_for(pid_file.exists)
        status = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--status")
        assert f"Monitor: running (pid {first.pid})" in status.stdout, status.stdout
        second = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once")
        assert second.returncode == 1
        assert "already running" in second.stderr and str(first.pid) in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        if os.name == "nt":
            first.terminate()
        else:
            first.send_signal(signal.SIGKILL)  # a crash leaves the lock and pid files behind
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (c2 / "code2" / "state" / "monitor.lock").exists()
    status = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--status")
    assert "Monitor: not running" in status.stdout, status.stdout
    again = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once")
    assert again.returncode == 0, again.stderr


def test_print_systemd_unit(fleet, tmp_path):
    c2 = fleet.clone("code2")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--interval", "15",
                      "--print-systemd-unit", "--service-user", "fleet")
    assert proc.returncode == 0, proc.stderr
    unit = proc.stdout
    for expected in ("Type=notify", "Restart=always", "RestartSec=10", "WatchdogSec=",
                     f"ExecStart={sys.executable} {PYTHON_DIR / 'message_monitor.py'}",
                     f"--repo {c2.resolve()}", "--server code2", "--interval 15", "User=fleet"):
        assert expected in unit, (expected, unit)
    watchdog = int(unit.split("WatchdogSec=")[1].split()[0])
    from fleet_git import NETWORK_TIMEOUT

    assert watchdog > NETWORK_TIMEOUT
    if shutil.which("systemd-analyze"):
        path = tmp_path / "fleet-monitor.service"
        path.write_text(unit)
        check = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        for bad in ("Unknown key", "Invalid", "Failed to parse", "Missing '='"):
            assert bad not in check.stderr, check.stderr


def test_print_task_scheduler_with_a_drive_letter_repo():
    proc = run_script("message_monitor.py", "--repo", "K:/Projects/Build", "--server", "code2",
                      "--print-task-scheduler")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "Register-ScheduledTask" in text and "K:/Projects/Build" in text
    assert str(PYTHON_DIR / "message_monitor.py") in text and sys.executable in text


@posix_only
def test_ctrl_c_in_one_shot_commands_exits_130_and_leaves_nothing_half_written(fleet, http_git_server):
    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 3.0
    for cmd in (monitor_cmd(c2, "--once"),
                [sys.executable, str(PYTHON_DIR / "send_message.py"), "hello", "--repo", str(c2),
                 "--from", "code2"]):
        assert wait_for(lambda: http_git_server.active_connections == 0, 30)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert wait_for(lambda: http_git_server.active_connections > 0, 30)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
    leftovers = [p for p in (c2 / "code2").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for path in (c2 / "code2").rglob("*.json"):
        json.loads(path.read_text())
    assert git(c2, "status", "--porcelain") == ""


@posix_only
def test_ctrl_c_in_a_look_at_the_fleet_stops_both_of_its_fetches(fleet, http_git_server):
    """fleet_status (and inbox acks, the same StateStore.mirror_fleet) fetch the branch and list
    the state refs side by side: Ctrl+C stops both at once, not after the remote's answer or the
    network timeout (60 s), and leaves no git (nor its HTTP helper) behind to write refs later."""
    import psutil

    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 45.0
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "fleet_status.py"), "--repo", str(c2)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: http_git_server.active_connections >= 2, 30)  # both wait on the remote
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)  # a fetch left running would hold it for 45 s
    assert proc.returncode == 130, err

    def left_behind() -> list:
        found = []
        for process in psutil.process_iter(["cwd", "cmdline"]):
            if process.info["cwd"] == str(c2.resolve()):
                found.append(process.info["cmdline"])
        return found

    assert wait_for(lambda: not left_behind(), 5), left_behind()


@posix_only
def test_ctrl_c_in_any_network_call_leaves_no_git_helper_behind(fleet, http_git_server):
    """Every git call that talks to the remote (here a send's fetch) stops with its helper
    (git-remote-http) when the command is stopped, not when the remote answers."""
    import psutil

    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 45.0
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "send_message.py"), "hello", "--to", "build1",
                             "--repo", str(c2), "--from", "code2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: http_git_server.active_connections >= 1, 30)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    where = str(c2.resolve())
    assert wait_for(lambda: not [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == where], 5)


def _suite_fleet(tmp_path: Path) -> Tuple[Fleet, Path, Path]:
    """A fleet repository that carries the suite itself (the seed's service layout)."""
    fleet = Fleet(tmp_path)
    seed = fleet.clone("seed")
    shutil.copytree(PYTHON_DIR, seed / "python", ignore=shutil.ignore_patterns("__pycache__"))
    git(seed, "add", "python")
    git(seed, "commit", "-qm", "the suite", "--no-gpg-sign")
    git(seed, "push", "-q", "origin", "main")
    return fleet, seed, fleet.clone("code2")


@posix_only
def test_upgrade_by_push_restarts_into_the_new_version(tmp_path):
    fleet, seed, c2 = _suite_fleet(tmp_path)
    script = c2 / "python" / "message_monitor.py"
    proc = subprocess.Popen(monitor_cmd(c2, "--interval", "0.3", "--mark-read", "on-show", script=script),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    status = c2 / "code2" / "state" / "monitor_status.json"

    def version() -> str:
        try:
            return json.loads(status.read_text()).get("suite_version", "")
        except (OSError, ValueError):
            return ""

    try:
        assert wait_for(lambda: version() == "1.0.0")
        # a broken version is reported, not looped on: the running monitor stays
        common = seed / "python" / "fleet_common.py"
        original = common.read_text()
        common.write_text(original + "\nthis is not python\n")
        git(seed, "commit", "-qam", "broken release", "--no-gpg-sign")
        git(seed, "push", "-q", "origin", "main")
        log = c2 / "code2" / "logs" / "structured.log"
        assert wait_for(lambda: log.exists() and "fails its self-check" in log.read_text())
        assert proc.poll() is None
        # a good version: the monitor finishes its cycle and re-executes itself
        common.write_text(original.replace('SUITE_VERSION: Final = "1.0.0"', 'SUITE_VERSION: Final = "1.0.1"'))
        git(seed, "commit", "-qam", "release 1.0.1", "--no-gpg-sign")
        git(seed, "push", "-q", "origin", "main")
        assert wait_for(lambda: version() == "1.0.1", 60), log.read_text()[-2000:]
        assert proc.poll() is None
        assert send_message("after the upgrade", to="code2", from_sender="build1", build_repo_path=str(seed))
        assert wait_for(lambda: fleet.readers(fleet.remote_messages()[-1]) == {"code2"})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0


def _ssh_key(folder: Path, name: str) -> Tuple[Path, str]:
    """A fresh ed25519 key pair: (private key file, public key line)."""
    key = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    return key, Path(f"{key}.pub").read_text().strip()


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen to sign commits")
def test_upgrade_by_push_runs_only_releases_signed_by_an_allowed_key(tmp_path):
    fleet, seed, c2 = _suite_fleet(tmp_path)
    keys = tmp_path / "keys"
    keys.mkdir()
    release_key, release_pub = _ssh_key(keys, "release")
    other_key, _ = _ssh_key(keys, "intruder")
    signers = keys / "allowed_signers"
    signers.write_text(f"release@fleet.invalid {release_pub}\n")
    script = c2 / "python" / "message_monitor.py"
    log = c2 / "code2" / "logs" / "structured.log"
    common = seed / "python" / "fleet_common.py"
    original = common.read_text()

    def release(version: str, key=None) -> str:
        common.write_text(original.replace('SUITE_VERSION: Final = "1.0.0"',
                                           f'SUITE_VERSION: Final = "{version}"'))
        how = (["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}", "commit", "-S"] if key
               else ["commit", "--no-gpg-sign"])
        git(seed, *how, "-qam", f"release {version}")
        git(seed, "push", "-q", "origin", "main")
        return git(seed, "rev-parse", "HEAD")

    def one_cycle() -> List[dict]:
        proc = subprocess.run(monitor_cmd(c2, "--once", "--no-auto-reply", "--upgrade-signed-by",
                                          str(signers), script=script),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in log.read_text().splitlines()]

    for version, key in (("1.0.1", None), ("1.0.2", other_key)):
        tip = release(version, key)
        records = one_cycle()
        assert git(c2, "rev-parse", "HEAD") != tip  # the working tree is left alone
        assert 'SUITE_VERSION: Final = "1.0.0"' in (c2 / "python" / "fleet_common.py").read_text()
        refused = [r["message"] for r in records if r["level"] == "ERROR" and tip[:12] in r["message"]]
        assert refused and "not signed by a key in" in refused[-1], records[-5:]
        assert not any("restarting into the new version" in r["message"] for r in records)
        assert not any("self-check" in r["message"] for r in records)
    tip = release("1.0.3", release_key)
    records = one_cycle()
    assert git(c2, "rev-parse", "HEAD") == tip
    assert any("restarting into the new version" in r["message"] and tip[:12] in r["message"]
               for r in records), records[-5:]


def test_a_release_commit_too_large_to_be_one_is_refused_unread(fleet, tmp_path):
    """The upgrade check reads a commit another machine wrote: its size is bounded first."""
    from fleet_git import Clone
    from monitor_worktree import MAX_RELEASE_COMMIT_BYTES, release_signature_problem

    c2 = fleet.clone("code2")
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("")
    small = git(c2, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-m", "release 1.2")
    huge = git(c2, "commit-tree", "HEAD^{tree}", "-p", "HEAD", "-F", "-",
               input=b"x" * (MAX_RELEASE_COMMIT_BYTES + 1))
    assert release_signature_problem(Clone(c2), small, str(allowed)) == "the commit is not signed"
    problem = release_signature_problem(Clone(c2), huge, str(allowed))
    assert problem is not None and f"more than the {MAX_RELEASE_COMMIT_BYTES:,}" in problem
