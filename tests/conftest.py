"""Shared fixtures: hermetic git, bare origins and one clone per server (STYLE.md 13-15)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIR = ROOT / "python"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
QUIRKY = FIXTURES / "quirky_messages.json"

if str(PYTHON_DIR) not in sys.path:
    sys.path.insert(0, str(PYTHON_DIR))

# Real git servers that tests stop and start (fault injection), available to every test.
from gitserver import git_daemon, http_git_server, no_proxy  # noqa: E402,F401


@pytest.fixture(autouse=True)
def collector_back_on():
    """A test that runs a script's early start in-process (fleet_start.start_poll / start_look)
    holds the cyclic collector off as the script does; it is on again for the next test."""
    import gc

    import fleet_start

    yield
    if fleet_start._COLLECTOR_HELD:
        fleet_start._COLLECTOR_HELD = False
        gc.enable()


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory, monkeypatch):
    """No test reads or writes the developer's git config, home or fleet settings."""
    home = tmp_path_factory.mktemp("home")
    template = tmp_path_factory.mktemp("git-template")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_TEMPLATE_DIR", str(template))
    for key, value in {
        "GIT_AUTHOR_NAME": "Fleet Test", "GIT_AUTHOR_EMAIL": "fleet@example.invalid",
        "GIT_COMMITTER_NAME": "Fleet Test", "GIT_COMMITTER_EMAIL": "fleet@example.invalid",
    }.items():
        monkeypatch.setenv(key, value)
    for key in ("BUILD_REPO_PATH", "SERVER_ID", "MONITOR_INTERVAL", "NOTIFY_SOCKET",
                "WATCHDOG_USEC", "WATCHDOG_PID", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE",
                "NO_COLOR", "FORCE_COLOR", "MONITOR_BACKOFF", "FLEET_GIT_PLUMBING"):
        monkeypatch.delenv(key, raising=False)
    yield


T0 = 1762254639.0  # 2025-11-04T11:10:39Z: a fixed epoch for injected clocks


class FakeClock:
    """Epoch seconds that move only when a test says so: tests inject clocks, never sleep."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def git(repo, *args: str, check: bool = True, input: Optional[bytes] = None) -> str:
    """Run git in ``repo`` for a test (the suite's own runner, so the environment is the same)."""
    from fleet_git import run_git

    return run_git(repo, *args, check=check, input=input).stdout.decode("utf-8", "replace").strip()


def empty_mailbox_bytes() -> bytes:
    return b'{\n  "messages": []\n}\n'


class Fleet:
    """A bare ``origin`` and any number of server clones under one temporary folder."""

    def __init__(self, base: Path, mailbox: Optional[bytes] = None, branch: str = "main") -> None:
        self.base = base
        self.branch = branch
        self.origin = base / "origin.git"
        git(base, "init", "--bare", "-q", "-b", branch, str(self.origin))
        seed = base / "seed"
        git(base, "init", "-q", "-b", branch, str(seed))
        (seed / "coordination").mkdir()
        (seed / "coordination" / "messages.json").write_bytes(
            mailbox if mailbox is not None else empty_mailbox_bytes())
        (seed / "README.md").write_text("Build repo\n")
        git(seed, "add", "-A")
        git(seed, "commit", "-q", "--no-gpg-sign", "-m", "initial")
        git(seed, "remote", "add", "origin", str(self.origin))
        git(seed, "push", "-q", "origin", f"{branch}:{branch}")
        shutil.rmtree(seed)
        self.clones: Dict[str, Path] = {}

    def clone(self, server: str) -> Path:
        path = self.base / server
        git(self.base, "clone", "-q", str(self.origin), str(path))
        self.clones[server] = path
        return path

    def remote_mailbox(self) -> dict:
        raw = git(self.origin, "show", f"{self.branch}:coordination/messages.json")
        return json.loads(raw)

    def remote_messages(self) -> List[dict]:
        return self.remote_mailbox()["messages"]

    def remote_commits(self) -> List[str]:
        return git(self.origin, "rev-list", self.branch).split()

    def state(self, server: str) -> dict:
        """``state.json`` of ``server``'s state ref on the remote (``{}`` when it has none)."""
        raw = git(self.origin, "show", f"refs/fleet/{server}:state.json", check=False)
        return json.loads(raw) if raw.startswith("{") else {}

    def readers(self, msg: dict) -> set:
        """Servers whose state ref holds a read receipt for ``msg`` (PROTOCOL.md)."""
        key = [msg["id"], str(msg["from"]).lower()]
        names = git(self.origin, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/fleet/").split()
        return {name for name in names if key in self.state(name).get("read", [])}

    def ackers(self, msg: dict) -> set:
        names = git(self.origin, "for-each-ref", "--format=%(refname:lstrip=2)", "refs/fleet/").split()
        return {name for name in names
                if any(a.get("id") == msg["id"] for a in self.state(name).get("acks", []))}


@pytest.fixture
def fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path)


@pytest.fixture
def quirky_fleet(tmp_path) -> Fleet:
    return Fleet(tmp_path, mailbox=QUIRKY.read_bytes())


def run_script(script: str, *args: str, env: Optional[Dict[str, str]] = None,
               timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run one of the suite's CLIs as a real process."""
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, str(PYTHON_DIR / script), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, timeout=timeout,
        text=True, encoding="utf-8", errors="replace", **kw,
    )


def aged_message(i: int, days_ago: float, to="code2", **extra) -> dict:
    """A valid message from build1, ``days_ago`` old (archive tests), with an id of that time."""
    import datetime as dt

    moment = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)
    msg = {"id": f"msg_{int(moment.timestamp())}_{i:012x}", "from": "build1", "to": to,
           "subject": f"old news {i}", "body": f"archived body {i}", "type": "info", "priority": "normal",
           "timestamp": moment.strftime("%Y-%m-%dT%H:%M:%SZ"), "read": False, "ack_required": False}
    msg.update(extra)
    return msg


