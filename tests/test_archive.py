"""Archive passes move done-with mail by one transaction, losing nothing; lookups still find it."""

from __future__ import annotations

import datetime as dt
import json
import time

from conftest import QUIRKY, Fleet, commit_and_push, crowd_state_refs, git, run_script

from fleet_archive import archive_mailbox, archived_keys, find_anywhere
from fleet_git import Clone
from fleet_mailbox import message_key, valid_messages
from message_monitor import Monitor
from send_message import send_message


def ts(days_ago: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def msg(i: int, days_ago: float, to="code2", **extra):
    m = {"id": f"msg_{1700000000 + i}_{i:012x}", "from": "build1", "to": to, "subject": f"m{i}",
         "body": "x" * 40, "type": "info", "priority": "normal", "timestamp": ts(days_ago),
         "read": False, "ack_required": False}
    m.update(extra)
    return m


def test_archive_moves_only_what_is_done_with(tmp_path):
    entries = [
        msg(1, 40, read=True),                               # direct, handled, old: moves
        msg(2, 40),                                          # direct, unread: stays
        msg(3, 40, to="all", read_by=["code2", "build2"]),   # broadcast read by every known server: moves
        msg(4, 1, to="all"),                                 # broadcast, recent: stays
        msg(5, 40, to=["code2", "build2"], read_by=["code2"]),            # one of two: stays
        msg(6, 40, to=["code2", "build2"], read_by=["code2", "build2"]),  # both: moves
        msg(7, 40, to="build2", read_by=["build2"]),        # handled through read_by: moves
        {"id": "x", "from": "a", "to": 42},                  # invalid: stays
        msg(9, 40, read=True, timestamp="yesterday-ish"),    # unparseable timestamp: stays
    ]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries}, indent=2).encode())
    c2 = fleet.clone("code2")
    before = fleet.remote_commits()
    result = archive_mailbox(Clone(c2), "code2", 30)
    assert result["archived"] == 4
    assert len(fleet.remote_commits()) == len(before) + 1  # one transaction
    left = [m.get("subject") if isinstance(m, dict) else m for m in fleet.remote_messages()]
    assert left == ["m2", "m4", "m5", None, "m9"]
    assert fleet.remote_messages()[3] == {"id": "x", "from": "a", "to": 42}
    moved = archived_keys(Clone(c2), Clone(c2).fetch())
    assert sorted(moved) == sorted(message_key(entries[i]) for i in (0, 2, 5, 6))
    month = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    path = f"coordination/archive/messages-{month:%Y-%m}.json"
    assert json.loads(git(fleet.origin, "show", f"main:{path}"))["messages"]
    # idempotent: a second pass finds nothing to do
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 0


def test_archive_keeps_every_entry_of_the_quirky_fixture(quirky_fleet):
    c2 = quirky_fleet.clone("code2")
    Monitor(Clone(c2), "code2", 1, one_shot=True, auto_reply=False).cycle()
    for server in ("build1", "build2", "architect"):
        Monitor(Clone(quirky_fleet.clone(server)), server, 1, one_shot=True, auto_reply=False).cycle()
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--archive-days", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("archived ")
    clone = Clone(c2)
    tip = clone.fetch()
    main = quirky_fleet.remote_messages()
    archived = archived_keys(clone, tip)
    original = json.loads(QUIRKY.read_text(encoding="utf-8"))["messages"]
    valid_keys = [message_key(m) for _, m in valid_messages({"messages": original}, warn=False)]
    main_keys = [message_key(m) for _, m in valid_messages({"messages": main}, warn=False)]
    assert sorted(main_keys + archived) == sorted(valid_keys)  # nothing lost, nothing doubled
    assert "this entry is not an object" in main
    # replies and lookups still find archived messages
    archived_id = archived[0][0]
    assert find_anywhere(clone, tip, archived_id) is not None
    b1 = quirky_fleet.clones["build1"]
    reply = send_message("answer to an archived message", reply_to=archived_id, from_sender="build1",
                         build_repo_path=str(b1))
    assert reply and reply.message["subject"].startswith("Re: ")


