"""Operation timings and counters of one server, kept in a small bounded local file.

A :class:`MetricsCollector` records operations (``git_fetch``, ``send``, ...) and counters
(``messages_sent``, ``errors``, ...) in memory; :meth:`MetricsCollector.flush` merges them into
``<repo>/<server>/logs/metrics.json`` (never committed, PROTOCOL.md "The fleet repository").
Nothing is written per operation: the monitor calls :meth:`MetricsCollector.maybe_flush` once per
cycle, which writes when the cycle did something, or at most once a minute otherwise.

Several processes (the monitor and a one-shot send) share the file: a flush takes
``metrics.json.lock``, reads the file, adds only this process's unflushed deltas and writes it
back atomically, so neither loses the other's data.

File format (version 1, compact JSON, ASCII)::

    {"version": 1, "server": "code2", "created_at": iso, "updated_at": iso,
     "counters": {"messages_sent": 3, ...},
     "samples": {"git_fetch": [[epoch_s, duration_ms, 1|0], ...]},
     "hourly":  {"git_fetch": {"<hour start epoch>": [count, successes, sum_ms, max_ms, hist]}}}

``samples`` holds raw samples for at most 24 h and at most ``max_samples_per_op`` per operation
(the newest). ``hourly`` holds 7 days of per-hour aggregates; ``hist`` is a list of counts for the
fixed upper bounds :data:`HIST_BOUNDS_MS` (the last one is +Inf). A week of a monitor at a 10 s
interval stays well under a megabyte.

Summaries (:meth:`MetricsCollector.get_summary`) give exact nearest-rank percentiles when the raw
samples cover the window; otherwise the older part of the window comes from the hourly aggregates
(by whole hours) and the percentiles are estimates (``"percentiles_exact": false``).
:meth:`MetricsCollector.to_prometheus` renders a summary in the Prometheus text format, for
node_exporter's textfile collector; :meth:`MetricsCollector.write_prometheus_textfile` writes it
atomically into a folder that must exist (:func:`check_textfile_path` refuses a missing one, for
``--metrics-textfile`` at start: the folder is the operator's, never created here).

``metrics.json`` is a runtime file (PROTOCOL.md, "Trust between servers"): it is read without
following symlinks (``structured_log.open_runtime_file``; a symlink or other non-regular file there
is moved aside with one warning), read at most :data:`MAX_FILE_BYTES`, and replaced, never written
in place.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import json
import logging
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

import fleet_common
from fleet_common import SuiteError, UsageError

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Deque, Dict, Final, Iterator, List, Mapping, Optional, Tuple, Union

    Sample = List[float]  # [epoch_s, duration_ms, 1|0]

    Hourly = List[Any]  # [count, successes, sum_ms, max_ms, [bucket counts]]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
METRICS_FILE: Final = fleet_common.METRICS_FILE_NAME  # the name lives in RuntimePaths
SEED_COUNTERS: Final = (
    "messages_processed", "messages_received", "messages_sent", "auto_responses", "errors",
    "git_pull_success", "git_pull_failure", "heartbeats",
)
RAW_RETENTION_S: Final = 24 * 3600.0
HOURLY_RETENTION_S: Final = 7 * 24 * 3600.0
MAX_SAMPLES_PER_OP: Final = 2000
MIN_FLUSH_INTERVAL_S: Final = 60.0
# A week of a monitor stays well under a megabyte; a file far bigger is damage, moved aside.
MAX_FILE_BYTES: Final = 16 * 1024 * 1024
LOCK_TIMEOUT_S: Final = 5.0
HOUR: Final = 3600
# Upper bounds (ms) of the hourly histogram buckets; the implicit last bucket is +Inf.
HIST_BOUNDS_MS: Final = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                         10000.0, 30000.0, 60000.0)
HIST_SIZE: Final = len(HIST_BOUNDS_MS) + 1



def _hour_of(epoch: float) -> int:
    return int(epoch // HOUR) * HOUR


def _new_hourly() -> Hourly:
    return [0, 0, 0.0, 0.0, [0] * HIST_SIZE]


def _add_hourly(target: Hourly, other: Hourly) -> None:
    target[0] += int(other[0])
    target[1] += int(other[1])
    target[2] = round(float(target[2]) + float(other[2]), 3)
    target[3] = max(float(target[3]), float(other[3]))
    hist = other[4] if len(other) > 4 and isinstance(other[4], list) else None
    if hist is not None and len(hist) == HIST_SIZE:
        for index, count in enumerate(hist):
            target[4][index] += int(count)


def nearest_rank(sorted_values: List[float], percent: float) -> Optional[float]:
    """The nearest-rank percentile of already sorted values (``None`` for no values)."""
    if not sorted_values:
        return None
    rank = max(1, int(math.ceil(percent / 100.0 * len(sorted_values))))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _weighted_rank(pairs: List[Tuple[float, int]], percent: float) -> Optional[float]:
    """Nearest-rank percentile over (value, weight) pairs."""
    total = sum(weight for _, weight in pairs)
    if total <= 0:
        return None
    rank = max(1, int(math.ceil(percent / 100.0 * total)))
    seen = 0
    for value, weight in sorted(pairs):
        seen += weight
        if seen >= rank:
            return value
    return pairs[-1][0]  # pragma: no cover - rank never exceeds total


def fresh_document(server: str, now: float) -> Dict[str, Any]:
    return {
        "version": FORMAT_VERSION, "server": server, "created_at": fleet_common.iso_from_epoch(now),
        "updated_at": fleet_common.iso_from_epoch(now), "counters": {}, "samples": {}, "hourly": {},
    }


def _clean_document(data: Dict[str, Any], server: str, now: float) -> Dict[str, Any]:
    """Drop entries of the wrong shape (a hand-edited or foreign file) instead of failing."""
    clean = fresh_document(str(data.get("server") or server), now)
    if isinstance(data.get("created_at"), str):
        clean["created_at"] = data["created_at"]
    counters = data.get("counters")
    if isinstance(counters, dict):
        for name, value in counters.items():
            if _finite(value):
                clean["counters"][str(name)] = int(value)
    for op, rows in _dict_items(data.get("samples")):
        good = _clean_samples(rows)
        if good:
            clean["samples"][str(op)] = good
    for op, hours in _dict_items(data.get("hourly")):
        kept = _clean_hours(hours)
        if kept:
            clean["hourly"][str(op)] = kept
    return clean


def _dict_items(value: Any) -> List[Tuple[Any, Any]]:
    return list(value.items()) if isinstance(value, dict) else []


MAX_NUMBER = 1e15  # a count or a duration beyond this is no measurement: the entry is dropped


def _finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and abs(value) < MAX_NUMBER)


def _numbers(row: Any, count: int) -> bool:
    return isinstance(row, list) and len(row) >= count and all(_finite(x) for x in row[:count])


def _clean_samples(rows: Any) -> List[Sample]:
    """The well-formed ``[epoch_s, duration_ms, ok]`` rows of one operation."""
    if not isinstance(rows, list):
        return []
    try:  # the usual case, a well-formed list, in one fast pass
        good = [[float(t), float(ms), 1 if ok else 0] for t, ms, ok in rows]
        if all(_finite(t) and _finite(ms) for t, ms, _ in good):
            return good
    except (TypeError, ValueError):
        pass
    return [[float(row[0]), float(row[1]), 1 if row[2] else 0] for row in rows if _numbers(row, 3)]


def _clean_hours(hours: Any) -> Dict[str, Hourly]:
    """The well-formed hourly aggregates of one operation, by hour."""
    kept: Dict[str, Hourly] = {}
    for key, entry in _dict_items(hours):
        try:
            hour = int(key)
        except (TypeError, ValueError):
            continue
        if _numbers(entry, 4) and (len(entry) < 5 or not isinstance(entry[4], list)
                                   or all(_finite(count) for count in entry[4])):
            agg = _new_hourly()
            _add_hourly(agg, entry)
            kept[str(hour)] = agg
    return kept


class MetricsCollector:
    """Operation timings and counters of one server (see the module docstring).

    ``clock`` returns epoch seconds (default :func:`time.time`); tests inject one.
    """

    def __init__(self, build_repo_path: Optional[str] = None, server_id: Optional[str] = None,
                 clock: Optional[Callable[[], float]] = None, *,
                 max_samples_per_op: int = MAX_SAMPLES_PER_OP,
                 min_flush_interval: float = MIN_FLUSH_INTERVAL_S) -> None:
        self.repo = Path(build_repo_path if build_repo_path is not None
                         else fleet_common.default_repo_path())
        self.server = fleet_common.resolve_server_id(server_id)
        # The folder is created on the first flush (runtime_dir), not here: a collector that
        # records nothing leaves no trace.
        self.path = fleet_common.RuntimePaths(self.repo, self.server).metrics
        self.clock: Callable[[], float] = clock or time.time
        self.max_samples_per_op = int(max_samples_per_op)
        self.min_flush_interval = float(min_flush_interval)
        self._mutex = threading.Lock()
        # One flush at a time in this process: two threads must not both write the same deltas.
        self._flush_mutex = threading.Lock()
        self._pending_samples: Dict[str, Deque[Sample]] = {}
        self._pending_hourly: Dict[str, Dict[int, Hourly]] = {}
        self._pending_counters: Dict[str, int] = {}
        self._dirty = False
        # "At most once a minute" counts from creation, so a fresh collector does not write at
        # once on an idle cycle.
        self.last_flush_at: float = self.clock()

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @property
    def dirty(self) -> bool:
        return self._dirty

    # ----------------------------------------------------------------- recording

    def record_operation(self, op_type: str, duration_ms: float, success: bool,
                         metadata: Optional[Mapping[str, Any]] = None) -> None:
        """Remember one operation (in memory only; :meth:`flush` persists it)."""
        if not isinstance(op_type, str) or not op_type:
            raise UsageError(f"invalid operation type {op_type!r}")
        try:
            ms = float(duration_ms)
        except (TypeError, ValueError):
            raise UsageError(f"invalid duration {duration_ms!r} for {op_type}") from None
        if not math.isfinite(ms) or ms < 0:
            ms = 0.0
        ms = round(ms, 3)
        ok = 1 if success else 0
        now = self.clock()
        hour = int(now // HOUR) * HOUR
        with self._mutex:
            rows = self._pending_samples.get(op_type)
            if rows is None:
                rows = self._pending_samples[op_type] = deque(maxlen=self.max_samples_per_op)
            rows.append([round(now, 3), ms, ok])
            hours = self._pending_hourly.get(op_type)
            if hours is None:
                hours = self._pending_hourly[op_type] = {}
            agg = hours.get(hour)
            if agg is None:
                agg = hours[hour] = _new_hourly()
            agg[0] += 1
            agg[1] += ok
            agg[2] += ms  # rounded when written
            if ms > agg[3]:
                agg[3] = ms
            agg[4][bisect.bisect_left(HIST_BOUNDS_MS, ms)] += 1  # bucket i: <= bound i
            self._dirty = True
        if metadata:
            log.debug("operation %s took %.1f ms (%s)", op_type, ms, "ok" if ok else "failed",
                      extra={"metadata": dict(metadata)})

    @contextlib.contextmanager
    def timed(self, op_type: str, metadata: Optional[Mapping[str, Any]] = None) -> Iterator[None]:
        """Record the duration of the ``with`` body; it failed when it raised."""
        started = time.perf_counter()
        success = False
        try:
            yield
            success = True
        finally:
            self.record_operation(op_type, (time.perf_counter() - started) * 1000.0, success,
                                  metadata)

    def increment(self, counter: str, n: int = 1) -> None:
        """Add ``n`` (>= 0) to a counter (in memory only)."""
        if not isinstance(counter, str) or not counter:
            raise UsageError(f"invalid counter name {counter!r}")
        n = int(n)
        if n < 0:
            raise UsageError(f"counter {counter} can only grow (got {n})")
        if n == 0:
            return
        with self._mutex:
            self._pending_counters[counter] = self._pending_counters.get(counter, 0) + n
            self._dirty = True

    # ----------------------------------------------------------------- persistence

    def _fresh(self) -> Dict[str, Any]:
        return fresh_document(self.server, self.clock())

    def _read_raw(self) -> Optional[bytes]:
        """The file's bytes (at most one more than :data:`MAX_FILE_BYTES`), ``None`` when absent."""
        from structured_log import open_runtime_file

        try:
            fd = open_runtime_file(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "rb") as handle:
            return handle.read(MAX_FILE_BYTES + 1)

    def _load(self) -> Dict[str, Any]:
        """The file's document (STYLE.md rule 11): absent, a fresh one; unreadable or too big, moved
        aside and a fresh one; from a newer program, :class:`SuiteError`, so it is never overwritten.
        """
        raw = self._read_raw()
        if raw is None:
            return self._fresh()
        try:
            data = fleet_common.load_json_bounded(raw, what=METRICS_FILE, max_bytes=MAX_FILE_BYTES)
            if not isinstance(data, dict):
                raise fleet_common.BadInput(f"{METRICS_FILE} is not a JSON object")
        except fleet_common.BadInput as exc:
            fleet_common.move_aside(self.path, str(exc))
            return self._fresh()
        found = data.get("version", 1)
        if not isinstance(found, int) or isinstance(found, bool) or found > FORMAT_VERSION:
            raise SuiteError(f"{self.path} has format version {found!r}, newer than this "
                             f"program's {FORMAT_VERSION}")
        try:
            return _clean_document(data, self.server, self.clock())
        except (TypeError, ValueError, OverflowError) as exc:  # a shape the cleaning did not foresee
            fleet_common.move_aside(self.path, f"{METRICS_FILE} does not hold metrics ({exc})")
            return self._fresh()

    def _snapshot_pending(self) -> Tuple[Dict[str, List[Sample]], Dict[str, Dict[int, Hourly]],
                                         Dict[str, int]]:
        with self._mutex:
            samples = {op: [list(row) for row in rows] for op, rows in self._pending_samples.items()}
            hourly = {op: {hour: copy.deepcopy(agg) for hour, agg in hours.items()}
                      for op, hours in self._pending_hourly.items()}
            return samples, hourly, dict(self._pending_counters)

    def _merge(self, data: Dict[str, Any], samples: Mapping[str, List[Sample]],
               hourly: Mapping[str, Mapping[int, Hourly]], counters: Mapping[str, int],
               now: float) -> Dict[str, Any]:
        """Add deltas to a document and prune it to its bounds (24 h / N raw, 7 days hourly)."""
        for name, delta in counters.items():
            data["counters"][name] = int(data["counters"].get(name, 0)) + int(delta)
        raw_cutoff = now - RAW_RETENTION_S
        for op in set(data["samples"]) | set(samples):
            rows = list(data["samples"].get(op, [])) + list(samples.get(op, []))
            rows = [row for row in rows if row[0] >= raw_cutoff]
            rows.sort(key=lambda row: row[0])
            rows = rows[-self.max_samples_per_op:] if self.max_samples_per_op > 0 else []
            if rows:
                data["samples"][op] = rows
            else:
                data["samples"].pop(op, None)
        hour_cutoff = _hour_of(now - HOURLY_RETENTION_S)
        for op in set(data["hourly"]) | set(hourly):
            hours = data["hourly"].get(op, {})
            for hour, agg in hourly.get(op, {}).items():
                target = hours.get(str(hour))
                if target is None:
                    target = hours[str(hour)] = _new_hourly()
                _add_hourly(target, agg)
            hours = {key: value for key, value in hours.items() if int(key) >= hour_cutoff}
            if hours:
                data["hourly"][op] = dict(sorted(hours.items(), key=lambda kv: int(kv[0])))
            else:
                data["hourly"].pop(op, None)
        return data

    def flush(self, force: bool = False) -> bool:
        """Merge unflushed data into the file; ``True`` when the file was written.

        Nothing is written when nothing was recorded since the last flush, unless ``force``
        (which also creates the file and prunes old data). A failure (lock timeout, disk error,
        a file from a newer program) is logged; the data stays pending for the next flush.
        """
        with self._flush_mutex:
            return self._flush(force)

    def _flush(self, force: bool) -> bool:
        if not self._dirty and not force:
            return False
        samples, hourly, counters = self._snapshot_pending()
        now = self.clock()
        try:
            fleet_common.runtime_dir(self.repo, self.server, fleet_common.LOGS_SUBDIR)
            with fleet_common.file_lock(self.lock_path, timeout=LOCK_TIMEOUT_S):
                data = self._merge(self._load(), samples, hourly, counters, now)
                data["server"] = data.get("server") or self.server
                data["updated_at"] = fleet_common.iso_from_epoch(now)
                payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True) + "\n"
                fleet_common.atomic_write_bytes(self.path, payload.encode("ascii"))
        except (OSError, SuiteError) as exc:  # filelock.Timeout is an OSError
            log.warning("metrics not saved to %s: %s", self.path, exc,
                        extra={"metadata": {"path": str(self.path)}})
            return False
        with self._mutex:
            self._subtract_flushed(samples, hourly, counters)
            self.last_flush_at = now
        return True

    def _subtract_flushed(self, samples: Mapping[str, List[Sample]],
                          hourly: Mapping[str, Mapping[int, Hourly]],
                          counters: Mapping[str, int]) -> None:
        """Forget what was written, keeping anything recorded while the flush ran."""
        for op, rows in samples.items():
            pending = self._pending_samples.get(op)
            if pending is None:
                continue
            for _ in range(min(len(rows), len(pending))):
                pending.popleft()
            if not pending:
                del self._pending_samples[op]
        for op, hours in hourly.items():
            pending_hours = self._pending_hourly.get(op, {})
            for hour, agg in hours.items():
                current = pending_hours.get(hour)
                if current is None:
                    continue
                if current[0] == agg[0]:
                    del pending_hours[hour]
                else:
                    current[0] -= agg[0]
                    current[1] -= agg[1]
                    current[2] = round(current[2] - agg[2], 3)
                    current[4] = [a - b for a, b in zip(current[4], agg[4])]
            if not pending_hours:
                self._pending_hourly.pop(op, None)
        for name, delta in counters.items():
            left = self._pending_counters.get(name, 0) - delta
            if left > 0:
                self._pending_counters[name] = left
            else:
                self._pending_counters.pop(name, None)
        self._dirty = bool(self._pending_samples or self._pending_hourly or self._pending_counters)

    def maybe_flush(self, cycle_recorded: bool = False, now: Optional[float] = None) -> bool:
        """The monitor's end-of-cycle flush.

        A cycle that did something (``cycle_recorded``) flushes what is pending; an idle cycle
        flushes only when something is pending and the last flush is at least
        ``min_flush_interval`` (60 s) old.
        """
        if not self._dirty:
            return False
        if cycle_recorded:
            return self.flush()
        moment = self.clock() if now is None else now
        if moment - self.last_flush_at >= self.min_flush_interval:
            return self.flush()
        return False

    # ----------------------------------------------------------------- reading

    def _current_document(self, now: float) -> Dict[str, Any]:
        """The file's data plus this process's unflushed data, pruned as of ``now``."""
        try:
            if self.path.parent.is_dir():
                with fleet_common.file_lock(self.lock_path, timeout=LOCK_TIMEOUT_S):
                    data = self._load()
            else:
                data = self._fresh()
        except (OSError, SuiteError) as exc:
            log.warning("metrics file %s not read: %s", self.path, exc,
                        extra={"metadata": {"path": str(self.path)}})
            data = self._fresh()
        samples, hourly, counters = self._snapshot_pending()
        return self._merge(data, samples, hourly, counters, now)

    def get_summary(self, hours: float = 24) -> Dict[str, Any]:
        """Per-operation counts, success rate and p50/p95/max over the last ``hours`` hours.

        Counters are cumulative since the metrics file was created (``counters_since``).
        """
        hours = float(hours)
        if not hours > 0:
            raise UsageError(f"window must be positive hours, got {hours!r}")
        now = self.clock()
        data = self._current_document(now)
        start = now - hours * 3600.0
        operations: Dict[str, Dict[str, Any]] = {}
        for op in sorted(set(data["samples"]) | set(data["hourly"])):
            stats = self._op_summary(data["samples"].get(op, []), data["hourly"].get(op, {}),
                                     start, now)
            if stats["count"]:
                operations[op] = stats
        counters = {name: 0 for name in SEED_COUNTERS}
        for name, value in sorted(data["counters"].items()):
            counters[name] = int(value)
        return {
            "window_hours": hours,
            "server": self.server,
            "since": fleet_common.iso_from_epoch(start),
            "until": fleet_common.iso_from_epoch(now),
            "counters_since": data.get("created_at"),
            "operations": operations,
            "counters": counters,
        }

    def _op_summary(self, samples: List[Sample], hourly: Mapping[str, Hourly], start: float,
                    now: float) -> Dict[str, Any]:
        rows, aggs, exact = self._window(samples, hourly, start, now)
        values = sorted(row[1] for row in rows)
        count = len(rows) + sum(int(agg[0]) for agg in aggs)
        success = sum(int(row[2]) for row in rows) + sum(int(agg[1]) for agg in aggs)
        total_ms = sum(values) + sum(float(agg[2]) for agg in aggs)
        tops = ([values[-1]] if values else []) + [float(agg[3]) for agg in aggs if agg[0]]
        max_ms = max(tops) if tops else None
        p50, p95 = _percentiles(values, aggs, exact)
        return {
            "count": count,
            "success": success,
            "failure": count - success,
            "success_rate": (success / count) if count else None,
            "p50_ms": p50,
            "p95_ms": p95,
            "max_ms": max_ms,
            "sum_ms": round(total_ms, 3),
            "percentiles_exact": exact,
        }

    def _window(self, samples: List[Sample], hourly: Mapping[str, Hourly], start: float,
                now: float) -> Tuple[List[Sample], List[Hourly], bool]:
        """The raw rows and hourly aggregates that cover ``start`` to ``now``, and whether the
        percentiles from them are exact (raw rows only)."""
        raw_from = now - RAW_RETENTION_S
        if self.max_samples_per_op > 0 and len(samples) >= self.max_samples_per_op:
            # The list was cut to its newest N: raw data is complete only from its oldest row.
            raw_from = max(raw_from, samples[0][0])
        if start >= raw_from:
            return [row for row in samples if row[0] >= start], [], True
        boundary = _hour_of(raw_from) + (HOUR if raw_from % HOUR else 0)
        rows = [row for row in samples if row[0] >= boundary]
        aggs = [agg for key, agg in hourly.items() if int(key) + HOUR > start and int(key) < boundary]
        return rows, aggs, not any(agg[0] for agg in aggs)

    # ----------------------------------------------------------------- Prometheus

    def to_prometheus(self, summary: Optional[Mapping[str, Any]] = None) -> str:
        """A summary (default: the last 24 h) in the Prometheus text exposition format 0.0.4."""
        if summary is None:
            summary = self.get_summary()
        return render_prometheus(summary, self.server)

    def write_prometheus_textfile(self, path: Union[str, Path],
                                  summary: Optional[Mapping[str, Any]] = None) -> None:
        """Write :meth:`to_prometheus` atomically (node_exporter reads ``*.prom`` files).

        The folder must exist: ``FileNotFoundError`` (an ``OSError``) otherwise, never a new folder.
        """
        # No folder is made; readable by node_exporter's own user (0644), whatever this one's umask.
        fleet_common.replace_file(Path(path), self.to_prometheus(summary).encode("utf-8", "replace"), mode=0o644)


