"""Big histories: what a send and a monitor cycle cost as the mailbox grows.

Fleets, built before anything is timed (bodies ~400 characters, direct messages among 8
servers; the same 100 unread messages, none for code2, sit in every main file):

* ``small``: the 100 messages;
* ``archived-10k``: 10,000 more messages, all read, then archived by
  ``message_monitor.py --archive-days 0`` into ``coordination/archive/messages-YYYY-MM.json``,
  so the main file holds the same 100 messages and the history lives in the archive;
* ``main-10k`` and ``main-100k`` (not in quick mode): the 10,000 / 100,000 read messages left
  in the main file (about 7 MB / 70 MB).

Measured, with the fleets interleaved operation by operation so that drift hits them alike:
the in-process send latency (``send_message`` from code1, after an untimed fetch) and one
monitor cycle that finds exactly one new message (a long-lived in-process
``Monitor(Clone(path), "code2", 10, one_shot=True, auto_reply=False)``, warmed by one cycle; the
one message is sent untimed right before). The send floor (fetch + push) is measured on the
small fleet, interleaved with the sends. Target: archived-10k / small <= 1.2 for both.

Usage: ``python3 bench/history.py [--quick] [--json] [--results-dir DIR]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl

RECENT = 100


def _recent() -> List[Dict[str, Any]]:
    return bl.make_messages(RECENT, read=False, start=time.time() - 3600, step=30, avoid=("code2",),
                            seed=11)


def build_fleet(name: str, history: int, archived: bool) -> Dict[str, Any]:
    msgs = bl.make_messages(history, read=True, start=1.6e9, step=3000.0) if history else []
    fleet = bl.BenchFleet(bl.mailbox_bytes(msgs + _recent()))
    del msgs
    info: Dict[str, Any] = {"name": name, "fleet": fleet, "history": history, "archived": archived}
    receiver = fleet.clone("code2")
    if archived:
        proc = subprocess.run([sys.executable, bl.python_script("message_monitor.py"), "--archive-days",
                               "0", "--repo", str(receiver), "--server", "code2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"archive failed: {proc.stdout}{proc.stderr}")
        info["archive_summary"] = proc.stdout.strip()
        tree = bl.git(fleet.origin, "ls-tree", "-r", "-l", f"refs/heads/{bl.BRANCH}", "coordination/archive")
        info["archive_bytes"] = sum(int(line.split()[3]) for line in tree.splitlines())
        info["archive_files"] = len(tree.splitlines())
    fleet.clone("code1")
    info["blob_bytes"] = fleet.remote_blob_size()
    info["main_messages"] = len(fleet.remote_messages())
    return info


def measure(fleets: List[Dict[str, Any]], send_reps: Dict[str, int],
            cycle_reps: Dict[str, int]) -> Dict[str, Any]:
    from fleet_git import Clone
    from message_monitor import Monitor
    from send_message import send_message

    small = fleets[0]["fleet"]
    floor = bl.SendFloor(small)
    sends: Dict[str, List[float]] = {f["name"]: [] for f in fleets}
    cycles: Dict[str, List[float]] = {f["name"]: [] for f in fleets}
    floors: List[float] = []
    counter = [0]

    def send(info: Dict[str, Any], to: str) -> float:
        sender = info["fleet"].clones["code1"]
        bl.git(sender, "fetch", "-q", "origin", bl.BRANCH)
        counter[0] += 1
        seconds, result = bl.timed(lambda: send_message(f"history bench {counter[0]} " + "y" * 380, None,
                                                        to, from_sender="code1",
                                                        build_repo_path=str(sender)))
        if not result:
            raise RuntimeError(f"send failed on {info['name']}: {result.status} {result.reason}")
        return seconds

    rounds = max(send_reps.values())
    for i in range(rounds):
        order = fleets if i % 2 == 0 else list(reversed(fleets))
        for info in order:
            if len(sends[info["name"]]) < send_reps[info["name"]]:
                bl.progress(f"history: send {info['name']} #{len(sends[info['name']]) + 1}")
                sends[info["name"]].append(send(info, "build1"))
            if info is fleets[0]:
                commit = floor.prepare()
                floors.append(bl.timed(lambda c=commit: floor.run(c))[0])

    monitors = {}
    for info in fleets:
        clone = Clone(info["fleet"].clones["code2"])
        monitors[info["name"]] = Monitor(clone, "code2", 10, one_shot=True, auto_reply=False)
        warm = monitors[info["name"]].cycle()
        if not warm.ok:
            raise RuntimeError(f"warm-up cycle failed on {info['name']}: {warm.error}")
    rounds = max(cycle_reps.values())
    for i in range(rounds):
        order = fleets if i % 2 == 0 else list(reversed(fleets))
        for info in order:
            if len(cycles[info["name"]]) >= cycle_reps[info["name"]]:
                continue
            bl.progress(f"history: cycle {info['name']} #{len(cycles[info['name']]) + 1}")
            send(info, "code2")
            seconds, report = bl.timed(monitors[info["name"]].cycle)
            if not report.ok or len(report.new_messages) != 1 or not report.marked:
                raise RuntimeError(f"cycle on {info['name']}: ok={report.ok} error={report.error} "
                                   f"new={len(report.new_messages)} marked={report.marked}")
            cycles[info["name"]].append(seconds)
    return {"sends": sends, "cycles": cycles, "floor": floors}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("history.py", "Send and cycle cost on big mailbox histories.")
    parser.add_argument("--reps", type=int, default=None,
                        help="cap on sends and cycles per fleet (default: 15/8, quick 5/3)")
    args = parser.parse_args(argv)
    started = time.time()
    specs = [("small", 0, False), ("archived-10k", 10000, True), ("main-10k", 10000, False)]
    if not args.quick:
        specs.append(("main-100k", 100000, False))
    send_reps = {"small": 15, "archived-10k": 15, "main-10k": 10, "main-100k": 4}
    cycle_reps = {"small": 8, "archived-10k": 8, "main-10k": 6, "main-100k": 3}
    if args.quick:
        send_reps = {"small": 5, "archived-10k": 5, "main-10k": 3}
        cycle_reps = {"small": 3, "archived-10k": 3, "main-10k": 2}
    if args.reps:
        send_reps = {k: min(v, args.reps) for k, v in send_reps.items()}
        cycle_reps = {k: min(v, args.reps) for k, v in cycle_reps.items()}
    fleets: List[Dict[str, Any]] = []
    try:
        for name, history, archived in specs:
            bl.progress(f"history: building {name}")
            t0 = time.perf_counter()
            fleets.append(build_fleet(name, history, archived))
            fleets[-1]["build_s"] = time.perf_counter() - t0
        res = measure(fleets, send_reps, cycle_reps)
    finally:
        for info in fleets:
            info["fleet"].close()
    details: Dict[str, Any] = {"fleets": [{k: v for k, v in f.items() if k != "fleet"} for f in fleets]}
    details.update(res)
    floor = bl.median(res["floor"])
    send_med = {k: bl.median(v) for k, v in res["sends"].items()}
    cycle_med = {k: bl.median(v) for k, v in res["cycles"].items()}
    blob = {f["name"]: f["blob_bytes"] for f in fleets}
    figures = [
        bl.Figure("history.floor", "send floor (fetch + push), small fleet", floor, "ms", scale=1000),
        bl.Figure("history.small_send", "send, 100-message mailbox", send_med["small"], "ms", floor,
                  scale=1000, note=f"blob {blob['small'] / 1024:.0f} KB"),
        bl.Figure("history.small_cycle", "cycle with 1 new message, 100-message mailbox",
                  cycle_med["small"], "ms", floor, scale=1000),
        bl.Figure("history.archived_send", "send, 10k archived vs 100 messages", send_med["archived-10k"],
                  "ms", send_med["small"], target=("ratio", "<=", 1.2), scale=1000,
                  note=f"floor ratio {send_med['archived-10k'] / floor:.2f}"),
        bl.Figure("history.archived_cycle", "cycle, 10k archived vs 100 messages",
                  cycle_med["archived-10k"], "ms", cycle_med["small"], target=("ratio", "<=", 1.2),
                  scale=1000, note=f"floor ratio {cycle_med['archived-10k'] / floor:.2f}"),
    ]
    for name, label in (("main-10k", "10k"), ("main-100k", "100k")):
        if name not in send_med:
            continue
        size = f"blob {blob[name] / 2 ** 20:.1f} MB"
        figures.append(bl.Figure(f"history.{name}_send".replace("-", "_"),
                                 f"send, {label} messages unarchived vs 100", send_med[name], "ms",
                                 send_med["small"], scale=1000,
                                 note=f"{size}, floor ratio {send_med[name] / floor:.1f}"))
        figures.append(bl.Figure(f"history.{name}_cycle".replace("-", "_"),
                                 f"cycle, {label} messages unarchived vs 100", cycle_med[name], "ms",
                                 cycle_med["small"], scale=1000,
                                 note=f"{size}, floor ratio {cycle_med[name] / floor:.1f}"))
    return bl.write_report("history", figures, details, quick=args.quick, started=started,
                           as_json=args.json, results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
