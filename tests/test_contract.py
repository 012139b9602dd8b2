"""What PROTOCOL.md promises older tools that share the repository, checked on real fleets."""

from __future__ import annotations

import json
import subprocess

from conftest import Fleet, git, run_script

from fleet_git import Clone
from message_monitor import Monitor, ReadingOptions
from send_message import send_message


def _message(i: int, **extra) -> dict:
    msg = {"id": f"msg_1762250000_{i:012x}", "from": "build1", "to": "code2", "subject": f"m{i}",
           "body": "b", "type": "info", "priority": "normal", "timestamp": "2025-11-04T08:00:00Z",
           "read": False, "ack_required": False}
    msg.update(extra)
    return msg


def test_heartbeat_on_main_alone_writes_the_legacy_heartbeat(fleet):
    c2 = fleet.clone("code2")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply",
                      "--heartbeat-on-main")
    assert proc.returncode == 0, proc.stderr
    beat = json.loads(git(fleet.origin, "show", "main:code2/heartbeat.json"))
    assert beat  # older dashboards see the server (every 5 minutes without --heartbeat-minutes)


def test_an_older_tools_ack_status_is_an_acknowledgement_of_mail_to_one_server(tmp_path):
    entries = [_message(1, ack_required=True, ack_status="acknowledged"),
               _message(2, ack_required="true"),  # an older tool's flag as text: still a request
               _message(3, to="all", ack_required=True, ack_status="acknowledged")]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries}, indent=2).encode())
    c2 = fleet.clone("code2")
    assert run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply",
                      "--mark-read", "never").returncode == 0  # code2 runs: a broadcast waits for it too
    owed = json.loads(run_script("inbox.py", "acks", "--json", "--repo", str(c2), "--server", "code2").stdout)["owed"]
    assert sorted(m["id"] for m in owed) == [entries[1]["id"], entries[2]["id"]]
    status = json.loads(run_script("fleet_status.py", "--json", "--repo", str(c2)).stdout)
    row = next(s for s in status["servers"] if s["id"] == "code2")
    assert row["acks_owed"]["count"] == 2  # the same answer as inbox.py acks


def test_a_change_to_a_mailbox_an_older_tool_laid_out_differently_writes_the_contracts_layout(tmp_path):
    raw = json.dumps({"messages": [_message(1, subject="caf\u00e9")]}, indent=2, ensure_ascii=False).encode()
    fleet = Fleet(tmp_path, mailbox=raw + b"\n")  # raw UTF-8, as some older tools wrote it
    c2 = fleet.clone("code2")
    assert send_message("hello", to="build1", from_sender="code2", build_repo_path=str(c2))
    written = subprocess.run(["git", "cat-file", "blob", "main:coordination/messages.json"], cwd=fleet.origin,
                             capture_output=True, check=True).stdout
    assert written.isascii() and written.endswith(b"\n")
    assert [m["subject"] for m in json.loads(written)["messages"]] == ["caf\u00e9", "hello"]


def test_one_servers_acknowledgement_never_marks_a_broadcast_acknowledged_for_older_tools(tmp_path):
    from fleet_common import iso_utc

    broadcast = _message(1, to="all", ack_required=True, subject="please acknowledge", timestamp=iso_utc())
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [broadcast]}, indent=2).encode())
    c2 = fleet.clone("code2")
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"version": 1, "rules": [{"name": "ack", "kind": "acknowledge",
                                                          "match": {"words": ["acknowledge"]},
                                                          "send_ack_message": False}]}))
    mon = Monitor(Clone(c2), "code2", 1.0, one_shot=True, rules_path=str(rules),
                  reading=ReadingOptions(legacy_marks=True, mark_read="on-show"))
    assert mon.cycle().ok
    mon.cycle()
    [after] = fleet.remote_messages()
    assert "code2" in after.get("acknowledged_by", []) and after.get("ack_status") != "acknowledged"


def test_a_send_never_pushes_a_mailbox_that_does_not_parse_whatever_keys_it_repeats(tmp_path):
    raw = (b'{\n  "x": 1,\n  "messages": [\n    {\n      "id": "m1",\n      "from": "b",\n      "to": "a"\n'
           b'    }\n  ],\n  "x": [\n  ]\n}\n')  # valid JSON: the last "x" wins, "messages" is parsed last
    fleet = Fleet(tmp_path, mailbox=raw)
    c2 = fleet.clone("code2")
    assert send_message("hello", to="a", from_sender="b", build_repo_path=str(c2))
    written = subprocess.run(["git", "cat-file", "blob", "main:coordination/messages.json"], cwd=fleet.origin,
                             capture_output=True, check=True).stdout
    assert [m["id"] for m in json.loads(written)["messages"]][0] == "m1" and len(json.loads(written)["messages"]) == 2


def test_an_append_never_lands_in_another_list_laid_out_to_look_like_the_mailboxs():
    from fleet_mailbox import _indented, append_to_blob, message_key

    old = _message(1)
    raw = (b'{\n  "x": 1,\n  "messages": [\n' + _indented(old) + b'\n  ],\n'
           b'  "x": [{\n  "messages": [\n  ]}\n  ]\n}\n')
    new = _message(2)
    doc = json.loads(append_to_blob(raw, None, new, message_key(new)))
    assert [m["id"] for m in doc["messages"]] == [old["id"], new["id"]]
