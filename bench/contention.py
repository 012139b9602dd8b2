"""Eight (or sixteen) servers sending at once while as many monitors read and mark their mail.

Eight clones by default, one per server; on each, a real ``message_monitor.py --interval 1
--no-auto-reply`` (the realistic case: a server's monitor and its command-line sends share the
clone) and, once every monitor has finished a first cycle, a sender process that sends its
messages in a loop (``send_message(..., clone=...)``), addressed round-robin to the other seven
servers. All senders start on the same signal.

Reported: every message on the remote exactly once (counted by id and sender), every read mark
applied (waited for with a deadline), total time, median and p95 send latency, push retries
(attempts - messages), sends that ended in the retry queue, and the aggregate throughput as a
fraction of one sender's throughput measured in the same run with the monitors running (its
messages go to a server that has no monitor, so they cause no read marks).

One run measures every configuration of :data:`SETUPS`, each on its own fleet, its figure keys
prefixed by its name: 8 senders on a local path, 25 messages each (``contention.*``; targets: p95
<= 1 s); 16 senders, 10 each (``contention.s16.*``; throughput >= 0.6); 8
senders whose clones reach the remote over a 100 ms round trip (``bench/slowlink.py``: ``git
daemon`` behind a delaying proxy), 10 each (``contention.rtt100.*``; p95 <= 3 s). Every one: no
message lost or duplicated, every read mark applied. ``--quick`` runs the first and the last with
fewer messages. ``--senders N`` and/or ``--rtt-ms MS`` run that one configuration only.

Usage: ``python3 bench/contention.py [--quick] [--senders N] [--per-sender N] [--rtt-ms MS] [--json]
[--results-dir DIR]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import benchlib as bl

NOBODY = "archive-only"  # a valid server id that no monitor watches


class Setup(NamedTuple):
    """One configuration: its figure keys start ``contention.<name>.`` (``contention.`` if unnamed)."""

    name: str
    senders: int
    rtt_ms: Optional[float]  # None: a local path
    per_sender: Tuple[int, int]  # messages per sender (full, quick); quick 0: not run in quick mode
    p95_s: Optional[float]  # target on the send latency's p95
    throughput: Optional[float]  # target on N senders' throughput against one sender's


# What run_all reports (README: Performance). Over 100 ms every send needs a few round trips, so
# the 8 senders are held to delivering everything within a p95 of 3 s rather than to a throughput.
SETUPS = (
    Setup("", len(bl.SERVERS), None, (25, 5), 1.0, None),
    Setup("s16", 16, None, (10, 0), None, 0.6),
    Setup("rtt100", len(bl.SERVERS), 100.0, (10, 3), 3.0, None),
)


def _senders(fleet: bl.BenchFleet, names: Sequence[str], count: int,
             targets: Dict[str, List[str]]) -> Tuple[float, List[Dict[str, Any]]]:
    pool = bl.SenderPool(fleet.base)
    try:
        for name in names:
            pool.spawn(fleet.clones[name], name, targets[name], count)
        return pool.run()
    finally:
        pool.close()


def _remote_state(fleet: bl.BenchFleet, expected: Dict[Tuple[str, str], str]) -> Dict[str, int]:
    """Missing, duplicated and unread messages among ``expected`` ((id, from) -> recipient).

    Read means a receipt in the recipient's state ref (or, in legacy mode, ``read_by``)."""
    counts: Dict[Tuple[str, str], int] = {}
    unread = set(expected)
    receipts = bl.state_receipts(fleet.origin)
    for msg in fleet.remote_messages():
        key = (str(msg.get("id")), str(msg.get("from")))
        if key not in expected:
            continue
        counts[key] = counts.get(key, 0) + 1
        if expected[key] in (msg.get("read_by") or []) or key in receipts.get(expected[key], ()):
            unread.discard(key)
    return {"missing": sum(1 for k in expected if k not in counts),
            "duplicated": sum(1 for v in counts.values() if v > 1), "unread": len(unread)}


def server_names(count: int) -> List[str]:
    """The usual eight server ids, then ``node9``, ``node10``... up to ``count``."""
    names = list(bl.SERVERS) + [f"node{i}" for i in range(len(bl.SERVERS) + 1, count + 1)]
    return names[:count]


