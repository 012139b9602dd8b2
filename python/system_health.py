"""Health of one fleet server: disk, memory, CPU, its clone, retry queue, breaker and monitor.

:func:`get_system_health` runs every check and returns::

    {"overall": "HEALTHY"|"WARNING"|"CRITICAL", "server": id, "timestamp": iso,
     "checks": {name: {"status": ..., "message": str, ...values}}}

Checks: ``disk`` (free space of the filesystem holding the clone), ``memory``, ``cpu``,
``repository`` (is it a clone, uncommitted changes, ahead/behind its upstream, stale lock files,
a merge or rebase in progress, size of ``.git``), ``queue`` (the local retry queue),
``circuit_breaker`` (``<server>/state/circuit_breaker.json``) and ``last_fetch`` (age of the
monitor's last successful fetch, from ``<server>/state/monitor_status.json``). ``overall`` is the
worst status. Every threshold can be changed through ``thresholds`` (see
:data:`DEFAULT_THRESHOLDS`). A check that cannot run reports WARNING with ``"error": true``.

Reading health writes nothing: git runs with ``--no-optional-locks`` (no index refresh) and the
state files are read, never repaired or created.

Command line (a Nagios-style plugin)::

    python3 python/system_health.py [PATH] [--server ID] [--json] [--disk-warning-gb X] ...

PATH defaults to ``BUILD_REPO_PATH``, else the current directory. Exit codes follow Nagios:
0 HEALTHY, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (an unexpected error: one line ``UNKNOWN: ...`` on
stdout, where Nagios reads a plugin's output; with ``--json``, ``{"overall": "UNKNOWN", ...}``).
Bad usage also exits 2 (argparse's convention, shared with the whole suite); a monitoring system
sees it as CRITICAL, which is the safe reading of a misconfigured check.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
import sys
import time
from pathlib import Path

import fleet_common
from fleet_cli import ArgumentParser, run_cli
from fleet_common import UsageError
from fleet_git import git_layout, lock_files, lock_name, operation_in_progress
from monitor_files import read_status  # the owner of monitor_status.json

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Final, List, Mapping, Optional, Sequence, Tuple

    Check = Dict[str, Any]

log = logging.getLogger(__name__)

HEALTHY: Final = "HEALTHY"
WARNING: Final = "WARNING"
CRITICAL: Final = "CRITICAL"
_RANK: Final = {HEALTHY: 0, WARNING: 1, CRITICAL: 2}

EXIT_HEALTHY: Final = 0
EXIT_WARNING: Final = 1
EXIT_CRITICAL: Final = 2
EXIT_UNKNOWN: Final = 3

GB: Final = 1024.0 ** 3
MB: Final = 1024.0 ** 2

# ``fetch_warning_seconds`` None means max(10 * the monitor's interval, 300 s).
DEFAULT_THRESHOLDS: Final = {
    "disk_critical_gb": 0.5,
    "disk_warning_gb": 1.0,
    "memory_warning_percent": 95.0,
    "cpu_warning_percent": 95.0,
    "queue_pending_warning": 20,
    "queue_dead_warning": 0,
    "fetch_warning_seconds": None,
    "fetch_critical_seconds": 3600.0,
    "breaker_open_critical_seconds": 3600.0,
}

# What each threshold may be on the command line: nan or inf would silently disable a check.
THRESHOLD_RANGES: Final = {
    "disk_critical_gb": (0.0, 1e9),
    "disk_warning_gb": (0.0, 1e9),
    "memory_warning_percent": (0.0, 100.0),
    "cpu_warning_percent": (0.0, 100.0),
    "queue_pending_warning": (0.0, 1e9),
    "queue_dead_warning": (0.0, 1e9),
    "fetch_warning_seconds": (0.0, 1e9),
    "fetch_critical_seconds": (0.0, 1e9),
    "breaker_open_critical_seconds": (0.0, 1e9),
}

CHECK_NAMES: Final = ("disk", "memory", "cpu", "repository", "queue", "circuit_breaker",
                      "last_fetch")
# How many directory entries the .git size walk may visit: the check must stay cheap on a big
# clone full of loose objects; beyond it the size is reported as a lower bound.
GIT_SIZE_ENTRY_BUDGET: Final = 20000



def worst(statuses: Sequence[str]) -> str:
    """The most severe of some statuses (HEALTHY for none)."""
    return max(statuses, key=lambda status: _RANK.get(status, 1), default=HEALTHY)


def merge_thresholds(thresholds: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Defaults overlaid with ``thresholds``; an unknown key or a non-number is a UsageError."""
    merged = dict(DEFAULT_THRESHOLDS)
    for key, value in (thresholds or {}).items():
        if key not in DEFAULT_THRESHOLDS:
            raise UsageError(f"unknown health threshold {key!r} "
                             f"(known: {', '.join(sorted(DEFAULT_THRESHOLDS))})")
        if value is None:
            merged[key] = DEFAULT_THRESHOLDS[key]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"health threshold {key} must be a number, got {value!r}")
        if not math.isfinite(value):  # nan or inf would silently disable the check
            raise UsageError(f"health threshold {key} must be a finite number, got {value!r}")
        merged[key] = value
    return merged


