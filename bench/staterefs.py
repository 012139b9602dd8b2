"""What state refs take off the shared branch: receipts, presence, and the sends they no longer race.

Every scenario runs twice in one run, *before* (how fleets ran without state refs: monitors also
write read marks into the mailbox, ``--legacy-marks``, and heartbeats as commits,
``--heartbeat-on-main``) and *after* (state refs only), on real monitor processes:

* **broadcast**: N monitors (20; quick 4) at ``--interval 1 --mark-read on-show``; one broadcast.
  Reported: commits on the shared branch caused by reading it (target 0), pushes to state refs
  and how many of them lost a lease (none may: only a server's own processes share its ref), and
  the time from the send until every server's receipt is on the remote.
* **heartbeat**: 10 monitors (quick 3) publishing presence every P seconds for 10 periods (P = 12 s; quick
  2 s): commits on the shared branch (target 0; before: one per heartbeat).
* **contention**: ``contention.py``'s 8 senders with 8 monitors: send pushes per delivered
  message and p95 send latency.
* **fleet**: M monitors (30; quick 6) at ``--interval 2`` while 4 senders send paced messages
  (one every 0.5 s) to random servers: send pushes per message and p95 latency.

Usage: ``python3 bench/staterefs.py [--quick] [--json] [--results-dir DIR]``.
Exit 0 when every figure was measured, 1 otherwise.
"""

from __future__ import annotations

import random
import time
from typing import Any, Dict, List, Optional, Sequence

import benchlib as bl
import contention


def _names(count: int, prefix: str = "srv") -> List[str]:
    return [f"{prefix}{i:02d}" for i in range(count)]


class Monitors:
    """Real monitor processes, one per clone, stopped together."""

    def __init__(self, fleet: bl.BenchFleet, names: Sequence[str], interval: float, extra: Sequence[str]) -> None:
        self.fleet = fleet
        self.procs: List[Any] = []
        # Every clone before any monitor: a local clone copies the origin's object folders, and
        # a push landing meanwhile (its quarantine folder) makes git refuse the copy.
        paths = {name: fleet.clones.get(name) or fleet.clone(name) for name in names}
        for name in names:
            path = paths[name]
            err = open(fleet.base / f"monitor-{name}.log", "wb")  # noqa: SIM115 - closed in stop()
            self.procs.append((bl.start_monitor(path, name, interval, stdout=err, stderr=err,
                                                extra=["--no-auto-reply", *extra]), err, name))
        for _proc, _err, name in self.procs:
            # Started: a first cycle done and a presence on the remote (the state ref exists).
            if not bl.wait_for(lambda n=name: bl.monitor_started(fleet.clones[n], n)() and _ref(fleet, n), 120):
                raise RuntimeError(f"monitor {name} did not start: "
                                   + (fleet.base / f"monitor-{name}.log").read_text(errors="replace")[-2000:])

    def stop(self) -> None:
        for proc, _err, _name in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc, err, _name in self.procs:
            bl.stop_process(proc)
            err.close()

    def log_count(self, needle: str) -> int:
        return sum((self.fleet.base / f"monitor-{name}.log").read_text(errors="replace").count(needle)
                   for _p, _e, name in self.procs)


