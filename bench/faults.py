"""Fault injection for the fleet mailbox suite: the FAULT TABLE.

Usage::

    python3 bench/faults.py            # every scenario (a few minutes at most)
    python3 bench/faults.py --quick    # fewer messages and kills
    python3 bench/faults.py --only baseline --only corrupt-repair --keep

Each scenario builds its own bare origin and clones in a temporary folder, serves the origin
through a real ``git daemon``, a real smart-HTTP server (tests/gitserver.py) or a plain file
path, injects one kind of fault while real sender and monitor processes work, lets the fleet
recover (monitor cycles until every sender's retry queue is empty, with a deadline), and then
counts on the remote itself (``coordination/messages.json`` on the bare origin's branch):

- every message body is a unique token; ``sent`` = tokens handed to the tool (CLI exit 0 or 75,
  API result ``sent``/``queued``, entries enqueued directly, messages that were already in a
  broken mailbox before its repair);
- ``delivered`` = distinct tokens present; ``duplicated`` = extra copies of a token plus
  distinct messages sharing one ``(id, from)``; ``lost`` = handed-over tokens that never arrived;
  ``interrupted`` = sends killed before the tool answered whose push did not land and that were
  not queued (the caller saw no exit code, so nothing was handed over). Messages that a
  scenario's own hostile force-push deletes from the remote are not counted as handed over;
  its notes say how many vanished and how many the monitor reported.

After each scenario the PROTOCOL.md invariants are checked: every commit on the branch holds a
``messages.json`` that parses (except a broken commit the scenario pushed on purpose), and no
clone is left in a merge or rebase or with a dirty working tree.

The table is printed as markdown; the JSON goes to ``bench/results/faults.json`` (``--json``).

Exit codes: 0 no scenario lost or duplicated a message and every invariant held; 1 otherwise
(or a scenario crashed); 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIR = ROOT / "python"
TESTS_DIR = ROOT / "tests"
for _folder in (PYTHON_DIR, TESTS_DIR):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from gitserver import PROXY_VARIABLES, GitDaemon, HttpGitServer, make_bare  # noqa: E402

from circuit_breaker import CircuitBreaker  # noqa: E402
from fleet_common import state_dir  # noqa: E402
from fleet_git import MAILBOX_PATH, Clone, PushRejected, run_git  # noqa: E402
from message_monitor import Monitor  # noqa: E402
from message_queue import MessageQueue  # noqa: E402

log = logging.getLogger("faults")

SEND_SCRIPT = PYTHON_DIR / "send_message.py"
MONITOR_SCRIPT = PYTHON_DIR / "message_monitor.py"
DEFAULT_JSON = ROOT / "bench" / "results" / "faults.json"
BRANCH = "main"
RECIPIENT = "code2"
FAST_BACKOFF = (0.05, 0.05, 0.05)
SEND_TIMEOUT = 120.0  # one CLI send; far beyond anything a scenario expects
DRAIN_DEADLINE = 60.0  # the recovery phase; a queued entry's backoff after failures is 2, 4, 8, 16 s
WAIT_DEADLINE = 30.0  # waiting for a push to be in flight
ORPHAN_GRACE = 20.0  # a git child that outlived its killed parent may finish its push
HANDED = frozenset({"sent", "queued", "enqueued", "salvaged"})
EXIT_SENT, EXIT_QUEUED = 0, 75
CLEARED_VARIABLES = ("BUILD_REPO_PATH", "SERVER_ID", "MONITOR_INTERVAL", "NOTIFY_SOCKET", "WATCHDOG_USEC",
                     "WATCHDOG_PID", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "PYTHONPATH",
                     "no_proxy", "NO_PROXY")


# --------------------------------------------------------------------------- environment


@contextlib.contextmanager
def hermetic_environment(base: Path) -> Iterator[None]:
    """Git config, identity and home inside ``base``; no proxy for 127.0.0.1 (restored after)."""
    saved = dict(os.environ)
    home = base / "home"
    template = base / "git-template"
    home.mkdir(parents=True, exist_ok=True)
    template.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text("", encoding="utf-8")
    for key in (*PROXY_VARIABLES, *CLEARED_VARIABLES):
        os.environ.pop(key, None)
    os.environ.update({
        "HOME": str(home), "USERPROFILE": str(home),
        "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"), "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TEMPLATE_DIR": str(template),
        "GIT_AUTHOR_NAME": "Fleet Faults", "GIT_AUTHOR_EMAIL": "faults@example.invalid",
        "GIT_COMMITTER_NAME": "Fleet Faults", "GIT_COMMITTER_EMAIL": "faults@example.invalid",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --------------------------------------------------------------------------- child processes


class Children:
    """Every process a scenario starts, and the git children that outlived a killed parent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.procs: List["subprocess.Popen[bytes]"] = []
        self.orphans: List[Any] = []  # psutil.Process objects (they remember their start time)

    def popen(self, argv: Sequence[str], log_path: Optional[Path] = None) -> "subprocess.Popen[bytes]":
        out: Any = subprocess.PIPE
        if log_path is not None:
            out = open(log_path, "ab")  # closed right after Popen: the child keeps its own descriptor
        try:
            proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT if log_path is not None else subprocess.PIPE,
                                    cwd=str(ROOT))
        finally:
            if log_path is not None:
                out.close()
        with self._lock:
            self.procs.append(proc)
        return proc

    def kill(self, proc: "subprocess.Popen[bytes]", *, tree: bool) -> int:
        """SIGKILL ``proc`` (and, with ``tree``, every descendant, as a service manager kills a
        control group). Without ``tree`` its git children are orphaned: they may finish the push,
        and are waited for. Returns how many descendants were running."""
        import psutil

        try:
            parent = psutil.Process(proc.pid)
            parent.suspend()  # no new children between listing them and the kill
            descendants = parent.children(recursive=True)
            if tree:
                for child in descendants:
                    with contextlib.suppress(psutil.Error):
                        child.suspend()
                descendants = _unique(descendants + parent.children(recursive=True))
        except psutil.Error:
            descendants = []
        proc.kill()
        proc.wait(timeout=30)
        if tree:
            for child in descendants:
                with contextlib.suppress(psutil.Error):
                    child.kill()
            psutil.wait_procs(descendants, timeout=10)
        else:
            with self._lock:
                self.orphans.extend(descendants)
            _gone, alive = psutil.wait_procs(descendants, timeout=ORPHAN_GRACE)
            for child in alive:
                with contextlib.suppress(psutil.Error):
                    child.kill()
        return len(descendants)

    def cleanup(self) -> None:
        import psutil

        with self._lock:
            procs, orphans = list(self.procs), list(self.orphans)
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.kill(proc, tree=True)
        for orphan in orphans:
            with contextlib.suppress(psutil.Error):
                if orphan.is_running():  # is_running compares the start time: never a recycled pid
                    orphan.kill()
        for proc in procs:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def _unique(items: List[Any]) -> List[Any]:
    seen: Set[int] = set()
    out = []
    for item in items:
        if item.pid not in seen:
            seen.add(item.pid)
            out.append(item)
    return out