def check_textfile_path(path: Union[str, Path]) -> Path:
    """The Prometheus textfile path, or :class:`UsageError` when its folder does not exist (it is
    never created: a typo must not make a folder node_exporter does not read) or it is a folder."""
    target = Path(path)
    if not target.parent.is_dir():
        raise UsageError(f"metrics textfile {target}: folder {target.parent} does not exist")
    if target.is_dir():
        raise UsageError(f"metrics textfile {target} is a folder")
    return target


def _histogram_pairs(agg: Hourly) -> List[Tuple[float, int]]:
    """(representative value, count) per histogram bucket of an hourly aggregate."""
    hist = agg[4] if len(agg) > 4 and isinstance(agg[4], list) else []
    top = float(agg[3])
    if len(hist) != HIST_SIZE or sum(hist) != agg[0]:
        return [(top, int(agg[0]))] if agg[0] else []
    pairs = []
    for index, count in enumerate(hist):
        if count:
            bound = HIST_BOUNDS_MS[index] if index < len(HIST_BOUNDS_MS) else top
            pairs.append((min(bound, top), int(count)))
    return pairs


def _percentiles(values: List[float], aggs: List[Hourly], exact: bool) -> Tuple[Optional[float], Optional[float]]:
    """p50 and p95 of sorted raw ``values``, with the hourly histograms when not ``exact``."""
    if exact:
        return nearest_rank(values, 50), nearest_rank(values, 95)
    pairs: List[Tuple[float, int]] = [(value, 1) for value in values]
    for agg in aggs:
        pairs.extend(_histogram_pairs(agg))
    return _weighted_rank(pairs, 50), _weighted_rank(pairs, 95)


