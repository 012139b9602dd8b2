"""Text from another server is bounded wherever it is shown or logged: console, stdout, log file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import Fleet, git, run_script

from message_monitor import render_message

HUGE_ID = "msg_" + "1" * 1_000_000
HUGE_FROM = "b" * 1_000_000
HUGE_SUBJECT = "S" * 2_000_000
MANY_TO = ["code2"] + [f"server{n}" for n in range(49_999)]
LINE_BOUND = 4 * 1024  # "a few KB": the longest line of console output or of the log


def hostile_message() -> dict:
    return {"id": HUGE_ID, "from": HUGE_FROM, "to": MANY_TO, "subject": HUGE_SUBJECT,
            "body": "B\x1b[2J" * 400_000, "type": "t" * 100_000, "priority": "p" * 100_000,
            "timestamp": "2" * 100_000, "read": False, "ack_required": False}


@pytest.mark.parametrize("terminal", [False, True])
def test_render_bounds_every_field(terminal):
    text = render_message(hostile_message(), terminal=terminal)
    assert len(text) < 2 * 1024
    assert "\x1b" not in text
    assert "code2, server0, server1, server2, server3 +49995 more" in text
    assert "(1000004 characters)" in text  # the id, cut, says how long it was
    assert "(1000000 characters)" in text  # the sender


def test_render_keeps_ordinary_messages_as_they_were():
    msg = {"id": "msg_1762254639_5f0c9a1be2d4", "from": "build1", "to": ["code2", "build2"],
           "subject": "Nightly build", "body": "Build 4411 is green.", "type": "info",
           "priority": "high", "timestamp": "2025-11-04T11:10:39Z"}
    assert render_message(msg, terminal=False) == (
        'NEW MESSAGE id=msg_1762254639_5f0c9a1be2d4 from=build1 to=code2, build2 priority=HIGH '
        'type=info subject="Nightly build" preview="Build 4411 is green."')


@pytest.mark.timeout(300)
def test_real_monitor_over_a_huge_message_writes_only_short_lines(tmp_path):
    # An id or sender over 512 characters makes an entry invalid (skipped with a warning); the
    # other fields are as long as ever, and both entries must produce only short lines.
    shown = {**hostile_message(), "id": "msg_" + "1" * 508, "from": "b" * 512}
    mailbox = (json.dumps({"messages": [hostile_message(), shown]}, indent=2, ensure_ascii=True)
               + "\n").encode()
    fleet = Fleet(tmp_path, mailbox=mailbox)
    c2 = fleet.clone("code2")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--no-auto-reply", timeout=240)
    assert proc.returncode == 0, proc.stderr[:2000]
    assert "NEW MESSAGE" in proc.stdout
    assert "+49995 more" in proc.stdout
    assert "mailbox entry #0 skipped: 'id' is longer than 512 characters" in proc.stderr
    for stream in (proc.stdout, proc.stderr):
        for line in stream.splitlines():
            assert len(line) < LINE_BOUND, line[:200]
    log = Path(c2 / "code2" / "logs" / "structured.log").read_text(encoding="ascii")
    lines = log.splitlines()
    assert any("new message" in json.loads(line)["message"] for line in lines)
    for line in lines:
        assert len(line) < 2 * LINE_BOUND, line[:200]
    assert git(c2, "status", "--porcelain") == ""