def refuse_custom_refs(fleet: "Fleet", message: str = "custom refs refused") -> None:
    """Make the bare origin refuse ``refs/fleet/*`` as some hosts do (an ``update`` hook)."""
    if sys.platform == "win32":
        pytest.skip("update hooks need a POSIX shell")
    hook = fleet.origin / "hooks" / "update"
    hook.parent.mkdir(exist_ok=True)
    hook.write_text(f'#!/bin/sh\ncase "$1" in refs/fleet/*) echo "{message}" >&2; exit 1;; esac\nexit 0\n')
    hook.chmod(0o755)


def crowd_state_refs(fleet: "Fleet", source: str, names) -> None:
    """Point ``refs/fleet/<name>`` on the origin, for each of ``names``, at ``source``'s state
    ref: a crowd of state refs, as ephemeral servers or one member could leave them."""
    tip = git(fleet.origin, "rev-parse", f"refs/fleet/{source}")
    git(fleet.origin, "update-ref", "--stdin",
        input="".join(f"create refs/fleet/{name} {tip}\n" for name in names).encode())


def request_message(subject: str = "status report please", body: str = "", *, sender: str = "build1",
                    to="code2", at: float = T0, mid: str = "msg_1_aaaaaaaaaaaa", **extra) -> dict:
    """A request as another server would send it, at epoch ``at`` (automatic-reply tests)."""
    import datetime as dt

    from fleet_common import iso_utc

    out = {"id": mid, "from": sender, "to": to, "subject": subject, "body": body, "type": "request",
           "priority": "normal", "timestamp": iso_utc(dt.datetime.fromtimestamp(at, dt.timezone.utc)),
           "read": False, "ack_required": False}
    out.update(extra)
    return out


def git_commands(trace: Path) -> List[str]:
    """The git commands run while ``GIT_TRACE`` named ``trace`` (``fetch ...``, ``config ...``)."""
    marker = "trace: built-in: git "
    text = trace.read_text(encoding="utf-8", errors="replace") if trace.exists() else ""
    return [line.split(marker, 1)[1] for line in text.splitlines() if marker in line]


def count_commands(commands: List[str], word: str) -> int:
    """How many of ``commands`` (:func:`git_commands`) are ``git <word>``."""
    return sum(1 for command in commands if command.split(" ", 1)[0] == word)


def publish_presence(clone: Path, server: str, activity: str) -> None:
    """``server`` publishes a presence doing ``activity`` from ``clone`` (its state ref)."""
    import time

    from fleet_git import Clone
    from fleet_state import StateChange, StateStore, presence_doc

    doc = presence_doc(started=time.time() - 60, interval=10, healthy=True, activity=activity)
    assert StateStore(Clone(clone)).update(server, StateChange(presence=doc))


def activities(report: dict) -> Dict[str, object]:
    """Each server's published activity in a ``fleet_status`` report."""
    return {row["id"]: (row["presence"] or {}).get("activity") for row in report["servers"]}


def commit_and_push(clone, message: str) -> None:
    """Commit everything in ``clone``'s working tree and push it to ``main``, as a member would."""
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", message, "--no-gpg-sign")
    git(clone, "push", "-q", "origin", "main")


def make_responder(tmp_path, rules=None, clock=None, server: str = "code2", **kw):
    """An ``AutoResponder`` with its ledger under ``tmp_path`` and an injected clock."""
    from auto_reply import AutoResponder, ReplyLedger, RuleSet

    clock = clock or FakeClock()
    ledger = ReplyLedger(tmp_path / server / "state" / "auto_reply.json", clock=clock)
    return AutoResponder(server, rules if rules is not None else RuleSet.default(), ledger,
                         status_provider=lambda: {"overall": "HEALTHY"}, started_at=T0 - 60,
                         version="1.0.0", clock=clock, **kw)