# --------------------------------------------------------------------------- remotes and clones


class Remote:
    """A bare origin under ``base`` and the clones that talk to it (through ``url`` or the path)."""

    def __init__(self, base: Path, mailbox: Optional[bytes] = None) -> None:
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        kwargs = {"mailbox": mailbox} if mailbox is not None else {}
        self.bare = make_bare(base, "origin.git", BRANCH, **kwargs)
        self.clones: List[Path] = []
        self.allowed_broken: Set[str] = set()

    def clone(self, name: str, url: Optional[str] = None) -> Path:
        path = self.base / name
        run_git(self.base, "clone", "-q", str(self.bare), str(path))
        if url is not None:
            run_git(path, "remote", "set-url", "origin", url)
        self.clones.append(path)
        return path

    def messages(self) -> List[Any]:
        raw = run_git(self.bare, "show", f"{BRANCH}:{MAILBOX_PATH}").stdout
        data = json.loads(raw.decode("utf-8"))
        return list(data.get("messages", []))

    def commits(self) -> List[str]:
        return run_git(self.bare, "rev-list", BRANCH).stdout.decode().split()

    def check_invariants(self) -> List[str]:
        """PROTOCOL.md: every commit's mailbox parses; no clone mid-merge/rebase or dirty."""
        problems: List[str] = []
        revs = self.commits()
        specs = "".join(f"{rev}:{MAILBOX_PATH}\n" for rev in revs).encode()
        out = run_git(self.bare, "cat-file", "--batch", input=specs).stdout
        pos = 0
        bad = 0
        for rev in revs:
            nl = out.index(b"\n", pos)
            header = out[pos:nl].split(b" ")
            pos = nl + 1
            content = None
            if len(header) == 3 and header[2].isdigit():
                size = int(header[2])
                content = out[pos:pos + size]
                pos += size + 1
            if rev in self.allowed_broken:
                continue
            try:
                doc = json.loads(content.decode("utf-8")) if content is not None else None
                ok = isinstance(doc, dict) and isinstance(doc.get("messages"), list)
            except ValueError:
                ok = False
            if not ok:
                bad += 1
                if bad <= 3:
                    problems.append(f"commit {rev[:12]} holds no parsable mailbox")
        if bad > 3:
            problems.append(f"{bad} commits in all hold no parsable mailbox")
        for clone in self.clones:
            git_dir = clone / ".git"
            for marker in ("MERGE_HEAD", "rebase-merge", "rebase-apply", "CHERRY_PICK_HEAD", "REVERT_HEAD"):
                if (git_dir / marker).exists():
                    problems.append(f"clone {clone.name} has {marker}")
            dirty = run_git(clone, "status", "--porcelain", check=False).stdout.decode().strip()
            if dirty:
                problems.append(f"clone {clone.name} has a dirty working tree: {dirty.splitlines()[0]}")
        return problems


