"""What a look at the fleet costs: ``fleet_status.py`` against one ``git fetch``, and the page's size.

Fleets, built before anything is timed, one per size (10 and 50 servers): 10,000 read messages
among the servers already archived into ``coordination/archive/`` (2,000 in quick mode), 200
recent messages in the hot mailbox, and a state ref per server holding its presence (a few of
them stale) and read receipts for half of its recent mail.

Measured, per fleet, on a real process (``python3 python/fleet_status.py --repo R --json``):

* *moved*: right before each run (untimed) one message is sent and one server publishes a new
  presence, as a cron job every minute would find; the run then fetches the branch and that
  state ref (on the local path one fetch, the remote's refs read from its files; over a link a
  listing and two fetches). Floor, timed in the same rounds on the same remote: one ``git
  fetch`` of the shared branch that brings the new commit, and the interpreter's start
  (``python3 -c pass``). Target: status <= 2 x fetch + interpreter start (ratio <= 1.0),
  whatever the archive.
* *idle*: nothing moved since the previous run (on the local path no fetch at all; over a link
  one ``ls-remote`` and the branch's fetch, which brings nothing); reported.
* *the fetch run by Python*: a Python process that imports json and subprocess, runs the fetch of
  the branch and the state refs the status runs on the local path, and parses the mailbox
  (``benchlib.python_fetch_argv``), in a clone of its own, against the same floor: the least any
  Python command that looks at the fleet can cost; reported, on the local path.
* the page (``--html``) for 50 servers: its size in KB; reported.
* the CPU the status and its git processes use (user + system time of the process and its
  children), after a send and with nothing moved, against the same floor's (2 x the fetch's + the
  interpreter's start): on a machine with few cores a look is bound by CPU; reported, on the local
  path, where the system can tell (``resource``).

The status and its floor are measured again with the viewer's clone and the floor's reaching the
remote over a 100 ms round trip (``bench/slowlink.py``; fewer rounds, keys ending in ``.rtt100``,
same target); ``--rtt-ms MS`` measures only over a link of ``MS``.

Usage: ``python3 bench/fleet_status.py [--quick] [--json] [--results-dir DIR] [--reps N] [--rtt-ms MS]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl

SIZES = (10, 50)
RECENT = 200
STALE_EVERY = 7  # every 7th server's presence is an hour old


def _servers(count: int) -> List[str]:
    return [f"srv{i:02d}" for i in range(count)]


def build_fleet(count: int, archived: int) -> Dict[str, Any]:
    """A fleet whose history is archived, with ``count`` servers publishing state refs."""
    from fleet_archive import plan_archive
    from fleet_common import iso_utc
    from fleet_git import Clone
    from fleet_mailbox import message_key, serialize
    from fleet_state import StateChange, StateStore, presence_doc

    servers = _servers(count)
    history = bl.make_messages(archived, servers=servers, read=True, start=1.6e9, step=3000.0)
    stay, moves = plan_archive({"messages": history}, days=0)
    files = {path: serialize({"messages": msgs}) for path, msgs in moves.items()}
    now = time.time()
    recent = bl.make_messages(RECENT, servers=servers, read=False, start=now - 10 * 86400,
                              step=10 * 86400 / RECENT, seed=11)
    fleet = bl.BenchFleet(bl.mailbox_bytes(stay + recent), files=files)
    publisher = Clone(fleet.clone("publisher"))
    store = StateStore(publisher)
    for index, server in enumerate(servers):
        mine = [message_key(m) for m in recent if m["to"] == server]
        presence = presence_doc(started=now - 86400, interval=10, healthy=True, activity="idle",
                                version="1.1.0", extra={"queue": {"pending": 0, "dead": 0},
                                                        "breaker": "CLOSED"})
        if index % STALE_EVERY == STALE_EVERY - 1:
            presence["timestamp"] = iso_utc(dt.datetime.fromtimestamp(now - 3600, dt.timezone.utc))
        store.update(server, StateChange(presence=presence, read=mine[::2]))
    fleet.clone("viewer")
    fleet.clone("sender")
    fleet.clone("floor")
    fleet.clone("python_floor")
    return {"count": count, "fleet": fleet, "publisher": publisher, "store": store,
            "archive_files": len(files), "archived": archived,
            "hot_bytes": fleet.remote_blob_size()}


def _status_argv(viewer: Path, *extra: str) -> List[str]:
    return [sys.executable, bl.python_script("fleet_status.py"), "--repo", str(viewer), *extra]


def _run(argv: Sequence[str], ok_codes: Sequence[int] = (0, 1, 2)) -> None:
    proc = subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          env=dict(os.environ))
    if proc.returncode not in ok_codes:
        raise RuntimeError(f"{argv[1]} exited {proc.returncode}: "
                           f"{proc.stderr.decode('utf-8', 'replace')[-2000:]}")


def measure(info: Dict[str, Any], reps: int, rtt_ms: Optional[float] = None) -> Dict[str, Any]:
    """Rounds of the status after a send and a presence update against the floor, with the
    viewer's clone and the floor's reaching the remote over a link of ``rtt_ms`` (None: the local
    path); the sender and the publisher stay on the local path. The page only on the local path."""
    from slowlink import linked

    fleet = info["fleet"]
    viewer = fleet.clones["viewer"]
    out: Dict[str, Any] = {"moved": [], "idle": [], "fetch": [], "interpreter": [], "python_fetch": [],
                           "cpu": {"moved": [], "idle": [], "fetch": [], "interpreter": []}}
    with linked(fleet.origin, [viewer, fleet.clones["floor"]], rtt_ms):
        _run(_status_argv(viewer, "--json"))  # warm: the first look fetches every state ref
        if rtt_ms is None:  # its first fetch brings every state ref
            subprocess.run(bl.python_fetch_argv(fleet.clones["python_floor"], state_refs=True), check=True)
        for i in range(reps):
            bl.progress(f"fleet_status: {info['count']} servers{bl.rtt_label(rtt_ms)}, round {i + 1}/{reps}")
            _round(info, out, i, python_floor=rtt_ms is None)
    if rtt_ms is None:
        page = fleet.base / "page.html"
        _run(_status_argv(viewer, "--html", str(page), "-q"))
        out["page_bytes"] = page.stat().st_size
    return out


def _round(info: Dict[str, Any], out: Dict[str, Any], i: int, python_floor: bool) -> None:
    """A send and a presence update (untimed), then the status and the floor's fetch in
    alternating order, the interpreter's start, with ``python_floor`` the same fetches run by
    Python, and the status again with nothing moved."""
    from fleet_state import StateChange, presence_doc
    from send_message import send_message

    fleet = info["fleet"]
    sender, floor_clone = fleet.clones["sender"], fleet.clones["floor"]
    status = _status_argv(fleet.clones["viewer"], "--json")
    moved, idle, fetches, starts = (out[k] for k in ("moved", "idle", "fetch", "interpreter"))
    cpu = out["cpu"]
    result = send_message(f"status bench {i}", None, "srv00", from_sender="srv01",
                          build_repo_path=str(sender))
    if not result:
        raise RuntimeError(f"send failed: {result.status} {result.reason}")
    info["store"].update("srv02", StateChange(presence=presence_doc(
        started=time.time() - 3600, interval=10, healthy=True, version="1.1.0")))
    steps = [lambda: _timed(fetches, cpu["fetch"], lambda: bl.git(floor_clone, "fetch", "-q", "origin", bl.BRANCH)),
             lambda: _timed(moved, cpu["moved"], lambda: _run(status))]
    for step in (steps if i % 2 == 0 else list(reversed(steps))):
        step()
    _timed(starts, cpu["interpreter"], lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
    if python_floor:
        argv = bl.python_fetch_argv(fleet.clones["python_floor"], state_refs=True)
        out["python_fetch"].append(bl.timed(lambda: subprocess.run(argv, check=True))[0])
    _timed(idle, cpu["idle"], lambda: _run(status))


def _timed(seconds: List[float], cpu: List[float], fn: Any) -> None:
    """Append the wall time of ``fn()`` to ``seconds`` and, where the system tells, the CPU time
    its child processes used (user + system) to ``cpu``."""
    try:
        import resource
    except ImportError:  # Windows
        seconds.append(bl.timed(fn)[0])
        return
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds.append(bl.timed(fn)[0])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)


def status_figures(info: Dict[str, Any], res: Dict[str, Any], rtt_ms: Optional[float]) -> List[bl.Figure]:
    """The status after a send, and with nothing moved, against 2 x fetch + interpreter; the page's size."""
    count, archived = info["count"], info["archived"]
    key, over = bl.rtt_key(rtt_ms), bl.rtt_label(rtt_ms)
    fetch, start = bl.median(res["fetch"]), bl.median(res["interpreter"])
    floor = 2 * fetch + start
    figures = [
        bl.Figure(f"fleet_status.s{count}{key}", f"fleet_status.py, {count} servers, {archived} archived{over}, "
                  "after a send and a presence update", bl.median(res["moved"]), "ms", floor,
                  target=("ratio", "<=", 1.0), scale=1000,
                  note=f"floor 2 x fetch {fetch * 1000:.0f} ms + python start {start * 1000:.0f} ms"),
        bl.Figure(f"fleet_status.s{count}_idle{key}", f"fleet_status.py, {count} servers{over}, nothing moved",
                  bl.median(res["idle"]), "ms", floor, scale=1000),
    ]
    if res["python_fetch"]:
        figures.append(bl.Figure(f"fleet_status.python_fetch_s{count}{key}",
                                 f"the status's fetch and a mailbox read by python (import json, "
                                 f"subprocess), {count} servers",
                                 bl.median(res["python_fetch"]), "ms", floor, scale=1000,
                                 note="the least any Python command that looks at the fleet costs"))
    used = res.get("cpu", {})
    if rtt_ms is None and all(used.get(k) for k in ("moved", "idle", "fetch", "interpreter")):
        cpu_floor = 2 * bl.median(used["fetch"]) + bl.median(used["interpreter"])
        label = f"CPU of fleet_status.py and its git processes, {count} servers"
        figures += [
            bl.Figure(f"fleet_status.cpu_s{count}", f"{label}, after a send and a presence update",
                      bl.median(used["moved"]), "ms", cpu_floor, scale=1000,
                      note=f"floor 2 x fetch {bl.median(used['fetch']) * 1000:.0f} ms + python start "
                           f"{bl.median(used['interpreter']) * 1000:.0f} ms of CPU"),
            bl.Figure(f"fleet_status.cpu_s{count}_idle", f"{label}, nothing moved",
                      bl.median(used["idle"]), "ms", cpu_floor, scale=1000),
        ]
    if count == max(SIZES) and "page_bytes" in res:
        figures.append(bl.Figure(f"fleet_status.page_kb_{count}", f"status page size, {count} servers",
                                 res["page_bytes"] / 1024, "KB"))
    return figures


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("fleet_status.py", "Cost of fleet_status.py against one git fetch.")
    parser.add_argument("--reps", type=int, default=None, help="rounds per fleet (default 12, quick 4)")
    bl.add_rtt_option(parser)
    args = parser.parse_args(argv)
    reps = args.reps or (4 if args.quick else 12)
    archived = 2000 if args.quick else 10000
    started = time.time()
    figures: List[bl.Figure] = []
    details: Dict[str, Any] = {"archived": archived, "recent": RECENT, "fleets": []}
    for count in SIZES:
        bl.progress(f"fleet_status: building {count} servers, {archived} archived messages")
        t0 = time.perf_counter()
        info = build_fleet(count, archived)
        try:
            info["build_s"] = time.perf_counter() - t0
            for rtt_ms, rounds in bl.link_plan(args.rtt_ms, reps, args.quick):
                res = measure(info, rounds, rtt_ms)
                details["fleets"].append({k: v for k, v in info.items() if k not in ("fleet", "publisher", "store")})
                details["fleets"][-1].update(res, rtt_ms=rtt_ms)
                figures += status_figures(info, res, rtt_ms)
        finally:
            info["fleet"].close()
    return bl.write_report("fleet_status", figures, details, quick=args.quick, started=started,
                           as_json=args.json, results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
