"""Automatic replies in the monitor's cycle: one ledger write and one queue write per cycle,
however many requests it answers, and still at most one reply per message (PROTOCOL.md, "Trust
between servers": no per-message work grows with the mailbox's size).

Costs are proven by counting writes and reads on real files and real git, never by durations.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import FakeClock, Fleet, make_responder, request_message

import auto_reply
from auto_reply import ReplyLedger
from fleet_common import UsageError
from fleet_git import Clone
from fleet_mailbox import message_key
from message_monitor import Monitor
from message_queue import PENDING, SENT, MessageQueue
from send_message import send_message

request = request_message


def stamp(epoch: float) -> str:
    return request_message(at=epoch)["timestamp"]


responder = make_responder


def test_held_decisions_are_written_once_and_counted_at_once(tmp_path, monkeypatch, caplog):
    replaced: List[str] = []
    real_replace = os.replace

    def counting_replace(src, dst, *args, **kwargs):
        replaced.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", counting_replace)
    r = responder(tmp_path)
    decisions = []
    with caplog.at_level(logging.DEBUG, logger="auto_reply"):
        for n in range(100):
            message = request(mid=f"msg_{n}", sender=f"build{n % 2}")
            decision = r.decide(message)
            assert decision is not None
            reply = dict(decision.reply, id=f"reply_{n}") if decision.reply else None
            assert r.hold(message, decision, reply)
            assert not r.hold(message, decision, reply)  # held once
            decisions.append(decision)
    assert replaced == []  # nothing written while deciding
    assert sum(d.reply is not None for d in decisions) == 2 * auto_reply.DEFAULT_PER_SENDER_LIMIT
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per flooding sender, not one per withheld reply
    sendable = r.commit_held()
    assert replaced == ["auto_reply.json"]
    assert sorted(reply["id"] for _, _, reply in sendable) == sorted(
        f"reply_{n}" for n in range(6))
    data = json.loads((tmp_path / "code2" / "state" / "auto_reply.json").read_text())
    assert len(data["replied"]) == 100
    assert r.commit_held() == [] and replaced == ["auto_reply.json"]  # nothing held: no write


def test_a_second_process_that_recorded_first_wins_the_whole_batch(tmp_path):
    clock = FakeClock()
    first, second = responder(tmp_path, clock=clock), responder(tmp_path, clock=clock)
    messages = [request(mid=f"msg_{n}", sender=f"build{n}") for n in range(4)]
    for r in (first, second):
        for n, message in enumerate(messages):
            decision = r.decide(message)
            assert r.hold(message, decision, dict(decision.reply, id=f"{id(r)}_{n}"))
    assert len(second.commit_held()) == 4
    assert first.commit_held() == []  # re-read under the lock: every key is taken
    assert second.ledger.reply_for(message_key(messages[0]))["reply_id"].startswith(str(id(second)))


def test_enqueue_many_is_one_write_and_idempotent(tmp_path, monkeypatch):
    clock = FakeClock()
    queue = MessageQueue(tmp_path, "code2", clock=clock)
    replies = [{"id": f"msg_{n}_{n:012x}", "from": "code2", "to": "build1", "subject": "Re: x",
                "body": "b", "type": "response", "priority": "normal", "auto": True} for n in range(500)]
    writes: List[str] = []
    real_replace = os.replace

    def counting_replace(src, dst, *args, **kwargs):
        writes.append(Path(dst).name)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", counting_replace)
    assert queue.enqueue_many(replies + replies[:3], reason="automatic reply", kind="reply") == \
        [r["id"] for r in replies + replies[:3]]
    assert writes == ["message_queue.json"]
    assert len(queue.get_pending()) == 500
    queue.mark_sent(replies[0]["id"])
    assert queue.get(replies[0]["id"])["status"] == SENT
    queue.enqueue_many(replies[:2])  # a sent entry is queued again, a pending one left alone
    assert [queue.get(r["id"])["status"] for r in replies[:2]] == [PENDING, PENDING]
    assert len(queue.get_pending()) == 500
    before = len(writes)
    with pytest.raises(UsageError):
        queue.enqueue_many([replies[0], {"from": "code2"}])  # checked before anything is written
    assert len(writes) == before
    assert queue.enqueue_many([]) == [] and len(writes) == before


def flood(count: int, senders: int) -> bytes:
    now = time.time()
    messages = []
    for n in range(count):
        messages.append({
            "id": f"msg_{int(now)}_{secrets.token_hex(6)}", "from": f"build{n % senders + 1}",
            "to": "code2", "subject": "status report please", "body": f"request {n}",
            "type": "request", "priority": "normal", "timestamp": stamp(now - 60),
            "read": False, "ack_required": False})
    return (json.dumps({"messages": messages}, indent=2) + "\n").encode()


@pytest.mark.timeout(300)
def test_a_cycle_of_2000_requests_writes_the_ledger_and_the_queue_once(tmp_path, monkeypatch):
    senders = 4
    fleet = Fleet(tmp_path, mailbox=flood(2000, senders))
    c2 = fleet.clone("code2")
    ledger_file = c2 / "code2" / "state" / "auto_reply.json"
    queue_file = c2 / "code2" / "queue" / "message_queue.json"
    writes: Dict[str, int] = {}
    loads: List[int] = []
    real_replace = os.replace
    real_load = ReplyLedger._load

    def counting_replace(src, dst, *args, **kwargs):
        target = os.path.realpath(dst)
        writes[target] = writes.get(target, 0) + 1
        return real_replace(src, dst, *args, **kwargs)

    def counting_load(self):
        loads.append(1)
        return real_load(self)

    monkeypatch.setattr(os, "replace", counting_replace)
    monkeypatch.setattr(ReplyLedger, "_load", counting_load)
    monitor = Monitor(Clone(c2), "code2", 1.0, one_shot=False)
    monitor.stop_event.set()  # stopping: the queue is not drained, so its writes are the enqueue's
    report = monitor.cycle()
    assert len(report.new_messages) == 2000
    limit = auto_reply.DEFAULT_PER_SENDER_LIMIT
    assert report.replies == senders * limit
    assert writes.get(os.path.realpath(ledger_file)) == 1
    assert writes.get(os.path.realpath(queue_file)) == 1
    assert len(loads) == 2  # once when the monitor started, once under the lock to write
    ledger = json.loads(ledger_file.read_text())
    assert len(ledger["replied"]) == 2000
    assert sum(e["reply_id"] is not None for e in ledger["replied"].values()) == senders * limit
    queued = MessageQueue(str(c2), "code2").get_pending()
    assert len(queued) == senders * limit and all(e["kind"] == "reply" for e in queued)
    # A restarted monitor delivers the replies once and decides nothing again.
    monkeypatch.setattr(os, "replace", real_replace)
    for _ in range(2):
        assert Monitor(Clone(c2), "code2", 1.0, one_shot=True).cycle().ok
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert len(autos) == senders * limit
    assert sorted({m["to"] for m in autos}) == [f"build{n + 1}" for n in range(senders)]


def test_the_default_monitor_acknowledges_nothing(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    send_message("Deploy 4411 done", "Deploy", to="code2", from_sender="build1", build_repo_path=str(b1),
                 ack_required=True)
    assert Monitor(Clone(c2), "code2", 1.0, one_shot=True).cycle().ok
    original = fleet.remote_messages()[0]
    assert "code2" not in (original.get("acknowledged_by") or [])
    assert original.get("ack_status") != "acknowledged"
    assert [m for m in fleet.remote_messages() if m.get("auto") is True] == []
    ledger = ReplyLedger(c2 / "code2" / "state" / "auto_reply.json")
    assert ledger.keys() == []  # not even recorded


@pytest.mark.timeout(300)
def test_requests_from_a_crowd_of_made_up_senders_get_a_bounded_number_of_replies(tmp_path, caplog):
    """Any member can write mail "from" a thousand made-up ids: each would get its own replies
    under the per-sender limit. The limit for all senders together bounds the flood, and one
    status snapshot answers the cycle's requests."""
    fleet = Fleet(tmp_path, mailbox=flood(300, 300))
    c2 = fleet.clone("code2")
    statuses: List[int] = []
    monitor = Monitor(Clone(c2), "code2", 1.0, one_shot=True)
    provider = monitor.responder.status_provider
    monitor.responder.status_provider = lambda: statuses.append(1) or provider()
    with caplog.at_level(logging.WARNING):
        assert monitor.cycle().ok
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert len(autos) == auto_reply.DEFAULT_OVERALL_LIMIT
    assert len(statuses) == 1
    assert "limit 20 for all senders the roster does not name together" in caplog.text