def prefetch(clone: Path) -> None:
    """A fresh FETCH_HEAD: a standalone send then pushes from the known tip (PROTOCOL.md step 1)."""
    run_git(clone, "fetch", "-q", "origin", check=True, timeout=60)


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """What each token's sender was told (or that it was killed before being told anything)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.Lock()
        self._serial = 0
        self.outcome: Dict[str, str] = {}
        self.codes: Counter = Counter()
        self.errors: List[str] = []

    def token(self, who: str) -> str:
        with self._lock:
            self._serial += 1
            token = f"FT-{self.label}-{who}-{self._serial:04d}-{secrets.token_hex(4)}"
            self.outcome[token] = "attempted"
            return token

    def record(self, token: str, outcome: str) -> None:
        with self._lock:
            self.outcome[token] = outcome

    def record_exit(self, token: str, code: int, stderr: str = "") -> None:
        outcome = {EXIT_SENT: "sent", EXIT_QUEUED: "queued"}.get(code, "failed")
        with self._lock:
            self.outcome[token] = outcome
            self.codes[code] += 1
            if outcome == "failed" and len(self.errors) < 5:
                self.errors.append(f"exit {code}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}")

    def add_known(self, token: str, outcome: str) -> None:
        with self._lock:
            self.outcome[token] = outcome


def codes_text(codes: Counter) -> str:
    return ", ".join(f"exit {code} x{count}" for code, count in sorted(codes.items()))


class ScenarioResult:
    def __init__(self, name: str, title: str) -> None:
        self.name = name
        self.title = title
        self.sent = self.delivered = self.duplicated = self.lost = self.interrupted = 0
        self.notes: List[str] = []
        self.problems: List[str] = []
        self.details: Dict[str, Any] = {}
        self.seconds = 0.0
        self.error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.problems or self.error)

    def to_dict(self) -> Dict[str, Any]:
        return {"scenario": self.name, "title": self.title, "sent": self.sent, "delivered": self.delivered,
                "duplicated": self.duplicated, "lost": self.lost, "interrupted": self.interrupted,
                "ok": self.ok, "seconds": round(self.seconds, 1), "notes": self.notes,
                "invariant_problems": self.problems, "error": self.error, "details": self.details}


def tally(remote: Remote, ledger: Ledger, result: ScenarioResult) -> None:
    """Count on the remote: delivered, duplicated, lost, interrupted."""
    present: Counter = Counter()
    bodies_by_key: Dict[Tuple[str, str], Set[str]] = {}
    copies_by_key: Counter = Counter()
    strangers = 0
    for msg in remote.messages():
        if not isinstance(msg, dict):
            continue
        body = msg.get("body")
        if isinstance(body, str) and body in ledger.outcome:
            present[body] += 1
        else:
            strangers += 1
        key = (str(msg.get("id")), str(msg.get("from")).lower())
        copies_by_key[key] += 1
        bodies_by_key.setdefault(key, set()).add(json.dumps(body))
    extra_copies = sum(count - 1 for count in present.values())
    shared_ids = sum(len(bodies_by_key[key]) - 1 for key, count in copies_by_key.items() if count > 1)
    handed = {t for t, o in ledger.outcome.items() if o in HANDED}
    lost = sorted(t for t in handed if t not in present)
    interrupted = sorted(t for t, o in ledger.outcome.items() if o == "killed" and t not in present)
    failed_missing = sorted(t for t, o in ledger.outcome.items() if o == "failed" and t not in present)
    unanswered = sorted(t for t, o in ledger.outcome.items() if o == "attempted")
    result.sent = len(handed)
    result.delivered = len(present)
    result.duplicated = extra_copies + shared_ids
    result.lost = len(lost)
    result.interrupted = len(interrupted)
    if ledger.codes:
        result.notes.append(codes_text(ledger.codes))
    killed_landed = sum(1 for t, o in ledger.outcome.items() if o == "killed" and t in present)
    if killed_landed:
        result.notes.append(f"{killed_landed} killed send(s) landed anyway (counted delivered)")
    if failed_missing:
        result.notes.append(f"{len(failed_missing)} failed with exit 1 and did not land")
    if shared_ids:
        result.notes.append(f"{shared_ids} distinct message(s) share an (id, from)")
    if strangers:
        result.notes.append(f"{strangers} message(s) without a known token on the remote")
    if unanswered:
        result.notes.append(f"{len(unanswered)} send(s) never answered")
    result.details.update({
        "lost_tokens": [{"token": t, "told": ledger.outcome[t]} for t in lost],
        "duplicated_tokens": sorted(t for t, c in present.items() if c > 1),
        "interrupted_tokens": interrupted, "failed_errors": ledger.errors,
        "exit_codes": {str(k): v for k, v in ledger.codes.items()},
        "remote_commits": len(remote.commits()),
    })


# --------------------------------------------------------------------------- senders and monitors


def send_cli(children: Children, repo: Path, sender: str, ledger: Ledger) -> int:
    """One real ``send_message.py`` process; its exit code goes into the ledger."""
    token = ledger.token(sender)
    proc = children.popen([sys.executable, str(SEND_SCRIPT), token, "--to", RECIPIENT, "--from", sender,
                           "--repo", str(repo), "-q"])
    try:
        _out, err = proc.communicate(timeout=SEND_TIMEOUT)
    except subprocess.TimeoutExpired:
        children.kill(proc, tree=True)
        ledger.record(token, "killed")
        return -1
    ledger.record_exit(token, proc.returncode, err.decode("utf-8", "replace"))
    return proc.returncode


def run_senders(children: Children, plan: Sequence[Tuple[Path, str]], per_sender: int, ledger: Ledger,
                on_done: Optional[Callable[[int], None]] = None) -> None:
    """One thread per (clone, sender), each running ``per_sender`` CLI sends one after another."""
    done = [0]
    lock = threading.Lock()
    failures: List[BaseException] = []

    def loop(repo: Path, sender: str) -> None:
        try:
            for _ in range(per_sender):
                send_cli(children, repo, sender, ledger)
                with lock:
                    done[0] += 1
                    count = done[0]
                if on_done is not None:
                    on_done(count)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=loop, args=(repo, sender), name=f"sender-{sender}")
               for repo, sender in plan]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]


def make_monitor(repo: Path, server: str) -> Monitor:
    """An in-process monitor with small thresholds, so breaker scenarios take seconds."""
    breaker = CircuitBreaker(2, 2.0, state_path=str(state_dir(repo, server) / "circuit_breaker.json"),
                             exclude=(PushRejected,))
    return Monitor(Clone(repo), server, 0.5, backoff=FAST_BACKOFF, breaker=breaker, auto_reply=False,
                   one_shot=True, preflight_timeout=1.0)


def pending_count(repo: Path, server: str) -> int:
    return len(MessageQueue(str(repo), server).get_pending())


def drain(monitors: Sequence[Monitor], result: ScenarioResult, deadline: float = DRAIN_DEADLINE) -> None:
    """The recovery phase: monitor cycles until every queue is empty (or the deadline)."""
    started = time.monotonic()
    cycles = 0
    while True:
        waiting = {m.server: pending_count(m.repo, m.server) for m in monitors}
        if not any(waiting.values()):
            break
        if time.monotonic() - started > deadline:
            result.notes.append(f"drain deadline: still pending {waiting}")
            break
        for mon in monitors:
            if waiting[mon.server]:
                mon.cycle()
                cycles += 1
        time.sleep(0.2)
    dead = sum(len(MessageQueue(str(m.repo), m.server).get_dead()) for m in monitors)
    if dead:
        result.notes.append(f"{dead} dead queue entr{'y' if dead == 1 else 'ies'}")
    result.notes.append(f"drained in {time.monotonic() - started:.1f} s ({cycles} cycles)")
    result.details["drain_cycles"] = cycles


def wait_for(condition: Callable[[], bool], deadline: float = WAIT_DEADLINE, step: float = 0.01) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(step)
    return False


def receive_pack_seen(server: HttpGitServer, since: int, method: str) -> bool:
    return any(r.method == method and "receive-pack" in r.path for r in server.requests[since:])


def kill_in_flight(children: Children, proc: "subprocess.Popen[bytes]", server: HttpGitServer, since: int,
                   phase: str, tree: bool) -> str:
    """Kill ``proc`` at ``phase`` of its push through ``server`` (whose every answer is delayed):

    - ``early``: the push's first request (GET info/refs for receive-pack) is held by the delay,
      so the pack has not been sent (needs a fresh FETCH_HEAD so the push is the first request);
    - ``post``: that GET was answered, the POST with the pack is held by the delay;
    - ``applying``: the server has started http-backend on the POST (the ref is being updated).
    """
    if phase == "early":
        reached = wait_for(lambda: server.active_connections > 0 or proc.poll() is not None)
        time.sleep(0.4)
    elif phase == "post":
        reached = wait_for(lambda: receive_pack_seen(server, since, "GET") or proc.poll() is not None)
        time.sleep(random.uniform(0.1, 0.7))
    else:
        reached = wait_for(lambda: receive_pack_seen(server, since, "POST") or proc.poll() is not None, step=0.002)
    if proc.poll() is not None:
        return f"{phase}: exited {proc.returncode} before the kill"
    if not reached:
        return f"{phase}: not reached"
    children.kill(proc, tree=tree)
    return f"{phase}/{'tree' if tree else 'process'}"


# --------------------------------------------------------------------------- scenarios


class Context:
    def __init__(self, base: Path, quick: bool) -> None:
        self.base = base
        self.quick = quick
        self.children = Children()

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def scenario_baseline(ctx: Context, result: ScenarioResult) -> Remote:
    senders, per = 4, ctx.n(10, 4)
    daemon = GitDaemon(ctx.base)
    remote = Remote(ctx.base)
    try:
        daemon.start()
        plan = [(remote.clone(f"s{i}", daemon.url("origin.git")), f"s{i}") for i in range(senders)]
        ledger = Ledger("base")
        run_senders(ctx.children, plan, per, ledger)
        drain([make_monitor(repo, name) for repo, name in plan], result)
        result.notes.insert(0, f"git daemon, {senders} senders x {per}")
        tally(remote, ledger, result)
    finally:
        daemon.stop()
    return remote


def scenario_remote_down(ctx: Context, result: ScenarioResult) -> Remote:
    per = ctx.n(10, 5)
    daemon = GitDaemon(ctx.base)
    remote = Remote(ctx.base)
    total = 2 * per
    events: List[str] = []
    lock = threading.Lock()
    try:
        daemon.start()
        plan = [(remote.clone(name, daemon.url("origin.git")), name) for name in ("build1", "build2")]
        ledger = Ledger("down")

        def on_done(count: int) -> None:
            with lock:  # one controller at a time; stop/start wait for the port to change state
                if count >= total // 3 and "stopped" not in events:
                    daemon.stop()
                    events.append("stopped")
                elif count >= 2 * total // 3 and "stopped" in events and "started" not in events:
                    daemon.start()
                    events.append("started")

        run_senders(ctx.children, plan, per, ledger, on_done)
        daemon.start()
        drain([make_monitor(repo, name) for repo, name in plan], result)
        result.notes.insert(0, f"git daemon stopped after {total // 3} and started after {2 * total // 3} "
                               f"of {total} sends")
        tally(remote, ledger, result)
    finally:
        daemon.stop()
    return remote


def scenario_flapping(ctx: Context, result: ScenarioResult) -> Remote:
    per = ctx.n(15, 6)
    daemon = GitDaemon(ctx.base)
    remote = Remote(ctx.base)
    stop = threading.Event()
    flips = [0]
    cycles = [0]
    failures: List[BaseException] = []
    try:
        daemon.start()
        plan = [(remote.clone(name, daemon.url("origin.git")), name) for name in ("build1", "build2")]
        monitors = [make_monitor(repo, name) for repo, name in plan]
        ledger = Ledger("flap")

        def flapper() -> None:
            try:
                while not stop.wait(random.uniform(0.5, 1.0)):
                    if daemon.running:
                        daemon.stop()
                    else:
                        daemon.start()
                    flips[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        def monitoring() -> None:
            try:
                while not stop.wait(0.3):
                    for mon in monitors:
                        mon.cycle()
                        cycles[0] += 1
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=flapper, name="flapper"),
                   threading.Thread(target=monitoring, name="monitors")]
        for thread in threads:
            thread.start()
        try:
            run_senders(ctx.children, plan, per, ledger)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        if failures:
            raise failures[0]
        daemon.start()
        drain(monitors, result)
        result.notes.insert(0, f"2 senders x {per}, {flips[0]} daemon stops/starts, "
                               f"{cycles[0]} monitor cycles meanwhile")
        tally(remote, ledger, result)
    finally:
        daemon.stop()
    return remote


def scenario_http_errors(ctx: Context, result: ScenarioResult) -> Remote:
    per = ctx.n(10, 5)
    server = HttpGitServer(ctx.base)
    remote = Remote(ctx.base)
    stop = threading.Event()
    seen: Counter = Counter()
    try:
        server.start()
        plan = [(remote.clone(name, server.url("origin.git")), name) for name in ("build1", "build2")]
        ledger = Ledger("http")

        def toggler() -> None:
            pattern = [None, 500, None, 401]
            index = 0
            while not stop.wait(random.uniform(0.3, 0.7)):
                index += 1
                server.fail_with = pattern[index % len(pattern)]

        thread = threading.Thread(target=toggler, name="toggler")
        thread.start()
        try:
            run_senders(ctx.children, plan, per, ledger)
        finally:
            stop.set()
            thread.join()
            server.fail_with = None
        for record in server.requests:
            seen[record.status] += 1
        drain([make_monitor(repo, name) for repo, name in plan], result)
        result.notes.insert(0, "HTTP answers " + ", ".join(f"{k} x{v}" for k, v in sorted(seen.items())))
        tally(remote, ledger, result)
    finally:
        server.stop()
    return remote


def scenario_slow(ctx: Context, result: ScenarioResult) -> Remote:
    count = ctx.n(5, 3)
    server = HttpGitServer(ctx.base)
    remote = Remote(ctx.base)
    try:
        server.start()
        repo = remote.clone("build1", server.url("origin.git"))
        prefetch(repo)
        server.delay = 2.0
        ledger = Ledger("slow")
        started = time.monotonic()
        for _ in range(count):
            send_cli(ctx.children, repo, "build1", ledger)
        per_send = (time.monotonic() - started) / count
        server.delay = 0.0
        drain([make_monitor(repo, "build1")], result)
        result.notes.insert(0, f"delay 2 s per request, {count} sequential sends, {per_send:.1f} s each")
        tally(remote, ledger, result)
        if ledger.codes.get(EXIT_SENT, 0) != count:
            result.notes.append("not every send was verified at once (exit 0)")
    finally:
        server.stop()
    return remote


def _queued_message(msg_id: str, token: str) -> Dict[str, Any]:
    return {"id": msg_id, "from": "build1", "to": RECIPIENT, "subject": token, "body": token, "type": "info",
            "priority": "normal", "timestamp": "2025-11-04T08:00:00Z", "read": False, "ack_required": False}


def scenario_monitor_killed(ctx: Context, result: ScenarioResult) -> Remote:
    from fleet_mailbox import new_message_id

    count = 10
    rounds = [("post", True), ("post", False), ("applying", True)][:ctx.n(3, 2)]
    server = HttpGitServer(ctx.base)
    remote = Remote(ctx.base)
    kills: List[str] = []
    try:
        server.start()
        repo = remote.clone("build1", server.url("origin.git"))
        ledger = Ledger("monkill")
        queue = MessageQueue(str(repo), "build1")
        for _ in range(count):
            token = ledger.token("build1")
            queue.enqueue(_queued_message(new_message_id(), token), reason="fault injection")
            ledger.record(token, "enqueued")
        server.delay = 1.0
        argv = [sys.executable, str(MONITOR_SCRIPT), "--repo", str(repo), "--server", "build1",
                "--interval", "0.5", "--no-auto-reply"]
        for phase, tree in rounds:
            since = len(server.requests)
            proc = ctx.children.popen(argv, log_path=ctx.base / "monitor.log")
            kills.append(kill_in_flight(ctx.children, proc, server, since, phase, tree))
            if proc.poll() is None:
                ctx.children.kill(proc, tree=True)
        pending_after_kills = pending_count(repo, "build1")
        landed = {m.get("body") for m in remote.messages() if isinstance(m, dict)}
        landed_pending = sum(1 for e in queue.get_pending() if (e.get("message") or {}).get("body") in landed)
        server.delay = 0.0
        once = 0
        started = time.monotonic()
        while pending_count(repo, "build1") and time.monotonic() - started < DRAIN_DEADLINE:
            proc = ctx.children.popen([*argv, "--once"], log_path=ctx.base / "monitor.log")
            proc.wait(timeout=SEND_TIMEOUT)
            once += 1
        result.notes.insert(0, f"{count} queued; kills: {', '.join(kills)}; {pending_after_kills} pending after "
                               f"the kills ({landed_pending} of them already on the remote); "
                               f"{once} --once run(s) to finish")
        if pending_count(repo, "build1"):
            result.notes.append(f"{pending_count(repo, 'build1')} still pending")
        tally(remote, ledger, result)
    finally:
        server.stop()
    return remote


def scenario_sender_killed(ctx: Context, result: ScenarioResult) -> Remote:
    from fleet_mailbox import new_message_id

    plan = [("early", True), ("post", True), ("post", False)][:ctx.n(3, 2)]
    server = HttpGitServer(ctx.base)
    remote = Remote(ctx.base)
    kills: List[str] = []
    reruns: Counter = Counter()
    try:
        server.start()
        repo = remote.clone("build1", server.url("origin.git"))
        ledger = Ledger("sendkill")

        def fresh_start() -> int:
            server.delay = 0.0
            prefetch(repo)  # the push is then the first request (PROTOCOL.md step 1 skipped)
            wait_for(lambda: server.active_connections == 0)
            server.delay = 1.0
            return len(server.requests)

        # A: the CLI (no way to re-send the same id): a kill is "delivered" or "interrupted".
        for phase, tree in plan:
            token = ledger.token("build1")
            since = fresh_start()
            proc = ctx.children.popen([sys.executable, str(SEND_SCRIPT), token, "--to", RECIPIENT, "--from",
                                       "build1", "--repo", str(repo), "-q"])
            kills.append("cli " + kill_in_flight(ctx.children, proc, server, since, phase, tree))
            if proc.returncode is not None and proc.returncode >= 0:
                ledger.record_exit(token, proc.returncode)
            else:
                ledger.record(token, "killed")
        # B: the API with a fixed id, killed, then the same send again: exactly once.
        for phase, tree in plan:
            token = ledger.token("build1")
            msg_id = new_message_id()
            child = [sys.executable, str(Path(__file__).resolve()), "--child-send", str(repo), "build1",
                     RECIPIENT, token, msg_id]
            since = fresh_start()
            proc = ctx.children.popen(child)
            kills.append("api " + kill_in_flight(ctx.children, proc, server, since, phase, tree))
            rerun = ctx.children.popen(child)
            _out, err = rerun.communicate(timeout=SEND_TIMEOUT)
            reruns[rerun.returncode] += 1
            ledger.record_exit(token, rerun.returncode, err.decode("utf-8", "replace"))
        server.delay = 0.0
        # A killed CLI send that reached the queue before it died was handed over after all.
        for entry in MessageQueue(str(repo), "build1").get_pending():
            body = (entry.get("message") or {}).get("body")
            if ledger.outcome.get(body) == "killed":
                ledger.record(body, "queued")
        drain([make_monitor(repo, "build1")], result)
        result.notes.insert(0, f"delay 1 s; kills: {', '.join(kills)}; API re-runs "
                               + ", ".join(f"exit {k} x{v}" for k, v in sorted(reruns.items())))
        tally(remote, ledger, result)
    finally:
        server.stop()
    return remote


def scenario_race_storm(ctx: Context, result: ScenarioResult) -> Remote:
    senders, per = 8, ctx.n(10, 4)
    remote = Remote(ctx.base)
    plan = [(remote.clone(f"s{i}"), f"s{i}") for i in range(senders)]
    ledger = Ledger("storm")
    started = time.monotonic()
    run_senders(ctx.children, plan, per, ledger)
    elapsed = time.monotonic() - started
    drain([make_monitor(repo, name) for repo, name in plan], result)
    result.notes.insert(0, f"file remote, {senders} senders x {per} at once, {elapsed:.1f} s, "
                           f"{len(remote.commits()) - 1} commits")
    tally(remote, ledger, result)
    return remote


def _legacy_message(token: str, n: int, sender: str) -> str:
    return json.dumps({"id": f"msg_17622500{n:02d}_{n:04d}", "from": sender, "to": RECIPIENT,
                       "subject": "legacy", "body": token, "timestamp": "2025-11-04T08:00:00Z",
                       "read": False}, indent=2)


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def scenario_corrupt_repair(ctx: Context, result: ScenarioResult) -> Remote:
    count = ctx.n(5, 3)
    ledger = Ledger("repair")
    kept, ours, theirs = (ledger.token(who) for who in ("architect", "build3", "build4"))
    good = '{\n  "messages": [\n' + _indent(_legacy_message(kept, 1, "architect")) + "\n  ]\n}\n"
    remote = Remote(ctx.base, mailbox=good.encode())
    broken = ("{\n  \"messages\": [\n" + _indent(_legacy_message(kept, 1, "architect")) + ",\n"
              "<<<<<<< HEAD\n" + _indent(_legacy_message(ours, 2, "build3")) + "\n"
              "=======\n" + _indent(_legacy_message(theirs, 3, "build4")) + "\n"
              ">>>>>>> origin/main\n  ]\n}\n")
    legacy = remote.clone("legacy")
    (legacy / MAILBOX_PATH).write_text(broken, encoding="utf-8")
    run_git(legacy, "commit", "-qam", "legacy merge with conflict markers", "--no-gpg-sign")
    run_git(legacy, "push", "-q", "origin", BRANCH)
    bad = run_git(legacy, "rev-parse", "HEAD").stdout.decode().strip()
    remote.allowed_broken.add(bad)
    for token in (kept, ours, theirs):
        ledger.add_known(token, "salvaged")
    repo = remote.clone("build1")
    told_repair = 0
    for _ in range(count):
        token = ledger.token("build1")
        proc = ctx.children.popen([sys.executable, str(SEND_SCRIPT), token, "--to", RECIPIENT, "--from",
                                   "build1", "--repo", str(repo), "-q"])
        _out, err = proc.communicate(timeout=SEND_TIMEOUT)
        text = err.decode("utf-8", "replace")
        told_repair += "--repair" in text
        ledger.record_exit(token, proc.returncode, text)
    commits_while_broken = len(remote.commits())
    repair = subprocess.run([sys.executable, str(MONITOR_SCRIPT), "--repair", "--repo", str(repo),
                             "--server", "build1"], stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=SEND_TIMEOUT, cwd=str(ROOT))
    summary = repair.stdout.decode("utf-8", "replace").strip().splitlines()
    drain([make_monitor(repo, "build1")], result)
    result.notes.insert(0, f"{count} sends while broken ({told_repair} told to --repair, "
                           f"{commits_while_broken - 2} commits on top of the broken one); "
                           f"--repair exit {repair.returncode}: {summary[-1] if summary else ''}")
    if told_repair != count:
        result.problems.append(f"only {told_repair} of {count} sends named --repair")
    if commits_while_broken != 2:
        result.problems.append("a send wrote on top of the broken mailbox")
    tally(remote, ledger, result)
    return remote


def scenario_gc_race(ctx: Context, result: ScenarioResult) -> Remote:
    """Sends from a clone in which ``git gc --prune=now`` and ``git repack -ad`` run without a
    pause (objects move into packs, loose ones and empty folders vanish under the sender), while
    a second clone sends too, so the first keeps losing races and reading new tips."""
    per = ctx.n(20, 8)
    remote = Remote(ctx.base)
    plan = [(remote.clone("s0"), "s0"), (remote.clone("s1"), "s1")]
    gc_repo = plan[0][0]
    ledger = Ledger("gc")
    stop = threading.Event()
    rounds = [0]

    def collect_garbage() -> None:
        while not stop.is_set():
            run_git(gc_repo, "gc", "-q", "--prune=now", check=False, timeout=120)
            run_git(gc_repo, "repack", "-adq", check=False, timeout=120)
            rounds[0] += 1

    collector = threading.Thread(target=collect_garbage, name="gc-loop")
    collector.start()
    started = time.monotonic()
    try:
        run_senders(ctx.children, plan, per, ledger)
    finally:
        stop.set()
        collector.join(timeout=300)
    elapsed = time.monotonic() - started
    drain([make_monitor(repo, name) for repo, name in plan], result)
    result.notes.insert(0, f"file remote, 2 senders x {per}, {rounds[0]} gc --prune=now + repack -ad "
                           f"rounds in s0's clone during the sends ({elapsed:.1f} s)")
    tally(remote, ledger, result)
    return remote


def _hostile_push(remote: Remote, hostile: Path, edit: Callable[[Path], None], message: str) -> str:
    """What a hostile (or broken) member can always do: commit anything and push it."""
    run_git(hostile, "pull", "-q", "--ff-only", "origin", BRANCH)
    edit(hostile)
    run_git(hostile, "commit", "-q", "--no-gpg-sign", "-m", message)
    run_git(hostile, "push", "-q", "origin", BRANCH)
    commit = run_git(hostile, "rev-parse", "HEAD").stdout.decode().strip()
    remote.allowed_broken.add(commit)
    return commit


def _repair(repo: Path, server: str) -> str:
    proc = subprocess.run([sys.executable, str(MONITOR_SCRIPT), "--repair", "--repo", str(repo), "--server", server],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=SEND_TIMEOUT, cwd=str(ROOT))
    lines = proc.stdout.decode("utf-8", "replace").strip().splitlines()
    return f"--repair exit {proc.returncode}: {lines[-1] if lines else proc.stderr.decode()[-200:]}"


def scenario_hostile(ctx: Context, result: ScenarioResult) -> Remote:
    """A hostile member, one attack after another, against real sender and monitor processes:

    - objects lost in a victim's clone (loose objects of the tip's tree, folder and mailbox
      deleted): its sends must build on the real mailbox, never on an "empty" one;
    - a commit that puts a submodule (a commit nobody has) where the mailbox is, then one with a
      mailbox nested 5,000 levels deep: sends queue, monitors keep running, ``--repair`` rebuilds;
    - a force-push that rewinds the branch: the monitor must report how many messages vanished.
    """
    per = ctx.n(5, 3)
    remote = Remote(ctx.base)
    victim, other = remote.clone("victim"), remote.clone("other")
    hostile = remote.clone("hostile")
    ledger = Ledger("hostile")
    steps: List[str] = []
    run_senders(ctx.children, [(other, "other")], per, ledger)
    # 1. missing objects in the victim's clone
    prefetch(victim)
    tip_path = ["origin/main^{tree}", "origin/main:coordination", "origin/main:coordination/messages.json"]
    oids = [run_git(victim, "rev-parse", spec).stdout.decode().strip() for spec in tip_path]
    gone = 0
    for oid in oids:
        with contextlib.suppress(FileNotFoundError):
            (victim / ".git" / "objects" / oid[:2] / oid[2:]).unlink()
            gone += 1
    codes: Counter = Counter()
    for _ in range(per):
        codes[send_cli(ctx.children, victim, "victim", ledger)] += 1
    steps.append(f"{gone} objects deleted in the victim's clone, then {per} sends: {codes_text(codes)}")

    # 2. a submodule where the mailbox is, then a mailbox nested 5,000 levels deep
    def submodule(repo: Path) -> None:
        run_git(repo, "rm", "-q", "--cached", MAILBOX_PATH)
        run_git(repo, "update-index", "--add", "--cacheinfo", f"160000,{'ab' * 20},{MAILBOX_PATH}")

    def deep(repo: Path) -> None:
        path = repo / MAILBOX_PATH
        text = path.read_text(encoding="utf-8")
        path.write_text(text.rstrip().rstrip("}").rstrip().rstrip("]").rstrip()
                        + ",\n" + "[" * 5000 + "]" * 5000 + "\n  ]\n}\n", encoding="utf-8")
        run_git(repo, "add", MAILBOX_PATH)

    for name, edit in (("a submodule at the mailbox path", submodule), ("a 5,000-deep entry", deep)):
        run_git(hostile, "reset", "-q", "--hard")
        _hostile_push(remote, hostile, edit, f"hostile: {name}")
        codes = Counter()
        for _ in range(per):
            codes[send_cli(ctx.children, victim, "victim", ledger)] += 1
        mon = make_monitor(other, "other")
        cycle = mon.cycle()
        if cycle.ok:
            result.problems.append(f"a monitor read {name} as a good mailbox")
        steps.append(f"{name}: {per} sends {codes_text(codes)}; monitor cycle "
                     f"{'ok' if cycle.ok else 'refused it'}; {_repair(other, 'other')}")
        drain([make_monitor(victim, "victim")], result)
    # 3. a force-push that rewinds the branch by three commits
    watcher = make_monitor(other, "other")
    watcher.cycle()
    before = {m.get("body") for m in remote.messages() if isinstance(m, dict)}
    run_git(hostile, "fetch", "-q", "origin")
    run_git(hostile, "reset", "-q", "--hard", f"origin/{BRANCH}~3")
    run_git(hostile, "push", "-q", "--force", "origin", f"HEAD:{BRANCH}")
    after = {m.get("body") for m in remote.messages() if isinstance(m, dict)}
    removed = sorted(t for t in before - after if t in ledger.outcome)
    for token in removed:
        ledger.record(token, "removed by the force-push")  # gone from the remote by the attack itself
    reported = watcher.cycle().rewritten
    steps.append(f"force-push rewound 3 commits: {len(before - after)} message(s) gone, the monitor "
                 f"reported {reported}")
    if reported != len(before - after):
        result.problems.append(f"the monitor reported {reported} vanished messages, not {len(before - after)}")
    result.notes[:0] = steps
    tally(remote, ledger, result)
    return remote


SCENARIOS: List[Tuple[str, str, Callable[[Context, ScenarioResult], Remote]]] = [
    ("baseline", "1. baseline", scenario_baseline),
    ("remote-down", "2. remote down mid-run", scenario_remote_down),
    ("flapping", "3. flapping network", scenario_flapping),
    ("http-errors", "4. HTTP 500/401 bursts", scenario_http_errors),
    ("slow-server", "5. slow server (2 s)", scenario_slow),
    ("monitor-killed", "6. monitor SIGKILLed mid-push", scenario_monitor_killed),
    ("sender-killed", "7. sender SIGKILLed mid-push", scenario_sender_killed),
    ("race-storm", "8. push race storm", scenario_race_storm),
    ("corrupt-repair", "9. corrupt mailbox + repair", scenario_corrupt_repair),
    ("gc-race", "10. gc racing sends", scenario_gc_race),
    ("hostile", "11. a hostile member", scenario_hostile),
]


def run_scenario(base: Path, quick: bool, name: str, title: str,
                 fn: Callable[[Context, ScenarioResult], Remote]) -> ScenarioResult:
    result = ScenarioResult(name, title)
    ctx = Context(base / name, quick)
    ctx.base.mkdir(parents=True)
    started = time.monotonic()
    remote: Optional[Remote] = None
    try:
        remote = fn(ctx, result)
        result.problems.extend(remote.check_invariants())
    except Exception as exc:  # noqa: BLE001 - one crashed scenario must not hide the others
        log.exception("scenario %s crashed", name)
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        ctx.children.cleanup()
        result.seconds = time.monotonic() - started
    return result


# --------------------------------------------------------------------------- output


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(results: Sequence[ScenarioResult]) -> str:
    lines = ["| scenario | sent | delivered | duplicated | lost | interrupted | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        notes = list(r.notes)
        notes.extend(f"INVARIANT: {p}" for p in r.problems)
        if r.error:
            notes.insert(0, f"CRASHED: {r.error}")
        notes.append(f"{r.seconds:.0f} s")
        lines.append(f"| {r.title} | {r.sent} | {r.delivered} | {r.duplicated} | {r.lost} | {r.interrupted} | "
                     f"{_cell('; '.join(notes))} |")
    return "\n".join(lines)


def _child_send(args: Sequence[str]) -> int:
    """``--child-send REPO FROM TO BODY ID``: the API with a fixed id, as a killable process."""
    from send_message import send_message

    repo, sender, to, body, msg_id = args
    result = send_message(body, None, to, from_sender=sender, build_repo_path=repo, message_id=msg_id)
    sys.stdout.write(json.dumps(result.to_dict()) + "\n")
    return {"sent": EXIT_SENT, "queued": EXIT_QUEUED}.get(result.status, 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    names = [name for name, _title, _fn in SCENARIOS]
    parser = argparse.ArgumentParser(prog="faults.py", description="Fault injection: the FAULT TABLE.")
    parser.add_argument("--quick", action="store_true", help="fewer messages and kills")
    parser.add_argument("--only", action="append", choices=names, default=None, metavar="NAME",
                        help=f"run only this scenario (repeatable): {', '.join(names)}")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"JSON output (default {DEFAULT_JSON})")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the random fault timing")
    parser.add_argument("--child-send", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_send:
        return _child_send(args.child_send)
    if args.seed is not None:
        random.seed(args.seed)
    base = Path(tempfile.mkdtemp(prefix="fleet-faults-"))
    handler = logging.FileHandler(str(base / "faults.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    results: List[ScenarioResult] = []
    started = time.monotonic()
    try:
        with hermetic_environment(base):
            for name, title, fn in SCENARIOS:
                if args.only and name not in args.only:
                    continue
                print(f"running {title} ...", file=sys.stderr, flush=True)
                results.append(run_scenario(base, args.quick, name, title, fn))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    ok = all(r.ok for r in results)
    print(render_table(results))
    report = {
        "ok": ok, "quick": args.quick, "seconds": round(time.monotonic() - started, 1),
        "python": platform.python_version(), "platform": platform.platform(),
        "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
        "scenarios": [r.to_dict() for r in results],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'OK' if ok else 'FAILED'}: {len(results)} scenario(s) in {report['seconds']} s; JSON: {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