def run(per_sender: int, deadline: float, legacy_marks: bool = False, senders: int = len(bl.SERVERS),
        rtt_ms: Optional[float] = None) -> Dict[str, Any]:
    import psutil
    from slowlink import linked

    servers = server_names(senders)
    procs: List[Any] = []
    with bl.BenchFleet() as fleet:
        for name in servers:
            fleet.clone(name)
        with contextlib.ExitStack() as stack:
            stack.enter_context(linked(fleet.origin, list(fleet.clones.values()), rtt_ms))
            stack.callback(_stop_monitors, procs)
            for name in servers:
                err = open(fleet.base / f"monitor-{name}.log", "wb")  # noqa: SIM115 - closed by _stop_monitors
                extra = ["--no-auto-reply", "--mark-read", "on-show"] + (["--legacy-marks"] if legacy_marks else [])
                procs.append((bl.start_monitor(fleet.clones[name], name, 1.0, stdout=err, stderr=err,
                                               extra=extra), err))
            for name in servers:
                if not bl.wait_for(bl.monitor_started(fleet.clones[name], name), 60):
                    raise RuntimeError(f"monitor {name} did not start: "
                                       + (fleet.base / f"monitor-{name}.log").read_text(errors="replace")[-2000:])
            bl.progress(f"contention: single sender x{per_sender}")
            single = bl.summarize_senders(*_senders(fleet, [servers[0]], per_sender, {servers[0]: [NOBODY]}))
            targets = {name: [s for s in servers[i + 1:] + servers[:i]] for i, name in enumerate(servers)}
            bl.progress(f"contention: {len(servers)} senders x{per_sender}")
            commits_before = int(bl.git(fleet.origin, "rev-list", "--count", bl.BRANCH))
            cpu0 = psutil.cpu_times()
            go = time.perf_counter()
            wall, reports = _senders(fleet, servers, per_sender, targets)
            sent_done = time.perf_counter() - go
            cpu1 = psutil.cpu_times()
            expected: Dict[Tuple[str, str], str] = {}
            for r in reports:
                rcpts = targets[r["sender"]]
                for i, msg_id in enumerate(r["ids"]):
                    expected[(msg_id, r["sender"])] = rcpts[i % len(rcpts)]
            state = _remote_state(fleet, expected)
            limit = time.monotonic() + deadline
            while (state["missing"] or state["unread"]) and time.monotonic() < limit:
                time.sleep(0.5)
                state = _remote_state(fleet, expected)
            all_read_s = time.perf_counter() - go
            subjects = bl.git(fleet.origin, "log", "--format=%s",
                              f"-{int(bl.git(fleet.origin, 'rev-list', '--count', bl.BRANCH)) - commits_before}",
                              bl.BRANCH).splitlines()
            alive = sum(1 for p, _ in procs if p.poll() is None)
        errors = _monitor_errors(fleet.base, servers)
    many = bl.summarize_senders(wall, reports)
    idle = cpu1.idle - cpu0.idle
    total = sum(cpu1) - sum(cpu0)
    return {"cpu_busy_send_phase": 1.0 - idle / total if total > 0 else None,
            "commits": {"sends": sum(1 for t in subjects if " -> " in t),
                        "read_marks": sum(1 for t in subjects if ": mark " in t),
                        "other": sum(1 for t in subjects if " -> " not in t and ": mark " not in t)},
            "servers": len(servers), "rtt_ms": rtt_ms, "per_sender": per_sender, "single": single, "contention": many,
            "send_phase_s": sent_done, "all_read_s": all_read_s, "final": state,
            "monitors_alive_at_end": alive, "monitor_warnings": errors}


def _stop_monitors(procs: List[Any]) -> None:
    for proc, _ in procs:
        if proc.poll() is None:
            proc.terminate()  # all at once: each finishes its current step in parallel
    for proc, err in procs:
        bl.stop_process(proc)
        err.close()


def _monitor_errors(base: Path, servers: Sequence[str]) -> Dict[str, List[str]]:
    """Warnings and whole tracebacks from each monitor's console output (for the report)."""
    found: Dict[str, List[str]] = {}
    for name in servers:
        path = base / f"monitor-{name}.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad: List[str] = []
        in_trace = False
        for line in lines:
            if line.startswith("Traceback"):
                in_trace = True
            if in_trace or any(w in line for w in ("WARNING", "ERROR", "CRITICAL")):
                bad.append(line)
            if in_trace and line and not line.startswith((" ", "Traceback")):
                in_trace = False
        if bad:
            found[name] = bad[:60]
    return found


