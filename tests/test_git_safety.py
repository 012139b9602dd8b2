"""The git core never loses mail and is never misled, on real git:

- an unexpected error in a monitor cycle
- hostile mailboxes (deep nesting, long numbers)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import Fleet, git, run_script

from fleet_git import Clone
from message_monitor import Monitor, repair_mailbox
from send_message import send_message

SEND = "send_message.py"
MONITOR = "message_monitor.py"


def loose(repo: Path, oid: str) -> Path:
    return repo / ".git" / "objects" / oid[:2] / oid[2:]


def drop_objects(repo: Path, *specs: str) -> List[str]:
    """Delete the loose objects these specs name in ``repo`` (all resolved first)."""
    oids = [git(repo, "rev-parse", spec) for spec in specs]
    for oid in oids:
        path = loose(repo, oid)
        assert path.exists(), f"{oid} is not a loose object"
        path.unlink()
    return oids


TIP_PATH = ("origin/main^{tree}", "origin/main:coordination", "origin/main:coordination/messages.json")


def bodies(fleet: Fleet) -> List[str]:
    return sorted(m["body"] for m in fleet.remote_messages())


def monitor(path: Path, server: str, shown=None, **kw) -> Monitor:
    kw.setdefault("auto_reply", False)
    return Monitor(Clone(path), server, 0.05, show=(shown.append if shown is not None else None),
                   one_shot=True, backoff=(0.01, 0.01, 0.01), preflight_timeout=1.0, **kw)


def served_clone(fleet: Fleet, server, name: str) -> Path:
    path = fleet.clone(name)
    git(path, "remote", "set-url", "origin", server.url("origin.git"))
    return path


# --------------------------------------------------------------------------- hostile mailboxes


def _hostile_mailbox(fleet: Fleet, entry: str) -> None:
    hostile = fleet.clone("hostile")
    good = json.dumps({"id": "msg_1_aaaaaaaaaaaa", "from": "build1", "to": "code2", "subject": "kept",
                       "body": "kept", "timestamp": "2025-11-04T08:00:00Z", "read": False})
    (hostile / "coordination" / "messages.json").write_text('{"messages": [' + good + ", " + entry + "]}\n")
    git(hostile, "commit", "-qam", "hostile", "--no-gpg-sign")
    git(hostile, "push", "-q", "origin", "main")


@pytest.mark.parametrize("entry", ["[" * 5000 + "]" * 5000, "9" * 5000,
                                   '{"id": "x", "from": "a", "to": "b", "n": ' + "[" * 900 + "]" * 900 + "}"])
def test_a_deeply_nested_or_huge_number_mailbox_is_corrupt_not_a_crash(fleet, entry):
    _hostile_mailbox(fleet, entry)
    c2, b1 = fleet.clone("code2"), fleet.clone("build1")
    proc = run_script(MONITOR, "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 1 and "does not parse" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(SEND, "queued", "--to", "code2", "--from", "build1", "--repo", str(b1))
    assert proc.returncode == 75 and "--repair" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script(MONITOR, "--repo", str(b1), "--server", "build1", "--repair")
    assert proc.returncode == 0, proc.stderr
    assert [m["body"] for m in fleet.remote_messages()] == ["kept"]
    assert monitor(b1, "build1").cycle().sent == 1
    shown: list = []
    assert monitor(c2, "code2", shown).cycle().ok
    assert sorted(m["body"] for m in shown) == ["kept", "queued"]


def test_an_unexpected_error_in_a_cycle_is_logged_and_the_monitor_carries_on(fleet, caplog):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    assert send_message("trips the display", to="code2", from_sender="build1", build_repo_path=str(b1))
    calls = []

    def show(msg):
        calls.append(msg)
        raise RuntimeError("the display broke")

    stop = threading.Event()
    mon = Monitor(Clone(c2), "code2", 0.02, show=show, stop_event=stop, auto_reply=False)
    watcher = threading.Thread(target=_stop_after, args=(mon, stop, 3))
    watcher.start()
    caplog.set_level(logging.ERROR)
    assert mon.run() == 0
    watcher.join()
    assert mon.iterations >= 3 and len(calls) == 1
    failed = [r for r in caplog.records if "the display broke" in r.getMessage()]
    assert len(failed) == 1 and failed[0].levelname == "ERROR" and failed[0].exc_info
    assert mon.metrics.get_summary(hours=1)["counters"].get("errors", 0) >= 1

    def interrupt(msg):
        raise KeyboardInterrupt

    send_message("another", to="code2", from_sender="build1", build_repo_path=str(b1))
    with pytest.raises(KeyboardInterrupt):
        Monitor(Clone(c2), "code2", 0.02, show=interrupt, one_shot=True, auto_reply=False).run()


def _stop_after(mon: Monitor, stop: threading.Event, cycles: int) -> None:
    deadline = time.monotonic() + 60
    while mon.iterations < cycles and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()


def test_repair_salvages_around_deep_text(fleet):
    good = json.dumps({"id": "msg_2_bbbbbbbbbbbb", "from": "build2", "to": "code2", "body": "salvaged"})
    _hostile_mailbox(fleet, good + ', {"id": "deep", "from": "a", "to": "b", "x": ' + "[" * 5000)
    b1 = fleet.clone("build1")
    result = repair_mailbox(Clone(b1), "build1")
    assert result["repaired"]
    assert sorted(m["body"] for m in fleet.remote_messages()) == ["kept", "salvaged"]
