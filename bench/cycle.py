"""A monitor cycle over a slow link against the floor of one fetch plus one push (issue 16).

A bare ``origin`` is served by ``git daemon`` behind :class:`slowlink.SlowRemote` (0 and 100 ms
round trip). code2's clone reaches it over that link; build1 sends through the local path, so
only the monitor pays the delay. Measured, interleaved with the floor, per round trip time:

* **busy cycle**: one new message for code2 is on the remote; ``Monitor.cycle()`` finds it,
  fetches it, shows it and pushes the read receipt to code2's state ref (``--mark-read on-show``);
* **idle cycle**: nothing new; the cycle is one network call;
* **floor**: plain git in another clone over the same link: ``git fetch origin main`` bringing
  one new commit, then ``git push`` of one new commit to a ref of its own.

Target: busy cycle <= 1.3x the floor at 100 ms.

Usage: ``python3 bench/cycle.py [--quick] [--json] [--results-dir DIR]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl
from slowlink import SlowRemote

SERVER = "code2"
RTTS_MS = (0.0, 100.0)
TARGET_RATIO = 1.3


def _floor(clone: Any, sender: Any, index: int) -> float:
    """One plain fetch (of a new commit) plus one plain push, timed."""
    from send_message import send_message

    send_message(f"floor {index}", to="build2", from_sender="build1", build_repo_path=str(sender))
    tip = bl.git(clone, "rev-parse", "HEAD")
    commit = bl.git(clone, "commit-tree", "-p", tip, "-m", f"floor {index}", f"{tip}^{{tree}}")
    started = time.monotonic()
    bl.git(clone, "fetch", "-q", "origin", bl.BRANCH)
    bl.git(clone, "push", "-q", "origin", f"+{commit}:refs/fleet/floor")
    return time.monotonic() - started


def measure(rtt_ms: float, samples: int) -> Dict[str, Any]:
    from fleet_git import Clone
    from message_monitor import Monitor, ReadingOptions
    from send_message import send_message

    with bl.BenchFleet() as fleet, SlowRemote(fleet.base, rtt_ms) as remote:
        sender = fleet.clone("build1")
        code2 = fleet.clone(SERVER)
        floor = fleet.clone("floor")
        for clone in (code2, floor):
            bl.git(clone, "remote", "set-url", "origin", remote.url("origin.git"))
        monitor = Monitor(Clone(code2), SERVER, 10.0, one_shot=True, auto_reply=False,
                          reading=ReadingOptions(mark_read="on-show"))
        monitor.cycle()  # presence, the first health check: not what is measured
        busy: List[float] = []
        idle: List[float] = []
        floors: List[float] = []
        for index in range(samples):
            send_message(f"busy {index}", to=SERVER, from_sender="build1", build_repo_path=str(sender))
            seconds, report = bl.timed(monitor.cycle)
            if len(report.new_messages) != 1 or report.marked != 1:
                raise RuntimeError(f"busy cycle did not show and mark one message: {report.summary()}")
            busy.append(seconds)
            seconds, report = bl.timed(monitor.cycle)
            if report.new_messages or not report.ok:
                raise RuntimeError(f"idle cycle was not idle: {report.summary()}")
            idle.append(seconds)
            floors.append(_floor(floor, sender, index))
    result = {"rtt_ms": rtt_ms, "samples": samples,
              "busy_median_s": round(bl.median(busy), 4), "idle_median_s": round(bl.median(idle), 4),
              "floor_median_s": round(bl.median(floors), 4)}
    result["busy_vs_floor"] = round(result["busy_median_s"] / result["floor_median_s"], 2)
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("cycle.py", __doc__.splitlines()[0])
    args = parser.parse_args(argv)
    started = time.time()
    samples = 3 if args.quick else 8  # below the monitor's tenth cycle, which checks health
    results = [measure(rtt, samples) for rtt in RTTS_MS]
    figures: List[bl.Figure] = []
    for row in results:
        rtt = int(row["rtt_ms"])
        figures.append(bl.Figure(
            f"cycle.busy_{rtt}ms", f"busy monitor cycle (new mail, shown, receipt pushed), {rtt} ms RTT",
            row["busy_median_s"], "ms", row["floor_median_s"], scale=1000,
            target=("ratio", "<=", TARGET_RATIO) if rtt == max(RTTS_MS) else None,
            note="floor: git fetch + git push over the same link"))
        figures.append(bl.Figure(f"cycle.idle_{rtt}ms", f"idle monitor cycle (one network call), {rtt} ms RTT",
                                 row["idle_median_s"], "ms", row["floor_median_s"], scale=1000))
    return bl.write_report("cycle", figures, {"results": results}, quick=args.quick, started=started,
                           as_json=args.json, results_dir=args.results_dir)


if __name__ == "__main__":
    sys.exit(main())