def _check(status: str, message: str, **values: Any) -> Check:
    result: Check = {"status": status, "message": message}
    result.update(values)
    return result


def _existing_ancestor(path: Path) -> Path:
    current = path.absolute()
    while not current.exists() and current.parent != current:
        current = current.parent
    return current


# --------------------------------------------------------------------------- system checks


def check_disk(repo: Path, th: Mapping[str, Any]) -> Check:
    usage = shutil.disk_usage(str(_existing_ancestor(repo)))
    free_gb = usage.free / GB
    total_gb = usage.total / GB
    percent_used = round(100.0 * usage.used / usage.total, 1) if usage.total else 0.0
    values = {"free_gb": round(free_gb, 2), "total_gb": round(total_gb, 2),
              "percent_used": percent_used}
    text = f"{free_gb:.2f} GB free of {total_gb:.2f} GB ({percent_used:.1f}% used)"
    if free_gb < float(th["disk_critical_gb"]):
        return _check(CRITICAL, f"{text}, under {th['disk_critical_gb']:g} GB", **values)
    if free_gb < float(th["disk_warning_gb"]):
        return _check(WARNING, f"{text}, under {th['disk_warning_gb']:g} GB", **values)
    return _check(HEALTHY, text, **values)


def check_memory(th: Mapping[str, Any]) -> Check:
    import psutil  # lazy: heavy, and only health needs it

    memory = psutil.virtual_memory()
    values = {"percent": float(memory.percent), "used_gb": round(memory.used / GB, 2),
              "available_gb": round(memory.available / GB, 2)}
    text = f"{memory.percent:.1f}% used, {memory.available / GB:.2f} GB available"
    if float(memory.percent) > float(th["memory_warning_percent"]):
        return _check(WARNING, f"{text}, over {th['memory_warning_percent']:g}%", **values)
    return _check(HEALTHY, text, **values)


def _load_average() -> Optional[List[float]]:
    # os.getloadavg exists on POSIX only; Windows has no load average worth reporting.
    getloadavg = getattr(os, "getloadavg", None)
    if getloadavg is None:
        return None
    try:
        return [round(value, 2) for value in getloadavg()]
    except OSError:
        return None


CPU_REUSE_S = 1.0  # a reading this recent answers again: a reading over milliseconds means nothing
CPU_FIRST_SAMPLE_S = 0.2  # the first reading of a process: psutil has nothing to compare with yet
_cpu_reading: List[float] = []  # [monotonic time, percent] of this process's last reading


def cpu_percent() -> float:
    """The machine's CPU use since this process last asked (psutil), at least over
    :data:`CPU_FIRST_SAMPLE_S`: a first reading blocks that long (without it psutil says 0.0), and
    one taken less than :data:`CPU_REUSE_S` ago is given again (two checks a few milliseconds
    apart read 100 and then 0)."""
    import psutil  # lazy

    now = time.monotonic()
    if _cpu_reading and now - _cpu_reading[0] < CPU_REUSE_S:
        return _cpu_reading[1]
    percent = float(psutil.cpu_percent(interval=None if _cpu_reading else CPU_FIRST_SAMPLE_S))
    _cpu_reading[:] = [time.monotonic(), percent]
    return percent


