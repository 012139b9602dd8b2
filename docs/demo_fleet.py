"""Build a small demo fleet and show it with fleet_status.py: the README's screen and screenshot.

Usage: ``python3 docs/demo_fleet.py [FOLDER]`` (default: a new temporary folder). It creates a
bare ``origin`` with two weeks of mail and a roster, one clone per server publishing its presence
(one stale, one never seen), prints the terminal screen, writes ``FOLDER/index.html`` and, when
``chromium`` is installed, ``FOLDER/fleet-status.png`` (the picture in ``docs/``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from fleet_common import iso_utc  # noqa: E402
from fleet_git import Clone, run_git  # noqa: E402
from fleet_mailbox import serialize  # noqa: E402
from fleet_state import StateChange, StateStore, presence_doc  # noqa: E402

ROSTER = [
    {"id": "code1", "description": "Claude agent, main repository"},
    {"id": "code2", "description": "Claude agent, tooling"},
    {"id": "build1", "description": "Linux builder"},
    {"id": "build2", "description": "Linux builder (spare)"},
    {"id": "win1", "description": "Windows builder"},
    {"id": "win2", "description": "Windows test box"},
]
SUBJECTS = ["Nightly build", "Deploy to staging?", "Cache is full", "Linker flake again",
            "Release 1.4 checklist", "Disk at 91%", "Retry queue drained", "Status report"]


def _ago(seconds: float) -> str:
    return iso_utc(dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=seconds))


def _messages() -> list:
    msgs = []
    senders = ["code1", "code2", "build1", "build1", "win1", "code2", "build2"]
    for n in range(60):
        sender = senders[n % len(senders)]
        to = "all" if n % 9 == 0 else [s["id"] for s in ROSTER if s["id"] != sender][n % 5]
        age = (14 * 86400) * (60 - n) / 60 + 600
        msgs.append({"id": f"msg_{int(time.time() - age)}_{n:012x}", "from": sender, "to": to,
                     "subject": SUBJECTS[n % len(SUBJECTS)], "body": "...", "type": "info",
                     "priority": "normal", "timestamp": _ago(age), "read": to != "all",
                     "read_by": [s["id"] for s in ROSTER if s["id"] != sender] if to == "all" else [to],
                     "ack_required": False})
    msgs += [
        {"id": "msg_demo_deploy", "from": "code1", "to": "build1", "subject": "Deploy 4412 tonight?",
         "body": "...", "type": "request", "priority": "high", "timestamp": _ago(6 * 3600),
         "read": False, "ack_required": True},
        {"id": "msg_demo_freeze", "from": "code2", "to": "all", "subject": "Freeze at 18:00",
         "body": "...", "type": "info", "priority": "normal", "timestamp": _ago(3000),
         "read": False, "ack_required": True},
        {"id": "msg_demo_reply", "from": "win1", "to": "code2", "subject": "Re: Freeze at 18:00",
         "body": "ok", "type": "response", "priority": "normal", "timestamp": _ago(2400),
         "read": False, "ack_required": False, "in_reply_to": "msg_demo_freeze"},
        {"id": "msg_demo_html", "from": "build2", "to": "code1",
         "subject": "<script>alert('escaped, never run')</script>", "body": "...", "type": "info",
         "priority": "low", "timestamp": _ago(1200), "read": False, "ack_required": False},
    ]
    return msgs


def build(base: Path) -> Path:
    run_git(base, "init", "--bare", "-q", "-b", "main", str(base / "origin.git"))
    seed = base / "seed"
    run_git(base, "init", "-q", "-b", "main", str(seed))
    (seed / "coordination").mkdir()
    (seed / "coordination" / "messages.json").write_bytes(serialize({"messages": _messages()}))
    (seed / "coordination" / "servers.json").write_text(json.dumps({"version": 1, "servers": ROSTER}, indent=2))
    run_git(seed, "add", "-A")
    run_git(seed, "-c", "user.name=demo", "-c", "user.email=demo@fleet.invalid", "commit", "-q",
            "--no-gpg-sign", "-m", "demo fleet")
    run_git(seed, "push", "-q", str(base / "origin.git"), "main")
    shutil.rmtree(seed)
    now = time.time()
    presence = {  # server: (age in seconds, activity, healthy)
        "code1": (8, "idle", True), "code2": (3, "replying to win1", True),
        "build1": (25, "building 4412", True), "build2": (47 * 60, "idle", True),
        "win1": (12, "running tests", False),
    }
    for server, (age, activity, healthy) in presence.items():
        clone = base / server
        run_git(base, "clone", "-q", str(base / "origin.git"), str(clone))
        doc = presence_doc(started=now - 86400, interval=10, healthy=healthy, activity=activity,
                           version="1.1.0", extra={"queue": {"pending": 1 if server == "build2" else 0,
                                                             "dead": 0}, "breaker": "CLOSED"})
        doc["timestamp"] = _ago(age)
        acks = [{"id": "msg_demo_freeze", "from": "code2"}] if server in ("code1", "build1") else []
        read = [("msg_demo_freeze", "code2")] if server == "build2" else []
        StateStore(Clone(clone)).update(server, StateChange(presence=doc, acks=acks, read=read))
    viewer = base / "viewer"
    run_git(base, "clone", "-q", str(base / "origin.git"), str(viewer))
    return viewer


def main() -> int:
    base = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="fleet-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    viewer = build(base)
    script = str(ROOT / "python" / "fleet_status.py")
    env = dict(os.environ, COLUMNS="118")
    subprocess.run([sys.executable, script, "--repo", str(viewer)], env=env)
    page = base / "index.html"
    subprocess.run([sys.executable, script, "--repo", str(viewer), "--html", str(page), "-q"])
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        "--no-first-run", f"--user-data-dir={base / 'chromium-profile'}",
                        "--virtual-time-budget=2000",  # the whole page painted before the shot
                        f"--screenshot={base / 'fleet-status.png'}", "--window-size=1000,760",
                        page.as_uri()], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    sys.stdout.write(f"\npage: {page}\n" + (f"screenshot: {base / 'fleet-status.png'}\n" if chromium else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
