"""Run every benchmark in sequence and print one combined table of figures against targets.

Each benchmark runs as its own process (``python3 bench/<name>.py``), writes
``<results>/<name>.json``, and its own table goes to standard error as it finishes; the combined
markdown table (figure, measured, floor, ratio, target, pass/fail) goes to standard output and
``<results>/summary.json`` holds everything.

Every figure of the README's Performance table comes from this one run, the ones over a 100 ms
round trip (``bench/slowlink.py``) and the contention configurations included.

``--quick`` is a smoke run that finishes in about two and a half minutes: each benchmark's quick
mode with sample counts trimmed further, and the two benchmarks that mostly wait (``idle``: one
idle monitor; ``latency``: sleeps between sends) overlapping each other.

Usage: ``python3 bench/run_all.py [--quick] [--json] [--results-dir DIR]``.
Exit 0 when every benchmark ran and produced every figure (targets are reported, not
enforced), 1 otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import benchlib as bl

SCRIPTS = ("send", "idle", "history", "latency", "cycle", "contention", "fleet_status", "inbox", "staterefs")
# Extra trimming for --quick, on top of each script's own quick mode (the whole run < 2.5 minutes).
QUICK_ARGS: Dict[str, List[str]] = {
    "send": ["--reps", "6"],
    "idle": [],
    "history": ["--reps", "2"],
    "latency": [],
    "cycle": [],
    "contention": ["--per-sender", "3"],
    "fleet_status": ["--reps", "3"],
    "inbox": ["--reps", "2"],
    "staterefs": [],
}
OVERLAP_IN_QUICK: Tuple[str, ...] = ("idle", "latency")
TIMEOUT = {"quick": 480.0, "full": 5400.0}


def _argv(name: str, quick: bool, results: Path) -> List[str]:
    argv = [sys.executable, str(bl.BENCH_DIR / f"{name}.py"), "--results-dir", str(results)]
    if quick:
        argv += ["--quick", *QUICK_ARGS.get(name, [])]
    return argv


def _start(name: str, quick: bool, results: Path) -> Tuple["subprocess.Popen[str]", float]:
    bl.progress(f"run_all: starting {name}")
    stale = results / f"{name}.json"
    if stale.exists():
        stale.unlink()
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(_argv(name, quick, results), stdout=subprocess.PIPE, stderr=None, text=True,
                            encoding="utf-8", errors="replace", env=env)
    return proc, time.perf_counter()


def _finish(name: str, proc: "subprocess.Popen[str]", started: float, timeout: float,
            results: Path) -> Dict[str, Any]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        out += f"\n{name}: killed after {timeout:g} s\n"
    seconds = time.perf_counter() - started
    sys.stderr.write(out if out.endswith("\n") else out + "\n")
    sys.stderr.flush()
    doc: Optional[Dict[str, Any]] = None
    try:
        doc = json.loads((results / f"{name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    return {"name": name, "returncode": proc.returncode, "seconds": round(seconds, 2),
            "figures": doc["figures"] if doc else [], "details": doc.get("details") if doc else None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("run_all.py", "Run every fleet mailbox benchmark; one combined table.")
    args = parser.parse_args(argv)
    suite_start = bl.suite_state()
    results = Path(args.results_dir) if args.results_dir else bl.RESULTS_DIR
    results.mkdir(parents=True, exist_ok=True)
    timeout = TIMEOUT["quick" if args.quick else "full"]
    started = time.time()
    t0 = time.perf_counter()
    runs: Dict[str, Dict[str, Any]] = {}
    groups: List[Sequence[str]] = [(name,) for name in SCRIPTS]
    if args.quick:
        groups = [(n,) for n in SCRIPTS if n not in OVERLAP_IN_QUICK and n != "contention"]
        groups += [OVERLAP_IN_QUICK, ("contention",)]
    running: Dict[str, Tuple["subprocess.Popen[str]", float]] = {}
    try:
        for group in groups:
            for name in group:
                running[name] = _start(name, args.quick, results)
            for name in group:
                proc, t = running.pop(name)
                runs[name] = _finish(name, proc, t, timeout, results)
    finally:
        for proc, _ in running.values():
            bl.stop_process(proc)
    total = time.perf_counter() - t0

    rows: List[List[str]] = []
    summary_rows: List[Dict[str, Any]] = []
    ok = True
    for name in SCRIPTS:
        run = runs.get(name) or {"returncode": None, "figures": [], "seconds": None}
        if run["returncode"] != 0 or not run["figures"]:
            ok = False
            rows.append([f"{name}: did not complete (exit {run['returncode']})", "n/a", "-", "-", "-", "FAIL"])
            summary_rows.append({"script": name, "key": None, "error": f"exit {run['returncode']}"})
        for data in run["figures"]:
            fig = bl.Figure.from_dict(data)
            if fig.measured is None:
                ok = False
            rows.append(bl.figure_row(fig, prefix=f"{name}: "))
            summary_rows.append({"script": name, **fig.to_dict()})
    failed = [r for r in summary_rows if r.get("pass") is False]
    suite_end = bl.suite_state()
    changed = suite_end["python_digest"] != suite_start["python_digest"]
    summary = {
        "quick": args.quick, "machine": bl.machine(), "started_at": started,
        "suite": {"at_start": suite_start, "at_end": suite_end, "changed_during_run": changed},
        "duration_s": round(total, 1), "ok": ok,
        "scripts": {n: {"returncode": r["returncode"], "seconds": r["seconds"]} for n, r in runs.items()},
        "figures": summary_rows, "failed_targets": [r["key"] for r in failed],
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        m = summary["machine"]
        print(f"## Fleet mailbox benchmarks{' (quick)' if args.quick else ''}: {m['cpu']}, {m['cores']} cores, "
              f"Python {m['python']}, git {m['git']}, {m['platform']}\n")
        print(bl.markdown_table(rows))
        timings = ", ".join(f"{n} {r['seconds']:.0f} s" for n, r in runs.items() if r["seconds"] is not None)
        print(f"\n{total:.0f} s in all ({timings}); {len(failed)} target(s) missed; suite "
              f"{suite_start['commit']}{' + modified python/' if suite_start['python_modified'] else ''}; "
              f"summary in {results / 'summary.json'}")
        if changed:
            print("WARNING: python/ changed during the run; the figures mix versions of the suite")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