def check_cpu(th: Mapping[str, Any]) -> Check:
    percent = cpu_percent()
    load = _load_average()
    text = f"{percent:.1f}% busy"
    if load is not None:
        text += f", load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    if percent > float(th["cpu_warning_percent"]):
        return _check(WARNING, f"{text}, over {th['cpu_warning_percent']:g}%",
                      percent=percent, load_avg=load)
    return _check(HEALTHY, text, percent=percent, load_avg=load)


# --------------------------------------------------------------------------- repository


def _git_text(repo: Path, *args: str) -> Tuple[int, str]:
    from fleet_git import run_git

    proc = run_git(repo, "--no-optional-locks", *args, check=False)
    return proc.returncode, proc.stdout.decode("utf-8", "surrogateescape")


def count_changes(porcelain_z: str) -> int:
    """Entries of ``git status --porcelain=v1 -z`` (a rename's second path is not counted)."""
    fields = porcelain_z.split("\0")
    count = 0
    index = 0
    while index < len(fields):
        entry = fields[index]
        index += 1
        if len(entry) < 4:
            continue
        count += 1
        if entry[0] in "RC" or entry[1] in "RC":
            index += 1  # -z: the original path follows as its own field
    return count


def _lock_files(git_dir: Path, common_dir: Path, now: float) -> List[Dict[str, Any]]:
    found: List[Dict[str, Any]] = []
    for path in lock_files(git_dir, common_dir):
        try:
            age = now - path.stat().st_mtime
        except OSError:
            continue
        found.append({"path": lock_name(path, common_dir), "age_s": round(max(age, 0.0), 1)})
    return found