def setup_for(senders: Optional[int], rtt_ms: Optional[float]) -> Setup:
    """The configuration ``--senders``/``--rtt-ms`` ask for: one of :data:`SETUPS` (with its
    targets) when it matches, else one reported with the delivery targets only."""
    senders = senders or len(bl.SERVERS)
    name = ".".join(([f"s{senders}"] if senders != len(bl.SERVERS) else [])
                    + ([f"rtt{rtt_ms:g}"] if rtt_ms is not None else []))
    return next((c for c in SETUPS if c.name == name), Setup(name, senders, rtt_ms, (25, 5), None, None))


def setup_figures(setup: Setup, r: Dict[str, Any]) -> List[bl.Figure]:
    c, s, f = r["contention"], r["single"], r["final"]
    key = "contention." + (setup.name + "." if setup.name else "")
    who = f"{r['servers']} senders{bl.rtt_label(setup.rtt_ms)}"
    fraction = c["per_s"] / s["per_s"] if c["per_s"] and s["per_s"] else None
    figures = [
        bl.Figure(key + "lost_or_duplicated", f"{who}: {r['servers']}x{r['per_sender']} messages lost or duplicated",
                  float(f["missing"] + f["duplicated"]), "", target=("measured", "==", 0.0),
                  note=f"{f['missing']} missing, {f['duplicated']} duplicated"),
        bl.Figure(key + "unread", f"{who}: messages without their read mark at the end",
                  float(f["unread"]), "", target=("measured", "==", 0.0),
                  note=f"all read {r['all_read_s']:.1f} s after the start"),
        bl.Figure(key + "total_time", f"{who}: time to send all messages", r["send_phase_s"], "s"),
        bl.Figure(key + "send_median", f"{who}: send latency under contention (median)",
                  c["latency_median_s"], "ms", scale=1000),
        bl.Figure(key + "send_p95", f"{who}: send latency under contention (p95)", c["latency_p95_s"], "ms",
                  scale=1000, note=f"max {c['latency_max_s'] * 1000:.0f} ms",
                  target=("measured", "<=", setup.p95_s) if setup.p95_s is not None else None),
        bl.Figure(key + "retries", f"{who}: push retries (attempts - messages)", float(c["retries"]), "",
                  note=f"{c['push_attempts']} pushes for {c['messages']} messages; "
                       f"statuses {c['statuses']}"),
        bl.Figure(key + "throughput", f"{who} vs 1 sender throughput", fraction, "x", ratio=fraction,
                  target=("ratio", ">=", setup.throughput) if setup.throughput is not None else None,
                  note=f"{c['per_s']:.1f} vs {s['per_s']:.1f} msg/s; CPU "
                       f"{100 * (r['cpu_busy_send_phase'] or 0):.0f} % busy; "
                       f"{r['commits']['read_marks']} read-mark commits beside {r['commits']['sends']} sends"),
    ]
    if r["monitors_alive_at_end"] != r["servers"]:
        figures[1].note += f"; only {r['monitors_alive_at_end']} monitors alive"
    return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("contention.py", "8 (or N) senders and as many monitors on one fleet.")
    parser.add_argument("--senders", type=int, default=None,
                        help="racing senders; with --rtt-ms, runs only that configuration (default: all)")
    parser.add_argument("--rtt-ms", type=float, default=None,
                        help="remote behind a delaying proxy with this round trip (default: a local path)")
    parser.add_argument("--per-sender", type=int, default=None,
                        help="messages per sender in every configuration (default: each one's own)")
    parser.add_argument("--legacy-marks", action="store_true",
                        help="monitors also write read marks into the mailbox (how fleets ran before state refs)")
    args = parser.parse_args(argv)
    if args.senders is not None and args.senders < 2:
        parser.error("--senders: at least 2")
    single = args.senders is not None or args.rtt_ms is not None
    setups = ([setup_for(args.senders, args.rtt_ms)] if single
              else [c for c in SETUPS if c.per_sender[1] or not args.quick])
    started = time.time()
    figures: List[bl.Figure] = []
    details: Dict[str, Any] = {}
    for setup in setups:
        per_sender = args.per_sender or (args.quick and setup.per_sender[1]) or setup.per_sender[0]
        bl.progress(f"contention: {setup.senders} senders{bl.rtt_label(setup.rtt_ms)}, {per_sender} each")
        r = run(per_sender, 30.0 if args.quick else 90.0, legacy_marks=args.legacy_marks,
                senders=setup.senders, rtt_ms=setup.rtt_ms)
        details[setup.name or "default"] = r
        figures += setup_figures(setup, r)
    return bl.write_report("contention", figures, details, quick=args.quick, started=started, as_json=args.json,
                           results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
