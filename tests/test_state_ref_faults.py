"""Faults around state refs and the archive: a hostile or deleted own ref, refs that only look like
ours, a failure while showing mail, over-long ids, a mistyped recipient, colliding ids."""

from __future__ import annotations

import json

import pytest
from conftest import Fleet, aged_message, commit_and_push, git

from fleet_archive import archive_mailbox, find_anywhere
from fleet_git import Clone
from fleet_mailbox import entry_problem
from fleet_state import REF_PREFIX, STATE_FILE, StateChange, StateStore
from monitor_cycle import Monitor
from send_message import send_message


def mon(path, server, shown=None, **kw) -> Monitor:
    return Monitor(Clone(path), server, 1.0, show=(shown.append if shown is not None else None),
                   one_shot=True, auto_reply=False, **kw)


def _push_raw_state(clone, ref: str, raw: bytes) -> None:
    blob = git(clone, "hash-object", "-w", "--stdin", input=raw)
    tree = git(clone, "mktree", input=f"100644 blob {blob}\t{STATE_FILE}\n".encode())
    commit = git(clone, "commit-tree", tree, "-m", "x")
    git(clone, "push", "-q", "--force", "origin", f"{commit}:{ref}")


def test_garbage_over_our_own_state_ref_is_replaced_not_a_stuck_monitor(fleet):
    b1, c2, evil = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("evil")
    mon(c2, "code2").cycle()  # code2 has a state ref now
    _push_raw_state(evil, f"{REF_PREFIX}code2", b'{"read": "x"}')
    sent = send_message("after the garbage", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    report = mon(c2, "code2", shown).cycle()
    assert report.ok and len(shown) == 1
    assert [sent.message_id, "build1"] in fleet.state("code2")["read"]  # a fresh, readable state


def test_a_deleted_own_state_ref_is_written_again_at_once(fleet):
    c2 = fleet.clone("code2")
    store = StateStore(Clone(c2))
    assert store.update("code2", StateChange(read=[("m1", "x")]))
    git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}code2")
    again = StateStore(Clone(c2))
    assert again.update("code2", StateChange(read=[("m2", "x")]))  # not 20 lost leases, no error
    assert ["m2", "x"] in fleet.state("code2")["read"]


def test_the_poll_fetches_our_own_state_ref_and_no_look_alike(fleet):
    b1, c2, evil = fleet.clone("build1"), fleet.clone("code2"), fleet.clone("evil")
    mon(c2, "code2").cycle()
    _push_raw_state(evil, f"{REF_PREFIX}code20", b'{"read": []}')  # another server, same prefix
    _push_raw_state(evil, f"{REF_PREFIX}code2-junk", b'{"read": []}')
    _push_raw_state(evil, f"{REF_PREFIX}code2-a/b", b'{"read": []}')  # nested, same prefix
    send_message("still delivered", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []
    assert mon(c2, "code2", shown).cycle().ok and len(shown) == 1
    local = git(c2, "for-each-ref", "--format=%(refname)", REF_PREFIX).split()
    assert local == [f"{REF_PREFIX}code2"]


def test_a_failure_while_showing_leaves_the_rest_unread_not_hidden(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for n in range(3):
        send_message(f"m{n}", to="code2", from_sender="build1", build_repo_path=str(b1))
    shown: list = []

    def show(msg):
        if msg["body"] == "m1":
            raise OSError("the console went away")
        shown.append(msg["body"])

    report = Monitor(Clone(c2), "code2", 1.0, show=show, one_shot=True, auto_reply=False).cycle()
    assert report.ok and shown == ["m0", "m2"]  # a console that fails is said, never the end of a cycle
    mon(c2, "code2").cycle()
    readers = {m["body"]: fleet.readers(m) for m in fleet.remote_messages()}
    assert readers == {"m0": {"code2"}, "m1": set(), "m2": {"code2"}}  # m1 unread for the agent's inbox


def test_an_id_too_long_to_record_is_an_invalid_entry():
    good = {"id": "m" * 512, "from": "b", "to": "c"}
    assert entry_problem(good) is None
    assert "longer than 512" in entry_problem({**good, "id": "m" * 513})
    assert "longer than 512" in entry_problem({**good, "from": "b" * 513})


def _aged(i: int, to, days: float = 40, **extra) -> dict:
    return aged_message(i, days, to, **extra)


def test_with_a_roster_a_mistyped_recipient_does_not_hold_every_broadcast(tmp_path):
    typo = _aged(1, "bulid1")
    broadcast = _aged(2, "all", read_by=["code2"])
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [typo, broadcast]}, indent=2).encode())
    admin = fleet.clone("admin")
    (admin / "coordination" / "servers.json").write_text(json.dumps(
        {"version": 1, "servers": [{"id": "build1"}, {"id": "code2"}]}))
    commit_and_push(admin, "roster")
    c2 = fleet.clone("code2")
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 1
    assert [m["to"] for m in fleet.remote_messages()] == ["bulid1"]  # unread by anyone: it stays


@pytest.mark.parametrize("same", [True, False])
def test_two_entries_with_one_id_and_sender_are_both_kept(tmp_path, same):
    first = _aged(1, "code2", read=True)
    second = dict(first) if same else {**first, "body": "another message, same id (older tools)"}
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [first, second]}, indent=2).encode())
    c2 = fleet.clone("code2")
    archive_mailbox(Clone(c2), "code2", 30)
    clone = Clone(c2)
    archived = find_anywhere(clone, clone.fetch(), first["id"])
    assert archived is not None
    left = fleet.remote_messages()
    if same:
        assert left == []  # the very same message twice: one archived copy is enough
    else:
        assert [m["body"] for m in left] == [second["body"]]  # never lost: it stays hot


def test_repair_refuses_a_mailbox_too_big_to_read_at_all(fleet, monkeypatch):
    """Over the objects' bound the mailbox is never read (its header says its size): --repair,
    which could rebuild it only from an older version, refuses rather than drop what is new."""
    import fleet_git
    from fleet_mailbox import Mailbox, MailboxCorrupt

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for n in range(3):
        send_message(f"m{n}", to="code2", from_sender="build1", build_repo_path=str(b1))
    monkeypatch.setattr(fleet_git, "MAX_OBJECT_BYTES", 200)  # the mailbox is now over the bound
    before = fleet.remote_commits()
    with pytest.raises(MailboxCorrupt, match="would lose messages"):
        Mailbox(Clone(c2)).repair("code2")
    assert fleet.remote_commits() == before and len(fleet.remote_messages()) == 3


def test_repair_refuses_a_mailbox_too_big_to_salvage_whole(fleet, monkeypatch):
    import fleet_mailbox
    from fleet_mailbox import Mailbox, MailboxCorrupt

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    for n in range(3):
        send_message(f"m{n}", to="code2", from_sender="build1", build_repo_path=str(b1))
    monkeypatch.setattr(fleet_mailbox, "MAX_MAILBOX_BYTES", 200)  # the mailbox is now "too big"
    before = fleet.remote_commits()
    with pytest.raises(MailboxCorrupt, match="would lose messages"):
        Mailbox(Clone(c2)).repair("code2")
    assert fleet.remote_commits() == before and len(fleet.remote_messages()) == 3