def test_auto_archive_runs_once_a_day(tmp_path):
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [msg(1, 40, read=True)]}, indent=2).encode())
    c2 = fleet.clone("code2")
    first = Monitor(Clone(c2), "code2", 1, one_shot=True, auto_reply=False, auto_archive_days=30)
    first.cycle()
    assert fleet.remote_messages() == []
    b1 = fleet.clone("build1")
    send_message("recent", to="code2", from_sender="build1", build_repo_path=str(b1))
    time.sleep(1.1)  # "recent" is now older than the tiny age below: only the daily gate keeps it
    again = Monitor(Clone(c2), "code2", 1, one_shot=True, auto_reply=False, auto_archive_days=1e-6)
    again.cycle()  # within the day: no second pass, even with a shorter age
    subjects = git(fleet.origin, "log", "--format=%s", "main").splitlines()
    assert sum(s.startswith("code2: archive") for s in subjects) == 1
    assert [m["body"] for m in fleet.remote_messages()] == ["recent"]


def test_the_monitor_archives_after_30_days_by_default_and_0_turns_it_off(tmp_path):
    entries = [msg(1, 40, read=True), msg(2, 20, read=True), msg(3, 40)]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries}, indent=2).encode())
    off = fleet.clone("build1")
    proc = run_script("message_monitor.py", "--repo", str(off), "--server", "build1", "--once",
                      "--no-auto-reply", "--auto-archive-days", "0")
    assert proc.returncode == 0, proc.stderr
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1", "m2", "m3"]
    c2 = fleet.clone("code2")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    # read and older than 30 days: archived; read but recent, or unread: stays
    assert [m["subject"] for m in fleet.remote_messages()] == ["m2", "m3"]


def _commit_roster(fleet: Fleet, text: str) -> None:
    admin = fleet.clone("admin")
    (admin / "coordination" / "servers.json").write_text(text)
    commit_and_push(admin, "roster")


def test_no_archive_setting_hides_a_broadcast_from_a_server_that_has_not_read_it(tmp_path):
    answered = msg(2, 40, to="build1", read=True)
    answered["from"] = "code2"
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [msg(1, 40, to="all"), answered]}, indent=2).encode())
    _commit_roster(fleet, json.dumps({"version": 1, "servers": [
        {"id": "build1", "description": "builds"}, {"id": "Architect", "description": "only in the roster"}]}))
    c2, arch = fleet.clone("code2"), fleet.clone("architect")
    archive = ["--server", "code2", "--archive-days", "0"]

    def left():
        return [m["subject"] for m in fleet.remote_messages()]

    proc = run_script("message_monitor.py", "--repo", str(c2), *archive)
    assert proc.returncode == 0, proc.stderr
    assert left() == ["m1"]  # the direct, read message went; the broadcast no one read stays
    Monitor(Clone(c2), "code2", 1, one_shot=True, auto_reply=False).cycle()
    run_script("message_monitor.py", "--repo", str(c2), *archive)
    assert left() == ["m1"]  # the architect (roster only) has not read it
    # another reader's automatic pass, while the architect has been offline for 40 days
    Monitor(Clone(fleet.clone("build2")), "build2", 1, one_shot=True, auto_reply=False,
            auto_archive_days=7).cycle()
    assert left() == ["m1"]
    Monitor(Clone(arch), "architect", 1, one_shot=True, auto_reply=False).cycle()
    proc = run_script("message_monitor.py", "--repo", str(c2), *archive)
    assert proc.returncode == 0 and left() == [], proc.stdout + proc.stderr
    assert message_key(msg(1, 40)) in archived_keys(Clone(c2), Clone(c2).fetch())


