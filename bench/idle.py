"""What an idle monitor costs: CPU, memory, network calls and disk writes per cycle.

A real ``message_monitor.py --interval 1 --no-auto-reply`` process watches a fleet where nothing
happens. After a warm-up, the benchmark samples it with psutil and reports:

* CPU: user + system time of the monitor and of every git child it waited for, over the wall
  time of the window, as % of one core (target <= 3 % at interval 1);
* RSS of the monitor process, the maximum seen (target <= 30 MB);
* network git calls per idle cycle, counted in ``GIT_TRACE`` output (``ls-remote``, ``fetch``,
  ``push``; target exactly one: the poll's fetch (``--no-write-fetch-head``) that finds nothing new);
* ``cat-file`` calls in the window: an idle cycle must not read (let alone parse) the mailbox;
* files under ``<clone>/code2/`` rewritten during the window (the status file may be rewritten
  at most once a minute: reported, allowed) and whether the mailbox blob changed.

Usage: ``python3 bench/idle.py [--quick] [--json] [--results-dir DIR] [--interval S]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import benchlib as bl

SERVER = "code2"
STATUS_FILE = "state/monitor_status.json"
STATUS_REWRITE_ALLOWED = 60.0  # seconds; PROTOCOL.md lets an idle monitor refresh its status
_TRACE_CMD = re.compile(r"trace: built-in: git (\S+)")
POLL_FETCH = "--no-write-fetch-head"  # the monitor's poll: one per cycle (a fallback cycle: ls-remote)


def _files(folder: Path) -> Dict[str, Tuple[int, int]]:
    found: Dict[str, Tuple[int, int]] = {}
    if not folder.is_dir():
        return found
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            found[path.relative_to(folder).as_posix()] = (st.st_mtime_ns, st.st_size)
    return found


def count_trace(data: bytes) -> Dict[str, int]:
    """How many times each git command started (``built-in`` lines of ``GIT_TRACE``)."""
    counts: Dict[str, int] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        m = _TRACE_CMD.search(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
            if m.group(1) == "fetch" and POLL_FETCH in line:
                counts["poll"] = counts.get("poll", 0) + 1
    return counts


def measure(interval: float, warmup: float, window: float) -> Dict[str, Any]:
    import psutil

    with bl.BenchFleet() as fleet:
        clone = fleet.clone(SERVER)
        trace = fleet.base / "git-trace.log"
        env = dict(os.environ, GIT_TRACE=str(trace))
        out_path = fleet.base / "monitor.out"
        proc = None
        with open(out_path, "wb") as out:
            try:
                proc = bl.start_monitor(clone, SERVER, interval, stdout=out, stderr=out, env=env)
                launched = time.monotonic()
                if not bl.wait_for(bl.monitor_started(clone, SERVER), 60):
                    raise RuntimeError("the monitor did not start: "
                                       + out_path.read_text(errors="replace")[-2000:])
                time.sleep(max(0.0, warmup - (time.monotonic() - launched)))
                # The first cycle's once-a-day duties (the archive pass, on by default) are start-up
                # work, not idling: the window opens after the monitor recorded that pass.
                state = clone / SERVER / "state" / "monitor_state.json"
                bl.wait_for(lambda: state.is_file() and "last_archive_at" in state.read_text(errors="replace"), 60)
                ps = psutil.Process(proc.pid)
                server_dir = clone / SERVER
                files_before = _files(server_dir)
                worktree_mailbox = clone / bl.MAILBOX_PATH
                wt_before = worktree_mailbox.stat().st_mtime_ns
                blob_before = fleet.remote_blob()
                trace_start = trace.stat().st_size if trace.exists() else 0
                cpu0 = ps.cpu_times()
                t0 = time.perf_counter()
                rss: List[float] = []
                changes: Dict[str, int] = {}
                last = dict(files_before)
                while time.perf_counter() - t0 < window:
                    rss.append(ps.memory_info().rss / 2 ** 20)
                    now = _files(server_dir)
                    for name, stamp in now.items():
                        if last.get(name) != stamp:
                            changes[name] = changes.get(name, 0) + 1
                    last = now
                    time.sleep(0.2)
                cpu1 = ps.cpu_times()
                wall = time.perf_counter() - t0
                trace_end = trace.stat().st_size if trace.exists() else 0
                rss.append(ps.memory_info().rss / 2 ** 20)
                files_after = _files(server_dir)
                for name, stamp in files_after.items():
                    if last.get(name) != stamp:
                        changes[name] = changes.get(name, 0) + 1
                blob_after = fleet.remote_blob()
                wt_after = worktree_mailbox.stat().st_mtime_ns
                alive = proc.poll() is None
            finally:
                bl.stop_process(proc)
        with open(trace, "rb") as fh:
            fh.seek(trace_start)
            counts = count_trace(fh.read(trace_end - trace_start))
    cpu = sum(getattr(cpu1, f) - getattr(cpu0, f)
              for f in ("user", "system", "children_user", "children_system"))
    own_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cycles = counts.get("poll", 0) + counts.get("ls-remote", 0)
    network = sum(counts.get(c, 0) for c in ("ls-remote", "fetch", "push"))
    git_total = sum(v for k, v in counts.items() if k not in ("upload-pack", "receive-pack"))
    status_rewrites = changes.get(STATUS_FILE, 0)
    unexpected = {k: v for k, v in changes.items() if k != STATUS_FILE}
    allowed_status = max(1, int(window // STATUS_REWRITE_ALLOWED) + 1)
    if status_rewrites > allowed_status:
        unexpected[STATUS_FILE] = status_rewrites
    return {
        "interval_s": interval, "window_s": wall, "alive_at_end": alive,
        "cpu_percent": 100.0 * cpu / wall, "cpu_percent_own": 100.0 * own_cpu / wall,
        "rss_max_mb": max(rss), "rss_median_mb": bl.median(rss),
        "cycles": cycles, "expected_cycles": wall / interval,
        "network_calls": network, "network_per_cycle": network / cycles if cycles else None,
        "git_processes_per_cycle": git_total / cycles if cycles else None,
        "trace_counts": counts, "cat_file_calls": counts.get("cat-file", 0),
        "file_changes": changes, "status_rewrites": status_rewrites,
        "unexpected_changes": unexpected,
        "mailbox_blob_changed": blob_before != blob_after,
        "worktree_mailbox_changed": wt_before != wt_after,
        "files_before": sorted(files_before),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("idle.py", "CPU, memory, network calls and writes of an idle monitor.")
    parser.add_argument("--interval", type=float, default=1.0, help="monitor interval (default 1)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before sampling (default 5)")
    parser.add_argument("--window", type=float, default=None, help="sample seconds (default 20, quick 8)")
    args = parser.parse_args(argv)
    window = args.window or (8.0 if args.quick else 20.0)
    started = time.time()
    bl.progress(f"idle: monitor --interval {args.interval:g}, warm-up {args.warmup:g} s, "
                f"window {window:g} s")
    r = measure(args.interval, args.warmup, window)
    changed = sorted(r["unexpected_changes"])
    figures = [
        bl.Figure("idle.cpu", f"idle monitor CPU, interval {args.interval:g} s (with git children)",
                  r["cpu_percent"], "% core", target=("measured", "<=", 3.0),
                  note=f"monitor alone {r['cpu_percent_own']:.2f} %"),
        bl.Figure("idle.rss", "idle monitor RSS (max)", r["rss_max_mb"], "MB",
                  target=("measured", "<=", 30.0)),
        bl.Figure("idle.network_per_cycle", "network git calls per idle cycle", r["network_per_cycle"],
                  "", target=("measured", "==", 1.0),
                  note=f"{r['network_calls']} in {r['cycles']} cycles, "
                       f"{r['expected_cycles']:.1f} expected"),
        bl.Figure("idle.git_per_cycle", "git processes per idle cycle", r["git_processes_per_cycle"], ""),
        bl.Figure("idle.cat_file", "cat-file calls in the idle window (mailbox reads)",
                  float(r["cat_file_calls"]), "", target=("measured", "==", 0.0)),
        bl.Figure("idle.files_changed", "files rewritten under code2/ or mailbox blob changed",
                  float(len(changed) + int(r["mailbox_blob_changed"])), "",
                  target=("measured", "==", 0.0),
                  note=(", ".join(changed) or "none") + f"; status file rewritten "
                       f"{r['status_rewrites']}x (allowed once a minute)"),
    ]
    if not r["alive_at_end"]:
        figures[0].note += "; THE MONITOR EXITED"
    return bl.write_report("idle", figures, r, quick=args.quick, started=started, as_json=args.json,
                           results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
