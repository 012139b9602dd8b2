"""MetricsCollector: summaries, counters, flush rules, bounded storage, merging, Prometheus."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
from conftest import FakeClock, run_script
from prometheus_client.parser import text_string_to_metric_families

import monitoring_metrics
from monitoring_metrics import SEED_COUNTERS, MetricsCollector, nearest_rank

T0 = 1_760_000_000.0  # a fixed epoch, on purpose not aligned to an hour


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "Build"
    path.mkdir()
    return path


def collector(repo, clock, **kw) -> MetricsCollector:
    return MetricsCollector(str(repo), "code2", clock=clock, **kw)


def test_defaults_and_lazy_file(repo, clock, monkeypatch):
    monkeypatch.setenv("BUILD_REPO_PATH", str(repo))
    monkeypatch.setenv("SERVER_ID", "Build1")
    metrics = MetricsCollector(clock=clock)
    assert metrics.server == "build1"
    assert metrics.path == repo / "build1" / "logs" / "metrics.json"
    metrics.record_operation("git_fetch", 10, True)
    metrics.increment("messages_sent")
    assert not (repo / "build1").exists(), "recording must not touch the disk"
    assert metrics.flush() is True
    assert metrics.path.is_file()


def test_summary_on_known_data(repo, clock):
    metrics = collector(repo, clock)
    durations = list(range(1, 21))  # 1..20 ms
    for ms in durations:
        metrics.record_operation("git_fetch", float(ms), success=ms % 5 != 0)
        clock.advance(1)
    metrics.record_operation("send", 250.0, True)
    summary = metrics.get_summary(hours=1)
    fetch = summary["operations"]["git_fetch"]
    assert fetch["count"] == 20
    assert fetch["failure"] == 4 and fetch["success"] == 16
    assert fetch["success_rate"] == pytest.approx(0.8)
    # Nearest rank: p50 = ceil(0.5*20) = 10th value, p95 = ceil(0.95*20) = 19th value.
    assert fetch["p50_ms"] == 10.0
    assert fetch["p95_ms"] == 19.0
    assert fetch["max_ms"] == 20.0
    assert fetch["sum_ms"] == pytest.approx(sum(durations))
    assert fetch["percentiles_exact"] is True
    assert summary["operations"]["send"]["count"] == 1
    assert summary["operations"]["send"]["p95_ms"] == 250.0
    assert summary["window_hours"] == 1
    assert summary["since"].endswith("Z")
    assert set(SEED_COUNTERS) <= set(summary["counters"])


def test_nearest_rank():
    assert nearest_rank([], 50) is None
    assert nearest_rank([7.0], 95) == 7.0
    values = [15.0, 20.0, 35.0, 40.0, 50.0]
    assert nearest_rank(values, 30) == 20.0
    assert nearest_rank(values, 40) == 20.0
    assert nearest_rank(values, 50) == 35.0
    assert nearest_rank(values, 100) == 50.0


def test_window_excludes_old_samples(repo, clock):
    metrics = collector(repo, clock)
    metrics.record_operation("git_fetch", 500.0, False)
    clock.advance(2 * 3600)
    metrics.record_operation("git_fetch", 5.0, True)
    one_hour = metrics.get_summary(hours=1)["operations"]["git_fetch"]
    assert (one_hour["count"], one_hour["success_rate"], one_hour["max_ms"]) == (1, 1.0, 5.0)
    day = metrics.get_summary(hours=24)["operations"]["git_fetch"]
    assert (day["count"], day["success_rate"], day["max_ms"]) == (2, 0.5, 500.0)
    clock.advance(3 * 3600)
    assert metrics.get_summary(hours=1)["operations"] == {}


def test_counters(repo, clock):
    metrics = collector(repo, clock)
    metrics.increment("messages_sent")
    metrics.increment("messages_sent", 2)
    metrics.increment("custom_thing", 5)
    metrics.increment("errors", 0)
    summary = metrics.get_summary()
    assert summary["counters"]["messages_sent"] == 3
    assert summary["counters"]["custom_thing"] == 5
    assert summary["counters"]["errors"] == 0
    assert all(summary["counters"][name] == 0 for name in SEED_COUNTERS if name != "messages_sent")
    metrics.flush()
    metrics.increment("messages_sent")
    assert metrics.get_summary()["counters"]["messages_sent"] == 4
    stored = json.loads(metrics.path.read_text())
    assert stored["counters"]["messages_sent"] == 3  # the unflushed increment is not on disk yet
    with pytest.raises(monitoring_metrics.UsageError):
        metrics.increment("errors", -1)


def test_file_format(repo, clock):
    metrics = collector(repo, clock)
    metrics.record_operation("git_fetch", 12.5, True)
    metrics.record_operation("git_fetch", 40.0, False)
    metrics.increment("heartbeats")
    assert metrics.flush()
    data = json.loads(metrics.path.read_text(encoding="ascii"))
    assert data["version"] == 1 and data["server"] == "code2"
    assert data["counters"] == {"heartbeats": 1}
    assert data["samples"]["git_fetch"] == [[T0, 12.5, 1], [T0, 40.0, 0]]
    hour = str(int(T0 // 3600) * 3600)
    count, successes, sum_ms, max_ms, hist = data["hourly"]["git_fetch"][hour]
    assert (count, successes, sum_ms, max_ms) == (2, 1, 52.5, 40.0)
    assert sum(hist) == 2 and len(hist) == len(monitoring_metrics.HIST_BOUNDS_MS) + 1
    assert data["updated_at"].endswith("Z")
    # The runtime folder is kept out of git (PROTOCOL.md): runtime_dir created it.
    assert (repo / "code2" / "logs").is_dir()


def test_no_write_when_nothing_recorded(repo, clock):
    metrics = collector(repo, clock)
    assert metrics.flush() is False
    assert metrics.maybe_flush(True) is False
    clock.advance(3600)
    assert metrics.maybe_flush(False) is False
    assert not metrics.path.exists()
    assert not (repo / "code2").exists()
    assert metrics.flush(force=True) is True
    assert metrics.path.is_file()


def test_maybe_flush_at_most_once_a_minute_when_idle(repo, clock):
    metrics = collector(repo, clock)
    writes = []
    for _cycle in range(30):  # idle cycles of 10 s at t = 0, 10, ... 290
        metrics.record_operation("git_fetch", 3.0, True)
        if metrics.maybe_flush(False):
            writes.append(clock())
        clock.advance(10)
    assert len(writes) == 4  # at 60, 120, 180 and 240 s
    assert all(b - a >= 60 for a, b in zip(writes, writes[1:]))
    assert writes[0] - T0 >= 60
    # A cycle that did something flushes at once.
    metrics.record_operation("send", 80.0, True)
    assert metrics.maybe_flush(True) is True
    assert metrics.maybe_flush(True) is False  # nothing new since
    stored = json.loads(metrics.path.read_text())
    assert len(stored["samples"]["git_fetch"]) == 30
    assert len(stored["samples"]["send"]) == 1


def test_two_collectors_merge_instead_of_overwriting(repo, clock):
    monitor = collector(repo, clock)
    cli = collector(repo, clock)
    monitor.record_operation("git_fetch", 10.0, True)
    monitor.increment("messages_processed", 2)
    cli.record_operation("send", 300.0, True)
    cli.increment("messages_sent")
    assert monitor.flush()
    assert cli.flush()
    monitor.record_operation("git_fetch", 20.0, False)
    monitor.increment("messages_processed")
    assert monitor.flush()
    data = json.loads(monitor.path.read_text())
    assert data["counters"] == {"messages_processed": 3, "messages_sent": 1}
    assert [row[1] for row in data["samples"]["git_fetch"]] == [10.0, 20.0]
    assert [row[1] for row in data["samples"]["send"]] == [300.0]
    # A third reader sees everything; a second flush of the same data does not double it.
    reader = collector(repo, clock)
    summary = reader.get_summary()
    assert summary["operations"]["git_fetch"]["count"] == 2
    assert summary["operations"]["send"]["count"] == 1
    assert summary["counters"]["messages_processed"] == 3
    assert monitor.flush() is False and cli.flush() is False
    assert reader.get_summary()["counters"]["messages_processed"] == 3


def test_corrupt_file_moved_aside(repo, clock, caplog):
    metrics = collector(repo, clock)
    metrics.path.parent.mkdir(parents=True)
    metrics.path.write_text('{"version": 1, "counters": {"errors": 3}')  # truncated
    metrics.increment("errors")
    with caplog.at_level(logging.CRITICAL):
        assert metrics.flush()
    asides = list(metrics.path.parent.glob("metrics.json.corrupt-*"))
    assert len(asides) == 1
    assert asides[0].read_text().startswith('{"version": 1, "counters"')
    assert json.loads(metrics.path.read_text())["counters"] == {"errors": 1}
    assert any(record.levelno == logging.CRITICAL for record in caplog.records)


def test_newer_file_is_not_overwritten(repo, clock):
    metrics = collector(repo, clock)
    metrics.path.parent.mkdir(parents=True)
    metrics.path.write_text('{"version": 99, "counters": {}}')
    metrics.increment("errors")
    assert metrics.flush() is False
    assert json.loads(metrics.path.read_text())["version"] == 99
    assert metrics.dirty  # kept for a later flush
    assert metrics.get_summary()["counters"]["errors"] == 1


def test_week_of_monitor_stays_small(repo, clock):
    """A week at a 10 s interval, two operations per cycle, flushed every 6 simulated hours."""
    metrics = collector(repo, clock)
    cycles = 7 * 24 * 360
    for cycle in range(cycles):
        metrics.record_operation("git_fetch", 20.0 + cycle % 50, cycle % 97 != 0)
        metrics.record_operation("process_cycle", 1.0 + cycle % 7, True)
        if cycle % 100 == 0:
            metrics.increment("heartbeats")
        clock.advance(10)
        if cycle % 2160 == 2159:
            assert metrics.flush()
    metrics.flush()
    size = metrics.path.stat().st_size
    assert size < 3 * 1024 * 1024, size
    data = json.loads(metrics.path.read_text())
    assert all(len(rows) <= monitoring_metrics.MAX_SAMPLES_PER_OP
               for rows in data["samples"].values())
    assert all(len(hours) <= 7 * 24 + 1 for hours in data["hourly"].values())
    assert all(row[0] >= clock() - 24 * 3600 for row in data["samples"]["git_fetch"])
    day = metrics.get_summary(24)["operations"]["git_fetch"]
    # The older part of the day comes from whole hourly buckets (up to an hour more).
    assert 8640 <= day["count"] <= 8640 + 360
    assert day["max_ms"] == 69.0
    assert 20.0 <= day["p50_ms"] <= 100.0
    recent = metrics.get_summary(1)["operations"]["git_fetch"]
    assert recent["count"] == 360 and recent["percentiles_exact"] is True
    week = metrics.get_summary(7 * 24)["operations"]["process_cycle"]
    assert week["count"] >= cycles - 360
    assert week["success_rate"] == 1.0
    assert data["counters"]["heartbeats"] == math.ceil(cycles / 100)


def test_hourly_estimate_when_raw_is_capped(repo, clock):
    metrics = collector(repo, clock, max_samples_per_op=10)
    for index in range(100):
        metrics.record_operation("git_fetch", 2000.0 if index < 50 else 3.0, True)
        clock.advance(60)
    summary = metrics.get_summary(24)["operations"]["git_fetch"]
    assert summary["count"] == 100
    assert summary["max_ms"] == 2000.0
    assert summary["percentiles_exact"] is False
    assert summary["p95_ms"] == 2000.0  # the 2500 ms bucket capped by the hour's max
    recent = metrics.get_summary(5 / 60)["operations"]["git_fetch"]
    assert recent["percentiles_exact"] is True and recent["p50_ms"] == 3.0


def test_prometheus_text_parses_and_matches(repo, clock, tmp_path):
    metrics = MetricsCollector(str(repo), "code2", clock=clock)
    for ms in (10.0, 20.0, 30.0, 40.0):
        metrics.record_operation("git_fetch", ms, ms != 40.0)
    metrics.record_operation('odd "op"\\\nname', 5.0, True)
    metrics.increment("messages_sent", 7)
    summary = metrics.get_summary()
    text = metrics.to_prometheus(summary)
    assert "# HELP fleet_operation_total" in text and "# TYPE fleet_operation_total" in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    samples = [sample for family in families.values() for sample in family.samples]
    assert all(sample.labels.get("server") == "code2" for sample in samples)

    def value(metric, **labels):
        hits = [s.value for s in samples
                if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(hits) == 1, (metric, labels, hits)
        return hits[0]

    assert value("fleet_operation_total", op="git_fetch", result="success") == 3
    assert value("fleet_operation_total", op="git_fetch", result="failure") == 1
    assert value("fleet_operation_duration_ms", op="git_fetch", quantile="0.5") == 20.0
    assert value("fleet_operation_duration_ms", op="git_fetch", quantile="0.95") == 40.0
    assert value("fleet_operation_duration_ms_count", op="git_fetch") == 4
    assert value("fleet_operation_duration_ms_sum", op="git_fetch") == 100.0
    assert value("fleet_operation_duration_max_ms", op="git_fetch") == 40.0
    assert value("fleet_operation_success_ratio", op="git_fetch") == 0.75
    assert value("fleet_counter_total", name="messages_sent") == 7
    assert value("fleet_counter_total", name="errors") == 0
    # Label values with quotes, backslashes and newlines survive the round trip.
    assert value("fleet_operation_total", op='odd "op"\\\nname', result="success") == 1
    assert families["fleet_operation_duration_ms"].type == "summary"

    prom = tmp_path / "textfile" / "fleet.prom"
    prom.parent.mkdir()  # the folder is the operator's: never created by the writer
    metrics.write_prometheus_textfile(prom, summary)
    assert prom.read_text(encoding="utf-8") == text
    assert [p.name for p in prom.parent.iterdir()] == ["fleet.prom"]  # no temp file left


def test_prometheus_with_no_operations(repo, clock):
    text = collector(repo, clock).to_prometheus()
    families = list(text_string_to_metric_families(text))
    names = {family.name for family in families}
    assert "fleet_counter" in names


def test_timed_context_manager(repo, clock):
    metrics = collector(repo, clock)
    with metrics.timed("git_push"):
        pass
    with pytest.raises(RuntimeError):
        with metrics.timed("git_push"):
            raise RuntimeError("boom")
    push = metrics.get_summary()["operations"]["git_push"]
    assert (push["count"], push["success"], push["failure"]) == (2, 1, 1)


def test_bad_input(repo, clock):
    metrics = collector(repo, clock)
    with pytest.raises(monitoring_metrics.UsageError):
        metrics.record_operation("", 1.0, True)
    with pytest.raises(monitoring_metrics.UsageError):
        metrics.get_summary(0)
    metrics.record_operation("x", float("nan"), True)
    metrics.record_operation("x", -5, True)
    assert metrics.get_summary()["operations"]["x"]["max_ms"] == 0.0
    with pytest.raises(monitoring_metrics.UsageError):
        MetricsCollector(str(repo), "../evil", clock=clock)


# --------------------------------------------------------------------------- files it was given or owns


def test_textfile_folder_is_never_created(repo, clock, tmp_path):
    metrics = collector(repo, clock)
    metrics.record_operation("git_fetch", 5.0, True)
    missing = tmp_path / "nonexistent" / "dir" / "x.prom"
    with pytest.raises(OSError):
        metrics.write_prometheus_textfile(missing)
    assert not (tmp_path / "nonexistent").exists()
    with pytest.raises(monitoring_metrics.UsageError, match="does not exist"):
        monitoring_metrics.check_textfile_path(missing)
    with pytest.raises(monitoring_metrics.UsageError, match="is a folder"):
        monitoring_metrics.check_textfile_path(tmp_path)
    assert monitoring_metrics.check_textfile_path(tmp_path / "x.prom") == tmp_path / "x.prom"


def test_monitor_refuses_a_textfile_in_a_missing_folder_at_start(fleet, tmp_path):
    c2 = fleet.clone("code2")
    missing = tmp_path / "nonexistent" / "dir" / "x.prom"
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--metrics-textfile", str(missing))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "nonexistent" in lines[0]
    assert not (tmp_path / "nonexistent").exists()
    assert not (c2 / "code2").exists()  # refused before the cycle: no log, no state


def test_symlinked_metrics_file_is_moved_aside_never_read_or_written_through(repo, clock, tmp_path, caplog):
    target = tmp_path / "bashrc"
    target.write_text('{"version": 1, "counters": {"errors": 1000}}')
    metrics = collector(repo, clock)
    metrics.path.parent.mkdir(parents=True)
    try:
        metrics.path.symlink_to(target)
    except (OSError, NotImplementedError):
        pytest.skip("this system cannot create symlinks")
    metrics.increment("errors")
    with caplog.at_level(logging.WARNING):
        assert metrics.flush()
    assert target.read_text() == '{"version": 1, "counters": {"errors": 1000}}'
    assert metrics.path.is_file() and not metrics.path.is_symlink()
    assert json.loads(metrics.path.read_text())["counters"] == {"errors": 1}  # nothing read through it
    asides = [p for p in metrics.path.parent.iterdir() if p.name.startswith("metrics.json.unsafe-")]
    assert len(asides) == 1 and asides[0].is_symlink()
    assert sum("symlink" in record.getMessage() for record in caplog.records) == 1


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_metrics_file_does_not_block(repo, clock):
    metrics = collector(repo, clock)
    metrics.path.parent.mkdir(parents=True)
    os.mkfifo(metrics.path)
    metrics.increment("errors")
    assert metrics.flush()
    assert json.loads(metrics.path.read_text())["counters"] == {"errors": 1}


def test_oversized_metrics_file_is_moved_aside(repo, clock, monkeypatch):
    monkeypatch.setattr(monitoring_metrics, "MAX_FILE_BYTES", 1000)
    metrics = collector(repo, clock)
    metrics.path.parent.mkdir(parents=True)
    metrics.path.write_text('{"version": 1, "counters": {"errors": 3}, "pad": "' + "x" * 2000 + '"}')
    metrics.increment("errors")
    assert metrics.flush()
    assert json.loads(metrics.path.read_text())["counters"] == {"errors": 1}
    assert len(list(metrics.path.parent.glob("metrics.json.corrupt-*"))) == 1


def test_a_metrics_file_with_numbers_no_measurement_has_is_cleaned_or_moved_aside(repo, clock):
    path = repo / "code2" / "logs" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"version": 1, "counters": {"errors": 1e400, "sent": 3, "\\ud800x": 1}, '
                    '"samples": {"fetch": [[1e400, 5, 1], [1700000000, 12.5, 1]]}, '
                    '"hourly": {"fetch": {"1700000000": [1, 1, 5.0, 5.0, [1e400]]}}}')
    m = MetricsCollector(str(repo), "code2", clock=clock)
    m.increment("sent")
    assert m.flush(force=True)
    data = json.loads(path.read_text())
    assert data["counters"]["sent"] == 4 and "errors" not in data["counters"]
    out = repo / "fleet.prom"
    m.write_prometheus_textfile(out)
    list(text_string_to_metric_families(out.read_text(encoding="utf-8")))  # whole and valid
    if os.name == "posix":
        assert oct(out.stat().st_mode & 0o777) == oct(0o644)  # node_exporter runs as its own user
