"""The inbox on real fleets of clones: list, show, thread, mark read, acknowledge, search, wait."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest
from conftest import PYTHON_DIR, Fleet, aged_message, commit_and_push, crowd_state_refs, git, run_script

from fleet_archive import archive_mailbox, archive_path
from fleet_common import UsageError
from fleet_git import Clone
from fleet_state import REF_PREFIX, STATE_FILE
from inbox import EXIT_TIMEOUT, EXIT_UNREAD, AmbiguousId, Inbox, main, message_view, parse_since
from send_message import send_message

# Unread mail for code2 in tests/fixtures/quirky_messages.json, in list order: high before normal
# before low; within a priority oldest first, a missing or unreadable timestamp oldest of all.
QUIRKY_UNREAD = [
    ("msg_1762250000_0001", "architect"), ("msg_1762251080_0021", "build1"),
    ("msg_1762250600_0011", "architect"), ("msg_1762250660_0012", "architect"),
    ("msg_1762250060_0002", "build1"), ("msg_1762250180_0004", "Build1"),
    ("msg_1762250300_0006", "architect"), ("msg_1762250480_0009", "build1"),
    ("msg_1762250540_0010", "build2"), ("msg_1762250780_0015", "architect"),
    ("msg_1762250900_0017", "build1"), ("msg_1762250900_0017", "build2"),
    ("msg_1762251020_0020", "build1"), ("msg_1762250360_0007", "build1"),
    ("msg_1762250420_0008", "architect"),
]
MSG_KEYS = {"id", "from", "to", "subject", "type", "priority", "timestamp", "in_reply_to",
            "ack_required", "auto", "read", "acknowledged", "archived"}


def pairs(result) -> list:
    return [(m["id"], m["from"]) for m in result["messages"]]


def send(clone: Path, body: str, sender: str, **kw):
    kw.setdefault("to", None)  # a reply goes to the original's sender, anything else to all
    result = send_message(body, from_sender=sender, build_repo_path=str(clone), **kw)
    assert result, result.reason
    return result.message_id


def untouched(clone: Path) -> None:
    """Reading mail writes nothing into the working tree (no runtime folder either)."""
    assert git(clone, "status", "--porcelain", "--untracked-files=all") == ""


# --------------------------------------------------------------------------- list and show


def test_list_and_show_on_the_quirky_mailbox(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    commits = quirky_fleet.remote_commits()
    inbox = Inbox(str(c2), "code2")
    result = inbox.unread()
    assert result["server"] == "code2" and result["count"] == len(QUIRKY_UNREAD)
    assert pairs(result) == QUIRKY_UNREAD
    assert all(set(m) == MSG_KEYS for m in result["messages"])  # no bodies unless asked
    legacy = next(m for m in result["messages"] if m["id"] == "msg_1762250540_0010")
    assert legacy["type"] == "info" and legacy["priority"] == "normal" and legacy["ack_required"] is False
    assert legacy["in_reply_to"] is None and legacy["read"] is False and legacy["archived"] is False
    assert next(m for m in result["messages"] if m["id"] == "msg_1762250000_0001")["ack_required"] is True
    # Listing marks nothing; filters and limits.
    assert inbox.unread()["count"] == len(QUIRKY_UNREAD)
    assert pairs(inbox.unread(priority="high")) == QUIRKY_UNREAD[:2]
    assert [m["from"] for m in inbox.unread(sender="BUILD2")["messages"]] == ["build2", "build2"]
    limited = inbox.unread(limit=3, bodies=True)
    assert limited["count"] == len(QUIRKY_UNREAD) and len(limited["messages"]) == 3
    assert limited["messages"][0]["body"].startswith("Welcome aboard")
    assert inbox.unread(since="2025-11-10T00:00:00Z")["messages"][0]["id"] == "msg_1762250360_0007"
    # The colliding id asks for the sender; with it, each copy is its own message.
    with pytest.raises(AmbiguousId, match="build1, build2"):
        inbox.get("msg_1762250900_0017")
    peeked = inbox.get("msg_1762250900_0017", "build2", peek=True)["message"]
    assert peeked["body"] == "second copy, different sender" and peeked["read"] is False
    shown = inbox.get("msg_1762250900_0017", "build2")["message"]
    assert shown["read"] is True
    after = pairs(Inbox(str(c2), "code2").unread())
    assert ("msg_1762250900_0017", "build2") not in after and ("msg_1762250900_0017", "build1") in after
    assert inbox.unread(include_read=True)["count"] == len(QUIRKY_UNREAD)
    # Marks live in the state ref: the shared branch and the working tree are untouched.
    assert quirky_fleet.remote_commits() == commits
    state = json.loads(git(quirky_fleet.origin, "show", f"{REF_PREFIX}code2:{STATE_FILE}"))
    assert state["read"] == [["msg_1762250900_0017", "build2"]]
    untouched(c2)


def test_a_broadcast_read_by_one_server_stays_unread_for_the_others(fleet):
    b1, c2, c3 = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("code3")
    mid = send(b1, "Release 2.0 is out", "build1", to="all")
    assert Inbox(str(c2), "code2").get(mid)["message"]["read"] is True
    assert pairs(Inbox(str(c3), "code3").unread()) == [(mid, "build1")]
    assert Inbox(str(c2), "code2").unread()["count"] == 0
    assert Inbox(str(c2), "code2").unread(include_read=True)["messages"][0]["read"] is True
    assert Inbox(str(b1), "build1").unread(include_read=True)["count"] == 0  # own mail is not inbox


def test_terminal_text_is_neutralised_and_json_escaped(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    mid = send(b1, "line one\n\x1b]0;pwned\x07\x1b[31mred\u202e", "build1", to="code2",
               subject="Hi \x1b[2J there")
    proc = run_script("inbox.py", "show", mid, "--peek", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\u202e" not in proc.stdout
    assert "Subject:  Hi \\x1b[2J there" in proc.stdout
    assert "\nline one\n\\x1b]0;pwned\\x07\\x1b[31mred\\u202e" in proc.stdout  # lines kept, escapes inert
    listing = run_script("inbox.py", "--repo", str(c2), "--server", "code2")
    assert "\x1b" not in listing.stdout and "Hi \\x1b[2J there" in listing.stdout
    raw = run_script("inbox.py", "show", mid, "--json", "--repo", str(c2), "--server", "code2")
    assert raw.returncode == 0 and raw.stdout.isascii() and raw.stdout.count("\n") == 1
    assert json.loads(raw.stdout)["message"]["body"] == "line one\n\x1b]0;pwned\x07\x1b[31mred\u202e"


# --------------------------------------------------------------------------- the CLI


def test_cli_count_exit_status_default_command_and_json(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    env = {"BUILD_REPO_PATH": str(c2), "SERVER_ID": "code2"}
    proc = run_script("inbox.py", "--count", env=env)
    assert (proc.returncode, proc.stdout) == (0, "0\n"), proc.stderr
    proc = run_script("inbox.py", env=env)
    assert proc.returncode == 0 and proc.stdout == "No unread mail for code2.\n"
    mid = send(b1, "Please deploy 4411", "build1", to="code2", priority="urgent", ack_required=True)
    proc = run_script("inbox.py", "list", "--count", env=env)
    assert (proc.returncode, proc.stdout) == (EXIT_UNREAD, "1\n"), proc.stderr
    proc = run_script("inbox.py", "--json", env=env)
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 and data["count"] == 1 and data["server"] == "code2"
    assert set(data["messages"][0]) == MSG_KEYS and data["messages"][0]["priority"] == "urgent"
    # Options may come before the command.
    proc = run_script("inbox.py", "--repo", str(c2), "--server", "code2", "show", mid, "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)["message"]
    assert shown["body"] == "Please deploy 4411" and shown["read"] is True
    assert run_script("inbox.py", "--count", env=env).returncode == 0
    untouched(c2)


@pytest.mark.parametrize("args, says", [
    (["show", "msg_1762254639_000000000000"], "no message with id msg_1762254639_000000000000"),
    (["show", "bad\x1bid"], "malformed message id 'bad\\x1bid'"),
    (["show", "msg_1762250900_0017"], "shared by messages from build1, build2"),
    (["show", "msg_1762250900_0017", "--from", "code9"], "no message with id msg_1762250900_0017 from code9"),
    (["list", "--since", "3 fortnights"], "--since '3 fortnights': use a duration"),
    (["list", "--limit", "0"], "--limit must be a positive number"),
    (["list", "--priority", "blocker"], "invalid priority 'blocker'"),
    (["mark-read"], "give message ids to mark read, or --all"),
    (["mark-read", "msg_1762250240_0005"], "is not addressed to code2"),
    (["ack", "nope"], "no message with id nope"),
    (["thread", "nope"], "no message with id nope"),
    (["wait", "--timeout", "-1"], "--timeout must not be negative"),
    (["wait", "--reply-to", "nope", "--timeout", "0"], "no message with id nope"),
    (["search", "x" * 300], "at most 200 characters"),
    (["list", "--server", "../etc"], "invalid server id"),
])
def test_bad_input_gets_one_line_and_exit_2(quirky_fleet, capsys, args, says):
    c2 = quirky_fleet.clone("code2")
    code = main([*args, "--repo", str(c2)] + ([] if "--server" in args else ["--server", "code2"]))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("inbox: error: ") and says in err, err
    assert git(quirky_fleet.origin, "for-each-ref", "refs/fleet/") == ""  # nothing written


def test_bad_input_as_a_real_process(fleet):
    c2 = fleet.clone("code2")
    proc = run_script("inbox.py", "show", "nope", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "inbox: error: no message with id nope in the mailbox or its archive\n"
    proc = run_script("inbox.py", "list", "--since", "soon", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_an_unreachable_remote_is_one_line_and_exit_1(fleet):
    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", str(fleet.base / "gone.git"))
    proc = run_script("inbox.py", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 1 and proc.stderr.startswith("inbox: error: ") and proc.stderr.count("\n") == 1


def test_parse_since():
    now = dt.datetime.now(dt.timezone.utc)
    assert abs((now - parse_since("2h")).total_seconds() - 7200) < 60
    assert abs((now - parse_since("30m")).total_seconds() - 1800) < 60
    assert abs((now - parse_since("1d")).total_seconds() - 86400) < 60
    assert parse_since("2025-11-04 20:45") == dt.datetime(2025, 11, 4, 20, 45, tzinfo=dt.timezone.utc)
    assert parse_since("2025-11-04") == dt.datetime(2025, 11, 4, tzinfo=dt.timezone.utc)
    for bad in ("", "2", "h", "-2h", "99999999d", "yesterday"):
        with pytest.raises(UsageError):
            parse_since(bad)


def _network_calls(trace: Path) -> List[str]:
    commands = [line.split("built-in: git ", 1)[1].split()[0] for line in trace.read_text().splitlines()
                if "built-in: git " in line]
    return [c for c in commands if c in ("fetch", "ls-remote", "push")]


def test_a_listing_costs_one_network_call_idle_or_busy(fleet, tmp_path, monkeypatch):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send(b1, "hello", "build1", to="code2")
    inbox = Inbox(str(c2), "code2")
    inbox.get(inbox.unread()["messages"][0]["id"])  # this clone now mirrors its own state ref
    trace = tmp_path / "idle.txt"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    for _ in range(3):
        assert Inbox(str(c2), "code2").unread(include_read=True)["count"] == 1
    assert _network_calls(trace) == ["fetch"] * 3
    monkeypatch.delenv("GIT_TRACE")
    send(b1, "news", "build1", to="code2")
    trace = tmp_path / "busy.txt"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    assert [m["subject"] for m in Inbox(str(c2), "code2").unread()["messages"]] == ["news"]
    assert _network_calls(trace) == ["fetch"]


def test_a_second_clone_of_a_server_finds_the_read_marks_of_the_first(fleet, tmp_path, monkeypatch):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    other = fleet.clone("code2-agent")  # the same server's second clone (its agent's, say)
    send(b1, "hello", "build1", to="code2")
    inbox = Inbox(str(c2), "code2")
    inbox.get(inbox.unread()["messages"][0]["id"])
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    # Listed first: the state ref was found and fetched, and so was the branch, which had moved.
    assert Inbox(str(other), "code2").unread()["count"] == 0
    assert Inbox(str(other), "code2").unread()["count"] == 0  # then one fetch of both
    assert _network_calls(trace) == ["ls-remote", "fetch", "fetch", "fetch"]


# --------------------------------------------------------------------------- archive


_old = aged_message


def test_archived_mail_is_found_by_show_search_thread_and_include_archive(tmp_path):
    entries = [_old(1, 40, to="all"), _old(2, 40, read=True), _old(3, 1)]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries[1:]}, indent=2).encode())
    # An older tool archived the broadcast unread (this suite never archives unread mail).
    old_tool = fleet.clone("oldtool")
    when = dt.datetime.fromtimestamp(int(entries[0]["id"].split("_")[1]), dt.timezone.utc)
    path = old_tool / archive_path(when)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"messages": [entries[0]]}, indent=2) + "\n")
    commit_and_push(old_tool, "archive (older tool)")
    c2 = fleet.clone("code2")
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 1
    b1 = fleet.clone("build1")
    answer = send(b1, "about that old broadcast", "build1", to="code2", reply_to=entries[0]["id"])
    inbox = Inbox(str(c2), "code2")
    assert pairs(inbox.unread()) == [(entries[2]["id"], "build1"), (answer, "build1")]  # hot only
    everything = inbox.unread(include_archive=True)
    assert pairs(everything) == [(entries[0]["id"], "build1"), (entries[2]["id"], "build1"),
                                 (answer, "build1")]  # the direct one was read: not listed
    assert everything["messages"][0]["archived"] is True
    assert inbox.unread(include_archive=True, include_read=True)["count"] == 4
    shown = inbox.get(entries[1]["id"])["message"]
    assert shown["archived"] is True and shown["body"] == "archived body 2" and shown["read"] is True
    assert inbox.search(["archived", "body"])["count"] == 1
    found = inbox.search(["ARCHIVED", "body"], include_archive=True)
    assert [m["id"] for m in found["messages"]] == [entries[2]["id"], entries[1]["id"], entries[0]["id"]]
    thread = inbox.thread(answer)
    assert thread["root"] == entries[0]["id"] and not thread["inferred"]
    assert [m["id"] for m in thread["messages"]] == [entries[0]["id"], answer]
    assert [m["archived"] for m in thread["messages"]] == [True, False]


def test_listing_does_not_read_the_archive(tmp_path, monkeypatch):
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [_old(1, 40, read=True), _old(2, 1)]}).encode())
    c2 = fleet.clone("code2")
    archive_mailbox(Clone(c2), "code2", 30)
    read = []
    original = Inbox._archive_file
    monkeypatch.setattr(Inbox, "_archive_file", lambda self, path, base: read.append(path) or original(
        self, path, base))
    inbox = Inbox(str(c2), "code2")
    assert inbox.unread(include_read=True)["count"] == 1 and inbox.acks()["owed"] == [] and read == []
    assert inbox.unread(include_read=True, include_archive=True)["count"] == 2
    assert len(read) == 1  # each archive file once
    read.clear()
    inbox.search(["news"], include_archive=True)
    assert len(read) == 1


def test_an_archive_file_too_large_to_read_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    import fleet_git

    archived = [_old(i, 40, read=True, body="archived body " + "x" * 400) for i in range(1, 6)]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": archived + [_old(9, 1)]}).encode())
    c2 = fleet.clone("code2")
    archive_mailbox(Clone(c2), "code2", 30)
    monkeypatch.setattr(fleet_git, "MAX_OBJECT_BYTES", 1500)  # the hot mailbox fits, the archive not
    found = Inbox(str(c2), "code2").search(["body"], include_archive=True)
    assert [m["archived"] for m in found["messages"]] == [False]
    assert any("cannot be read" in r.getMessage() and "its messages are skipped" in r.getMessage()
               for r in caplog.records)


# --------------------------------------------------------------------------- threads


def test_thread_follows_in_reply_to_up_and_down(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    root = send(b1, "Can you take the 4411 deploy?", "build1", to="code2", subject="Deploy 4411")
    other = send(b1, "A different conversation, same subject", "build1", to="code2", subject="Deploy 4411")
    yes = send(c2, "Yes, on it", "code2", reply_to=root)
    done = send(b1, "Thanks", "build1", reply_to=yes)
    side = send(fleet.clone("code3"), "I can help too", "code3", to="build1", reply_to=root)
    for server, clone in (("code2", c2), ("build1", b1)):
        thread = Inbox(str(clone), server).thread(yes)
        assert thread["root"] == root and thread["inferred"] is False
        assert [m["id"] for m in thread["messages"]] == [root, yes, done, side]
        assert all("body" in m for m in thread["messages"])
    assert other not in [m["id"] for m in Inbox(str(c2), "code2").thread(root)["messages"]]
    assert Inbox(str(c2), "code2").thread(other)["messages"][0]["id"] == other
    # Reading a thread marks nothing.
    assert Inbox(str(c2), "code2").unread()["count"] == 3


def test_thread_of_older_tools_is_inferred_from_subject_and_participants(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    inbox = Inbox(str(c2), "code2")
    # 0001 "Kick-off" architect -> code2; 0005 "Re: Re: Re: Kick-off" code2 -> architect, written by
    # an older tool without in_reply_to; 0020 answers 0001 by in_reply_to.
    expected = ["msg_1762250000_0001", "msg_1762250240_0005", "msg_1762251020_0020"]
    for start in expected:
        thread = inbox.thread(start)
        assert [m["id"] for m in thread["messages"]] == expected
        assert thread["root"] == "msg_1762250000_0001" and thread["inferred"] is True
    lone = inbox.thread("msg_1762250060_0002")
    assert [m["id"] for m in lone["messages"]] == ["msg_1762250060_0002"] and lone["inferred"] is False


def test_inferred_threads_strip_ack_prefixes_and_keep_participants_apart(tmp_path):
    def m(i, sender, to, subject):
        return {"id": f"legacy_{i}", "from": sender, "to": to, "subject": subject, "body": str(i),
                "timestamp": f"2025-11-04 08:0{i}"}

    entries = [m(1, "architect", "code2", "Rollout plan"), m(2, "code2", "architect", "ACK: Rollout plan"),
               m(3, "architect", "code2", "Ack Re: rollout PLAN"), m(4, "build1", "build2", "Re: Rollout plan"),
               m(5, "build2", "build1", "Rollout plan")]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries}).encode())
    inbox = Inbox(str(fleet.clone("code2")), "code2")
    thread = inbox.thread("legacy_2")
    assert [x["id"] for x in thread["messages"]] == ["legacy_1", "legacy_2", "legacy_3"]
    assert thread["root"] == "legacy_1" and thread["inferred"] is True
    assert [x["id"] for x in inbox.thread("legacy_4")["messages"]] == ["legacy_4", "legacy_5"]


# --------------------------------------------------------------------------- mark read, ack, acks


def test_mark_read_ids_and_all_before(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    inbox = Inbox(str(c2), "code2")
    # A colliding id marks both copies (mark-read takes ids only); unknown ids mark nothing.
    with pytest.raises(UsageError):
        inbox.mark_read(["msg_1762250000_0001", "nope"])
    assert inbox.unread()["count"] == len(QUIRKY_UNREAD)
    assert inbox.mark_read(["msg_1762250900_0017", "msg_1762250000_0001"]) == {"marked": 3}
    assert inbox.mark_read(["msg_1762250000_0001"]) == {"marked": 0}
    assert inbox.mark_read(all=True, before="2025-11-04T08:06:00Z") == {"marked": 5}
    left = pairs(inbox.unread())
    assert left == [("msg_1762251080_0021", "build1"), ("msg_1762250480_0009", "build1"),
                    ("msg_1762250540_0010", "build2"), ("msg_1762250780_0015", "architect"),
                    ("msg_1762251020_0020", "build1"), ("msg_1762250360_0007", "build1"),
                    ("msg_1762250420_0008", "architect")]
    proc = run_script("inbox.py", "mark-read", "--all", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 0 and proc.stdout == "Marked 7 messages read.\n"
    assert Inbox(str(c2), "code2").unread()["count"] == 0
    untouched(c2)


def test_ack_records_the_note_answers_the_sender_and_acks_show_both_sides(fleet):
    b1, c2, c3 = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("code3")
    direct = send(b1, "Rotate the keys", "build1", to="code2", ack_required=True, subject="Keys")
    wide = send(b1, "Freeze merges", "build1", to="all", ack_required=True, subject="Freeze")
    Inbox(str(c3), "code3").mark_read(all=True)  # code3 has a state ref: a broadcast waits on it
    assert [m["id"] for m in Inbox(str(c2), "code2").acks()["owed"]] == [direct, wide]
    before = len(fleet.remote_commits())
    proc = run_script("inbox.py", "ack", direct, "--note", "rotated at 10:00", "--json",
                      "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["acknowledged"]["acknowledged"] is True and result["acknowledged"]["read"] is True
    assert result["reply"]["status"] == "sent"
    answer = fleet.remote_messages()[-1]
    assert len(fleet.remote_commits()) == before + 1  # the answer only; the ack is in the state ref
    assert answer["type"] == "ack" and answer["to"] == "build1" and answer["in_reply_to"] == direct
    assert answer["subject"] == "Re: Keys" and "rotated at 10:00" in answer["body"]
    state = json.loads(git(fleet.origin, "show", f"{REF_PREFIX}code2:{STATE_FILE}"))
    assert state["acks"][0]["id"] == direct and state["acks"][0]["note"] == "rotated at 10:00"
    # Acknowledging again records and sends nothing.
    again = Inbox(str(c2), "code2").acknowledge(direct)
    assert again["reply"] is None and again["already_acknowledged"] is True
    assert Inbox(str(c2), "code2").acknowledge(wide, message=False)["reply"] is None
    assert len(fleet.remote_commits()) == before + 1
    assert Inbox(str(c2), "code2").acks()["owed"] == []
    assert [m["id"] for m in Inbox(str(c3), "code3").acks()["owed"]] == [wide]
    owed = Inbox(str(b1), "build1").acks()
    assert owed["owed"] == []
    by_id = {item["message"]["id"]: item for item in owed["owed_to_me"]}
    assert by_id[direct]["acknowledged_by"] == ["code2"] and by_id[direct]["waiting_on"] == []
    assert by_id[wide]["acknowledged_by"] == ["code2"] and by_id[wide]["waiting_on"] == ["code3"]
    assert 0 <= by_id[wide]["age_seconds"] < 3600
    # The ack message went to build1's inbox like any other mail.
    assert [m["type"] for m in Inbox(str(b1), "build1").unread()["messages"]] == ["ack"]
    text = run_script("inbox.py", "acks", "--repo", str(b1), "--server", "build1")
    assert "waiting on: code3" in text.stdout
    # A recipient that left the fleet is listed apart, not waited on.
    assert run_script("message_monitor.py", "--repo", str(c3), "--server", "code3", "--retire").returncode == 0
    item = {i["message"]["id"]: i for i in Inbox(str(b1), "build1").acks()["owed_to_me"]}[wide]
    assert item["waiting_on"] == [] and item["retired"] == ["code3"]
    text = run_script("inbox.py", "acks", "--repo", str(b1), "--server", "build1")
    assert "waiting on: nobody; retired: code3;" in text.stdout


# --------------------------------------------------------------------------- search


def test_search_words_in_subject_body_and_sender_newest_first(quirky_fleet):
    inbox = Inbox(str(quirky_fleet.clone("code2")), "code2")
    assert [m["id"] for m in inbox.search(["GREEN"])["messages"]] == ["msg_1762250060_0002"]
    assert [m["id"] for m in inbox.search(["responding", "automatically"])["messages"]] == [
        "msg_1762251020_0020", "msg_1762250240_0005"]  # newest first; own mail is correspondence too
    assert inbox.search(["build2", "copy"])["messages"][0]["from"] == "build2"
    assert inbox.search(["VNFFRAM"])["count"] == 0  # build2 -> build1: not this server's mail
    assert inbox.search(["green", "nowhere"])["count"] == 0
    assert inbox.search(["a"], limit=2)["count"] > 2 and len(inbox.search(["a"], limit=2)["messages"]) == 2


# --------------------------------------------------------------------------- wait


def test_wait_times_out_with_124_and_returns_waiting_mail_at_once(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    proc = run_script("inbox.py", "wait", "--timeout", "1", "--json", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == EXIT_TIMEOUT and json.loads(proc.stdout) == {"arrived": False, "messages": []}
    proc = run_script("inbox.py", "wait", "--timeout", "0", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == EXIT_TIMEOUT and proc.stderr == "inbox: nothing arrived within 0 s\n"
    mid = send(b1, "already here", "build1", to="code2")
    proc = run_script("inbox.py", "wait", "--timeout", "0", "--repo", str(c2), "--server", "code2")
    assert proc.returncode == 0 and "already here" in proc.stdout and mid in proc.stdout
    assert Inbox(str(c2), "code2").unread()["count"] == 0  # what wait printed is read


def test_wait_without_timeout_returns_when_mail_arrives(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "inbox.py"), "wait", "--json", "--repo", str(c2),
                             "--server", "code2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        mid = send(b1, "wake up", "build1", to="code2")
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["arrived"] is True and [m["id"] for m in result["messages"]] == [mid]
    assert result["messages"][0]["body"] == "wake up"


def test_wait_for_a_reply_ignores_other_mail(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    question = send(b1, "Which branch?", "build1", to="code2")
    send(c2, "unrelated news", "code2", to="build1")
    inbox = Inbox(str(b1), "build1")
    polls = []
    c3 = fleet.clone("code3")  # not asked: its in_reply_to makes mail, not the answer
    send(c3, "deploy from evil-branch", "code3", to="build1", reply_to=question)
    result = inbox.wait(timeout=3600, reply_to=question, poll_seconds=0.01,
                        sleep=lambda s: polls.append(s) or (len(polls) == 2 and send(
                            c2, "main", "code2", reply_to=question)))
    assert result["arrived"] is True and [m["body"] for m in result["messages"]] == ["main"]
    assert result["messages"][0]["in_reply_to"] == question and result["messages"][0]["read"] is True
    assert len(polls) >= 2
    assert pairs(inbox.unread()) != []  # the unrelated mail is still unread


def test_send_wait_reply_gets_the_monitors_automatic_status_answer(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    monitor = subprocess.Popen([sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--repo", str(c2),
                                "--server", "code2", "--interval", "0.5", "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        proc = run_script("send_message.py", "status report please?", "--to", "code2", "--from", "build1",
                          "--repo", str(b1), "--wait-reply", "90", "--json", timeout=150)
    finally:
        monitor.terminate()
        _, monitor_err = monitor.communicate(timeout=60)
    assert proc.returncode == 0, proc.stderr + monitor_err
    result = json.loads(proc.stdout)
    assert result["status"] == "sent" and result["reply"]["arrived"] is True
    answer = result["reply"]["messages"][0]
    assert answer["from"] == "code2" and answer["in_reply_to"] == result["message_id"]
    assert answer["type"] == "response" and "Status" in answer["body"] and answer["auto"] is True


@pytest.mark.skipif(os.name != "posix", reason="the slow remote is git http-backend behind a Python server")
def test_wait_returns_at_its_timeout_even_when_the_remote_is_slow(fleet, http_git_server):
    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    assert run_script("inbox.py", "--repo", str(c2), "--server", "code2").returncode == 0
    http_git_server.delay = 30.0  # every answer of the remote takes 30 s
    started = time.monotonic()
    proc = run_script("inbox.py", "wait", "--timeout", "6", "--repo", str(c2), "--server", "code2")
    took = time.monotonic() - started
    assert proc.returncode == EXIT_TIMEOUT, proc.stderr
    assert took < 20, took  # was: the network limit (60 s) of a poll, past the caller's timeout


@pytest.mark.skipif(os.name != "posix", reason="SIGINT stands for Ctrl+C")
def test_send_wait_reply_json_interrupted_still_prints_what_was_sent(fleet):
    import signal

    b1 = fleet.clone("build1")
    fleet.clone("code2")
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "send_message.py"), "anyone?", "--to", "code2",
                             "--from", "build1", "--repo", str(b1), "--wait-reply", "120", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(m.get("body") == "anyone?" for m in fleet.remote_messages()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    result = json.loads(out)
    assert result["status"] == "sent" and result["reply"] is None and result["message_id"].startswith("msg_")


def test_send_wait_reply_without_answer_exits_124_and_the_message_is_sent(fleet):
    b1 = fleet.clone("build1")
    fleet.clone("code2")
    proc = run_script("send_message.py", "anyone?", "--to", "code2", "--from", "build1", "--repo", str(b1),
                      "--wait-reply", "1")
    assert proc.returncode == EXIT_TIMEOUT
    assert proc.stdout.startswith("Sent msg_") and "waiting up to 1 s" in proc.stdout
    assert proc.stderr == "send_message: no answer within 1 s (the message was sent)\n"
    assert fleet.remote_messages()[-1]["body"] == "anyone?"


def test_mail_a_service_monitor_has_shown_is_still_unread_for_its_agent(fleet):
    helptext = run_script("message_monitor.py", "--help").stdout
    if "--mark-read" not in helptext:
        pytest.skip("this monitor still records what it shows as read in the mailbox "
                    "(its --mark-read setting comes with the monitor's state-ref change)")
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    mid = send(b1, "Deploy 4411 when ready", "build1", to="code2")
    # As a service runs it: output to a pipe (the journal), nobody at a console.
    env = dict(os.environ, INVOCATION_ID="0123456789abcdef0123456789abcdef", JOURNAL_STREAM="8:12345")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--no-auto-reply", env=env)
    assert proc.returncode == 0, proc.stderr
    assert mid in proc.stdout + proc.stderr  # the monitor did show it
    assert pairs(Inbox(str(c2), "code2").unread()) == [(mid, "build1")]


def test_message_view_is_the_one_shape():
    msg = {"id": "m", "from": "Build1", "to": ["code2", 7], "subject": "s" * 5000, "body": "b" * 1_000_001,
           "priority": "URGENT", "ack_required": "true", "in_reply_to": 42}
    view = message_view(msg, "code2", {}, body=True)
    assert set(view) == MSG_KEYS | {"body", "truncated"}
    assert view["priority"] == "urgent" and view["type"] == "info" and view["ack_required"] is True
    assert view["in_reply_to"] is None and view["to"] == ["code2", None] and len(view["subject"]) == 1000
    assert len(view["body"]) == 1_000_000 and view["truncated"] is True and view["timestamp"] is None


def test_acks_read_past_a_state_ref_that_stays_locked_in_the_clone(fleet):
    """Another server's mirror locked in this clone (a crashed process left its lock) leaves that
    server's receipts as last fetched, with a warning: the rest is fetched and shown."""
    b1, c2, c3 = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("code3")
    ask = send(b1, "Freeze merges", "build1", to="all", ack_required=True, subject="Freeze")
    Inbox(str(c3), "code3").mark_read(all=True)
    Inbox(str(b1), "build1").acks()  # mirrors code3's state ref
    Inbox(str(c2), "code2").acknowledge(ask, message=False)
    Inbox(str(c3), "code3").acknowledge(ask, message=False)
    lock = b1 / ".git" / "refs" / "fleet" / "code3.lock"
    lock.write_text("")
    proc = run_script("inbox.py", "acks", "--json", "--repo", str(b1), "--server", "build1")
    assert proc.returncode == 0, proc.stderr
    assert "stays locked" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    item = json.loads(proc.stdout)["owed_to_me"][0]
    assert item["acknowledged_by"] == ["code2"] and item["waiting_on"] == ["code3"]  # as last fetched
    lock.unlink()
    item = Inbox(str(b1), "build1").acks()["owed_to_me"][0]
    assert item["acknowledged_by"] == ["code2", "code3"] and item["waiting_on"] == []