def test_a_bad_roster_keeps_every_broadcast_and_archives_direct_mail(tmp_path, caplog):
    entries = [msg(1, 40, to="all", read_by=["code2"]), msg(2, 40, read=True)]
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": entries}, indent=2).encode())
    _commit_roster(fleet, "[" * 5000 + "]" * 5000)
    result = archive_mailbox(Clone(fleet.clone("code2")), "code2", 0)
    assert result["archived"] == 1
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1"]
    assert any("servers.json" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_has_read_is_one_question_that_takes_receipts_from_elsewhere():
    from fleet_archive import has_read, known_servers, plan_archive

    broadcast = msg(1, 40, to="all", read_by=["code2"])
    data = {"messages": [broadcast]}
    key = message_key(broadcast)
    known = known_servers(data, ["build2"])
    assert known == {"build1", "code2", "build2"}
    assert has_read(broadcast, "code2") and not has_read(broadcast, "build2")
    assert has_read(broadcast, "build2", {"build2": {key}})
    assert plan_archive(data, 0, known=known)[1] == {}
    assert plan_archive(data, 0, known=None, receipts={"build2": {key}})[1] == {}  # fleet unknown
    stay, moves = plan_archive(data, 0, known=known, receipts={"build2": {key}})
    assert stay == [] and sum(len(v) for v in moves.values()) == 1


def test_more_state_refs_than_a_reader_reads_keep_every_broadcast(tmp_path, monkeypatch, caplog):
    """The archive reads at most MAX_STATE_SERVERS servers' receipts: past that, who has read a
    broadcast cannot be told, so every broadcast stays (direct mail still moves)."""
    import fleet_state
    from fleet_state import StateChange, StateStore

    broadcast = msg(1, 40, to="all", read_by=["code2"])
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [broadcast, msg(2, 40, read=True)]}, indent=2).encode())
    StateStore(Clone(fleet.clone("crowd"))).update("crowd", StateChange(read=[message_key(broadcast)]))
    crowd_state_refs(fleet, "crowd", (f"ghost{n}" for n in range(5)))
    c2 = fleet.clone("code2")
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 3)
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 1
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1"]
    assert any("state refs of 6 servers" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    monkeypatch.undo()  # every receipt read: every server has read the broadcast
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 1
    assert fleet.remote_messages() == []


def test_a_crowd_of_state_refs_cannot_keep_the_recipients_receipts_from_the_archive(tmp_path, monkeypatch):
    """Refs named to sort before every real server do not crowd out the receipts of the servers
    the mailbox names: direct mail their receipts say was read still moves."""
    import fleet_state
    from fleet_state import StateChange, StateStore

    direct = msg(1, 40, to="zz-code2")
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [direct]}, indent=2).encode())
    StateStore(Clone(fleet.clone("zz-code2"))).update("zz-code2", StateChange(read=[message_key(direct)]))
    crowd_state_refs(fleet, "zz-code2", (f"aaa{n}" for n in range(5)))
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 3)
    assert archive_mailbox(Clone(fleet.clone("build1")), "build1", 30)["archived"] == 1
    assert fleet.remote_messages() == []


def test_mail_waits_for_no_retired_server_and_its_archived_copy_says_who_read_it(tmp_path):
    """A server that retired reads nothing more: a broadcast, mail to it alone and mail to it and
    another move once the others have read them; the archived copy names only who did."""
    from fleet_state import StateChange, StateStore

    broadcast, alone, shared = msg(1, 40, to="all"), msg(2, 40, to="ci-7"), msg(3, 40, to=["code2", "ci-7"])
    fresh = msg(4, 1, to="ci-7")  # recent: age still keeps it, retired or not
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [broadcast, alone, shared, fresh]}, indent=2).encode())
    c2 = fleet.clone("code2")
    StateStore(Clone(c2)).update("code2", StateChange(read=[message_key(broadcast), message_key(shared)]))
    StateStore(Clone(fleet.clone("ci-7"))).update("ci-7", StateChange(presence={"timestamp": ts(5)}))
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 0  # ci-7 has read none of them

    proc = run_script("message_monitor.py", "--repo", str(fleet.clone("ops")), "--server", "ci-7", "--retire")
    assert proc.returncode == 0, proc.stderr
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 3
    assert [m["subject"] for m in fleet.remote_messages()] == ["m4"]
    assert find_anywhere(Clone(c2), Clone(c2).tip(), alone["id"])["subject"] == "m2"  # still found
    month = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40)
    archived = json.loads(git(fleet.origin, "show", f"main:coordination/archive/messages-{month:%Y-%m}.json"))
    by_subject = {m["subject"]: m for m in archived["messages"]}
    assert by_subject["m1"]["read_by"] == ["code2"] and by_subject["m3"]["read_by"] == ["code2"]
    assert "read_by" not in by_subject["m2"]


