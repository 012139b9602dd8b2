"""What reading mail costs: ``inbox.py`` list, show and search against one ``git fetch``.

Fleets, built before anything is timed: 100 hot messages (half of them to ``code2``) with no
archive; the same with 10,000 messages already archived into ``coordination/archive/`` (2,000 in
quick mode); and, for search only, 50,000 archived (10,000 in quick mode).

Measured on real processes (``python3 python/inbox.py ... --repo R --server code2 --json``), in
rounds interleaved with the floor:

* **list** (the default command) right after another server sent code2 one message (untimed), so
  the list finds the branch moved: one ``git fetch`` of the branch and code2's own state ref (code2
  has read mail before, so it has one), one mailbox read. Floor: one ``git fetch`` of the same new
  commit on the same remote, plus the interpreter's start (``python3 -c pass``). Target: list <= 1.5
  x that floor, with or without the archive (also reported against 1.5 x the fetch plus the
  interpreter's start, the reading the status's target is given). Measured again with code2's
  clone and the floor's reaching the remote over a 100 ms round trip (``bench/slowlink.py``; fewer
  rounds, keys ending in ``.rtt100``, same target); ``--rtt-ms MS`` measures only that list, over
  a link of ``MS``.
* the same list by a server that has never written a state ref (``code1``): it lists the remote
  first (``ls-remote``), since another clone of it could have written one; reported.
* **show ID --peek** of a hot message (nothing moved: one ``ls-remote``), against the same floor;
  ``show`` without ``--peek`` also pushes the read receipt to the state ref (reported).
* **the floor's fetch and a mailbox read, run by Python** (``python3 -c 'import json, subprocess;
  ...'`` in a clone of its own; ``benchlib.python_fetch_argv``), against the same floor: the
  least any Python command that reads mail can cost; reported, on the local path.
* **search WORD --include-archive** over 10,000 and 50,000 archived messages (each archive file
  read once), reported as measured.

Usage: ``python3 bench/inbox.py [--quick] [--json] [--results-dir DIR] [--reps N] [--rtt-ms MS]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl

SERVER = "code2"
NEWCOMER = "code1"  # has mail, has never written a state ref
HOT = 100


def build_fleet(archived: int) -> Dict[str, Any]:
    from fleet_archive import plan_archive
    from fleet_mailbox import serialize

    files: Dict[str, bytes] = {}
    stay: List[Dict[str, Any]] = []
    if archived:
        history = bl.make_messages(archived, read=True, start=1.6e9, step=3000.0)
        stay, moves = plan_archive({"messages": history}, days=0)
        files = {path: serialize({"messages": msgs}) for path, msgs in moves.items()}
    now = time.time()
    hot = bl.make_messages(HOT, read=False, start=now - 5 * 86400, step=5 * 86400 / HOT, seed=3)
    fleet = bl.BenchFleet(bl.mailbox_bytes(stay + hot), files=files)
    for name in (SERVER, "sender", "floor", "python_floor"):
        fleet.clone(name)
    mine = [m for m in hot if m["to"] == SERVER]
    return {"fleet": fleet, "archived": archived, "archive_files": len(files), "hot": HOT,
            "to_code2": len(mine), "show_id": mine[0]["id"] if mine else hot[0]["id"]}


def _inbox(clone: Path, *args: str, server: str = SERVER) -> List[str]:
    return [sys.executable, bl.python_script("inbox.py"), *args, "--repo", str(clone), "--server", server,
            "--json"]


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"inbox.py exited {proc.returncode}: {proc.stderr.decode('utf-8', 'replace')[-2000:]}")


def measure(info: Dict[str, Any], reps: int, rtt_ms: Optional[float] = None) -> Dict[str, List[float]]:
    """Rounds of list (and, on the local path, the other reads) against the floor, with code2's
    clone and the floor's reaching the remote over a link of ``rtt_ms`` (None: the local path);
    the sender's clone stays on the local path, so only the reader pays the delay."""
    from slowlink import linked

    fleet = info["fleet"]
    mine, sender, floor_clone = (fleet.clones[n] for n in (SERVER, "sender", "floor"))
    out: Dict[str, List[float]] = {"list": [], "list_first": [], "show_peek": [], "show": [], "fetch": [],
                                   "interpreter": [], "python_fetch": []}
    with linked(fleet.origin, [mine, floor_clone], rtt_ms):
        _run(_inbox(mine, "show", info["show_id"]))  # code2 has read mail: its state ref exists
        _run(_inbox(mine, "list"))  # warm: the first read fetches everything once
        for i in range(reps):
            bl.progress(f"inbox: {info['archived']} archived{bl.rtt_label(rtt_ms)}, round {i + 1}/{reps}")
            _round(info, out, i, reads=rtt_ms is None)
        if rtt_ms is None:
            out["show"].append(bl.timed(lambda: _run(_inbox(mine, "show", info["show_id"])))[0])
    return out


