"""The mailbox format: every real-world quirk of the fixture is read, kept and written back."""

from __future__ import annotations

import json
import logging
import random
import re
import tracemalloc

import pytest
from conftest import QUIRKY

from fleet_common import is_valid_server_id, json_depth_exceeds, parse_timestamp
from fleet_mailbox import (
    MAX_MAILBOX_BYTES,
    MailboxCorrupt,
    append_to_blob,
    entry_problem,
    is_addressed_to,
    is_handled_by,
    mark_handled,
    message_key,
    new_message_id,
    parse_document,
    reply_subject,
    serialize,
    valid_messages,
)

CODE2_EXPECTED = [
    "msg_1762250000_0001", "msg_1762250060_0002", "msg_1762250180_0004", "msg_1762250300_0006",
    "msg_1762250360_0007", "msg_1762250420_0008", "msg_1762250480_0009", "msg_1762250540_0010",
    "msg_1762250600_0011", "msg_1762250660_0012", "msg_1762250780_0015", "msg_1762250900_0017",
    "msg_1762250900_0017", "msg_1762251020_0020", "msg_1762251080_0021",
]


@pytest.fixture
def quirky():
    return parse_document(QUIRKY.read_bytes())


def test_invalid_entries_are_skipped_with_their_position(quirky, caplog):
    caplog.set_level(logging.WARNING)
    valid = [index for index, _ in valid_messages(quirky)]
    assert 12 not in valid and 13 not in valid and 15 not in valid
    assert len(valid) == len(quirky["messages"]) - 3
    warned = [r.getMessage() for r in caplog.records]
    assert any("#12" in w and "not an object" in w for w in warned)
    assert any("#13" in w and "'id'" in w for w in warned)
    assert any("#15" in w and "'to'" in w for w in warned)


def test_what_code2_receives(quirky):
    got = [m["id"] for _, m in valid_messages(quirky, warn=False) if is_addressed_to(m, "code2")]
    assert got == CODE2_EXPECTED


def test_hostile_and_own_messages_match_no_one(quirky):
    msgs = {m["id"]: m for _, m in valid_messages(quirky, warn=False)}
    hostile = msgs["msg_1762251140_0022"]
    assert not any(is_addressed_to(hostile, s) for s in ("code2", "build1", "build3", "etc", ".."))
    own = msgs["msg_1762250960_0019"]
    assert not is_addressed_to(own, "code2") and is_addressed_to(own, "build1")


def test_colliding_ids_are_two_messages(quirky):
    collided = [m for _, m in valid_messages(quirky, warn=False) if m["id"] == "msg_1762250900_0017"]
    assert len({message_key(m) for m in collided}) == 2
    changed = mark_handled(quirky, "code2", [message_key(collided[0])])
    assert changed == 1
    assert collided[0]["read"] is True and collided[1]["read"] is False


def test_timestamps_in_every_real_form():
    assert parse_timestamp("2025-11-04T08:00:00Z").second == 0
    assert parse_timestamp("2025-11-04T08:01:00.123456Z").microsecond == 123456
    assert parse_timestamp("2025-11-04T08:04:00.5Z").microsecond == 500000
    assert parse_timestamp("2025-11-04 08:02").minute == 2
    assert parse_timestamp("2025-11-04T10:00:00+02:00").hour == 8
    assert parse_timestamp("yesterday-ish") is None
    assert parse_timestamp(None) is None
    # Past either end of the calendar once the offset is applied: unreadable, never an exception.
    assert parse_timestamp("9999-12-31T23:59:59-23:59") is None
    assert parse_timestamp("0001-01-01T00:00:00+23:59") is None


@pytest.mark.parametrize("text, expected", [
    ("2026-11-29T12:34:56Z", (2026, 11, 29, 12, 34, 56)),  # the suite's own form: datetime reads it
    ("2024-02-29T23:59:59Z", (2024, 2, 29, 23, 59, 59)),
    ("2026-11-29T24:00:00Z", None),  # some Pythons read 24:00 as the next day; the suite never did
    ("2026-11-29T12:34:60Z", None),
    ("2026-02-29T12:00:00Z", None),
    ("0000-01-01T00:00:00Z", None),
    ("\uff12026-11-29T12:34:56Z", (2026, 11, 29, 12, 34, 56)),  # a full-width digit: the pattern reads it
    ("2026-11-29T12:34:5\ud800Z", None),
    ("2026-11-29T12:34:56z", (2026, 11, 29, 12, 34, 56)),
    ("2026-11-29t12:34:56Z", (2026, 11, 29, 12, 34, 56)),
    ("2024-05-01T12:Z\x00:56Z", None),  # datetime's own parser reads this one on some Pythons
    ("2024-05-01T12:34:Z\x00Z", None),
])
def test_timestamps_of_the_suites_form_read_as_the_pattern_reads_them(text, expected):
    moment = parse_timestamp(text)
    if expected is None:
        assert moment is None
    else:
        assert moment.tzinfo is not None and moment.utcoffset().total_seconds() == 0
        assert (moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second) == expected