def _push_fallback_state(fleet: Fleet, server: str, doc: dict) -> None:
    """Push a ``state.json`` holding ``doc`` to ``fleet-state/<server>``, as any member can."""
    raw = json.dumps({"version": 1, "server": server, "read": [], "acks": [], **doc}).encode()
    evil = fleet.clones.get("evil") or fleet.clone("evil")
    blob = git(evil, "hash-object", "-w", "--stdin", input=raw).strip()
    tree = git(evil, "mktree", input=f"100644 blob {blob}\tstate.json\n".encode()).strip()
    commit = git(evil, "commit-tree", tree, "-m", f"{server}: state").strip()
    git(evil, "push", "-q", "origin", f"{commit}:refs/heads/fleet-state/{server}")


def test_a_retirement_forged_under_a_servers_other_ref_name_moves_none_of_its_mail(tmp_path):
    """Any member can push a ``fleet-state/<server>`` branch: a record there, beside a presence
    stamped far ahead, does not retire a server that publishes presence under its own ref."""
    from fleet_state import StateChange, StateStore

    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [msg(1, 40, to="code2")]}, indent=2).encode())
    StateStore(Clone(fleet.clone("code2"))).update("code2", StateChange(presence={"timestamp": ts(0.01)}))
    _push_fallback_state(fleet, "code2", {
        "presence": {"timestamp": "9999-12-31T23:59:59Z", "activity": "stopped"},
        "retired": {"at": ts(0), "presence": "9999-12-31T23:59:59Z"}})
    assert archive_mailbox(Clone(fleet.clone("build1")), "build1", 30)["archived"] == 0
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1"]
    # Nor can that forged "stopped" presence get a live server retired: each name is judged.
    proc = run_script("message_monitor.py", "--repo", str(fleet.clones["build1"]), "--server", "code2", "--retire")
    assert proc.returncode == 2 and "code2 looks live" in proc.stderr, proc.stderr


def test_a_server_whose_clock_runs_fast_is_not_retired_by_an_old_record_under_its_other_name(tmp_path):
    """An old presence and a record under fleet-state/<server>, while the server publishes under
    refs/fleet/<server> with a clock two hours fast: it is live, and none of its mail moves."""
    from fleet_state import StateChange, StateStore

    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [msg(1, 40, to="code2")]}, indent=2).encode())
    ahead = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    StateStore(Clone(fleet.clone("code2"))).update("code2", StateChange(presence={"timestamp": ahead}))
    _push_fallback_state(fleet, "code2", {"presence": {"timestamp": ts(2)},
                                          "retired": {"at": ts(1.9), "presence": ts(2)}})
    assert archive_mailbox(Clone(fleet.clone("build1")), "build1", 30)["archived"] == 0
    proc = run_script("message_monitor.py", "--repo", str(fleet.clones["build1"]), "--server", "code2", "--retire")
    assert proc.returncode == 2 and "code2 looks live" in proc.stderr, proc.stderr