def _round(info: Dict[str, Any], out: Dict[str, List[float]], i: int, reads: bool) -> None:
    """One round: a message for code2 arrives (untimed), then its list and the floor's fetch in
    alternating order, the interpreter's start, and with ``reads`` the newcomer's list and show."""
    from send_message import send_message

    fleet = info["fleet"]
    mine, sender, floor_clone = (fleet.clones[n] for n in (SERVER, "sender", "floor"))
    if not send_message(f"inbox bench {i}", None, SERVER, from_sender="build1",
                        build_repo_path=str(sender)):
        raise RuntimeError("bench send failed")
    steps = [lambda: out["fetch"].append(bl.timed(lambda: bl.git(floor_clone, "fetch", "-q", "origin",
                                                                   bl.BRANCH))[0]),
             lambda: out["list"].append(bl.timed(lambda: _run(_inbox(mine, "list")))[0])]
    for step in (steps if i % 2 == 0 else list(reversed(steps))):
        step()
    out["interpreter"].append(bl.timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))[0])
    if not reads:
        return
    python_floor = fleet.clones["python_floor"]
    out["python_fetch"].append(bl.timed(lambda: subprocess.run(bl.python_fetch_argv(python_floor), check=True))[0])
    if not info["archived"]:
        if not send_message(f"inbox bench {i} again", None, SERVER, from_sender="build1",
                            build_repo_path=str(sender)):
            raise RuntimeError("bench send failed")
        out["list_first"].append(bl.timed(lambda: _run(_inbox(mine, "list", server=NEWCOMER)))[0])
    out["show_peek"].append(bl.timed(lambda: _run(_inbox(mine, "show", info["show_id"], "--peek")))[0])


def measure_search(archived: int, reps: int) -> float:
    info = build_fleet(archived)
    try:
        argv = _inbox(info["fleet"].clones[SERVER], "search", "build", "--include-archive")
        _run(argv)
        return bl.median([bl.timed(lambda: _run(argv))[0] for _ in range(reps)])
    finally:
        info["fleet"].close()


def reader_figures(info: Dict[str, Any], res: Dict[str, List[float]], rtt_ms: Optional[float]) -> List[bl.Figure]:
    """The list (and on the local path the newcomer's list and show) against fetch + interpreter."""
    archived, key, over = info["archived"], bl.rtt_key(rtt_ms), bl.rtt_label(rtt_ms)
    fetch, start = bl.median(res["fetch"]), bl.median(res["interpreter"])
    floor = fetch + start
    label = f"{HOT} hot" + (f" + {archived} archived" if archived else "") + over
    figures = [bl.Figure(f"inbox.list_{archived}{key}", f"inbox.py list, {label}, after a new message",
                         bl.median(res["list"]), "ms", floor, target=("ratio", "<=", 1.5), scale=1000,
                         note=f"floor fetch {fetch * 1000:.0f} ms + python start {start * 1000:.0f} ms"),
               # The target read the other way, 1.5 x the fetch plus one interpreter start (as the
               # status's "2 x fetch plus interpreter start" is read): reported.
               bl.Figure(f"inbox.list_strict_{archived}{key}",
                         "the same list against 1.5 x fetch + python start", bl.median(res["list"]), "ms",
                         1.5 * fetch + start, scale=1000)]
    if res["list_first"]:
        figures.append(bl.Figure(f"inbox.list_first_{archived}{key}",
                                 f"inbox.py list, {label}, by a server without a state ref yet",
                                 bl.median(res["list_first"]), "ms", floor, scale=1000,
                                 note="ls-remote first, then one fetch"))
    if res["show_peek"]:
        figures.append(bl.Figure(f"inbox.show_{archived}{key}", f"inbox.py show --peek, {label}",
                                 bl.median(res["show_peek"]), "ms", floor, scale=1000,
                                 note=f"show with its read receipt pushed: {res['show'][0] * 1000:.0f} ms"))
    if res["python_fetch"]:
        figures.append(bl.Figure(f"inbox.python_fetch_{archived}{key}",
                                 f"the floor's fetch and a mailbox read by python (import json, subprocess), {label}",
                                 bl.median(res["python_fetch"]), "ms", floor, scale=1000,
                                 note="the least any Python command that reads mail costs"))
    return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("inbox.py", "Cost of inbox.py list, show and search against one git fetch.")
    parser.add_argument("--reps", type=int, default=None, help="rounds per fleet (default 10, quick 3)")
    bl.add_rtt_option(parser)
    args = parser.parse_args(argv)
    reps = args.reps or (3 if args.quick else 10)
    big, huge = (2000, 10000) if args.quick else (10000, 50000)
    started = time.time()
    figures: List[bl.Figure] = []
    details: Dict[str, Any] = {"fleets": []}
    for archived in (0, big):
        bl.progress(f"inbox: building {HOT} hot + {archived} archived")
        info = build_fleet(archived)
        try:
            for rtt_ms, rounds in bl.link_plan(args.rtt_ms, reps, args.quick):
                res = measure(info, rounds, rtt_ms)
                details["fleets"].append({**{k: v for k, v in info.items() if k != "fleet"}, "rtt_ms": rtt_ms,
                                          **res})
                figures += reader_figures(info, res, rtt_ms)
        finally:
            info["fleet"].close()
    for archived in (big, huge) if args.rtt_ms is None else ():  # no network: the local path only
        bl.progress(f"inbox: search over {archived} archived")
        figures.append(bl.Figure(f"inbox.search_{archived}", f"inbox.py search --include-archive, {archived} archived",
                                 measure_search(archived, max(2, reps // 3)), "ms", scale=1000))
    return bl.write_report("inbox", figures, details, quick=args.quick, started=started, as_json=args.json,
                           results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