@pytest.mark.parametrize("case_blind", [False, True])
def test_acks_owed_to_me_are_read_past_a_crowd_of_state_refs(fleet, monkeypatch, case_blind):
    """Past the bound on state refs read, the recipients of this server's own mail come first:
    a crowd of refs that sort before them cannot hide their acknowledgements."""
    import fleet_state

    b1, c2 = fleet.clone("build1"), fleet.clone("zz-code2")
    direct = send(b1, "Rotate the keys", "build1", to="zz-code2", ack_required=True, subject="Keys")
    wide = send(b1, "Freeze merges", "build1", to="all", ack_required=True, subject="Freeze")
    Inbox(str(c2), "zz-code2").acknowledge(direct, message=False)
    crowd_state_refs(fleet, "zz-code2", (f"ghost{n:02d}" for n in range(10)))
    Inbox(str(c2), "zz-code2").acknowledge(wide, message=False)  # the crowd holds no such ack
    if case_blind:
        git(b1, "config", "core.ignorecase", "true")
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 5)
    owed = {o["message"]["id"]: o for o in Inbox(str(b1), "build1").acks()["owed_to_me"]}
    assert (owed[direct]["acknowledged_by"], owed[direct]["waiting_on"]) == (["zz-code2"], [])
    # A broadcast's audience is the servers read: zz-code2 among them, then the crowd's first.
    assert owed[wide]["acknowledged_by"] == ["zz-code2"]
    assert owed[wide]["waiting_on"] == ["ghost00", "ghost01", "ghost02", "ghost03"]