def test_an_archive_file_nobody_can_read_keeps_only_its_months_mail_hot(tmp_path):
    """Another member pushed garbage (or a link) as one month's archive file: that month's mail
    stays in the hot mailbox, every other month moves, and the pass still prunes receipts."""
    from fleet_state import StateChange, StateStore

    def month_of(days_ago: float) -> str:
        return f"{dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=days_ago):%Y-%m}"

    m1, m2 = msg(1, 70), msg(2, 130)  # two different months, both read by code2
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [m1, m2]}, indent=2).encode())
    c2, evil = fleet.clone("code2"), fleet.clone("evil")
    (evil / "coordination" / "archive").mkdir(parents=True)
    (evil / "coordination" / "archive" / f"messages-{month_of(70)}.json").write_text("{ not json")
    (evil / "coordination" / "archive" / "messages-1999-01.json").write_text("[[[")
    commit_and_push(evil, "garbage archive files")
    StateStore(Clone(c2)).update("code2", StateChange(read=[message_key(m1), message_key(m2)]))

    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--archive-days", "30")
    assert proc.returncode == 0, proc.stderr
    assert f"messages-{month_of(70)}.json cannot be read" in proc.stdout + proc.stderr
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1"]  # its month's file is unreadable
    assert find_anywhere(Clone(c2), Clone(c2).fetch(), m2["id"])["subject"] == "m2"
    state = StateStore(Clone(c2)).read("code2")
    assert list(state.read) == [message_key(m1)]  # m2's receipt now lives in the archive


def test_a_queued_retry_of_mail_archived_meanwhile_does_not_bring_it_back(tmp_path):
    """The push landed but its answer was lost (or a dead entry was revived long after): the
    message was read and archived meanwhile; delivering the queued copy changes nothing."""
    from fleet_state import StateChange, StateStore
    from message_queue import MessageQueue

    m = msg(1, 40)
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [m]}, indent=2).encode())
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    MessageQueue(str(b1), "build1").enqueue(m, reason="the answer to its push was lost")
    StateStore(Clone(c2)).update("code2", StateChange(read=[message_key(m)]))
    assert archive_mailbox(Clone(c2), "code2", 30)["archived"] == 1
    before = fleet.remote_commits()
    proc = run_script("message_monitor.py", "--repo", str(b1), "--server", "build1", "--once", "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert fleet.remote_messages() == [] and fleet.remote_commits() == before
    assert MessageQueue(str(b1), "build1").stats()["pending"] == 0  # counted as delivered


def test_a_month_whose_archive_file_is_full_keeps_its_mail_hot_and_the_others_move(tmp_path, monkeypatch):
    import fleet_archive

    m1, m2 = msg(1, 70, read=True), msg(2, 130, read=True)  # two months
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [m1, m2]}, indent=2).encode())
    c2 = fleet.clone("code2")
    full = f"{dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=70):%Y-%m}"
    (c2 / "coordination" / "archive").mkdir(parents=True)
    (c2 / "coordination" / "archive" / f"messages-{full}.json").write_text(
        json.dumps({"messages": [msg(100 + i, 70, read=True) for i in range(20)]}, indent=2))
    commit_and_push(c2, "a busy month")
    monkeypatch.setattr(fleet_archive, "MAX_MAILBOX_BYTES", 6000)  # that month's file is about full
    result = archive_mailbox(Clone(c2), "code2", 30)
    assert result["archived"] == 1 and result["skipped"] == [f"coordination/archive/messages-{full}.json"]
    assert [m["subject"] for m in fleet.remote_messages()] == ["m1"]


def test_repair_leaves_out_only_the_archived_copy_not_a_message_sharing_its_id(tmp_path):
    """Older tools' ids collided: two messages with one id and sender, one of them archived.
    A repair drops the hot copy of the archived one and keeps the other."""
    from message_monitor import repair_mailbox

    a = msg(1, 40, body="the archived one")
    b = dict(a, body="another message, same id")
    fleet = Fleet(tmp_path, mailbox=json.dumps({"messages": [a, b]}, indent=2).encode())
    c2 = fleet.clone("code2")
    month = f"{dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=40):%Y-%m}"
    (c2 / "coordination" / "archive").mkdir(parents=True)
    (c2 / "coordination" / "archive" / f"messages-{month}.json").write_text(json.dumps({"messages": [a]}))
    commit_and_push(c2, "an older tool's archive")
    (c2 / "coordination" / "messages.json").write_text("{ broken")
    commit_and_push(c2, "broken")
    result = repair_mailbox(Clone(c2), "code2")
    assert result["repaired"] and result["dropped"] == 1
    assert [m["body"] for m in fleet.remote_messages()] == ["another message, same id"]
