"""Automatic replies under hostile input: rules and messages from the shared repository can never
hang, crash or flood a monitor (PROTOCOL.md, "Trust between servers").

Costs are proven by bounds (sizes, counts), never by durations; a test that would hang instead
fails on its timeout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict

import pytest
from conftest import T0, commit_and_push, make_responder, request_message, run_script

import auto_reply
from auto_reply import (
    MAX_MATCHED_CHARS,
    MAX_PHRASE_CHARS,
    MAX_PHRASES,
    MAX_RULES,
    MAX_RULES_BYTES,
    PhraseIndex,
    RuleError,
    RuleSource,
    load_rules,
    message_tokens,
    should_reply,
    word_tokens,
)
from fleet_common import EXIT_USAGE
from fleet_git import Clone
from message_monitor import Monitor
from send_message import send_message

# Patterns known to backtrack catastrophically (or to blow up when compiled) in Python's re.
CATASTROPHIC = ["(a+)+$", "(a|aa)+$", "(x+x+)+y", r"^(\w+\s?)*$", "(.*a){20}", "a{1000000000}",
                "(?:a*)*b", r"^(([a-z])+.)+[A-Z]([a-z])+$"]


request = request_message


def rules_doc(*rules: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": 1, "rules": list(rules)}


def status_rule(**match: Any) -> Dict[str, Any]:
    return {"name": "status", "kind": "status", "match": match or {"words": ["status"]}}


responder = make_responder


def check(path: Path, capsys) -> tuple:
    code = auto_reply.main(["--check", str(path)])
    captured = capsys.readouterr()
    return code, captured.err


# --------------------------------------------------------------------------- regexes are refused


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_check_refuses_every_regex_naming_the_rule(tmp_path, capsys, pattern):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules_doc({"name": "evil", "kind": "status", "match": {"regex": pattern}})))
    code, err = check(path, capsys)
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1
    assert "rules.json" in err and "rule #1 ('evil')" in err and "match.regex is not accepted" in err


def test_a_local_rules_file_with_a_regex_is_refused_too(tmp_path):
    local = tmp_path / "local.json"
    local.write_text(json.dumps(rules_doc({"name": "ping", "kind": "presence", "match": {"regex": "^ping"}})))
    with pytest.raises(RuleError, match=r"rule #1 \('ping'\): match.regex is not accepted"):
        RuleSource(local)
    proc = run_script("auto_reply.py", "--check", str(local))
    assert proc.returncode == EXIT_USAGE and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
def test_shared_catastrophic_regex_never_reaches_a_monitor(fleet, caplog):
    """The review's case: (a+)+$ in the shared rules and a broadcast of 32 a's and a '!'."""
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    rules = b1 / "coordination" / "auto_reply_rules.json"
    rules.write_text(json.dumps(rules_doc(
        {"name": "shout", "kind": "status", "match": {"regex": "(a+)+$"}},
        {"name": "status", "kind": "status", "match": {"words": ["status"]}})))
    commit_and_push(b1, "rules")
    send_message("a" * 32 + "!", "a" * 32 + "!", to="all", from_sender="build1", build_repo_path=str(b1))
    send_message("status report please", "status?", to="code2", from_sender="build1", build_repo_path=str(b1))
    caplog.set_level(logging.ERROR)
    monitor = Monitor(Clone(c2), "code2", 1.0, one_shot=True)
    for _ in range(2):
        assert monitor.cycle().ok
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "rule #1 ('shout')" in errors[0] and "regex" in errors[0]
    assert monitor.rule_source.current().source == "defaults"  # never good: the defaults hold
    autos = [m for m in fleet.remote_messages() if m.get("auto") is True]
    assert [m["subject"] for m in autos] == ["Re: status?"]  # answered by the default status rule


# --------------------------------------------------------------------------- bounded rules files


def nested(depth: int) -> str:
    return '{"version": 1, "rules": [], "comment": ' + "[" * depth + "]" * depth + "}"


BAD_FILES = [
    (nested(5000), "nests deeper than"),
    ('{"version": 1' + "0" * 5000 + ', "rules": []}', "5001 digits"),
    ('{"version": 1, "rules": [], "comment": "' + "x" * MAX_RULES_BYTES + '"}', "bytes allowed"),
    (json.dumps(rules_doc(*[dict(status_rule(), name=f"r{n}") for n in range(MAX_RULES + 1)])),
     f"more than the {MAX_RULES} allowed"),
    (json.dumps(rules_doc(*[dict(status_rule(words=[f"w{n}-{k}" for k in range(MAX_PHRASES // 4)]),
                                 name=f"r{n}") for n in range(5)])),
     f"more than {MAX_PHRASES} words and phrases"),
    (json.dumps(rules_doc(status_rule(words=["x" * (MAX_PHRASE_CHARS + 1)]))), "longer than"),
    (json.dumps(rules_doc(status_rule(words=["status\x1b[2J"]))), "control character"),
    (json.dumps(rules_doc(status_rule(**{"from": [f"s{n}" for n in range(1000)]}))), "items, more than"),
    (json.dumps(rules_doc(dict(status_rule(), name="n" * 1000))), "printable characters"),
]


@pytest.mark.parametrize("text, problem", BAD_FILES)
def test_check_exits_2_with_one_line_for_every_file_the_monitor_refuses(tmp_path, capsys, text, problem):
    path = tmp_path / "rules.json"
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_rules(path)
    assert problem in str(info.value) and "rules.json" in str(info.value)
    code, err = check(path, capsys)
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and problem in err
    assert len(err) < 400  # the line is bounded, whatever the file holds


def test_check_runs_as_a_script_on_nested_and_huge_number_files(tmp_path):
    for name, text in (("deep.json", nested(5000)), ("digits.json", '{"version": ' + "9" * 5000 + "}")):
        path = tmp_path / name
        path.write_text(text)
        proc = run_script("auto_reply.py", "--check", str(path))
        assert proc.returncode == EXIT_USAGE, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and name in proc.stderr
        assert "Traceback" not in proc.stderr


def test_check_reads_no_more_than_the_bound_of_a_huge_file(tmp_path, capsys):
    path = tmp_path / "huge.json"
    with path.open("wb") as handle:
        handle.truncate(1 << 30)  # a sparse gigabyte
    code, err = check(path, capsys)
    assert code == EXIT_USAGE and f"more than the {MAX_RULES_BYTES} bytes allowed" in err


@pytest.mark.parametrize("text", [t for t, _ in BAD_FILES] + [
    json.dumps(rules_doc({"name": "evil", "kind": "status", "match": {"regex": "(a+)+$"}}))])
def test_a_bad_shared_file_is_logged_once_and_the_last_good_rules_stay(caplog, text):
    source = RuleSource()
    good = json.dumps(rules_doc({"name": "hello", "kind": "presence", "match": {"words": ["hello"]}}))
    source.update_from_shared("blob-good", good.encode())
    with caplog.at_level(logging.ERROR, logger="auto_reply"):
        for _ in range(3):
            source.update_from_shared("blob-bad", text.encode())
    assert [r.name for r in source.current().rules] == ["hello"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "last good rules" in errors[0] and "\n" not in errors[0]


def test_the_largest_valid_file_is_still_valid(tmp_path):
    per_rule = MAX_PHRASES // MAX_RULES
    doc = rules_doc(*[dict(status_rule(words=[f"p{n}-{k} ".ljust(MAX_PHRASE_CHARS, "x")
                                              for k in range(per_rule)]), name=f"r{n}")
                      for n in range(MAX_RULES)])
    raw = json.dumps(doc).encode()
    assert len(raw) <= MAX_RULES_BYTES
    rules = load_rules(raw)
    assert len(rules.rules) == MAX_RULES
    assert sum(len(rule.match.phrases) for rule in rules.rules) == MAX_PHRASES


# --------------------------------------------------------------------------- bounded matching


@pytest.mark.timeout(60)
def test_matching_cost_is_bounded_whatever_the_message(tmp_path):
    """The most phrases a file may hold, each built to be a near miss, against megabytes of
    text that nearly matches them: one pass over a bounded number of tokens."""
    near_miss = "a " * (MAX_PHRASE_CHARS // 2 - 1) + "b"  # "a a ... a b": fails at its last word
    per_rule = MAX_PHRASES // MAX_RULES
    doc = rules_doc(*[dict(status_rule(words=[near_miss[:-1] + chr(ord("b") + k) for k in range(per_rule)]),
                           name=f"r{n}") for n in range(MAX_RULES)])
    rules = load_rules(json.dumps(doc))
    huge = "a " * 2_000_000
    message = request(huge, huge)
    # At most two tokens a character (a non-word character and a gap), a gap, a separator.
    for text in (huge, "!" * 1_000_000, "a" * 1_000_000, "ab " * 1_000_000):
        assert len(message_tokens(request(text, text))) <= 2 * (2 * MAX_MATCHED_CHARS + 1) + 1
    assert rules.match(message) is None
    r = responder(tmp_path, rules=rules)
    for n in range(200):
        assert r.decide(dict(message, id=f"msg_{n}")) is None


@pytest.mark.timeout(60)
def test_crafted_subjects_and_timestamps_cost_no_more_than_real_ones(tmp_path):
    """fleet_mailbox's reply-prefix and fleet_common's timestamp patterns grow with the square of
    padding; the decision only gives them the bounded start of a subject and real timestamps."""
    padded = request("re" + " " * 500_000 + "x", "status please")
    assert should_reply(padded, "code2", T0)[0]
    late = request(timestamp="2025-11-04T11:10:39" + " " * 500_000 + "x")
    assert should_reply(late, "code2", T0)[1].startswith("too-old")
    decision = responder(tmp_path).decide(padded)
    assert decision is not None and decision.kind == "status"
    assert len(decision.reply["subject"]) <= auto_reply.MAX_SUBJECT_PREFIX_CHARS + len("Re: ")


@pytest.mark.parametrize("subject, body, words, expected", [
    ("ready?x", "", ["ready?"], False),  # as the old look-around: punctuation ends at a non-word
    ("x?foo", "", ["?foo"], False),
    ("a ?foo", "", ["?foo"], True),
    ("status", "report", ["status report"], False),  # no phrase spans the subject and the body
    ("\x01status\x02", "", ["status"], True),  # control characters in the text forge no marker
    ("", "x" * (MAX_MATCHED_CHARS - 7) + " reporter", ["report"], False),  # the cut word is left out
    ("", "x" * (MAX_MATCHED_CHARS - 8) + " status", ["status"], True),
    ("", "x" * MAX_MATCHED_CHARS + " status", ["status"], False),  # past the matched start
    ("Stop THE Build", "", ["the build"], True),
    ("re: status", "", ["re:"], True),
])
def test_phrases_match_as_whole_words(subject, body, words, expected):
    # As the regex (?<!\w)phrase(?!\w) that shared rules used to compile, without any regex.
    rules = auto_reply.parse_rules(rules_doc(status_rule(words=words)), "t")
    assert (rules.match(request(subject, body)) is not None) is expected


def test_the_phrase_index_finds_overlapping_and_nested_phrases():
    phrases = [tuple(word_tokens(p)) for p in ("a b", "b c", "a b c d", "b", "c d e", "x")]
    index = PhraseIndex(phrases)
    found = index.found(word_tokens("z a b c d e"))
    assert found == {tuple(word_tokens(p)) for p in ("a b", "b c", "a b c d", "b", "c d e")}
    assert index.found(word_tokens("a  b xb")) == {tuple(word_tokens("b"))}
    assert PhraseIndex([]).found(word_tokens("anything")) == set()