def test_a_request_is_answered_once_by_a_server_monitored_from_two_clones(fleet):
    """A Windows checkout and a WSL one, or a clone whose runtime files a `git clean -fdx` took:
    the mailbox shows this server's earlier automatic answer, and it is not sent again."""
    b1, c2, c2b = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("code2-again")
    send_message("status report please", to="code2", from_sender="build1", build_repo_path=str(b1))
    for clone in (c2, c2b, c2):
        assert Monitor(Clone(clone), "code2", 1.0, one_shot=True).cycle().ok
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert len(autos) == 1


def test_a_request_dated_far_ahead_or_named_with_control_characters_is_not_answered(tmp_path):
    r = responder(tmp_path)
    now = r.clock()
    assert r.decide(request(at=now + 600)) is not None  # a sender's clock a little ahead
    assert r.decide(request(at=now + 2 * 86400, mid="msg_2_bbbbbbbbbbbb")) is None
    assert r.decide(request(at=now, mid="msg_\x1b[31m\nInjected: yes")) is None
    decision = r.decide(request(at=now, subject="status\x1b[2J\r\nFrom: admin\u202e", mid="msg_3_cccccccccccc"))
    assert decision is not None and decision.reply["subject"].isprintable()


def test_a_flood_of_made_up_senders_never_silences_the_servers_the_roster_names(tmp_path):
    fleet = Fleet(tmp_path, mailbox=flood(30, 30))
    c2 = fleet.clone("code2")
    roster = c2 / "coordination" / "servers.json"
    roster.write_text(json.dumps({"version": 1, "servers": [{"id": "code2"}, {"id": "build1"}, {"id": "real1"}]}))
    from conftest import commit_and_push

    commit_and_push(c2, "the roster")
    b1 = fleet.clone("real1")
    send_message("status report please", to="code2", from_sender="real1", build_repo_path=str(b1))
    assert Monitor(Clone(c2), "code2", 1.0, one_shot=True).cycle().ok
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert "real1" in {m["to"] for m in autos}  # answered, whatever the flood used up
    assert len(autos) <= auto_reply.DEFAULT_OVERALL_LIMIT + 2  # (build1 and real1: the roster names both)


def test_a_roster_naming_every_flooding_sender_still_bounds_the_replies(tmp_path):
    """Any member can commit a roster of 300 names and flood "from" them: the roster's servers
    have a budget of their own, not none."""
    from conftest import commit_and_push

    fleet = Fleet(tmp_path, mailbox=flood(200, 100))
    c2 = fleet.clone("code2")
    (c2 / "coordination" / "servers.json").write_text(json.dumps(
        {"version": 1, "servers": [{"id": "code2"}] + [{"id": f"build{n + 1}"} for n in range(100)]}))
    commit_and_push(c2, "a roster of everyone")
    assert Monitor(Clone(c2), "code2", 1.0, one_shot=True).cycle().ok
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert len(autos) == auto_reply.DEFAULT_OVERALL_LIMIT


def test_an_earlier_answer_to_another_senders_message_with_the_same_id_is_no_answer(tmp_path):
    r = responder(tmp_path)
    r.answered = {("msg_1_aaaaaaaaaaaa", "build2")}  # code2 answered build2's message of that id
    assert r.decide(request(at=r.clock(), sender="build1")) is not None
    r.answered = {("msg_1_aaaaaaaaaaaa", "build1")}
    assert r.decide(request(at=r.clock(), sender="build1")) is None