def _ref(fleet: bl.BenchFleet, server: str) -> str:
    import subprocess

    return subprocess.run(["git", "rev-parse", "-q", "--verify", f"refs/fleet/{server}"], cwd=str(fleet.origin),
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()


def _commits(fleet: bl.BenchFleet) -> int:
    return int(bl.git(fleet.origin, "rev-list", "--count", bl.BRANCH))


def broadcast(count: int, legacy: bool) -> Dict[str, Any]:
    names = _names(count)
    extra = ["--mark-read", "on-show"] + (["--legacy-marks"] if legacy else [])
    with bl.BenchFleet() as fleet:
        sender = fleet.clone("sender")
        mons = Monitors(fleet, names, 1.0, extra)
        try:
            from send_message import send_message

            before = _commits(fleet)
            tips_before = {n: _ref(fleet, n) for n in names}
            started = time.perf_counter()
            result = send_message("all hands: deploy at 5", "Deploy", to="all", from_sender="sender",
                                  build_repo_path=str(sender))
            key = (result.message_id, "sender")

            def everyone_read() -> bool:
                receipts = bl.state_receipts(fleet.origin)
                return all(key in receipts.get(n, ()) for n in names)

            done = bl.wait_for(everyone_read, 120, step=0.1)
            all_read_s = time.perf_counter() - started
            time.sleep(2.0)  # let legacy mailbox commits land too
            moved = sum(1 for n in names if _ref(fleet, n) != tips_before[n])
            lost_leases = mons.log_count("lease lost")
            reading_commits = _commits(fleet) - before - 1  # everything but the send itself
        finally:
            mons.stop()
    return {"servers": count, "all_read": done, "all_read_s": all_read_s, "state_ref_pushes": moved,
            "lost_leases": lost_leases, "reading_commits": reading_commits}


def heartbeat(count: int, period: float, legacy: bool) -> Dict[str, Any]:
    names = _names(count)
    extra = ["--heartbeat-minutes", f"{period / 60:g}"] + (["--heartbeat-on-main"] if legacy else [])
    with bl.BenchFleet() as fleet:
        mons = Monitors(fleet, names, 1.0, extra)
        try:
            before = _commits(fleet)
            pushes_before = mons.log_count("presence not published")
            time.sleep(period * 10)
            commits = _commits(fleet) - before
            failures = mons.log_count("presence not published") - pushes_before
        finally:
            mons.stop()
    return {"servers": count, "period_s": period, "window_s": period * 10, "commits": commits,
            "presence_failures": failures}


def fleet_run(count: int, senders: int, per_sender: int, legacy: bool) -> Dict[str, Any]:
    names = _names(count)
    extra = ["--mark-read", "on-show"] + (["--legacy-marks"] if legacy else [])
    rng = random.Random(7)
    with bl.BenchFleet() as fleet:
        sender_names = [f"send{i}" for i in range(senders)]
        for name in sender_names:
            fleet.clone(name)
        mons = Monitors(fleet, names, 2.0, extra)
        pool = bl.SenderPool(fleet.base)
        try:
            for name in sender_names:
                pool.spawn(fleet.clones[name], name, rng.sample(names, min(8, len(names))), per_sender, pace=0.5)
            wall, reports = pool.run()
        finally:
            pool.close()
            mons.stop()
    return bl.summarize_senders(wall, reports)


def state_size(entries: int) -> int:
    """Bytes of a ``state.json`` holding ``entries`` read receipts (PROTOCOL.md asks for its size
    at 10,000 hot messages: a state ref is as big as the mail addressed to its server)."""
    from fleet_state import ServerState, presence_doc

    state = ServerState("code2")
    state.presence = presence_doc(started=time.time(), interval=10.0, healthy=True, version="1.1.0")
    rng = random.Random(5)
    for i in range(entries):
        state.read[(f"msg_{1760000000 + i * 37}_{rng.getrandbits(48):012x}", f"build{i % 8}")] = None
    return len(state.to_bytes())


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = bl.common_parser("staterefs.py", "State refs against read marks and heartbeats on the branch.")
    args = parser.parse_args(argv)
    started = time.time()
    quick = args.quick
    details: Dict[str, Any] = {}
    for label, legacy in (("before", True), ("after", False)):
        bl.progress(f"staterefs: broadcast ({label})")
        details[f"broadcast_{label}"] = broadcast(4 if quick else 20, legacy)
        bl.progress(f"staterefs: heartbeat ({label})")
        details[f"heartbeat_{label}"] = heartbeat(3 if quick else 10, 2.0 if quick else 12.0, legacy)
        bl.progress(f"staterefs: contention ({label})")
        details[f"contention_{label}"] = contention.run(2 if quick else 25, 30.0 if quick else 90.0,
                                                        legacy_marks=legacy)
        bl.progress(f"staterefs: fleet ({label})")
        details[f"fleet_{label}"] = fleet_run(6 if quick else 30, 4, 3 if quick else 15, legacy)
    b0, b1 = details["broadcast_before"], details["broadcast_after"]
    h0, h1 = details["heartbeat_before"], details["heartbeat_after"]
    c0, c1 = details["contention_before"]["contention"], details["contention_after"]["contention"]
    f0, f1 = details["fleet_before"], details["fleet_after"]

    def per_msg(s: Dict[str, Any]) -> float:
        return s["push_attempts"] / s["messages"] if s["messages"] else float("nan")

    details["state_bytes_10k"] = state_size(10000)
    figures = [
        bl.Figure("staterefs.size_10k", "state.json with 10,000 read receipts",
                  details["state_bytes_10k"] / 1024, "KB"),
        bl.Figure("staterefs.broadcast_commits",
                  f"commits on the shared branch from {b1['servers']} servers reading one broadcast",
                  float(b1["reading_commits"]), "", target=("measured", "==", 0.0),
                  note=f"before: {b0['reading_commits']}"),
        bl.Figure("staterefs.broadcast_pushes", "state-ref pushes for that broadcast (lost leases)",
                  float(b1["state_ref_pushes"]), "", note=f"{b1['lost_leases']} lost leases"),
        bl.Figure("staterefs.broadcast_lost_leases", "state-ref pushes rejected by another server",
                  float(b1["lost_leases"]), "", target=("measured", "==", 0.0)),
        bl.Figure("staterefs.broadcast_all_read", f"send to every receipt on the remote ({b1['servers']} servers)",
                  b1["all_read_s"] if b1["all_read"] else None, "s",
                  note=f"before: {b0['all_read_s']:.1f} s"),
        bl.Figure("staterefs.heartbeat_commits",
                  f"commits on the shared branch: {h1['servers']} servers x 10 heartbeat periods",
                  float(h1["commits"]), "", target=("measured", "==", 0.0),
                  note=f"before: {h0['commits']} (period {h1['period_s']:g} s)"),
        bl.Figure("staterefs.contention_pushes_per_msg", "8 senders + 8 monitors: send pushes per message",
                  per_msg(c1), "", note=f"before: {per_msg(c0):.2f}"),
        bl.Figure("staterefs.contention_p95", "8 senders + 8 monitors: send latency p95",
                  c1["latency_p95_s"], "ms", scale=1000, note=f"before: {c0['latency_p95_s'] * 1000:.0f} ms"),
        bl.Figure("staterefs.fleet_pushes_per_msg",
                  f"{6 if quick else 30} monitors at 2 s, paced senders: send pushes per message",
                  per_msg(f1), "", note=f"before: {per_msg(f0):.2f}"),
        bl.Figure("staterefs.fleet_p95", f"{6 if quick else 30} monitors at 2 s, paced senders: send p95",
                  f1["latency_p95_s"], "ms", scale=1000, note=f"before: {f0['latency_p95_s'] * 1000:.0f} ms"),
    ]
    return bl.write_report("staterefs", figures, details, quick=quick, started=started, as_json=args.json,
                           results_dir=args.results_dir)


if __name__ == "__main__":
    raise SystemExit(main())
