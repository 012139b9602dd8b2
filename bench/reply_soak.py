"""Two monitors answering each other's traffic: how many automatic messages does a run produce?

Usage::

    python3 bench/reply_soak.py [--seconds 60] [--interval 1] [--json]

Creates a local fleet (bare origin, one clone per server), starts ``message_monitor.py`` for code2
and build1 as real processes at the given interval, and sends, as people would:

- at the start, from code2 to build1: "status report please?" (one status reply expected);
- a third of the way in, from build1 to all: "are you there?" (one presence reply, from code2);
- two thirds of the way in, from code2 to build1, requiring an acknowledgement (one ack: the
  fleet's ``coordination/auto_reply_rules.json`` asks for acknowledgements, which the default
  rules no longer send).

At the end it prints every message on the remote, the count of automatic ones, and the text of the
automatic status reply. Exit 0 when the counts are exactly the expected three, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / "python"
RULES_PATH = "coordination/auto_reply_rules.json"
# The default rules acknowledge nothing; a fleet that wants acknowledgements says so.
ACK_RULE = {"name": "ack-required", "kind": "acknowledge", "match": {"ack_required": True},
            "send_ack_message": True}


def _git(cwd: Path, *args: str, env: Dict[str, str]) -> str:
    return subprocess.run(["git", *args], cwd=str(cwd), env=env, check=True, capture_output=True,
                          text=True).stdout


def _send(clone: Path, env: Dict[str, str], *args: str) -> None:
    proc = subprocess.run([sys.executable, str(PYTHON / "send_message.py"), *args, "--repo", str(clone)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"send_message.py exited {proc.returncode}: {proc.stderr.strip()}")


def _share_rules(seed: Path, env: Dict[str, str]) -> None:
    """Commit the fleet's rules: an acknowledge rule, then the default rules."""
    defaults = subprocess.run([sys.executable, str(PYTHON / "auto_reply.py"), "--print-defaults"],
                              env=env, check=True, capture_output=True, text=True).stdout
    document = json.loads(defaults)
    document["rules"].insert(0, ACK_RULE)
    (seed / RULES_PATH).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    _git(seed, "add", RULES_PATH, env=env)
    _git(seed, "commit", "-q", "--no-gpg-sign", "-m", "fleet: acknowledge what requires it", env=env)
    _git(seed, "push", "-q", "origin", "HEAD", env=env)


def run(seconds: float, interval: float, keep: bool = False) -> Dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="fleet-soak-"))
    try:
        return _run_in(base, seconds, interval)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _run_in(base: Path, seconds: float, interval: float) -> Dict[str, Any]:
    env = dict(os.environ)
    env.update({"GIT_CONFIG_GLOBAL": str(base / "gitconfig"), "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_AUTHOR_NAME": "soak", "GIT_AUTHOR_EMAIL": "soak@example.invalid",
                "GIT_COMMITTER_NAME": "soak", "GIT_COMMITTER_EMAIL": "soak@example.invalid"})
    for key in ("BUILD_REPO_PATH", "SERVER_ID", "MONITOR_INTERVAL", "NOTIFY_SOCKET"):
        env.pop(key, None)
    subprocess.run([sys.executable, str(PYTHON / "message_monitor.py"), "--init", "--repo",
                    str(base / "seed")], env=env, check=True, capture_output=True)
    origin = base / "seed.origin.git"
    _share_rules(base / "seed", env)
    clones = {}
    for server in ("code2", "build1"):
        clones[server] = base / server
        _git(base, "clone", "-q", str(origin), str(clones[server]), env=env)
    procs: List[subprocess.Popen] = []
    try:
        for server, clone in clones.items():
            procs.append(subprocess.Popen(
                [sys.executable, str(PYTHON / "message_monitor.py"), "--repo", str(clone), "--server",
                 server, "--interval", str(interval), "--quiet"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        start = time.monotonic()
        _send(clones["code2"], env, "status report please?", "Status?", "--to", "build1", "--from", "code2")
        plan = [(seconds / 3, ("are you there?", "Roll call", "--to", "all", "--from", "build1"), "build1"),
                (2 * seconds / 3, ("Deploy 4411 done", "Deploy", "--to", "build1", "--from", "code2",
                                   "--ack-required"), "code2")]
        for at, args, server in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))
            _send(clones[server], env, *args)
        time.sleep(max(0.0, start + seconds - time.monotonic()))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return _summarise(base, origin, env, seconds, interval)


def _summarise(base: Path, origin: Path, env: Dict[str, str], seconds: float, interval: float) -> Dict[str, Any]:
    raw = _git(origin, "show", "main:coordination/messages.json", env=env)
    messages = json.loads(raw)["messages"]
    autos = [m for m in messages if m.get("auto") is True]
    status = next((m for m in autos if m.get("subject") == "Re: Status?"), None)
    commits = len(_git(origin, "rev-list", "main", env=env).split())
    return {
        "seconds": seconds, "interval": interval, "messages": len(messages),
        "automatic": len(autos), "by_person": len(messages) - len(autos), "commits": commits,
        "automatic_messages": [{k: m.get(k) for k in ("from", "to", "type", "subject", "in_reply_to")}
                               for m in autos],
        "status_reply": status, "folder": str(base),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temporary fleet for a look")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.interval, args.keep)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['seconds']:g} s at a {result['interval']:g} s interval: {result['messages']} messages, "
              f"{result['by_person']} sent by people, {result['automatic']} automatic, "
              f"{result['commits']} commits")
        for m in result["automatic_messages"]:
            print(f"  auto {m['type']:<8} {m['from']} -> {m['to']}: {m['subject']}")
        if result["status_reply"]:
            print("\nThe automatic status reply:\n")
            print(result["status_reply"]["body"])
    return 0 if result["automatic"] == 3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
