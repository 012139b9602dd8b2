"""Shared ground for the benchmark scripts in ``bench/``: fleets, floors, timing and reports.

A benchmark builds a throw-away fleet (a bare ``origin`` holding ``coordination/messages.json``
and one clone per server) in a temporary folder, under a hermetic git environment (no global or
system git config, a fixed identity). Speed figures are reported as ratios against a *floor*
measured in the same run, interleaved with the measured operation, so that they hold on a noisy
machine: the send floor is one ``git fetch`` plus one ``git push`` of a fresh commit on the same
local remote; the CLI floor adds the interpreter's own start (``python3 -c pass``).

Results are printed as a markdown table and written as JSON to ``bench/results/<name>.json``.

Run as a script, this module is the sender worker that ``send.py`` and ``contention.py`` start
in separate processes::

    python3 bench/benchlib.py send-worker --repo CLONE --from S --to A,B --count N

It prints ``READY``, waits for one line on standard input, sends ``N`` messages round-robin to
the recipients with ``send_message(..., clone=...)`` and prints one JSON line with what happened.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON_DIR = ROOT / "python"
RESULTS_DIR = BENCH_DIR / "results"
MAILBOX_PATH = "coordination/messages.json"
BRANCH = "main"

if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

# Variables that would make a benchmark read the developer's fleet or systemd instead of its own.
_SCRUB = ("BUILD_REPO_PATH", "SERVER_ID", "MONITOR_INTERVAL", "NOTIFY_SOCKET", "WATCHDOG_USEC",
          "WATCHDOG_PID", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_TRACE",
          "GIT_TRACE_PERFORMANCE", "PYTHONPATH",
          # A deployed suite starts from cached bytecode; without the cache every CLI start
          # would also compile the suite's modules, which is not what a fleet server pays.
          "PYTHONDONTWRITEBYTECODE")


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    data = sorted(values)
    if not data:
        return float("nan")
    mid = len(data) // 2
    return data[mid] if len(data) % 2 else (data[mid - 1] + data[mid]) / 2.0


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * pct / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def p95(values: Sequence[float]) -> float:
    return percentile(values, 95.0)


def timed(fn: Callable[[], Any]) -> Tuple[float, Any]:
    """(seconds, result) of one call, by ``time.perf_counter``."""
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def interleaved(floor: Callable[[], Any], measure: Callable[[], Any], reps: int,
                prepare_floor: Optional[Callable[[], Any]] = None,
                prepare_measure: Optional[Callable[[], Any]] = None) -> Tuple[List[float], List[float]]:
    """Time ``floor`` and ``measure`` ``reps`` times each, alternating which goes first
    (ABBA...), so that drift on a busy machine hits both series alike. ``prepare_*`` run
    untimed right before their operation; ``floor(prep)`` / ``measure(prep)`` get their result.
    Returns (floor seconds, measured seconds)."""
    floors: List[float] = []
    measured: List[float] = []

    def run_floor() -> None:
        prep = prepare_floor() if prepare_floor else None
        floors.append(timed(lambda: floor(prep) if prepare_floor else floor())[0])

    def run_measure() -> None:
        prep = prepare_measure() if prepare_measure else None
        measured.append(timed(lambda: measure(prep) if prepare_measure else measure())[0])

    for i in range(reps):
        if i % 2 == 0:
            run_floor()
            run_measure()
        else:
            run_measure()
            run_floor()
    return floors, measured


# --------------------------------------------------------------------------- environment


def hermetic_env(base: Path) -> Dict[str, str]:
    """Make this process (and every child) use a private git config and a fixed identity."""
    cfg = base / "gitconfig"
    cfg.touch()
    template = base / "git-template"
    template.mkdir(exist_ok=True)
    for key in _SCRUB:
        os.environ.pop(key, None)
    os.environ.update({
        "GIT_CONFIG_GLOBAL": str(cfg),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TEMPLATE_DIR": str(template),
        "GIT_AUTHOR_NAME": "Fleet Bench", "GIT_AUTHOR_EMAIL": "bench@fleet.invalid",
        "GIT_COMMITTER_NAME": "Fleet Bench", "GIT_COMMITTER_EMAIL": "bench@fleet.invalid",
        "GIT_TERMINAL_PROMPT": "0",
        "PYTHONUNBUFFERED": "1",
    })
    return dict(os.environ)


def git(repo: "os.PathLike[str] | str", *args: str, input: Optional[bytes] = None,
        check: bool = True, env: Optional[Dict[str, str]] = None) -> str:
    proc = subprocess.run(["git", *args], cwd=str(repo), input=input, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=env,
                          stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args[:3])} failed in {repo}: "
                           f"{proc.stderr.decode('utf-8', 'replace').strip()}")
    return proc.stdout.decode("utf-8", "replace").strip()


def git_version() -> str:
    try:
        return git(".", "--version").replace("git version ", "")
    except (OSError, RuntimeError):
        return "unknown"


def suite_state() -> Dict[str, Any]:
    """Which suite is measured: HEAD, whether ``python/`` differs from it, and a digest of the
    ``python/*.py`` files themselves (to tell when they changed in the middle of a run)."""
    import hashlib

    digest = hashlib.sha1()
    for path in sorted(PYTHON_DIR.glob("*.py")):
        digest.update(path.name.encode("utf-8") + b"\0")
        try:
            digest.update(path.read_bytes())
        except OSError:
            pass
    state: Dict[str, Any] = {"python_digest": digest.hexdigest()[:12], "commit": None, "python_modified": None}
    try:
        state["commit"] = git(ROOT, "--no-optional-locks", "rev-parse", "--short=12", "HEAD")
        proc = subprocess.run(["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--", "python"],
                              cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        state["python_modified"] = proc.returncode != 0
    except (OSError, RuntimeError):
        pass
    return state


_SUITE_AT_START: Dict[str, Any] = {}


def machine() -> Dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "git": git_version(),
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------- mailboxes

SERVERS = ("code1", "code2", "build1", "build2", "build3", "win1", "win2", "test1")
_WORDS = ("build", "green", "red", "deploy", "artifact", "cache", "runner", "queue", "linker",
          "release", "nightly", "test", "suite", "failed", "passed", "retry", "disk", "memory",
          "upload", "download", "package", "version", "branch", "commit", "merge", "windows",
          "linux", "compiler", "warning", "error", "timeout", "fleet", "server", "agent", "job")


def _bodies(rng: random.Random, count: int, length: int) -> List[str]:
    out = []
    for _ in range(count):
        words: List[str] = []
        size = 0
        while size < length:
            word = rng.choice(_WORDS)
            words.append(word)
            size += len(word) + 1
        out.append(" ".join(words)[:length])
    return out


def make_messages(count: int, *, servers: Sequence[str] = SERVERS, body_len: int = 400,
                  read: bool = True, start: float = 1.7e9, step: float = 600.0,
                  avoid: Sequence[str] = (), seed: int = 7) -> List[Dict[str, Any]]:
    """``count`` direct messages among ``servers`` (none to or from ``avoid``), oldest first.

    ``read``: each is handled by its recipient (``read`` and ``read_by``), so an archive pass
    may move it; otherwise nobody has read it yet.
    """
    import datetime as dt

    rng = random.Random(seed)
    pool = [s for s in servers if s not in avoid]
    bodies = _bodies(rng, min(count, 2000) or 1, body_len - 12)
    msgs = []
    for i in range(count):
        sender = pool[i % len(pool)]
        to = pool[(i + 1 + (i // len(pool)) % (len(pool) - 1)) % len(pool)]
        when = start + i * step
        stamp = dt.datetime.fromtimestamp(when, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        msg: Dict[str, Any] = {
            "id": f"msg_{int(when)}_{rng.getrandbits(48):012x}",
            "from": sender, "to": to,
            "subject": f"Build {i}: {rng.choice(_WORDS)} {rng.choice(_WORDS)}",
            "body": f"#{i:09d} " + bodies[i % len(bodies)],
            "type": "info", "priority": "normal", "timestamp": stamp,
            "read": read, "ack_required": False,
        }
        if read:
            msg["read_by"] = [to]
        msgs.append(msg)
    return msgs


def mailbox_bytes(messages: Sequence[Dict[str, Any]]) -> bytes:
    """The canonical mailbox text (PROTOCOL.md: indent 2, ASCII, final newline)."""
    from fleet_mailbox import serialize

    return serialize({"messages": list(messages)})


# --------------------------------------------------------------------------- fleets


class BenchFleet:
    """A bare ``origin`` and server clones in a temporary folder; a context manager.

    The first commit is built with plumbing directly in the bare repository, so even a 70 MB
    mailbox is seeded without a working tree.
    """

    def __init__(self, mailbox: Optional[bytes] = None, files: Optional[Dict[str, bytes]] = None,
                 base: Optional[Path] = None) -> None:
        self._own_base = base is None
        self.base = Path(base or tempfile.mkdtemp(prefix="fleet-bench-"))
        self.env = hermetic_env(self.base)
        self.origin = self.base / "origin.git"
        self.clones: Dict[str, Path] = {}
        git(self.base, "init", "--bare", "-q", "-b", BRANCH, str(self.origin))
        content = {MAILBOX_PATH: mailbox if mailbox is not None else b'{\n  "messages": []\n}\n',
                   "README.md": b"Build repo\n"}
        content.update(files or {})
        tree = self._tree(content)
        commit = git(self.origin, "commit-tree", tree, "-m", "initial")
        git(self.origin, "update-ref", f"refs/heads/{BRANCH}", commit)

    def _tree(self, files: Dict[str, bytes]) -> str:
        """A tree holding ``files`` (nested paths allowed), written into the origin."""
        blobs: Dict[str, str] = {}
        dirs: Dict[str, Dict[str, Any]] = {}
        for path, data in files.items():
            blobs[path] = git(self.origin, "hash-object", "-w", "--stdin", input=data)
            node = dirs
            parts = path.split("/")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = blobs[path]

        def write(node: Dict[str, Any]) -> str:
            lines = []
            for name, value in sorted(node.items()):
                if isinstance(value, dict):
                    lines.append(f"040000 tree {write(value)}\t{name}\n")
                else:
                    lines.append(f"100644 blob {value}\t{name}\n")
            return git(self.origin, "mktree", input="".join(lines).encode("utf-8"))

        return write(dirs)

    def clone(self, name: str) -> Path:
        path = self.base / name
        git(self.base, "clone", "-q", str(self.origin), str(path))
        self.clones[name] = path
        return path

    def remote_tip(self) -> str:
        return git(self.origin, "rev-parse", f"refs/heads/{BRANCH}")

    def remote_blob(self, path: str = MAILBOX_PATH) -> str:
        return git(self.origin, "rev-parse", f"refs/heads/{BRANCH}:{path}")

    def remote_blob_size(self, path: str = MAILBOX_PATH) -> int:
        return int(git(self.origin, "cat-file", "-s", f"refs/heads/{BRANCH}:{path}"))

    def remote_messages(self) -> List[Dict[str, Any]]:
        raw = subprocess.run(["git", "cat-file", "blob", f"refs/heads/{BRANCH}:{MAILBOX_PATH}"],
                             cwd=str(self.origin), stdout=subprocess.PIPE, check=True).stdout
        return json.loads(raw.decode("utf-8-sig"))["messages"]

    def close(self) -> None:
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "BenchFleet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- floors


class SendFloor:
    """One ``git fetch origin main`` plus one ``git push origin <commit>:refs/heads/main``.

    ``prepare()`` (untimed) catches the floor's own clone up with the remote and builds a fresh
    commit on the tip's tree with the tip as parent, so the timed push really transfers a new
    commit; ``run(commit)`` is the timed part. With ``interpreter=True`` it also starts the
    interpreter (``python3 -c pass``): the floor of a command-line send.
    """

    def __init__(self, fleet: BenchFleet, name: str = "floor", interpreter: bool = False,
                 interpreter_env: Optional[Dict[str, str]] = None) -> None:
        self.path = fleet.clones.get(name) or fleet.clone(name)
        self.interpreter = interpreter
        self.env = dict(os.environ)
        # The interpreter starts under the same footing as the command it is the floor of
        # (bytecode cached or not).
        self.interpreter_env = interpreter_env or self.env

    def _git(self, *args: str) -> str:
        return git(self.path, *args, env=self.env)

    def prepare(self) -> str:
        self._git("fetch", "-q", "origin", BRANCH)
        tip = self._git("rev-parse", "FETCH_HEAD")
        return self._git("commit-tree", "-p", tip, "-m", "floor", f"{tip}^{{tree}}")

    def run(self, commit: str) -> None:
        self._git("fetch", "-q", "origin", BRANCH)
        self._git("push", "-q", "origin", f"{commit}:refs/heads/{BRANCH}")
        if self.interpreter:
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=self.interpreter_env)


# --------------------------------------------------------------------------- processes


def python_script(name: str) -> str:
    return str(PYTHON_DIR / name)


# The least a Python command of the suite that reads mail can do: import what every one of them
# needs before its first line (json, subprocess), run the floor's fetch (with ``state_refs``,
# beside it, the fetch of every state ref that a look at the fleet needs, as
# fleet_state.StateStore.mirror_fleet does) and parse the fetched mailbox. Timed against the
# floor, it shows where a target that counts the interpreter's start but not its standard library
# is out of reach for any Python program.
_PYTHON_FETCH = """\
import json, subprocess, sys
clone, state_refs, branch, mailbox = sys.argv[1:5]
if state_refs == "1":  # as a look does from a remote reached by a path: one fetch of both
    subprocess.run(["git", "-c", "fetch.negotiationAlgorithm=skipping", "fetch", "-q", "--prune",
                    f"--negotiation-tip=refs/remotes/origin/{branch}", "origin",
                    f"+refs/heads/{branch}:refs/remotes/origin/{branch}", "+refs/fleet/*:refs/fleet/*"],
                   cwd=clone, check=True)
else:
    subprocess.run(["git", "fetch", "-q", "origin", branch], cwd=clone, check=True)
blob = subprocess.run(["git", "cat-file", "blob", f"refs/remotes/origin/{branch}:{mailbox}"], cwd=clone,
                      stdout=subprocess.PIPE, check=True).stdout
json.loads(blob)
"""


def python_fetch_argv(clone: Path, state_refs: bool = False) -> List[str]:
    """A Python process that runs the floor's fetch in ``clone`` and reads the mailbox (see _PYTHON_FETCH)."""
    return [sys.executable, "-c", _PYTHON_FETCH, str(clone), "1" if state_refs else "0", BRANCH, MAILBOX_PATH]


def stop_process(proc: Optional["subprocess.Popen[Any]"], timeout: float = 10.0) -> None:
    """Ask a child to stop (SIGTERM: the monitor's requested stop), then kill it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except OSError:
        pass


def start_monitor(clone: Path, server: str, interval: float, *, stdout: Any = subprocess.DEVNULL,
                  stderr: Any = subprocess.DEVNULL, env: Optional[Dict[str, str]] = None,
                  extra: Sequence[str] = ("--no-auto-reply",)) -> "subprocess.Popen[Any]":
    argv = [sys.executable, python_script("message_monitor.py"), "--repo", str(clone),
            "--server", server, "--interval", f"{interval:g}", *extra]
    return subprocess.Popen(argv, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                            env=env or dict(os.environ))


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def state_receipts(origin: Path) -> Dict[str, set]:
    """Every server's read receipts on the remote: server -> {(id, from)} (PROTOCOL.md state refs)."""
    found: Dict[str, set] = {}
    refs = git(origin, "for-each-ref", "--format=%(refname)", "refs/fleet/", "refs/heads/fleet-state/")
    for ref in refs.split():
        raw = subprocess.run(["git", "cat-file", "blob", f"{ref}:state.json"], cwd=str(origin),
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout
        try:
            doc = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        found[ref.rsplit("/", 1)[-1]] = {(i, f) for i, f in doc.get("read", [])}
    return found


def monitor_started(clone: Path, server: str) -> Callable[[], bool]:
    """True once the monitor finished its first cycle (it writes its status file then)."""
    path = clone / server / "state" / "monitor_status.json"
    return path.is_file


class SenderPool:
    """Sender workers in separate processes, started together by one line on their stdin."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.procs: List[Tuple["subprocess.Popen[str]", Path]] = []

    def spawn(self, clone: Path, sender: str, targets: Sequence[str], count: int, pace: float = 0.0) -> None:
        log_path = self.base / f"worker-{sender}-{len(self.procs)}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), "send-worker", "--repo", str(clone),
                "--from", sender, "--to", ",".join(targets), "--count", str(count), "--pace", f"{pace:g}"]
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=dict(os.environ))
        self.procs.append((proc, log_path))

    def run(self, timeout: float = 600.0) -> Tuple[float, List[Dict[str, Any]]]:
        """Wait until every worker is ready, start them at once; (wall seconds, reports)."""
        for proc, log_path in self.procs:
            line = proc.stdout.readline() if proc.stdout else ""
            if line.strip() != "READY":
                raise RuntimeError(f"sender worker did not start: {line!r} "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
        started = time.time()
        for proc, _ in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        reports = []
        for proc, log_path in self.procs:
            out, _ = proc.communicate(timeout=timeout)
            lines = [ln for ln in out.splitlines() if ln.startswith("{")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"sender worker failed ({proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            reports.append(json.loads(lines[-1]))
        wall = max(r["t_end"] for r in reports) - started
        return wall, reports

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _send_worker(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="benchlib.py send-worker")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--from", dest="sender", required=True)
    parser.add_argument("--to", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between sends (0: back to back)")
    args = parser.parse_args(argv)
    from fleet_git import Clone
    from send_message import send_message

    clone = Clone(args.repo)
    targets = args.to.split(",")
    print("READY", flush=True)
    sys.stdin.readline()
    t_start = time.time()
    latencies: List[float] = []
    ids: List[str] = []
    statuses: Dict[str, int] = {}
    for i in range(args.count):
        if args.pace and i:
            time.sleep(args.pace)
        body = f"{args.sender} message {i} of {args.count}: " + "x" * 300
        started = time.perf_counter()
        result = send_message(body, f"bench {i}", targets[i % len(targets)], from_sender=args.sender,
                              clone=clone)
        latencies.append(time.perf_counter() - started)
        ids.append(result.message_id)
        statuses[result.status] = statuses.get(result.status, 0) + 1
    t_end = time.time()
    print(json.dumps({"sender": args.sender, "count": args.count, "latencies": latencies, "ids": ids,
                      "statuses": statuses, "push_attempts": clone.push_attempts,
                      "t_start": t_start, "t_end": t_end}), flush=True)
    return 0


# --------------------------------------------------------------------------- reports


class Figure:
    """One reported number, with its floor, its ratio and the target it is held to.

    ``target`` is ``(on, op, limit)``: ``on`` is ``"ratio"`` or ``"measured"``, ``op`` is
    ``"<="``, ``">="`` or ``"=="``. A figure without a target is information only.
    """

    def __init__(self, key: str, label: str, measured: Optional[float], unit: str = "",
                 floor: Optional[float] = None, ratio: Optional[float] = None,
                 target: Optional[Tuple[str, str, float]] = None, note: str = "",
                 scale: float = 1.0) -> None:
        self.key = key
        self.label = label
        self.measured = measured
        self.unit = unit
        self.floor = floor
        if ratio is None and floor and measured is not None:
            ratio = measured / floor
        self.ratio = ratio
        self.target = target
        self.note = note
        self.scale = scale  # display factor: seconds shown as ms use 1000

    @property
    def passed(self) -> Optional[bool]:
        if self.target is None:
            return None
        on, op, limit = self.target
        value = self.ratio if on == "ratio" else self.measured
        if value is None:
            return False
        if op == "<=":
            return value <= limit + 1e-9
        if op == ">=":
            return value >= limit - 1e-9
        return abs(value - limit) < 1e-9

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        on, op, limit = self.target
        sign = {"<=": "\u2264", ">=": "\u2265", "==": "="}[op]
        if on == "ratio":
            return f"ratio {sign} {limit:g}"
        return f"{sign} {_fmt(limit * self.scale, self.unit)}"

    def to_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "figure": self.label, "measured": self.measured, "unit": self.unit,
                "scale": self.scale, "floor": self.floor, "ratio": self.ratio,
                "target": list(self.target) if self.target else None,
                "target_text": self.target_text(), "pass": self.passed, "note": self.note}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Figure":
        fig = cls(data["key"], data["figure"], data.get("measured"), data.get("unit", ""),
                  data.get("floor"), data.get("ratio"),
                  tuple(data["target"]) if data.get("target") else None,  # type: ignore[arg-type]
                  data.get("note", ""), data.get("scale", 1.0))
        return fig


def _fmt(value: Optional[float], unit: str) -> str:
    if value is None:
        return "n/a"
    if value != value:  # NaN
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def figure_row(fig: Figure, prefix: str = "") -> List[str]:
    passed = fig.passed
    verdict = "-" if passed is None else ("pass" if passed else "FAIL")
    measured = _fmt(fig.measured * fig.scale if fig.measured is not None else None, fig.unit)
    floor = _fmt(fig.floor * fig.scale, fig.unit) if fig.floor is not None else "-"
    ratio = f"{fig.ratio:.2f}" if fig.ratio is not None else "-"
    label = prefix + fig.label + (f" ({fig.note})" if fig.note else "")
    return [label, measured, floor, ratio, fig.target_text(), verdict]


def markdown_table(rows: Iterable[Sequence[str]],
                   header: Sequence[str] = ("figure", "measured", "floor", "ratio", "target",
                                            "pass/fail")) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def write_report(name: str, figures: Sequence[Figure], details: Dict[str, Any], *, quick: bool,
                 started: float, as_json: bool, results_dir: Optional[str] = None) -> int:
    """Print the table (or the JSON with ``--json``) and write ``<results>/<name>.json``."""
    suite = suite_state()
    if _SUITE_AT_START and _SUITE_AT_START.get("python_digest") != suite["python_digest"]:
        suite["changed_during_run"] = True
        suite["at_start"] = dict(_SUITE_AT_START)
    doc = {
        "name": name, "quick": quick, "machine": machine(), "suite": suite,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": round(time.time() - started, 2),
        "figures": [f.to_dict() for f in figures], "details": details,
    }
    folder = Path(results_dir) if results_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(str(tmp), str(target))
    if as_json:
        print(json.dumps(doc, indent=2, default=str))
    else:
        m = doc["machine"]
        print(f"## {name}{' (quick)' if quick else ''} - {m['cpu']}, {m['cores']} cores, "
              f"Python {m['python']}, git {m['git']}\n")
        print(markdown_table(figure_row(f) for f in figures))
        print(f"\n{doc['duration_s']:.1f} s; suite {suite['commit']}"
              f"{' + modified python/' if suite['python_modified'] else ''}; results in {target}")
        if suite.get("changed_during_run"):
            print("WARNING: python/ changed during this run; the figures mix two versions of the suite")
    return 0 if all(f.measured is not None for f in figures) else 1


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; also notes which suite the run starts on."""
    if not _SUITE_AT_START:
        _SUITE_AT_START.update(suite_state())
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--results-dir", default=None,
                        help="where to write <name>.json (default: bench/results)")
    return parser


# The far link the short commands are also measured over (issue: "report the figures at 0 and
# 100 ms"), with fewer rounds than on the local path: each round costs several round trips. In
# --quick (CI's smoke run, about 2.5 minutes in all) one round only shows that the path works.
FAR_RTT_MS = 100.0
FAR_REPS = {False: 8, True: 1}  # keyed by --quick


def add_rtt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rtt-ms", type=float, default=None,
                        help="measure only over a link of this round trip (bench/slowlink.py); default: "
                             f"the local path, then {FAR_RTT_MS:g} ms with fewer rounds")


def link_plan(rtt_ms: Optional[float], reps: int, quick: bool) -> List[Tuple[Optional[float], int]]:
    """(round trip in ms or None for the local path, rounds) for each link a benchmark measures."""
    if rtt_ms is not None:
        return [(rtt_ms, reps)]
    return [(None, reps), (FAR_RTT_MS, min(reps, FAR_REPS[quick]))]


def rtt_key(rtt_ms: Optional[float]) -> str:
    """The suffix of a figure's key measured over a link: ``""`` on the local path, ``".rtt100"``."""
    return "" if rtt_ms is None else f".rtt{rtt_ms:g}"


def rtt_label(rtt_ms: Optional[float]) -> str:
    return "" if rtt_ms is None else f", {rtt_ms:g} ms RTT"


def progress(text: str) -> None:
    """A progress line on stderr (stdout carries the table or the JSON)."""
    sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["send-worker"]:
        return _send_worker(args[1:])
    sys.stderr.write("usage: benchlib.py send-worker --repo R --from S --to A,B --count N\n")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())


def summarize_senders(wall: float, reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals over sender-worker reports: messages, pushes, retries, statuses, latencies."""
    messages = sum(r["count"] for r in reports)
    attempts = sum(r["push_attempts"] for r in reports)
    latencies = [x for r in reports for x in r["latencies"]]
    statuses: Dict[str, int] = {}
    for r in reports:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"messages": messages, "wall_s": wall, "per_s": messages / wall if wall > 0 else None,
            "push_attempts": attempts, "retries": attempts - messages, "statuses": statuses,
            "latency_median_s": median(latencies), "latency_p95_s": p95(latencies),
            "latency_max_s": max(latencies) if latencies else None}