def _depth(value) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _random_json(rng: random.Random, depth: int):
    pick = rng.random()
    if depth == 0 or pick < 0.3:  # strings full of what the check must not take for structure
        return "".join(rng.choice(['"', "[", "]", "{", "}", "\\", "a", "", "\\\""]) for _ in range(rng.randint(0, 6)))
    if pick < 0.65:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {_random_json(rng, 0): _random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))}


def test_the_nesting_check_counts_only_brackets_outside_strings():
    rng = random.Random(5)
    for _ in range(3000):
        value = _random_json(rng, rng.randint(0, 7))
        raw = json.dumps(value, ensure_ascii=rng.random() < 0.5, separators=rng.choice([(",", ":"), (", ", ": ")]))
        limit = rng.randint(0, 7)
        assert json_depth_exceeds(raw.encode("utf-8"), limit) is (_depth(value) > limit), raw
    # Not JSON (a quote without its partner): left to the parser, whatever the brackets after it.
    assert json_depth_exceeds(b'[[[["]', 1) is False
    assert json_depth_exceeds(b'[[]]"""', 1) is True


def test_judging_ids_another_server_made_keeps_nothing_of_them():
    """Verdicts on server ids are kept (a look asks about the same few ids hundreds of times),
    but never a text longer than any id: a monitor reading long made-up recipients holds nothing."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(20):
            assert not is_valid_server_id(f"{n}" + "x" * 200_000)
        assert tracemalloc.get_traced_memory()[0] - before < 100_000
    finally:
        tracemalloc.stop()
    assert is_valid_server_id("code2") and is_valid_server_id("code2") and not is_valid_server_id("all")


def test_round_trip_keeps_everything(quirky):
    before = json.loads(QUIRKY.read_text(encoding="utf-8"))
    keys = [message_key(m) for _, m in valid_messages(quirky, warn=False) if is_addressed_to(m, "code2")]
    mark_handled(quirky, "code2", keys)
    out = serialize(quirky)
    after = json.loads(out)
    assert len(after["messages"]) == len(before["messages"])
    for old, new in zip(before["messages"], after["messages"]):
        if not isinstance(old, dict):
            assert new == old
            continue
        assert list(new)[:len(old)] == list(old), "key order kept"
        for field, value in old.items():
            if field not in ("read", "read_by"):
                assert new[field] == value, field
    # invalid entries untouched, unknown fields kept
    assert after["messages"][12] == "this entry is not an object"
    assert after["messages"][7]["tags"] == ["unicode", "round-trip"]
    # ASCII-escaped, indent=2, final newline
    assert out.endswith(b"\n") and out.isascii()
    assert b'\\u2713' in out and b'\\ud83d\\ude80' in out
    assert out.startswith(b'{\n  "messages": [\n    {\n      "id"')


def test_read_marks_never_hide_a_broadcast(quirky):
    msgs = {m["id"]: m for _, m in valid_messages(quirky, warn=False)}
    broadcast = msgs["msg_1762250060_0002"]
    mark_handled(quirky, "code2", [message_key(broadcast)])
    assert broadcast["read"] is False
    assert broadcast["read_by"] == ["code2"]
    assert is_handled_by(broadcast, "code2") and not is_handled_by(broadcast, "build2")
    listed = msgs["msg_1762250300_0006"]
    mark_handled(quirky, "code2", [message_key(listed)])
    assert listed["read"] is False and not is_handled_by(listed, "build1")
    direct = msgs["msg_1762250180_0004"]  # to "Code2": matched case-insensitively
    mark_handled(quirky, "code2", [message_key(direct)])
    assert direct["read"] is True and direct["read_by"] == ["code2"]


def test_legacy_read_broadcast_is_not_handled_by_others(quirky):
    msgs = {m["id"]: m for _, m in valid_messages(quirky, warn=False)}
    legacy = msgs["msg_1762250360_0007"]  # a broadcast an old tool marked read
    assert legacy["read"] is True and not is_handled_by(legacy, "code2")


def test_changes_are_idempotent(quirky):
    key = ("msg_1762250000_0001", "architect")
    assert mark_handled(quirky, "code2", [key], acknowledge=[key]) == 1
    assert mark_handled(quirky, "code2", [key], acknowledge=[key]) == 0
    raw = serialize(quirky)
    msg = {"id": "msg_1762250000_0001", "from": "architect", "to": "code2"}
    assert append_to_blob(raw, None, msg, message_key(msg)) is None


def test_acknowledgement_fields(quirky):
    key = ("msg_1762250000_0001", "architect")
    mark_handled(quirky, "code2", [], acknowledge=[key])
    msg = quirky["messages"][0]
    assert msg["acknowledged_by"] == ["code2"] and msg["ack_status"] == "acknowledged"


@pytest.mark.parametrize("raw", [b"<<<<<<< HEAD\n{}", b"[1, 2]", b'{"messages": 3}', b"\xff\xfe"])
def test_unparseable_mailbox_is_refused(raw):
    with pytest.raises(MailboxCorrupt):
        parse_document(raw, "abc")


def test_absent_or_blank_mailbox_is_empty():
    assert parse_document(None) == {"messages": []}
    assert parse_document(b"  \n") == {"messages": []}


def test_powershell_bom_and_single_object_are_read():
    doc = parse_document(b'\xef\xbb\xbf{"messages": {"id": "a", "from": "x", "to": "all"}}')
    assert doc["messages"][0]["id"] == "a"


def test_new_ids_never_use_the_colliding_scheme():
    ids = {new_message_id(1762254639) for _ in range(2000)}
    assert len(ids) == 2000
    assert all(re.match(r"^msg_1762254639_[0-9a-f]{12}$", i) for i in ids)


@pytest.mark.parametrize("subject,expected", [
    ("Kick-off", "Re: Kick-off"), ("Re: Re: Re: Kick-off", "Re: Kick-off"),
    ("RE:re: x", "Re: x"), ("Re[2]: y", "Re: y"), (None, "Re: (no subject)"),
])
def test_reply_subject_has_exactly_one_re(subject, expected):
    assert reply_subject(subject) == expected


def test_entry_problem_types():
    assert entry_problem({"id": "a", "from": "b", "to": ["x", 1]}) is not None
    assert entry_problem({"id": "a", "from": "b", "to": []}) is not None
    assert entry_problem({"id": "a", "from": "b", "to": "x", "subject": None}) is None
    assert entry_problem({"id": "a", "from": "b", "to": "x", "read_by": "code2"}) is not None


def _full_append(raw, msg):
    data = parse_document(raw)
    data["messages"].append(msg)
    return serialize(data)


def test_spliced_append_equals_a_full_rewrite(quirky):
    from fleet_mailbox import append_to_blob

    raw = serialize(quirky)
    msg = {"id": "msg_1_cccccccccccc", "from": "build1", "to": ["code2"], "subject": "\u2713 \"q\"",
           "body": "line\nline", "extra": {"nested": [1, {"id": "x"}]}}
    out = append_to_blob(raw, "blob-a", msg, message_key(msg))
    assert out == _full_append(raw, msg)
    empty = serialize({"messages": []})
    assert append_to_blob(empty, "blob-b", msg, message_key(msg)) == _full_append(empty, msg)
    # a layout that is not canonical (another tool's indentation) gets a full rewrite
    other = json.dumps(quirky, indent=4).encode()
    assert append_to_blob(other, "blob-c", msg, message_key(msg)) == _full_append(other, msg)


def test_spliced_marks_equal_a_full_rewrite(quirky):
    from fleet_mailbox import mark_in_blob

    raw = serialize(quirky)
    keys = [message_key(m) for _, m in valid_messages(quirky, warn=False) if is_addressed_to(m, "code2")]
    acks = [("msg_1762250000_0001", "architect")]
    out, changed = mark_in_blob(raw, "blob-d", "code2", keys, acks)
    full = parse_document(raw)
    assert changed == mark_handled(full, "code2", keys, acks) == len(keys)
    assert out == serialize(full)
    assert mark_in_blob(out, "blob-e", "code2", keys, acks) == (None, 0)
    # colliding ids: only the named sender's copy changes
    one = [("msg_1762250900_0017", "build2")]
    out, changed = mark_in_blob(raw, "blob-d", "code2", one)
    full = parse_document(raw)
    mark_handled(full, "code2", one)
    assert changed == 1 and out == serialize(full)
    other = json.dumps(quirky, indent=4).encode()
    out, _ = mark_in_blob(other, "blob-f", "code2", keys)
    full = parse_document(other)
    mark_handled(full, "code2", keys)
    assert out == serialize(full)


@pytest.mark.parametrize("entry", [b"[" * 5000 + b"]" * 5000, b"[" * 900 + b"]" * 900, b"9" * 5000,
                                   b'"' + b"x" * MAX_MAILBOX_BYTES + b'"'])
def test_a_mailbox_beyond_the_bounds_is_corrupt(entry):
    from fleet_mailbox import salvage_messages

    good = b'{"id": "a", "from": "x", "to": "all"}'
    raw = b'{"messages": [' + good + b", " + entry + b"]}"
    with pytest.raises(MailboxCorrupt) as caught:
        parse_document(raw, "abc")
    assert "--repair" in str(caught.value) and len(str(caught.value)) < 400
    assert [m["id"] for m in salvage_messages(raw.decode())] == ["a"]


def test_archive_files_name_themselves_when_corrupt():
    with pytest.raises(MailboxCorrupt, match="coordination/archive/messages-2025-10.json"):
        parse_document(b"{", "abc", path="coordination/archive/messages-2025-10.json")


def test_marks_copy_only_what_they_change():
    from fleet_mailbox import mark_in_blob, parse_cached

    nested: object = "leaf"
    for _ in range(12):  # 27 levels in all, within the bound: the copy leaves them shared
        nested = {"n": [nested]}
    msg = {"id": "m1", "from": "build1", "to": "code2", "read_by": ["build2"], "extra": nested}
    raw = serialize({"messages": [msg]})
    cached = parse_cached(raw, "blob-nested")
    out, changed = mark_in_blob(raw, "blob-nested", "code2", [("m1", "build1")])
    assert changed == 1 and json.loads(out)["messages"][0]["read_by"] == ["build2", "code2"]
    assert cached["messages"][0]["read_by"] == ["build2"]  # the cached document is unchanged


# --------------------------------------------------------------------------- the Mailbox of a clone


def test_a_mailbox_caches_read_only_documents_and_writers_change_their_own_copy(fleet):
    from fleet_git import Clone
    from fleet_mailbox import Mailbox

    mailbox = Mailbox(Clone(fleet.clone("code2")))
    msg = {"id": "m1", "from": "build1", "to": "code2", "subject": "hi", "read_by": ["build2"]}
    first = mailbox.deliver(msg, fresh_for=0)
    assert first.changed and mailbox.deliver(dict(msg), fresh_for=0).changed is False  # idempotent
    blob, doc = mailbox.read(first.commit)
    assert mailbox.read(first.commit)[1] is doc  # one parse per blob, shared
    marked = mailbox.mark("code2", [("m1", "build1")], fresh_for=0)
    assert marked.changed and mailbox.mark("code2", [("m1", "build1")], fresh_for=0).changed is False
    assert doc["messages"][0]["read_by"] == ["build2"]  # the cached document was not changed
    assert fleet.remote_messages()[0]["read_by"] == ["build2", "code2"]
    assert mailbox.read(marked.commit)[0] != blob
    # every clone's mailbox has a cache of its own: nothing is shared between objects
    other = Mailbox(Clone(fleet.clone("build1")))
    other.clone.fetch()
    assert other.read(marked.commit)[1] is not mailbox.read(marked.commit)[1]


def test_a_mailbox_puts_files_creates_and_repairs(tmp_path, fleet):
    from fleet_git import Clone, run_git
    from fleet_mailbox import Mailbox

    mailbox = Mailbox(Clone(fleet.clone("code2")))
    tx = mailbox.put_file("code2/heartbeat.json", b"{}\n", "code2: heartbeat", author="code2", fresh_for=0)
    assert tx.changed and run_git(fleet.origin, "show", "main:code2/heartbeat.json").stdout == b"{}\n"
    assert mailbox.create().changed is False  # a mailbox is there
    mailbox.deliver({"id": "m1", "from": "build1", "to": "code2"}, fresh_for=0)
    mailbox.put_file("coordination/messages.json", b'{"messages": [{"id": "m2", "from": "x", "to": "all"},',
                     "break it", author="code2", fresh_for=0)
    with pytest.raises(MailboxCorrupt):
        mailbox.read(mailbox.clone.tip())
    result = mailbox.repair("code2")
    assert result["repaired"] and (result["kept"], result["salvaged"]) == (1, 1)
    assert [m["id"] for m in fleet.remote_messages()] == ["m1", "m2"]
    assert mailbox.repair("code2")["repaired"] is False
