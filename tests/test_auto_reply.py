"""Automatic replies: rules, the loop guard, the ledger, the decision and the reply texts.

Pure tests: injected clocks, real files for the ledger and rules, no git.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from conftest import QUIRKY, T0, FakeClock, run_script

import auto_reply
from auto_reply import (
    AutoResponder,
    Decision,
    ReplyLedger,
    RuleError,
    RuleSet,
    RuleSource,
    load_rules,
    render_status,
    should_reply,
)
from fleet_common import EXIT_USAGE, UsageError, iso_utc
from fleet_mailbox import is_addressed_to, message_key, valid_messages


def stamp(epoch: float) -> str:
    return iso_utc(_dt.datetime.fromtimestamp(epoch, _dt.timezone.utc))


def msg(subject: str = "hello", body: str = "", *, sender: str = "build1", to: Any = "code2",
        at: Optional[float] = T0, mid: str = "msg_1_aaaaaaaaaaaa", **extra: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {"id": mid, "from": sender, "to": to, "subject": subject, "body": body,
                           "type": "request", "priority": "normal", "read": False,
                           "ack_required": False}
    if at is not None:
        out["timestamp"] = stamp(at)
    out.update(extra)
    return out


STATUS: Dict[str, Any] = {
    "overall": "HEALTHY", "disk_free_gb": 41.2, "memory_percent": 63, "cpu_percent": 12,
    "queue_pending": 0, "queue_dead": 0, "breaker": "CLOSED", "last_fetch_age_s": 4,
}
STARTED = T0 - (2 * 3600 + 13 * 60)  # up 2 h 13 min at T0
ACK_RULE: Dict[str, Any] = {"name": "ack-required", "kind": "acknowledge", "match": {"ack_required": True},
                            "send_ack_message": True}
# What a fleet that wants acknowledgements writes: its acknowledge rule, then the defaults.
ACK_RULES = auto_reply.parse_rules(
    {"version": 1, "rules": [ACK_RULE, *auto_reply.DEFAULT_RULES_DOCUMENT["rules"]]}, "with-ack")


def responder(tmp_path: Path, server: str = "code2", rules: Any = None, clock: Optional[FakeClock] = None,
              provider: Any = None, **kw: Any) -> AutoResponder:
    clock = clock or FakeClock()
    ledger = ReplyLedger(tmp_path / server / "state" / "auto_reply.json", clock=clock)
    return AutoResponder(server, rules if rules is not None else RuleSet.default(), ledger,
                         status_provider=provider or (lambda: dict(STATUS)), started_at=STARTED,
                         version="1.0.0", clock=clock, **kw)


# --------------------------------------------------------------------------- default rules


@pytest.mark.parametrize("subject, body, expected", [
    ("status report please?", "", "status"),
    ("are you there?", "", "presence"),
    ("please confirm", "", "status"),
    ("Are you ready? Send a status report", "", "presence"),
    ("", "ping", "presence"),
    ("PING", "", "presence"),
    ("Ready?", "", "presence"),
    ("ARE YOU ONLINE", "", "presence"),
    ("Jira space", "Use project VNFFRAM.\nReply AGREE or ADJUST.", "status"),
    ("Status:", "", "status"),
    ("Unicode \u2713 status \U0001F680", "", "status"),
    ("please ack", "", "status"),
    ("Please acknowledge", "", "status"),
    ("respond when you can", "", "status"),
    # words as words, never parts of words
    ("statusbar is broken", "", None),
    ("the reporter crashed", "stacktrace attached", None),
    ("backup done", "", None),
    ("acknowledged", "", None),
    ("pinging the proxy", "", None),
    ("status_report", "", None),
    ("ready", "", None),
    ("are  you", "", None),  # a phrase matches across a single space only
    ("Nightly build green", "Build 4411 is green on ExternalNew.", None),
    ("", "", None),
])
def test_default_rules_match_words_as_words(subject, body, expected):
    rule = RuleSet.default().match(msg(subject, body))
    assert (rule.kind if rule else None) == expected


def test_default_rules_acknowledge_nothing_but_a_rules_file_can_ask_for_it():
    message = msg("nothing special", "plain", ack_required=True)
    assert RuleSet.default().match(message) is None
    assert all(rule.kind != "acknowledge" for rule in RuleSet.default().rules)
    rule = ACK_RULES.match(message)
    assert rule is not None and rule.name == "ack-required" and rule.send_ack_message


def test_default_rules_document_round_trips():
    again = auto_reply.parse_rules(RuleSet.default().to_json(), "again")
    assert [(r.name, r.kind, r.match) for r in again.rules] == \
        [(r.name, r.kind, r.match) for r in RuleSet.default().rules]


def test_custom_rules_all_conditions_must_hold(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"version": 1, "rules": [
        {"name": "off", "kind": "status", "match": {"words": ["status"]}, "enabled": False},
        {"name": "nothing", "kind": "status", "match": {}},
        {"name": "not-alone", "kind": "status", "match": {"ack_required": False}},
        {"name": "urgent-architect", "kind": "presence",
         "match": {"from": ["Architect"], "priority": ["URGENT"], "words": ["build 4411"]}},
        {"name": "ack-info", "kind": "acknowledge", "match": {"type": ["info"], "ack_required": True}},
    ]}))
    rules = load_rules(path)
    assert rules.match(msg("status")) is None  # disabled; an empty match matches nothing
    hit = msg("about", "Build 4411", sender="ARCHITECT", priority="urgent")
    assert rules.match(hit).name == "urgent-architect"
    assert rules.match(dict(hit, priority="high")) is None
    assert rules.match(dict(hit, body="Build x")) is None
    no_type = msg("x", ack_required=True)
    del no_type["type"]  # a missing type is the default, info
    assert rules.match(no_type).name == "ack-info"
    assert rules.match(dict(no_type, type="request")) is None


# --------------------------------------------------------------------------- rule file errors


@pytest.mark.parametrize("text, problem", [
    ('{"version": 1, "rules": [\n  {"name": "x",, }\n]}', "invalid JSON at line 2 column"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "shout", "match": {"words": ["a"]}}]}',
     "unknown kind 'shout'"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"word": ["a"]}}]}',
     "unknown match key 'word'"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"words": "status"}}]}',
     "match.words must be a non-empty list"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"from": [3]}}]}',
     "match.from must hold non-empty strings"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"regex": "(unclosed"}}]}',
     "rule #1 ('x'): match.regex is not accepted"),
    ('{"version": 1, "rules": [{"kind": "status", "match": {"words": ["a"]}}]}', "missing 'name'"),
    ('{"version": 2, "rules": []}', "newer than this program"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"words": ["a"]}, '
     '"enabled": "yes"}]}', "'enabled' must be true or false"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"ack_required": 1}}]}',
     "match.ack_required must be true or false"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"words": ["a"]}, '
     '"send_ack_message": true}]}', "acknowledge rules only"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status", "match": {"words": ["a"]}}, '
     '{"name": "x", "kind": "status", "match": {"words": ["b"]}}]}', "used twice"),
    ('{"version": 1, "rules": [{"name": "x", "kind": "status"}]}', "missing 'match'"),
    ('{"version": 1, "rule": []}', "unknown key 'rule'"),
    ('{"version": 1}', "missing 'rules'"),
    ('[]', "top level must be a JSON object"),
    ('   ', "empty"),
])
def test_rule_file_errors_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "my_rules.json"
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    message = str(info.value)
    assert "my_rules.json" in message and problem in message
    assert "\n" not in message
    assert isinstance(info.value, UsageError) and info.value.exit_code == EXIT_USAGE


def test_missing_rules_file_is_a_rule_error(tmp_path):
    with pytest.raises(RuleError, match="absent.json.*cannot be read"):
        load_rules(tmp_path / "absent.json")


def test_rules_load_from_text_and_bytes_with_bom():
    text = '{"version": 1, "rules": [{"name": "p", "kind": "presence", "match": {"words": ["hi"]}}]}'
    assert load_rules(text).rules[0].name == "p"
    assert load_rules(b"\xef\xbb\xbf" + text.encode()).rules[0].name == "p"


# --------------------------------------------------------------------------- the loop guard


@pytest.mark.parametrize("changes, code", [
    ({"auto": True}, "auto"),
    ({"auto": "true"}, "auto"),
    ({"type": "heartbeat"}, "type"),
    ({"type": "Response"}, "type"),
    ({"type": "ack"}, "type"),
    ({"from": "Code2", "to": "all"}, "own"),
    ({"to": "build2"}, "not-addressed"),
    ({"to": ["build1", "build2"]}, "not-addressed"),
    ({"from": "a person"}, "bad-sender"),
    ({"body": "CODE2 (LL-CODE2-02) Responding Automatically. Status?"}, "legacy-auto"),
    ({"body": "x\n\nAUTO-RESPONSE FROM MONITOR at 2025-11-04 08:04:00"}, "legacy-auto"),
    ({"subject": "Auto-response: status"}, "legacy-auto"),
    ({"subject": "[auto] status"}, "legacy-auto"),
    ({"subject": "Re: [AUTO] status", "ack_required": True}, "legacy-auto"),
    ({"subject": "Re: status?"}, "reply"),
    ({"subject": "RE[2]: status?"}, "reply"),
    ({"in_reply_to": "msg_0_000000000000"}, "reply"),
    ({"acknowledged_by": ["CODE2"], "ack_required": True}, "acknowledged"),
    ({"timestamp": stamp(T0 - 25 * 3600)}, "too-old"),
    ({"timestamp": None}, "too-old"),
    ({"timestamp": "yesterday-ish"}, "too-old"),
    ({"to": 42}, "invalid"),
])
def test_every_no_reply_reason(changes, code):
    message = msg("status report please?")
    message.update(changes)
    if message.get("timestamp") is None:
        del message["timestamp"]
    ok, reason = should_reply(message, "code2", T0)
    assert not ok
    assert reason.split(":")[0] == code, reason


@pytest.mark.parametrize("changes, reason", [
    ({}, "ok"),
    ({"to": "all"}, "ok"),
    ({"to": ["CODE2", "build2"]}, "ok"),
    ({"timestamp": stamp(T0 - 23 * 3600)}, "ok"),
    ({"timestamp": stamp(T0 + 3600)}, "ok"),  # a clock ahead: fresh
    ({"subject": "Re: Re: status", "ack_required": True}, "ack-only"),
    ({"in_reply_to": "msg_0_000000000000", "ack_required": True}, "ack-only"),
])
def test_what_may_be_answered(changes, reason):
    message = msg("status report please?")
    message.update(changes)
    ok, why = should_reply(message, "Code2", T0)
    assert ok and why.split(":")[0] == reason


def test_cut_off_is_configurable_and_uses_the_injected_clock(tmp_path):
    clock = FakeClock(T0)
    r = responder(tmp_path, clock=clock, max_age_hours=1)
    message = msg("status?", at=T0)
    clock.advance(3599)
    assert r.decide(message) is not None
    clock.advance(2)
    assert r.decide(message) is None
    assert should_reply(message, "code2", T0 + 3601, max_age_hours=2)[0]


def quirky() -> Dict[str, Any]:
    return json.loads(QUIRKY.read_text(encoding="utf-8"))


def test_legacy_auto_responses_in_the_fixture_get_no_reply(tmp_path):
    legacy = [m for _, m in valid_messages(quirky(), warn=False)
              if m.get("auto") is True or "responding automatically" in str(m.get("body")).lower()]
    assert {m["id"] for m in legacy} == {"msg_1762250240_0005", "msg_1762251020_0020"}
    for message in legacy:
        fresh = auto_reply.message_time(message).timestamp() + 60  # the loop guard, not the cut-off
        for server in ("code2", "architect", "build1", "build2", "build3"):
            ok, reason = should_reply(message, server, fresh)
            assert not ok and not reason.startswith("too-old"), (message["id"], server, reason)
            if is_addressed_to(message, server):
                assert reason.split(":")[0] in ("auto", "type", "legacy-auto")
            clock = FakeClock(fresh)
            assert responder(tmp_path / server, server=server, clock=clock).decide(message) is None


def test_fresh_legacy_looking_mail_full_of_trigger_words_gets_no_reply(tmp_path):
    r = responder(tmp_path)
    for body in ("BUILD1 responding automatically. Status: ONLINE. Please confirm and report.",
                 "Are you there? ping. Auto-response from monitor at 2025-11-04 11:10:00"):
        message = msg("Status report? Are you there? Please confirm", body, type="info")
        assert r.decide(message) is None
        assert should_reply(message, "code2", T0)[1].startswith("legacy-auto")


def test_the_quirky_mailbox_gets_exactly_one_decision_for_code2(tmp_path):
    clock = FakeClock(auto_reply.message_time({"timestamp": "2025-11-04T09:00:00Z"}).timestamp())
    kick_off = next(m for _, m in valid_messages(quirky(), warn=False) if m["id"] == "msg_1762250000_0001")
    by_default = responder(tmp_path / "defaults", clock=clock).decide(kick_off)
    assert by_default.kind == "status" and not by_default.acknowledge  # "Please confirm ..."
    r = responder(tmp_path, clock=clock, rules=ACK_RULES)
    decisions = []
    for _, message in valid_messages(quirky(), warn=False):
        decision = r.decide(message)
        if decision is not None:
            decisions.append((message, decision))
            assert r.commit(message, decision, "msg_9_000000000000")
    assert [m["id"] for m, _ in decisions] == ["msg_1762250000_0001"]
    decision = decisions[0][1]
    assert decision.acknowledge and decision.kind == "acknowledge"
    assert decision.reply == {"to": "architect", "subject": "Re: Kick-off",
                              "body": "Acknowledged by code2: Kick-off", "type": "ack",
                              "priority": "normal", "in_reply_to": "msg_1762250000_0001", "auto": True}


# --------------------------------------------------------------------------- decisions


def test_reply_to_a_broadcast_goes_to_the_sender_only(tmp_path):
    r = responder(tmp_path)
    decision = r.decide(msg("are you there?", sender="Build1", to="all"))
    assert decision is not None and not decision.acknowledge
    assert decision.reply["to"] == "build1"
    assert decision.reply["subject"] == "Re: are you there?"
    assert decision.reply["type"] == "response" and decision.reply["auto"] is True
    assert decision.reply["in_reply_to"] == "msg_1_aaaaaaaaaaaa"
    assert decision.reply["body"] == "code2 is online (up 2 h 13 min, monitor 1.0.0)."


def test_an_ack_required_reply_gets_one_re_and_only_an_acknowledgement(tmp_path):
    message = msg("Re: Re: status", "status report please?", ack_required=True,
                  in_reply_to="msg_0_000000000000")
    assert responder(tmp_path / "defaults").decide(message) is None  # the defaults acknowledge nothing
    decision = responder(tmp_path, rules=ACK_RULES).decide(message)
    assert decision is not None and decision.kind == "acknowledge" and decision.acknowledge
    assert decision.reply["subject"] == "Re: status"
    assert decision.reply["subject"].count("Re:") == 1
    assert decision.reply["type"] == "ack"
    assert decision.reply["body"] == "Acknowledged by code2: Re: Re: status"
    # With no acknowledge rule, an ack-required reply is not answered at all.
    status_only = auto_reply.parse_rules({"version": 1, "rules": [
        {"name": "status", "kind": "status", "match": {"words": ["status"]}}]}, "t")
    assert responder(tmp_path / "other", rules=status_only).decide(message) is None


def test_status_rule_first_still_cannot_answer_an_ack_required_reply(tmp_path):
    rules = auto_reply.parse_rules({"version": 1, "rules": [
        {"name": "status", "kind": "status", "match": {"words": ["status"]}},
        {"name": "ack", "kind": "acknowledge", "match": {"ack_required": True}}]}, "t")
    r = responder(tmp_path, rules=rules)
    decision = r.decide(msg("Re: status", ack_required=True))
    assert decision == Decision(rule="ack", kind="acknowledge", acknowledge=True, reply=None)
    assert r.decide(msg("status", mid="m2")).kind == "status"  # not a reply: first rule wins


def test_status_reply_shows_the_real_state_and_never_the_original_body(tmp_path):
    decision = responder(tmp_path).decide(msg("status report please?", "SECRET-TOKEN-123 status"))
    assert decision.reply["body"] == (
        "Status of code2: HEALTHY\nDisk: 41.2 GB free\nMemory: 63 % used\nCPU: 12 %\n"
        "Retry queue: 0 pending, 0 dead\nCircuit breaker: CLOSED\nLast fetch: 4 s ago\n"
        "Uptime: 2 h 13 min\nVersion: 1.0.0")
    assert "SECRET" not in json.dumps(decision.reply)


def test_status_reply_survives_a_provider_that_raises(tmp_path):
    def broken() -> Dict[str, Any]:
        raise OSError("psutil is not installed")

    decision = responder(tmp_path, provider=broken).decide(msg("status?"))
    assert decision.reply["body"] == ("Status of code2: health unavailable: psutil is not installed\n"
                                      "Uptime: 2 h 13 min\nVersion: 1.0.0")


def test_status_text_with_missing_values_and_problem_checks():
    text = render_status("build1", {"overall": "WARNING", "memory_percent": "71.6",
                                    "breaker": None, "cpu_percent": float("nan"),
                                    "checks": {"disk": {"status": "WARNING", "message": "4.1 GB free"},
                                               "memory": {"status": "HEALTHY", "message": "fine"},
                                               "repository": "clean"}},
                         uptime_s=59, version="2.0")
    assert text.splitlines() == [
        "Status of build1: WARNING", "Disk: unknown", "Memory: 72 % used", "CPU: unknown",
        "Retry queue: unknown pending, unknown dead", "Circuit breaker: unknown",
        "Last fetch: unknown", "Uptime: 59 s", "Version: 2.0",
        "Check disk: warning: 4.1 GB free", "Check repository: clean"]
    healthy = render_status("b", dict(STATUS, checks={"repository": ".git 0.0 MB", "disk": "41 GB"}),
                            uptime_s=1, version="1")
    assert len(healthy.splitlines()) == 9  # a healthy server's reply stays short
    assert render_status("b", "not a dict", uptime_s=None, version="1").splitlines()[0] == \
        "Status of b: health unavailable: no status report"


def test_acknowledge_without_message_marks_only(tmp_path):
    rules = auto_reply.parse_rules({"version": 1, "rules": [
        {"name": "ack", "kind": "acknowledge", "match": {"ack_required": True}}]}, "t")
    r = responder(tmp_path, rules=rules, per_sender_limit=0)  # a mark costs no mail: no limit
    message = msg("deploy window", ack_required=True)
    decision = r.decide(message)
    assert decision == Decision(rule="ack", kind="acknowledge", acknowledge=True, reply=None)
    assert r.commit(message, decision, None)
    assert r.decide(message) is None  # recorded all the same
    assert r.ledger.recent_count("build1") == 0


# --------------------------------------------------------------------------- the ledger


def test_ledger_at_most_once_survives_a_new_ledger_on_the_same_file(tmp_path):
    path = tmp_path / "code2" / "state" / "auto_reply.json"
    clock = FakeClock()
    r = responder(tmp_path, clock=clock)
    message = msg("status?", sender="Build1")
    decision = r.decide(message)
    assert decision is not None
    assert r.commit(message, decision, "msg_2_bbbbbbbbbbbb")
    assert not r.commit(message, decision, "msg_3_cccccccccccc")  # a second record is refused
    data = json.loads(path.read_text())
    assert data == {"version": 1,
                    "replied": {"build1\x1fmsg_1_aaaaaaaaaaaa": {"at": T0, "reply_id": "msg_2_bbbbbbbbbbbb"}},
                    "recent": {"build1": [T0]}}
    again = responder(tmp_path, clock=clock)  # a restarted monitor
    assert again.ledger.already_replied(message_key(message))
    assert again.decide(message) is None
    assert again.ledger.reply_for(message_key(message))["reply_id"] == "msg_2_bbbbbbbbbbbb"
    # Same id from another sender (old id scheme collided) is another message.
    assert again.decide(dict(message, **{"from": "build2"})) is not None


def test_a_second_ledger_on_the_same_file_cannot_record_the_same_key(tmp_path):
    path = tmp_path / "auto_reply.json"
    first, second = ReplyLedger(path, clock=FakeClock()), ReplyLedger(path, clock=FakeClock())
    key = ("msg_1", "build1")
    assert not second.already_replied(key)
    assert first.record(key, "build1", "r1")
    assert not second.record(key, "build1", "r2")  # re-read under the lock
    assert ReplyLedger(path).reply_for(key)["reply_id"] == "r1"


def test_ledger_prunes_old_entries(tmp_path):
    path = tmp_path / "auto_reply.json"
    clock = FakeClock()
    ledger = ReplyLedger(path, clock=clock)
    assert ledger.record(("old", "build1"), "build1", "r1")
    clock.advance(31 * 86400)
    assert ledger.record(("new", "build1"), "build1", "r2")
    data = json.loads(path.read_text())
    assert list(data["replied"]) == ["build1\x1fnew"]
    assert data["recent"] == {"build1": [clock.now]}


def test_unreadable_ledger_is_moved_aside_not_emptied(tmp_path, caplog):
    path = tmp_path / "auto_reply.json"
    path.write_text("{not json")
    ledger = ReplyLedger(path)
    assert ledger.keys() == []
    assert list(tmp_path.glob("auto_reply.json.corrupt-*"))
    assert any(rec.levelno == logging.CRITICAL for rec in caplog.records)


def test_per_sender_limit_with_an_injected_clock(tmp_path, caplog):
    clock = FakeClock()
    r = responder(tmp_path, clock=clock)
    sent = 0
    for n in range(3):
        message = msg("status?", mid=f"msg_{n}")
        decision = r.decide(message)
        assert decision.reply is not None
        assert r.commit(message, decision, f"reply_{n}")
        sent += 1
        clock.advance(60)
    fourth = msg("status?", mid="msg_4")
    with caplog.at_level(logging.WARNING, logger="auto_reply"):
        decision = r.decide(fourth)
    assert decision is not None and decision.reply is None and decision.limited
    assert not decision.acknowledge
    warnings = [rec for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1 and "withheld" in warnings[0].getMessage()
    assert r.decide(msg("status?", sender="build2", mid="msg_5")).reply is not None  # per sender
    clock.advance(600 - 3 * 60 + 1)  # the first reply leaves the window
    decision = r.decide(fourth)
    assert decision.reply is not None and not decision.limited


def test_limited_acknowledgement_still_acknowledges(tmp_path):
    r = responder(tmp_path, per_sender_limit=0, rules=ACK_RULES)
    decision = r.decide(msg("deploy", ack_required=True))
    assert decision.acknowledge and decision.reply is None and decision.limited


def test_ledger_path_is_the_servers_state_folder(tmp_path):
    assert auto_reply.ledger_path(tmp_path, "Code2") == tmp_path / "code2" / "state" / "auto_reply.json"
    assert (tmp_path / "code2" / "state").is_dir()


def test_responder_refuses_settings_that_break_at_most_once(tmp_path):
    with pytest.raises(UsageError):
        responder(tmp_path, max_age_hours=31 * 24)
    with pytest.raises(UsageError):
        responder(tmp_path, per_sender_window=2 * 86400)


# --------------------------------------------------------------------------- rule sources


GOOD = json.dumps({"version": 1, "rules": [
    {"name": "shared-presence", "kind": "presence", "match": {"words": ["hello"]}}]}).encode()
BAD = b'{"version": 1, "rules": [{"name": "x", "kind": "shout", "match": {}}]}'


def test_rule_source_follows_the_shared_file_and_keeps_the_last_good(caplog):
    source = RuleSource()
    assert source.current().source == "defaults"
    source.update_from_shared(None, None)  # absent: the defaults
    assert source.current().source == "defaults"
    with caplog.at_level(logging.INFO, logger="auto_reply"):
        source.update_from_shared("blob-good", GOOD)
        assert [r.name for r in source.current().rules] == ["shared-presence"]
        source.update_from_shared("blob-bad", BAD)
        source.update_from_shared("blob-bad", BAD)  # unchanged: not parsed, not logged again
        source.update_from_shared("blob-good", GOOD)
        source.update_from_shared("blob-bad", BAD)  # seen before: parsed, not logged again
    assert [r.name for r in source.current().rules] == ["shared-presence"]
    errors = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "auto_reply_rules.json" in errors[0].getMessage() and "shout" in errors[0].getMessage()
    assert "last good rules" in errors[0].getMessage()
    source.update_from_shared("blob-bad-2", b"{oops")
    assert len([rec for rec in caplog.records if rec.levelno == logging.ERROR]) == 2
    assert [r.name for r in source.current().rules] == ["shared-presence"]
    source.update_from_shared(None, None)  # deleted from the repo: the defaults again
    assert source.current().source == "defaults"


def test_rule_source_never_good_means_defaults(caplog):
    source = RuleSource()
    source.update_from_shared("blob-bad", BAD)
    assert source.current().source == "defaults"
    assert [r.name for r in source.current().rules] == ["presence", "status"]


def test_local_rules_file_overrides_shared_rules(tmp_path):
    local = tmp_path / "local.json"
    local.write_text(json.dumps({"version": 1, "rules": [
        {"name": "local-status", "kind": "status", "match": {"words": ["hello"]}}]}))
    source = RuleSource(local)
    source.update_from_shared("blob-good", GOOD)
    assert [r.name for r in source.current().rules] == ["local-status"]
    r = responder(tmp_path, rules=source)
    assert r.decide(msg("hello")).rule == "local-status"


def test_invalid_local_rules_file_is_an_error_at_start(tmp_path):
    local = tmp_path / "local.json"
    local.write_bytes(BAD)
    with pytest.raises(RuleError, match="local.json"):
        RuleSource(local)


def test_responder_follows_rule_source_changes(tmp_path):
    source = RuleSource()
    r = responder(tmp_path, rules=source)
    assert r.decide(msg("hello")) is None
    source.update_from_shared("blob-good", GOOD)
    assert r.decide(msg("hello")).rule == "shared-presence"


# --------------------------------------------------------------------------- the classic loop


def run_two_monitors(tmp_path: Path, rounds: int, strip: List[str], step: float) -> List[Dict[str, Any]]:
    """Servers a and b, each re-reading the whole mailbox every round (as if they had lost their
    processed-ids state): only the loop guard and the ledger can stop a loop."""
    clock = FakeClock()
    responders = {s: responder(tmp_path, server=s, clock=clock) for s in ("a", "b")}
    mailbox = [msg("status report please?", "Please send a status report.", sender="a", to="b",
                   mid="msg_0_person", type="request")]
    sent: List[Dict[str, Any]] = []
    for _ in range(rounds):
        for server, r in responders.items():
            for message in list(mailbox):
                if not is_addressed_to(message, server):
                    continue
                decision = r.decide(message)
                if decision is None:
                    continue
                reply_id = f"msg_{len(mailbox)}_{server}" if decision.reply else None
                assert r.commit(message, decision, reply_id)  # as the monitor: before sending
                if decision.reply is None:
                    continue
                reply = dict(decision.reply, id=reply_id, timestamp=stamp(clock.now), read=False,
                             ack_required=False, **{"from": server})
                for name in strip:  # a legacy tool rewriting what it relays
                    if name == "subject":
                        reply["subject"] = "status"
                    elif name == "type":
                        reply["type"] = "info"
                    else:
                        reply.pop(name, None)
                mailbox.append(reply)
                sent.append(reply)
        clock.advance(step)
    return sent


@pytest.mark.parametrize("strip", [[], ["auto"], ["auto", "in_reply_to"],
                                   ["auto", "in_reply_to", "subject"]])
def test_two_monitors_exchange_exactly_one_automatic_reply(tmp_path, strip):
    sent = run_two_monitors(tmp_path, rounds=20, strip=strip, step=30)
    assert len(sent) == 1
    assert sent[0]["from"] == "b" and sent[0]["to"] == "a"
    assert sent[0]["subject"] == ("Re: status report please?" if "subject" not in strip else "status")
    assert sent[0]["body"].startswith("Status of b: HEALTHY")


def test_even_a_relay_that_strips_every_marker_is_bounded_by_the_limit(tmp_path):
    sent = run_two_monitors(tmp_path, rounds=20, strip=["auto", "in_reply_to", "subject", "type"],
                            step=1)
    assert 1 < len(sent) <= 2 * auto_reply.DEFAULT_PER_SENDER_LIMIT


# --------------------------------------------------------------------------- command line


def test_cli_checks_a_rules_file(tmp_path, capsys):
    good = tmp_path / "good.json"
    good.write_bytes(GOOD)
    assert auto_reply.main(["--check", str(good)]) == 0
    assert "valid, 1 rules" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_bytes(BAD)
    assert auto_reply.main(["--check", str(bad)]) == EXIT_USAGE
    assert "bad.json" in capsys.readouterr().err
    assert auto_reply.main(["--print-defaults"]) == 0
    printed = capsys.readouterr().out
    assert [r.name for r in load_rules(printed).rules] == ["presence", "status"]


def test_cli_runs_as_a_script(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b"{")
    proc = run_script("auto_reply.py", "--check", str(bad))
    assert proc.returncode == EXIT_USAGE
    assert "invalid JSON at line 1" in proc.stderr