def test_two_acknowledgements_at_once_send_one_answer(fleet):
    import threading

    b1, c2, c2b = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("code2-agent")
    ids = [send(b1, f"please confirm {i}", "build1", to="code2", ack_required=True) for i in range(3)]
    for mid in ids:
        barrier = threading.Barrier(2)
        results = []

        def ack(repo, note, mid=mid, barrier=barrier, results=results) -> None:
            inbox = Inbox(str(repo), "code2")
            barrier.wait()
            results.append(inbox.acknowledge(mid, note=note))

        threads = [threading.Thread(target=ack, args=(repo, note)) for repo, note in ((c2, "one"), (c2b, "two"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(r["already_acknowledged"] for r in results) == [False, True]
    answers = [m for m in fleet.remote_messages() if m.get("type") == "ack"]
    assert sorted(m["in_reply_to"] for m in answers) == sorted(ids)


def test_a_bounded_wait_counts_whole_messages_and_leaves_the_rest_unread(fleet):
    from fleet_inbox import MAX_TAKEN

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for i in range(3):
        send(b1, "short", "build1", to="code2", subject=f"{i} " + "s" * 900)
    got = Inbox(str(c2), "code2").wait(timeout=5, max_body_chars=2500)
    assert len(got["messages"]) == 2 and got["more"] == 1  # each view is over 900 characters
    assert Inbox(str(c2), "code2").unread()["count"] == 1
    many = [aged_message(100 + i, 0.01, "code2") for i in range(MAX_TAKEN + 10)]
    path = b1 / "coordination" / "messages.json"
    git(b1, "pull", "-q", "--ff-only", "origin", "main")
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["messages"].extend(many)
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    commit_and_push(b1, "sixty small messages")
    got = Inbox(str(c2), "code2").wait(timeout=5, max_body_chars=10**9)
    assert len(got["messages"]) == MAX_TAKEN and got["more"] == 11


def test_a_wait_for_the_answer_to_an_archived_question_finds_the_archived_answer(tmp_path):
    question = _old(1, 40, to="code2", read=True)  # from build1
    answer = _old(2, 40, to="build1", **{"from": "code2"}, in_reply_to=question["id"], read=True)
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [question, answer]}, indent=2).encode())
    c2 = fleet.clone("code2")
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 2
    proc = run_script("inbox.py", "wait", "--reply-to", question["id"], "--timeout", "1", "--json",
                      "--repo", str(fleet.clone("build1")), "--server", "build1")
    assert proc.returncode == 0, proc.stderr
    assert [m["id"] for m in json.loads(proc.stdout)["messages"]] == [answer["id"]]
