"""Delivery latency: from ``send_message`` returning to the recipient's monitor showing the mail.

A real ``message_monitor.py --server code2 --no-auto-reply`` process runs with its standard
output piped, so it prints each new message as one ``NEW MESSAGE id=<id> ...`` line; a thread
timestamps every such line as it arrives. The benchmark sends to code2 from another clone (the
in-process ``send_message``) at random offsets: time is cut into periods of one interval and
each period gets its sends at uniformly random offsets, so the sends fall at uniformly random
phases of the monitor's cycle. Latency = line timestamp - the moment ``send_message`` returned.

Run for ``--interval 1`` and ``--interval 10``. Target: median <= interval / 2 + 0.3 s.

Usage: ``python3 bench/latency.py [--quick] [--json] [--results-dir DIR]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl

SERVER = "code2"


class LineWatcher:
    """Reads the monitor's stdout in a thread; remembers when each message id was shown."""

    def __init__(self, proc: "subprocess.Popen[str]") -> None:
        self.proc = proc
        self.seen: Dict[str, float] = {}
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.perf_counter()
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("NEW MESSAGE id="):
                    msg_id = line.split()[2][len("id="):]
                    self.seen.setdefault(msg_id, now)
                    self.cond.notify_all()

    def wait(self, ids: Sequence[str], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(i in self.seen for i in ids):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return False
                self.cond.wait(min(left, 0.5))
        return True


def run_interval(interval: float, samples: int, per_period: int, seed: int, rtt_ms: float = 0.0) -> Dict[str, Any]:
    from fleet_git import Clone
    from send_message import send_message

    rng = random.Random(seed)
    with bl.BenchFleet() as fleet, contextlib.ExitStack() as stack:
        receiver = fleet.clone(SERVER)
        if rtt_ms:  # the receiver's monitor reaches the remote over a slow link (slowlink.py)
            from slowlink import SlowRemote

            remote = stack.enter_context(SlowRemote(fleet.base, rtt_ms))
            bl.git(receiver, "remote", "set-url", "origin", remote.url("origin.git"))
        sender = Clone(fleet.clone("code1"))
        warm = send_message("warm-up", None, SERVER, from_sender="code1", clone=sender)
        err_path = fleet.base / "monitor.err"
        proc = None
        with open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, bl.python_script("message_monitor.py"), "--repo", str(receiver),
                     "--server", SERVER, "--interval", f"{interval:g}", "--no-auto-reply"],
                    stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, text=True,
                    encoding="utf-8", errors="replace", bufsize=1)
                watcher = LineWatcher(proc)
                if not watcher.wait([warm.message_id], 60):
                    raise RuntimeError("the monitor never showed the warm-up message: "
                                       + err_path.read_text(errors="replace")[-2000:])
                sent: Dict[str, float] = {}
                send_seconds: List[float] = []
                retries = 0
                period_start = time.perf_counter()
                periods = -(-samples // per_period)
                for p in range(periods):
                    count = min(per_period, samples - p * per_period)
                    for offset in sorted(rng.uniform(0, interval) for _ in range(count)):
                        delay = period_start + offset - time.perf_counter()
                        if delay > 0:
                            time.sleep(delay)
                        before = sender.push_attempts
                        t0 = time.perf_counter()
                        result = send_message(f"latency probe {len(sent)}", None, SERVER,
                                              from_sender="code1", clone=sender)
                        t1 = time.perf_counter()
                        if not result:
                            raise RuntimeError(f"send failed: {result.status} {result.reason}")
                        retries += sender.push_attempts - before - 1
                        sent[result.message_id] = t1
                        send_seconds.append(t1 - t0)
                    period_start += interval
                complete = watcher.wait(list(sent), 2 * interval + 30)
            finally:
                bl.stop_process(proc)
    latencies = [watcher.seen[i] - t for i, t in sent.items() if i in watcher.seen]
    return {
        "interval_s": interval, "rtt_ms": rtt_ms, "samples": samples, "per_period": per_period,
        "delivered": len(latencies), "complete": complete, "latencies_s": latencies,
        "median_s": bl.median(latencies), "p95_s": bl.p95(latencies),
        "max_s": max(latencies) if latencies else None,
        "send_median_s": bl.median(send_seconds), "send_retries": retries,
        "lines_not_probes": sum(1 for line in watcher.lines if not line.startswith("NEW MESSAGE")),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("latency.py", "Delivery latency from send to the recipient's monitor.")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the send offsets")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    # (interval, samples, sends per period, round trip to the remote in ms; issue 16: at 100 ms
    # the median may be 0.2 s more, interval / 2 + 0.5 s)
    # 40 sends at interval 10: the median of uniformly random phases then varies by about 0.8 s
    # from run to run (by 1.4 s with 12), against a target that sits at its expected value.
    plan = [(1.0, 5, 2, 0.0), (10.0, 3, 3, 0.0)] if args.quick else [
        (1.0, 30, 1, 0.0), (10.0, 40, 4, 0.0), (10.0, 40, 4, 100.0)]
    started = time.time()
    figures: List[bl.Figure] = []
    details: Dict[str, Any] = {"seed": seed, "runs": []}
    for interval, samples, per_period, rtt in plan:
        bl.progress(f"latency: interval {interval:g} s, {samples} sends, {rtt:g} ms round trip")
        r = run_interval(interval, samples, per_period, seed, rtt)
        name = f"i{interval:g}" + (f".rtt{rtt:g}" if rtt else "")
        over = f" over {rtt:g} ms" if rtt else ""
        details["runs"].append(r)
        note = f"{r['delivered']}/{samples} delivered, {r['send_retries']} send retries"
        figures.append(bl.Figure(f"latency.{name}.median", f"delivery latency, interval {interval:g} s{over} "
                                 "(median)", r["median_s"] if r["delivered"] == samples else None, "s",
                                 target=("measured", "<=", interval / 2 + (0.5 if rtt else 0.3)), note=note))
        figures.append(bl.Figure(f"latency.{name}.p95", f"delivery latency, interval {interval:g} s{over} "
                                 "(p95)", r["p95_s"] if r["delivered"] else None, "s"))
    return bl.write_report("latency", figures, details, quick=args.quick, started=started,
                           as_json=args.json, results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
