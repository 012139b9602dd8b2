"""system_health: every check against real clones and state files, thresholds, CLI exit codes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import git, run_script

import fleet_common
import system_health
from system_health import CRITICAL, HEALTHY, WARNING, get_system_health

# Thresholds under which this machine's disk, memory and CPU are always healthy, so that a test
# only sees the check it is about.
CALM = {"disk_critical_gb": 0, "disk_warning_gb": 0, "memory_warning_percent": 100,
        "cpu_warning_percent": 100}
CALM_ARGS = ["--disk-critical-gb", "0", "--disk-warning-gb", "0",
             "--memory-warning-percent", "100", "--cpu-warning-percent", "100"]
NOW = 1_760_000_000.0


def health(clone, thresholds=None, now=None, server="code2"):
    merged = dict(CALM)
    merged.update(thresholds or {})
    clock = (lambda: now) if now is not None else None
    return get_system_health(str(clone), server, merged, clock=clock)


def state_file(clone: Path, name: str, data) -> Path:
    path = fleet_common.runtime_dir(clone, "code2", "state") / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def snapshot(root: Path):
    found = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            stat = path.stat()
            found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_healthy_clone(fleet):
    clone = fleet.clone("code2")
    result = health(clone)
    assert result["overall"] == HEALTHY, result
    assert result["server"] == "code2"
    assert result["timestamp"].endswith("Z")
    assert list(result["checks"]) == list(system_health.CHECK_NAMES)
    for check in result["checks"].values():
        assert check["status"] in (HEALTHY, WARNING, CRITICAL)
        assert isinstance(check["message"], str) and check["message"]
    repo = result["checks"]["repository"]
    assert (repo["is_clone"], repo["uncommitted_changes"], repo["ahead"], repo["behind"]) == (
        True, 0, 0, 0)
    assert repo["lock_files"] == [] and repo["operation_in_progress"] is None
    assert repo["git_size_mb"] >= 0 and repo["git_size_complete"] is True
    disk = result["checks"]["disk"]
    assert disk["total_gb"] > 0 and 0 <= disk["percent_used"] <= 100
    memory = result["checks"]["memory"]
    assert 0 <= memory["percent"] <= 100 and memory["available_gb"] >= 0
    cpu = result["checks"]["cpu"]
    assert 0 <= cpu["percent"] <= 100
    if hasattr(os, "getloadavg"):
        assert len(cpu["load_avg"]) == 3
    assert result["checks"]["queue"]["pending"] == 0
    assert result["checks"]["circuit_breaker"]["state"] == "CLOSED"
    last_fetch = result["checks"]["last_fetch"]
    assert (last_fetch["status"], last_fetch["known"], last_fetch["message"]) == (
        HEALTHY, False, "no monitor has run")


def test_health_writes_nothing(fleet):
    clone = fleet.clone("code2")
    (clone / "README.md").write_text("edited by a person\n")  # a dirty tree, left as is
    state_file(clone, "circuit_breaker.json", {"version": 1, "state": "CLOSED"})
    before = snapshot(clone)
    health(clone)
    get_system_health(str(clone), "build1", CALM)  # a server with no folder at all
    assert snapshot(clone) == before
    assert not (clone / "build1").exists()
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == "M README.md"


def test_disk_thresholds(fleet):
    clone = fleet.clone("code2")
    warn = health(clone, {"disk_warning_gb": 1e9})
    assert warn["checks"]["disk"]["status"] == WARNING
    assert warn["overall"] == WARNING
    crit = health(clone, {"disk_warning_gb": 1e9, "disk_critical_gb": 1e9})
    assert crit["checks"]["disk"]["status"] == CRITICAL
    assert crit["overall"] == CRITICAL
    assert crit["checks"]["disk"]["free_gb"] < 1e9


def test_memory_and_cpu_thresholds(fleet):
    clone = fleet.clone("code2")
    result = health(clone, {"memory_warning_percent": -1, "cpu_warning_percent": -1})
    assert result["checks"]["memory"]["status"] == WARNING
    assert result["checks"]["cpu"]["status"] == WARNING
    assert result["overall"] == WARNING


def test_unknown_or_bad_threshold_is_usage_error(fleet):
    clone = fleet.clone("code2")
    with pytest.raises(fleet_common.UsageError, match="disk_warn_gb"):
        health(clone, {"disk_warn_gb": 1})
    with pytest.raises(fleet_common.UsageError):
        health(clone, {"disk_warning_gb": "lots"})


def test_merge_in_progress_is_warning(fleet):
    mine = fleet.clone("code2")
    theirs = fleet.clone("build1")
    (theirs / "README.md").write_text("their line\n")
    git(theirs, "commit", "-q", "--no-gpg-sign", "-am", "theirs")
    git(theirs, "push", "-q", "origin", "main")
    (mine / "README.md").write_text("my line\n")
    git(mine, "commit", "-q", "--no-gpg-sign", "-am", "mine")
    git(mine, "fetch", "-q", "origin")
    git(mine, "merge", "--no-edit", "origin/main", check=False)  # conflicts
    assert (mine / ".git" / "MERGE_HEAD").exists()
    repo = health(mine)["checks"]["repository"]
    assert repo["status"] == WARNING
    assert repo["operation_in_progress"] == "merge"
    assert "merge" in repo["message"]
    assert (repo["ahead"], repo["behind"]) == (1, 1)
    assert repo["uncommitted_changes"] >= 1


def test_rebase_in_progress_is_warning(fleet):
    clone = fleet.clone("code2")
    (clone / ".git" / "rebase-merge").mkdir()
    repo = health(clone)["checks"]["repository"]
    assert (repo["status"], repo["operation_in_progress"]) == (WARNING, "rebase")


@pytest.mark.parametrize("lock", ["index.lock", "HEAD.lock", "refs/heads/main.lock"])
def test_lock_file_is_warning(fleet, lock):
    clone = fleet.clone("code2")
    (clone / ".git" / lock).write_bytes(b"")
    result = health(clone)
    repo = result["checks"]["repository"]
    assert repo["status"] == WARNING and result["overall"] == WARNING
    assert [item["path"] for item in repo["lock_files"]] == [lock]
    assert lock in repo["message"]


def test_uncommitted_and_ahead_are_reported_not_warned(fleet):
    clone = fleet.clone("code2")
    (clone / "notes.txt").write_text("new\n")
    git(clone, "add", "notes.txt")
    git(clone, "commit", "-q", "--no-gpg-sign", "-m", "local")
    git(clone, "mv", "README.md", "READ ME.md")  # a rename: two paths, one change
    (clone / "notes.txt").write_text("changed\n")
    (clone / "untracked.txt").write_text("not counted\n")
    repo = health(clone)["checks"]["repository"]
    assert repo["status"] == HEALTHY
    assert repo["uncommitted_changes"] == 2
    assert (repo["ahead"], repo["behind"]) == (1, 0)
    assert "2 uncommitted changes" in repo["message"]


def test_no_upstream(fleet):
    clone = fleet.clone("code2")
    git(clone, "checkout", "-q", "-b", "local-only")
    repo = health(clone)["checks"]["repository"]
    assert repo["status"] == HEALTHY
    assert repo["ahead"] is None and "no upstream" in repo["message"]


def test_not_a_clone_is_critical(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    result = health(plain)
    repo = result["checks"]["repository"]
    assert repo["status"] == CRITICAL and repo["is_clone"] is False
    assert "not a git clone" in repo["message"]
    assert result["overall"] == CRITICAL
    missing = health(tmp_path / "nowhere")
    assert missing["checks"]["repository"]["status"] == CRITICAL
    assert "does not exist" in missing["checks"]["repository"]["message"]
    assert missing["checks"]["disk"]["status"] == HEALTHY  # measured on the nearest parent


def test_circuit_breaker_states(fleet):
    clone = fleet.clone("code2")
    state_file(clone, "circuit_breaker.json",
               {"version": 1, "state": "OPEN", "failure_count": 5, "opened_at": NOW - 120})
    breaker = health(clone, now=NOW)["checks"]["circuit_breaker"]
    assert (breaker["status"], breaker["state"], breaker["failure_count"]) == (WARNING, "OPEN", 5)
    assert breaker["open_for_s"] == 120

    breaker = health(clone, now=NOW + 3600)["checks"]["circuit_breaker"]
    assert breaker["status"] == CRITICAL
    breaker = health(clone, {"breaker_open_critical_seconds": 7200}, now=NOW + 3600)
    assert breaker["checks"]["circuit_breaker"]["status"] == WARNING

    state_file(clone, "circuit_breaker.json", {"version": 1, "state": "half_open",
                                               "failure_count": 5, "opened_at": NOW - 9999})
    assert health(clone, now=NOW)["checks"]["circuit_breaker"]["status"] == WARNING

    state_file(clone, "circuit_breaker.json", {"version": 1, "state": "CLOSED",
                                               "failure_count": 0, "opened_at": None})
    assert health(clone, now=NOW)["checks"]["circuit_breaker"]["status"] == HEALTHY

    state_file(clone, "circuit_breaker.json", "{not json")
    broken = health(clone, now=NOW)["checks"]["circuit_breaker"]
    assert broken["status"] == WARNING and broken["error"] is True
    # Read-only: the broken file is left for its owner to move aside.
    assert (clone / "code2" / "state" / "circuit_breaker.json").read_text() == "{not json"


def _status(last_fetch_ok_at, interval=10, **extra):
    data = {"version": 1, "pid": 4242, "started_at": fleet_common.iso_utc(),
            "last_cycle_at": fleet_common.iso_utc(), "last_cycle_ok": True,
            "last_fetch_ok_at": last_fetch_ok_at, "last_error": None, "iterations": 12,
            "interval": interval}
    data.update(extra)
    return data


def _iso(epoch):
    import datetime as dt

    return fleet_common.iso_utc(dt.datetime.fromtimestamp(epoch, dt.timezone.utc))


def test_last_fetch_ages(fleet):
    clone = fleet.clone("code2")
    state_file(clone, "monitor_status.json", _status(_iso(NOW - 60)))
    fresh = health(clone, now=NOW)["checks"]["last_fetch"]
    assert (fresh["status"], fresh["known"], fresh["age_s"]) == (HEALTHY, True, 60)
    assert fresh["warning_after_s"] == 300  # max(10 x 10 s, 300 s)

    state_file(clone, "monitor_status.json", _status(_iso(NOW - 600)))
    assert health(clone, now=NOW)["checks"]["last_fetch"]["status"] == WARNING

    # A slow monitor (interval 60 s) is allowed ten intervals.
    state_file(clone, "monitor_status.json", _status(_iso(NOW - 500), interval=60))
    assert health(clone, now=NOW)["checks"]["last_fetch"]["status"] == HEALTHY

    state_file(clone, "monitor_status.json",
               _status(_iso(NOW - 7200), last_error="git fetch: Could not resolve host"))
    stale = health(clone, now=NOW)
    assert stale["checks"]["last_fetch"]["status"] == CRITICAL
    assert "Could not resolve host" in stale["checks"]["last_fetch"]["message"]
    assert stale["overall"] == CRITICAL

    relaxed = health(clone, {"fetch_warning_seconds": 10000, "fetch_critical_seconds": 20000},
                     now=NOW)
    assert relaxed["checks"]["last_fetch"]["status"] == HEALTHY
    strict = health(clone, {"fetch_warning_seconds": 10, "fetch_critical_seconds": 1e9}, now=NOW)
    assert strict["checks"]["last_fetch"]["status"] == WARNING


def test_last_fetch_never_succeeded(fleet):
    clone = fleet.clone("code2")
    state_file(clone, "monitor_status.json",
               _status(None, started_at=_iso(NOW - 30), last_error="auth failed"))
    assert health(clone, now=NOW)["checks"]["last_fetch"]["status"] == HEALTHY
    state_file(clone, "monitor_status.json", _status(None, started_at=_iso(NOW - 4000)))
    assert health(clone, now=NOW)["checks"]["last_fetch"]["status"] == CRITICAL


def test_queue_evaluation():
    th = system_health.merge_thresholds(None)
    assert system_health.queue_check_from_stats({"pending": 3}, th)["status"] == HEALTHY
    assert system_health.queue_check_from_stats({"pending": 21}, th)["status"] == WARNING
    dead = system_health.queue_check_from_stats({"pending": 0, "dead": 1, "sent": 4}, th)
    assert dead["status"] == WARNING and dead["dead"] == 1
    th = system_health.merge_thresholds({"queue_pending_warning": 50})
    assert system_health.queue_check_from_stats({"pending": 21}, th)["status"] == HEALTHY


def test_no_queue_file_counts_as_empty(fleet):
    clone = fleet.clone("code2")
    queue = health(clone)["checks"]["queue"]
    assert (queue["status"], queue["pending"], queue["dead"]) == (HEALTHY, 0, 0)
    assert not (clone / "code2").exists()


def test_queue_from_the_real_retry_queue(fleet):
    message_queue = pytest.importorskip("message_queue")
    from fleet_service import InstanceLock

    clone = fleet.clone("code2")
    queue = message_queue.MessageQueue(str(clone), "code2", max_attempts=1)
    queue.enqueue({"id": "msg_1762254639_5f0c9a1be2d4", "from": "code2", "to": "all",
                   "subject": "s", "body": "b"}, "remote unreachable")
    with InstanceLock(clone, "code2"):  # a monitor runs: it delivers what is pending
        check = health(clone)["checks"]["queue"]
        assert (check["status"], check["pending"], check["dead"]) == (HEALTHY, 1, 0)
        assert health(clone, {"queue_pending_warning": 0})["checks"]["queue"]["status"] == WARNING
    queue.increment_attempts("msg_1762254639_5f0c9a1be2d4", "still unreachable")
    check = health(clone)["checks"]["queue"]
    assert (check["status"], check["pending"], check["dead"]) == (WARNING, 0, 1)


def test_pending_mail_with_no_monitor_is_a_warning_naming_the_command(fleet):
    message_queue = pytest.importorskip("message_queue")
    from fleet_service import InstanceLock

    clone = fleet.clone("code2")
    message_queue.MessageQueue(str(clone), "code2").enqueue(
        {"id": "msg_1762254639_5f0c9a1be2d4", "from": "code2", "to": "all", "subject": "s",
         "body": "b"}, "remote unreachable")
    check = health(clone)["checks"]["queue"]
    assert check["status"] == WARNING and check["pending"] == 1
    assert "nothing will deliver" in check["message"]
    assert f"message_monitor.py --once --repo {clone} --server code2" in check["message"]
    # the probe writes nothing: no pid file, and a monitor can still start
    assert not (clone / "code2" / "state" / "monitor.pid").exists()
    with InstanceLock(clone, "code2"):
        assert health(clone)["checks"]["queue"]["status"] == HEALTHY
    status = run_script("message_monitor.py", "--repo", str(clone), "--server", "code2", "--status")
    assert status.returncode == 0, status.stderr
    assert "nothing will deliver" in status.stdout and "--once --repo" in status.stdout
    cycle = run_script("message_monitor.py", "--repo", str(clone), "--server", "code2", "--once",
                       "--no-auto-reply")
    assert cycle.returncode == 0, cycle.stderr
    assert health(clone)["checks"]["queue"]["pending"] == 0


# --------------------------------------------------------------------------- CLI


def test_cli_exit_codes(fleet):
    clone = fleet.clone("code2")
    ok = run_script("system_health.py", str(clone), "--server", "code2", *CALM_ARGS)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("overall: HEALTHY")
    assert len(ok.stdout.splitlines()) == 1 + len(system_health.CHECK_NAMES)

    warn = run_script("system_health.py", str(clone), *CALM_ARGS, "--disk-warning-gb", "1e9")
    assert warn.returncode == 1, warn.stderr
    assert "disk" in warn.stdout and "WARNING" in warn.stdout

    crit = run_script("system_health.py", str(clone), *CALM_ARGS, "--disk-warning-gb", "1e9",
                      "--disk-critical-gb", "1e9", "--json")
    assert crit.returncode == 2, crit.stderr
    report = json.loads(crit.stdout)
    assert report["overall"] == CRITICAL
    assert report["checks"]["disk"]["status"] == CRITICAL
    assert report["server"] == "code2"


def test_cli_path_from_environment(fleet):
    clone = fleet.clone("code2")
    proc = run_script("system_health.py", "--json", *CALM_ARGS,
                      env={"BUILD_REPO_PATH": str(clone), "SERVER_ID": "Build1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["server"] == "build1"
    assert report["checks"]["repository"]["is_clone"] is True


def test_cli_current_directory_default(fleet):
    clone = fleet.clone("code2")
    proc = run_script("system_health.py", *CALM_ARGS, "--json", cwd=str(clone))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["checks"]["repository"]["status"] == HEALTHY


def test_cli_bad_usage(tmp_path, capsys):
    assert system_health.main([str(tmp_path), "--server", "a/b"]) == 2
    assert "invalid server id" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        system_health.main(["--no-such-option"])
    assert exc.value.code == 2


def test_cli_unexpected_error_is_unknown(tmp_path, capsys, monkeypatch):
    def broken(*_args, **_kw):
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(system_health, "get_system_health", broken)
    assert system_health.main([str(tmp_path)]) == 3
    out = capsys.readouterr()
    assert out.out == "UNKNOWN: system_health failed: disk on fire\n" and out.err == ""  # Nagios reads stdout
    assert system_health.main([str(tmp_path), "--json"]) == 3
    assert json.loads(capsys.readouterr().out)["overall"] == "UNKNOWN"


def test_one_failing_check_does_not_hide_others(fleet):
    clone = fleet.clone("code2")
    state_dir = fleet_common.runtime_dir(clone, "code2", "state")
    (state_dir / "monitor_status.json").mkdir()  # a folder where a file belongs
    result = health(clone)
    last_fetch = result["checks"]["last_fetch"]
    assert last_fetch["status"] == WARNING and last_fetch["error"] is True
    assert result["checks"]["repository"]["status"] == HEALTHY


def test_cpu_is_read_over_a_real_span_not_the_milliseconds_between_two_checks(monkeypatch):
    import psutil

    asked = []
    real = psutil.cpu_percent
    monkeypatch.setattr(psutil, "cpu_percent", lambda interval=None: asked.append(interval) or real(interval))
    monkeypatch.setattr(system_health, "_cpu_reading", [])  # a process that has not read it yet
    first = system_health.cpu_percent()
    assert asked == [system_health.CPU_FIRST_SAMPLE_S]  # a first reading samples a span of its own
    assert system_health.cpu_percent() == first  # a check a moment later reuses the reading
    assert 0.0 <= first <= 100.0


def test_a_status_written_by_a_clock_far_ahead_is_no_proof_of_health(fleet):
    c2 = fleet.clone("code2")
    ahead = fleet_common.iso_from_epoch(__import__("time").time() + 365 * 86400)
    status = {"pid": 1, "server": "code2", "started_at": ahead, "last_cycle_at": ahead, "last_cycle_ok": True,
              "last_fetch_ok_at": ahead, "interval": 10, "iterations": 1, "suite_version": "1.0.0"}
    path = fleet_common.RuntimePaths(c2, "code2").state_dir / fleet_common.STATUS_FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, **status}))
    check = get_system_health(str(c2), "code2")["checks"]["last_fetch"]
    assert check["status"] == WARNING and "in the future" in check["message"]