def git_dir_size(git_dir: Path, budget: int = GIT_SIZE_ENTRY_BUDGET) -> Tuple[int, bool]:
    """Bytes under ``git_dir`` and whether the walk was complete (it stops after ``budget``)."""
    total = 0
    stack = [str(git_dir)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    budget -= 1
                    if budget < 0:
                        return total, False
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total, True


def check_repository(repo: Path, now: float) -> Check:
    if not repo.is_dir():
        return _check(CRITICAL, f"{repo} does not exist", is_clone=False)
    code, out = _git_text(repo, "rev-parse", "--show-toplevel")
    layout = git_layout(out.strip()) if code == 0 and out.strip() else None
    if layout is None:
        return _check(CRITICAL, f"{repo} is not a git clone", is_clone=False)
    git_dir, common_dir = layout
    ahead, behind = _ahead_behind(repo)
    operation = operation_in_progress(git_dir)
    size, complete = git_dir_size(common_dir)
    values = {
        "is_clone": True,
        "uncommitted_changes": _uncommitted(repo),
        "ahead": ahead,
        "behind": behind,
        "lock_files": _lock_files(git_dir, common_dir, now),
        "operation_in_progress": operation.label if operation else None,
        "git_size_mb": round(size / MB, 1),
        "git_size_complete": complete,
    }
    problems = _repository_problems(values)
    notes = _repository_notes(values, size)
    if problems:
        return _check(WARNING, "; ".join(problems + notes), **values)
    return _check(HEALTHY, "; ".join(notes), **values)


def _uncommitted(repo: Path) -> Optional[int]:
    code, out = _git_text(repo, "status", "--porcelain=v1", "-z", "--untracked-files=no")
    return count_changes(out) if code == 0 else None


def _ahead_behind(repo: Path) -> Tuple[Optional[int], Optional[int]]:
    """Commits ahead of and behind the upstream; ``(None, None)`` without one."""
    code, out = _git_text(repo, "rev-list", "--left-right", "--count", "HEAD...@{upstream}")
    parts = out.split()
    if code == 0 and len(parts) == 2 and all(part.isdigit() for part in parts):
        return int(parts[0]), int(parts[1])
    return None, None


def _repository_problems(values: Mapping[str, Any]) -> List[str]:
    problems: List[str] = []
    if values["operation_in_progress"]:
        problems.append(f"a {values['operation_in_progress']} is in progress")
    if values["lock_files"]:
        problems.append("lock file " + ", ".join(lock["path"] for lock in values["lock_files"]))
    return problems


def _repository_notes(values: Mapping[str, Any], size: int) -> List[str]:
    notes: List[str] = []
    changes, ahead, behind = values["uncommitted_changes"], values["ahead"], values["behind"]
    if changes:
        notes.append(f"{changes} uncommitted change{'s' if changes != 1 else ''}")
    if ahead is None:
        notes.append("no upstream")
    elif ahead or behind:
        notes.append(f"{ahead} ahead, {behind} behind upstream")
    notes.append(f".git {size / MB:.1f} MB{'' if values['git_size_complete'] else '+'}")
    return notes


# --------------------------------------------------------------------------- fleet state


def queue_check_from_stats(stats: Mapping[str, Any], th: Mapping[str, Any],
                           known: bool = True, *, stranded: Optional[str] = None) -> Check:
    """The ``queue`` check for a retry queue's ``stats()``.

    ``stranded``: when no monitor runs for the queue's clone, the command that would deliver it;
    pending messages are then a WARNING, since nothing else will ever send them.
    """
    pending = int(stats.get("pending") or 0)
    dead = int(stats.get("dead") or 0)
    values = {"known": known, "pending": pending, "dead": dead,
              "sent": int(stats.get("sent") or 0),
              "oldest_pending_age_s": stats.get("oldest_pending_age_s"),
              "next_due_in_s": stats.get("next_due_in_s")}
    text = f"{pending} pending, {dead} dead"
    if pending and stranded is not None:
        values["monitor_running"] = False
        values["deliver_command"] = stranded
        return _check(WARNING, f"{text}: no monitor runs on this clone, so nothing will deliver "
                               f"them; run: {stranded}", **values)
    if dead > int(th["queue_dead_warning"]):
        return _check(WARNING, f"{text}: undeliverable messages need attention", **values)
    if pending > int(th["queue_pending_warning"]):
        return _check(WARNING, f"{text}: over {th['queue_pending_warning']} pending", **values)
    return _check(HEALTHY, text, **values)


def check_queue(repo: Path, server: str, th: Mapping[str, Any]) -> Check:
    queue_file = fleet_common.RuntimePaths(repo, server).queue
    try:
        info: Optional[os.stat_result] = os.lstat(queue_file)
    except (FileNotFoundError, NotADirectoryError):
        info = None
    if info is None:
        # Checked before importing: opening a queue must not create its folder (health writes
        # nothing).
        return queue_check_from_stats({}, th, known=True)
    if not stat.S_ISREG(info.st_mode) or fleet_common.is_link(info):
        return _check(WARNING, f"{queue_file.name} is not a regular file (a symlink?); the monitor "
                               "moves it aside", known=False, error=True)
    try:
        import message_queue
    except ImportError:
        check = queue_check_from_stats({}, th, known=False)
        check["message"] = "retry queue module not available; counted as empty"
        return check
    stats = message_queue.MessageQueue(str(repo), server).stats()
    stranded = None
    if stats.get("pending"):
        from fleet_service import deliver_command, monitor_running

        if monitor_running(repo, server) is False:
            stranded = deliver_command(repo, server)
    return queue_check_from_stats(stats, th, stranded=stranded)


# Local state files that health reads (monitor status, breaker state) are small.
STATE_READ_MAX_BYTES: Final = 1024 * 1024


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    """A state file read-only (``None`` when missing); ValueError when it cannot be used.

    Never through a symlink, and within bounds (PROTOCOL.md, "Trust between servers").
    """
    try:
        raw = fleet_common.read_local_file(path, max_bytes=STATE_READ_MAX_BYTES)
        if raw is None:
            return None
        data = fleet_common.load_json_bounded(raw, what=path.name, max_bytes=STATE_READ_MAX_BYTES)
    except fleet_common.SuiteError as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _epoch(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    moment = fleet_common.parse_timestamp(value)
    return moment.timestamp() if moment is not None else None


def check_circuit_breaker(repo: Path, server: str, th: Mapping[str, Any], now: float) -> Check:
    from circuit_breaker import read_state_file

    path = fleet_common.RuntimePaths(repo, server).breaker
    try:
        data = read_state_file(path)
    except (OSError, fleet_common.SuiteError) as exc:
        return _check(WARNING, f"{path.name} is unreadable ({fleet_common.one_line(exc)})", state=None,
                      error=True)
    if data is None:
        return _check(HEALTHY, "closed (no breaker state yet)", state="CLOSED", failure_count=0,
                      open_for_s=None)
    state = str(data.get("state") or "CLOSED").upper()
    failures = data.get("failure_count")
    opened = _epoch(data.get("opened_at"))
    open_for = round(now - opened, 1) if opened is not None and state == "OPEN" else None
    if open_for is not None and open_for < -fleet_common.CLOCK_SKEW_TOLERANCE:
        open_for = None  # opened by a clock far ahead: how long is unknown, never "not yet"
    values = {"state": state, "failure_count": failures, "open_for_s": open_for}
    if state == "OPEN":
        limit = float(th["breaker_open_critical_seconds"])
        since = f" for {fleet_common.format_duration(open_for)}" if open_for is not None else ""
        text = f"open{since} after {failures} failures: git operations are paused"
        if open_for is not None and open_for > limit:
            return _check(CRITICAL, text, **values)
        return _check(WARNING, text, **values)
    if state == "HALF_OPEN":
        return _check(WARNING, "half-open: probing the remote after failures", **values)
    if state != "CLOSED":
        return _check(WARNING, f"unknown breaker state {state!r}", **values)
    return _check(HEALTHY, "closed", **values)


def check_last_fetch(repo: Path, server: str, th: Mapping[str, Any], now: float) -> Check:
    try:
        data = read_status(repo, server)
    except (fleet_common.SuiteError, ValueError, UnicodeDecodeError) as exc:
        return _check(WARNING, f"{fleet_common.STATUS_FILE_NAME} is unreadable ({exc})", known=False, error=True)
    if data is None:
        return _check(HEALTHY, "no monitor has run", known=False)
    try:
        interval = float(data.get("interval") or fleet_common.DEFAULT_INTERVAL)
    except (TypeError, ValueError):
        interval = fleet_common.DEFAULT_INTERVAL
    warn_after = th["fetch_warning_seconds"]
    if warn_after is None:
        warn_after = max(10.0 * interval, 300.0)
    warn_after = float(warn_after)
    critical_after = float(th["fetch_critical_seconds"])
    last_ok = _epoch(data.get("last_fetch_ok_at"))
    values: Dict[str, Any] = {
        "known": True,
        "last_fetch_ok_at": data.get("last_fetch_ok_at"),
        "age_s": round(now - last_ok, 1) if last_ok is not None else None,
        "last_cycle_at": data.get("last_cycle_at"),
        "last_cycle_ok": data.get("last_cycle_ok"),
        "last_error": data.get("last_error"),
        "pid": data.get("pid"),
        "iterations": data.get("iterations"),
        "interval": interval,
        "warning_after_s": warn_after,
        "critical_after_s": critical_after,
    }
    if last_ok is None:
        # The monitor ran but never fetched: judge by how long it has been trying.
        started = _epoch(data.get("started_at"))
        age = now - started if started is not None else None
        text = "no successful fetch since the monitor started"
    else:
        age = now - last_ok
        text = f"last successful fetch {fleet_common.format_duration(age)} ago"
    if data.get("last_error"):
        text += f" (last error: {str(data['last_error']).splitlines()[0][:200]})"
    if age is None or age > critical_after:
        return _check(CRITICAL, text, **values)
    if age > warn_after:
        return _check(WARNING, text, **values)
    if age < -fleet_common.CLOCK_SKEW_TOLERANCE:  # written by a clock far ahead: it says nothing about now
        return _check(WARNING, f"{fleet_common.STATUS_FILE_NAME} is dated "
                               f"{fleet_common.format_duration(-age)} in the future (clock skew)", **values)
    return _check(HEALTHY, text, **values)


# --------------------------------------------------------------------------- all checks


def get_system_health(build_repo_path: Optional[str] = None, server_id: Optional[str] = None,
                      thresholds: Optional[Mapping[str, Any]] = None, *,
                      clock: Optional[Callable[[], float]] = None) -> Dict[str, Any]:
    """Run every check (see the module docstring); writes nothing."""
    repo = Path(build_repo_path if build_repo_path is not None
                else fleet_common.default_repo_path())
    server = fleet_common.resolve_server_id(server_id)
    th = merge_thresholds(thresholds)
    now = (clock or time.time)()
    runners: Dict[str, Callable[[], Check]] = {
        "disk": lambda: check_disk(repo, th),
        "memory": lambda: check_memory(th),
        "cpu": lambda: check_cpu(th),
        "repository": lambda: check_repository(repo, now),
        "queue": lambda: check_queue(repo, server, th),
        "circuit_breaker": lambda: check_circuit_breaker(repo, server, th, now),
        "last_fetch": lambda: check_last_fetch(repo, server, th, now),
    }
    checks: Dict[str, Check] = {}
    for name in CHECK_NAMES:
        try:
            checks[name] = runners[name]()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            log.warning("health check %s failed: %s", name, exc,
                        extra={"metadata": {"check": name}})
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            checks[name] = _check(WARNING, f"check failed: {reason}", error=True)
    return {
        "overall": worst([check["status"] for check in checks.values()]),
        "checks": checks,
        "timestamp": fleet_common.iso_utc(),
        "server": server,
    }


# --------------------------------------------------------------------------- CLI


def format_report(health: Mapping[str, Any]) -> str:
    lines = [f"overall: {health['overall']} (server {health['server']}, {health['timestamp']})"]
    width = max((len(name) for name in health["checks"]), default=0)
    for name, check in health["checks"].items():
        lines.append(f"{name.ljust(width)}  {check['status'].ljust(8)}  {check['message']}")
    return "\n".join(lines) + "\n"


def _option(key: str) -> str:
    return "--" + key.replace("_", "-")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="system_health.py",
        description="Report the health of a fleet server (Nagios exit codes: 0 healthy, "
                    "1 warning, 2 critical, 3 unknown; bad usage also exits 2).",
    )
    parser.add_argument("path", nargs="?", metavar="PATH",
                        help="the server's clone of the Build repo (default: BUILD_REPO_PATH, "
                             "else the current directory)")
    parser.add_argument("--repo", dest="repo", help="same as PATH")
    parser.add_argument("--server", help="server id (default: SERVER_ID, else code2)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    for key, default in DEFAULT_THRESHOLDS.items():
        parser.add_argument(_option(key), dest=key, default=None,
                            type=fleet_common.finite_number(_option(key), *THRESHOLD_RANGES[key]),
                            metavar="N", help=f"threshold (default: {default})"
                            if default is not None else "threshold (default: "
                            "max(10 x monitor interval, 300))")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.path and args.repo and args.path != args.repo:
        parser.error("give the repository either as PATH or as --repo, not both")
    repo = os.path.expanduser(args.path or args.repo or os.environ.get("BUILD_REPO_PATH") or os.getcwd())
    thresholds = {key: getattr(args, key) for key in DEFAULT_THRESHOLDS
                  if getattr(args, key) is not None}
    def unknown(exc: BaseException) -> Tuple[int, str]:
        """Nagios: a check that could not run is UNKNOWN (exit 3), whatever stopped it."""
        line = f"UNKNOWN: system_health failed: {fleet_common.one_line(exc)}"
        if args.json:
            line = fleet_common.dump_json_text({"overall": "UNKNOWN", "error": line}).rstrip("\n")
        return EXIT_UNKNOWN, line

    return run_cli("system_health", lambda: _report(repo, args.server, thresholds, args.json),
                   on_failure=unknown, catch_all=True, failure_stream=sys.stdout)


def _report(repo: str, server: Optional[str], thresholds: Dict[str, float], as_json: bool) -> int:
    health = get_system_health(repo, server, thresholds)
    if as_json:
        fleet_common.write_text(fleet_common.dump_json_text(health))
    else:
        fleet_common.write_text(format_report(health))
    return {HEALTHY: EXIT_HEALTHY, WARNING: EXIT_WARNING}.get(health["overall"], EXIT_CRITICAL)


if __name__ == "__main__":
    raise SystemExit(main())
