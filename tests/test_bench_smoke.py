"""The benchmarks run end to end: ``bench/run_all.py --quick`` produces every figure.

Only that the figures exist is checked, never their values: speed targets depend on the machine
and are reported by the benchmarks themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

EXPECTED = {
    "send.in_process", "send.in_process_stale", "send.in_process_p95",
    "send.cli", "send.cli_uncached", "send.cli_dontwrite_monitor", "send.cli_nothing_cached", "send.stdlib_start",
    "send.single_sender_rate",
    "send.four_senders_rate", "send.four_senders_fraction",
    "idle.cpu", "idle.rss", "idle.network_per_cycle", "idle.git_per_cycle", "idle.cat_file",
    "idle.files_changed",
    "history.floor", "history.small_send", "history.small_cycle", "history.archived_send",
    "history.archived_cycle", "history.main_10k_send", "history.main_10k_cycle",
    "latency.i1.median", "latency.i1.p95", "latency.i10.median", "latency.i10.p95",
    "contention.lost_or_duplicated", "contention.unread", "contention.total_time",
    "contention.send_median", "contention.send_p95", "contention.retries", "contention.throughput",
    "cycle.busy_0ms", "cycle.busy_100ms", "cycle.idle_0ms", "cycle.idle_100ms",
    "fleet_status.s10", "fleet_status.s50", "fleet_status.page_kb_50",
    "inbox.list_0", "inbox.list_first_0", "inbox.list_2000", "inbox.show_0", "inbox.search_2000", "inbox.search_10000",
    "staterefs.size_10k", "staterefs.broadcast_commits", "staterefs.broadcast_pushes",
    "staterefs.broadcast_lost_leases", "staterefs.broadcast_all_read", "staterefs.heartbeat_commits",
    "staterefs.contention_pushes_per_msg", "staterefs.contention_p95", "staterefs.fleet_pushes_per_msg",
    "staterefs.fleet_p95",
    # over a 100 ms link (bench/slowlink.py)
    "send.in_process.rtt100", "send.in_process_stale.rtt100", "send.cli.rtt100",
    "inbox.list_0.rtt100", "inbox.list_2000.rtt100", "fleet_status.s10.rtt100", "fleet_status.s50.rtt100",
    "contention.rtt100.lost_or_duplicated", "contention.rtt100.unread", "contention.rtt100.send_p95",
    "contention.rtt100.throughput",
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_all_quick_produces_every_figure(tmp_path):
    results = tmp_path / "results"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--results-dir", str(results)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
        env=env, timeout=580,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((results / "summary.json").read_text(encoding="utf-8"))
    figures = {f["key"]: f for f in summary["figures"] if f.get("key")}
    assert EXPECTED <= set(figures), sorted(EXPECTED - set(figures))
    for key in EXPECTED:
        assert isinstance(figures[key]["measured"], (int, float)), (key, figures[key])
    for name in ("send", "idle", "history", "latency", "cycle", "contention", "fleet_status", "inbox", "staterefs"):
        assert (results / f"{name}.json").is_file()
    assert "| figure | measured | floor | ratio | target | pass/fail |" in proc.stdout