def escape_label(value: object) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped; text that is no
    UTF-8 (a lone surrogate from a hand-edited file) replaced."""
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(pairs: List[Tuple[str, object]]) -> str:
    return "{" + ",".join(f'{key}="{escape_label(value)}"' for key, value in pairs) + "}"


def render_prometheus(summary: Mapping[str, Any], server: str) -> str:
    """Render a :meth:`MetricsCollector.get_summary` result as Prometheus text."""
    lines: List[str] = []
    window = summary.get("window_hours", 24)
    operations: Mapping[str, Mapping[str, Any]] = summary.get("operations", {})

    def family(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")

    family("fleet_metrics_window_hours", "gauge", "Length of the window the fleet_operation_* "
           "metrics cover, in hours.")
    lines.append(f"fleet_metrics_window_hours{_labels([('server', server)])} "
                 f"{_format_value(float(window))}")
    # Window counts can go down as old operations leave the window, so they are gauges.
    family("fleet_operation_total", "gauge",
           f"Operations in the last {window:g} hours, by result.")
    for op, stats in operations.items():
        for result in ("success", "failure"):
            labels = _labels([("server", server), ("op", op), ("result", result)])
            lines.append(f"fleet_operation_total{labels} {int(stats.get(result, 0))}")
    family("fleet_operation_success_ratio", "gauge",
           f"Share of successful operations in the last {window:g} hours (0 to 1).")
    for op, stats in operations.items():
        rate = stats.get("success_rate")
        if rate is not None:
            lines.append(f"fleet_operation_success_ratio{_labels([('server', server), ('op', op)])} "
                         f"{_format_value(float(rate))}")
    family("fleet_operation_duration_ms", "summary",
           f"Operation durations in milliseconds over the last {window:g} hours.")
    for op, stats in operations.items():
        base = [("server", server), ("op", op)]
        for quantile, key in (("0.5", "p50_ms"), ("0.95", "p95_ms")):
            value = stats.get(key)
            if value is not None:
                lines.append(f"fleet_operation_duration_ms{_labels(base + [('quantile', quantile)])} "
                             f"{_format_value(float(value))}")
        lines.append(f"fleet_operation_duration_ms_count{_labels(base)} {int(stats.get('count', 0))}")
        lines.append(f"fleet_operation_duration_ms_sum{_labels(base)} "
                     f"{_format_value(float(stats.get('sum_ms', 0.0)))}")
    family("fleet_operation_duration_max_ms", "gauge",
           f"Longest operation in the last {window:g} hours, in milliseconds.")
    for op, stats in operations.items():
        if stats.get("max_ms") is not None:
            lines.append(f"fleet_operation_duration_max_ms{_labels([('server', server), ('op', op)])} "
                         f"{_format_value(float(stats['max_ms']))}")
    family("fleet_counter_total", "counter",
           "Fleet event counters since the metrics file was created.")
    for name, value in summary.get("counters", {}).items():
        lines.append(f"fleet_counter_total{_labels([('server', server), ('name', name)])} {int(value)}")
    return "\n".join(lines) + "\n"
