"""Per-server state refs on real git: write, read everywhere, merge lost leases, bounds, fallback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import PYTHON_DIR, commit_and_push, crowd_state_refs, git, refuse_custom_refs

from fleet_git import Clone
from fleet_state import (
    MAX_ENTRIES,
    REF_PREFIX,
    STATE_FILE,
    ServerState,
    StateChange,
    StateRefError,
    StateStore,
    has_acknowledged,
    has_read,
)


def _remote_state(fleet, server: str, ref: str = "") -> dict:
    ref = ref or f"{REF_PREFIX}{server}"
    return json.loads(git(fleet.origin, "show", f"{ref}:{STATE_FILE}"))


def test_write_then_every_clone_reads_it(fleet):
    a, b = fleet.clone("code2"), fleet.clone("build1")
    store = StateStore(Clone(a))
    assert store.update("code2", StateChange(read=[("m1", "Build1")],
                                             acks=[{"id": "m2", "from": "build1", "note": "done"}]))
    doc = _remote_state(fleet, "code2")
    assert doc["version"] == 1 and doc["server"] == "code2"
    assert ["m1", "build1"] in doc["read"] and doc["acks"][0]["note"] == "done"
    # Idempotent: the same change again pushes nothing.
    assert not store.update("code2", StateChange(read=[("m1", "build1")]))
    other = StateStore(Clone(b))
    view = other.fetch()
    assert view.servers() == ["code2"]
    state = other.read("code2")
    assert state.has_read(("m1", "build1")) and state.has_acked(("m2", "build1"))
    msg = {"id": "m1", "from": "build1", "to": "all"}
    assert has_read(msg, "code2", {"code2": state}) and not has_read(msg, "other", {"code2": state})
    assert has_acknowledged({"id": "m2", "from": "BUILD1", "to": "code2"}, "code2", {"code2": state})


def test_state_refs_are_fetched_without_negotiation(fleet, tmp_path, monkeypatch):
    """A state ref is a root commit with one file: nothing to negotiate, so its fetch sends no
    ``have`` (git would go on sending them for round trips, never finding a common base)."""
    a, b = fleet.clone("code2"), fleet.clone("build1")
    writer, reader = StateStore(Clone(a)), StateStore(Clone(b))
    writer.update("code2", StateChange(read=[("m1", "build1")]))
    reader.fetch()  # the first copy
    writer.update("code2", StateChange(read=[("m2", "build1")]))
    trace = tmp_path / "packets.log"
    monkeypatch.setenv("GIT_TRACE_PACKET", str(trace))
    reader.fetch(["code2"])
    monkeypatch.delenv("GIT_TRACE_PACKET")
    packets = trace.read_text(errors="replace")
    assert "fetch> want " in packets and "fetch> have " not in packets
    assert reader.read("code2").has_read(("m2", "build1"))


def test_a_state_ref_carrying_history_makes_the_clone_negotiate(fleet, tmp_path, monkeypatch, caplog):
    """Someone pushed the branch to refs/fleet/x: fetched without negotiation, each move of it
    would bring the whole history again. Seen once, the clone negotiates from then on."""
    a, b = fleet.clone("code2"), fleet.clone("build1")
    StateStore(Clone(a)).update("code2", StateChange(read=[("m1", "build1")]))
    reader = StateStore(Clone(b))
    reader.mirror_fleet()
    assert git(b, "config", "--get", "fleet.negotiatestaterefs", check=False) == ""  # state refs only
    Clone(a).transact(lambda tip: ({"notes.txt": b"x"}, "a second commit"), author="code2")
    git(fleet.origin, "update-ref", "refs/fleet/build2", "refs/heads/main")
    reader.mirror_fleet()
    assert "refs/fleet/build2 is no state ref" in caplog.text
    assert git(b, "config", "--get", "fleet.negotiatestaterefs") == "true"
    assert reader.read("build2").read == {} and reader.read("code2").has_read(("m1", "build1"))
    StateStore(Clone(a)).update("code2", StateChange(read=[("m2", "build1")]))
    trace = tmp_path / "packets.log"
    monkeypatch.setenv("GIT_TRACE_PACKET", str(trace))
    StateStore(Clone(b)).fetch(["code2"])  # a new process of the same clone: it negotiates
    monkeypatch.delenv("GIT_TRACE_PACKET")
    assert "fetch> have " in trace.read_text(errors="replace")


def test_a_look_reads_the_branch_while_the_state_refs_come_and_fails_after_them(fleet):
    """mirror_fleet hands the fetched branch's tip to ``meanwhile`` (a look reads the mailbox then);
    what that raises comes out once the state refs' fetch is done, never cutting it off."""
    a, b = fleet.clone("code2"), fleet.clone("build1")
    reader = StateStore(Clone(b))
    reader.mirror_fleet()
    StateStore(Clone(a)).update("code2", StateChange(read=[("m1", "build1")]))
    (a / "notes.txt").write_text("a new tip\n", encoding="utf-8")
    commit_and_push(a, "a new tip")
    seen = []

    def meanwhile(tip):
        seen.append((tip, git(b, "rev-parse", "refs/remotes/origin/main")))
        raise RuntimeError("the mailbox could not be read")

    with pytest.raises(RuntimeError, match="could not be read"):
        reader.mirror_fleet(meanwhile=meanwhile)
    tip = git(fleet.origin, "rev-parse", "refs/heads/main")
    assert seen == [(tip, tip)]
    assert git(b, "rev-parse", "refs/fleet/code2") == git(fleet.origin, "rev-parse", "refs/fleet/code2")
    assert StateStore(Clone(b)).read("code2").has_read(("m1", "build1"))


def test_an_oversized_root_commit_is_not_taken_for_history(fleet, caplog):
    a, b = fleet.clone("code2"), fleet.clone("build1")
    writer, reader = StateStore(Clone(a)), StateStore(Clone(b))
    writer.update("code2", StateChange(read=[("m1", "build1")]))
    reader.mirror_fleet()
    tree = git(a, "rev-parse", "refs/fleet/code2^{tree}")
    big = git(a, "commit-tree", tree, "-m", "x" * 70_000)  # a root commit over the bound
    git(a, "push", "-q", "origin", f"{big}:refs/fleet/zz")
    writer.update("code2", StateChange(read=[("m2", "build1")]))
    reader.mirror_fleet()
    assert git(b, "config", "--get", "fleet.negotiatestaterefs", check=False) == ""
    assert "no state ref" not in caplog.text and reader.read("code2").has_read(("m2", "build1"))


def test_where_ref_names_are_case_blind_only_server_ids_are_fetched(fleet):
    """On Windows and macOS refs/fleet/CODE2 is the file of refs/fleet/code2: a look lists the
    remote and fetches lower-case server ids only, so another member cannot pose as code2."""
    a, b, evil = fleet.clone("code2"), fleet.clone("build1"), fleet.clone("evil")
    StateStore(Clone(a)).update("code2", StateChange(read=[("m1", "build1")]))
    StateStore(Clone(evil)).update("evil", StateChange(read=[("forged", "build1")]))
    git(evil, "push", "-q", "origin", "refs/fleet/evil:refs/fleet/CODE2")
    git(b, "config", "core.ignorecase", "true")
    reader = StateStore(Clone(b))
    reader.mirror_fleet()
    assert set(Clone(b).refs_in("refs/fleet/")) == {"refs/fleet/code2", "refs/fleet/evil"}
    state = reader.read("code2")
    assert state.has_read(("m1", "build1")) and not state.has_read(("forged", "build1"))
    git(fleet.origin, "update-ref", "-d", "refs/fleet/evil")
    reader.mirror_fleet()  # a ref deleted on the remote: its mirror goes too
    assert set(Clone(b).refs_in("refs/fleet/")) == {"refs/fleet/code2"}


@pytest.mark.parametrize("case_blind", [False, True])
def test_a_look_reads_a_bounded_number_of_state_refs_the_named_servers_first(fleet, monkeypatch, caplog,
                                                                              case_blind):
    """Any member can push state refs, and ephemeral servers leave theirs behind: a look reads
    at most MAX_STATE_SERVERS of them, those of the servers it was told of first, and says how
    many it left out. It fetches no more than that (by name, never by pattern, case-blind clone
    or not); past a few dozen, the refspecs reach git on standard input (a Windows command line
    holds a few hundred)."""
    import fleet_start
    import fleet_state

    a, reader_clone, crowd = fleet.clone("zz-code2"), fleet.clone("build1"), fleet.clone("crowd")
    StateStore(Clone(a)).update("zz-code2", StateChange(read=[("m1", "build1")]))
    StateStore(Clone(crowd)).update("crowd", StateChange(read=[("m2", "build1")]))
    crowd_state_refs(fleet, "crowd", (f"ghost{n:02d}" for n in range(40)))
    if case_blind:
        git(reader_clone, "config", "core.ignorecase", "true")
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 36)
    monkeypatch.setattr(fleet_start, "REFSPECS_IN_ARGV", 8)
    reader = StateStore(Clone(reader_clone))
    reader.mirror_fleet(first=["zz-code2"])
    fetched = Clone(reader_clone).refs_in(REF_PREFIX)
    assert len(fetched) == 36  # the bound: a crowd fills no clone with refs
    mirrors = reader.mirrored(first=["zz-code2"])
    assert len(mirrors) == 36 and reader.left_out == 6
    assert "zz-code2" in mirrors.values()  # named: read although it sorts last
    assert reader.read_all(mirrors.values())["zz-code2"].has_read(("m1", "build1"))
    git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}zz-code2")
    reader.mirror_fleet(first=["zz-code2"])  # gone on the remote: gone here too
    assert f"{REF_PREFIX}zz-code2" not in Clone(reader_clone).refs_in(REF_PREFIX)
    archiver = StateStore(Clone(fleet.clone("archiver")))  # the listed path (the archive's)
    archiver.fetch(first=["crowd"])
    assert len(Clone(fleet.clones["archiver"]).refs_in(REF_PREFIX)) == 36 and archiver.left_out == 5
    assert archiver.read_all()["crowd"].has_read(("m2", "build1")) and archiver.left_out == 5


def test_history_never_grows(fleet):
    store = StateStore(Clone(fleet.clone("code2")))
    for n in range(5):
        store.update("code2", StateChange(read=[(f"m{n}", "x")]))
    assert git(fleet.origin, "rev-list", "--count", f"{REF_PREFIX}code2") == "1"
    assert len(_remote_state(fleet, "code2")["read"]) == 5
    # The shared branch is untouched.
    assert len(fleet.remote_commits()) == 1


def test_lost_lease_is_merged_not_lost(fleet):
    """Two processes of one server, each with a stale view: both changes end up in the ref."""
    one = StateStore(Clone(fleet.clone("code2")))
    two = StateStore(Clone(fleet.clone("code2-again")))
    one.update("code2", StateChange(read=[("a", "x")]))
    two.update("code2", StateChange(read=[("b", "x")]))  # built on nothing: loses the lease
    one.update("code2", StateChange(read=[("c", "x")]))  # built on its own stale tip: loses too
    read = {tuple(item) for item in _remote_state(fleet, "code2")["read"]}
    assert read == {("a", "x"), ("b", "x"), ("c", "x")}


RACER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from fleet_git import Clone
    from fleet_state import StateChange, StateStore
    store = StateStore(Clone(sys.argv[2]))
    for n in range(int(sys.argv[4])):
        store.update("code2", StateChange(read=[(f"{sys.argv[3]}-{n}", "x")]))
""")


@pytest.mark.timeout(180)
def test_racing_processes_of_one_server_lose_nothing(fleet):
    clone = fleet.clone("code2")
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(PYTHON_DIR), str(clone), f"p{i}", "5"],
                              stderr=subprocess.PIPE) for i in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=170)
        assert proc.returncode == 0, err.decode()
    read = {tuple(item) for item in _remote_state(fleet, "code2")["read"]}
    assert read == {(f"p{i}-{n}", "x") for i in range(4) for n in range(5)}


def test_unknown_keys_kept_and_newer_version_never_rewritten(fleet):
    evil = fleet.clone("evil")
    store = StateStore(Clone(fleet.clone("code2")))
    _push_raw_state(evil, "code2", {"version": 1, "server": "code2", "read": [], "acks": [],
                                    "future": {"x": 1}})
    store.fetch()
    store.update("code2", StateChange(read=[("m", "x")]))
    assert _remote_state(fleet, "code2")["future"] == {"x": 1}
    _push_raw_state(evil, "code2", {"version": 7, "server": "code2", "read": [["old", "x"]]})
    store.fetch()
    assert store.read("code2").has_read(("old", "x"))  # read for the keys it knows
    with pytest.raises(StateRefError, match="newer version"):
        store.update("code2", StateChange(read=[("n", "x")]))
    assert _remote_state(fleet, "code2")["version"] == 7


def _push_raw_state(clone, server: str, doc, raw: bytes = b"") -> None:
    data = raw or json.dumps(doc).encode()
    blob = git(clone, "hash-object", "-w", "--stdin", input=data)
    tree = git(clone, "mktree", input=f"100644 blob {blob}\t{STATE_FILE}\n".encode())
    commit = git(clone, "commit-tree", tree, "-m", "x")
    git(clone, "push", "-q", "--force", "origin", f"{commit}:{REF_PREFIX}{server}")


@pytest.mark.parametrize("raw", [
    b"[" * 5000 + b"]" * 5000,
    b'{"version": ' + b"9" * 5000 + b"}",
    b'{"read": "not a list"}',
    b"\xff\xfe",
    b'{"read": [' + b",".join([b'["m", "x"]'] * (MAX_ENTRIES + 1)) + b"]}",
])
def test_hostile_state_refs_are_ignored_with_a_warning(fleet, raw, caplog):
    evil = fleet.clone("evil")
    _push_raw_state(evil, "code2", None, raw)
    _push_raw_state(evil, "build1", {"version": 1, "read": [["m", "x"], ["y" * 5000, "x"], [1, 2]]})
    store = StateStore(Clone(fleet.clone("reader")))
    store.fetch()
    states = store.read_all()
    assert set(states) == {"code2", "build1"}
    assert not states["code2"].read  # ignored: nothing counts as read
    assert list(states["build1"].read) == [("m", "x")]  # bad entries dropped, good ones kept
    assert any("state ref of code2 ignored" in r.getMessage() for r in caplog.records)


def test_refs_with_bad_server_names_are_not_read(fleet):
    evil = fleet.clone("evil")
    _push_raw_state(evil, "Code2", {"read": [["m", "x"]]})
    _push_raw_state(evil, "bad!name", {"read": [["m", "x"]]})
    _push_raw_state(evil, "nested/code2", {"read": [["m", "x"]]})
    store = StateStore(Clone(fleet.clone("reader")))
    view = store.fetch()
    assert view.servers() == [] and store.known_servers() == []


def test_host_refusing_custom_refs_gets_the_fallback_branch(fleet, caplog):
    refuse_custom_refs(fleet)
    clone = fleet.clone("code2")
    store = StateStore(Clone(clone))
    assert store.update("code2", StateChange(read=[("m1", "x")]))
    assert git(fleet.origin, "for-each-ref", "--format=%(refname)", "refs/fleet/") == ""
    doc = _remote_state(fleet, "code2", "refs/heads/fleet-state/code2")
    assert doc["read"] == [["m1", "x"]]
    assert sum("fleet-state/code2" in r.getMessage() for r in caplog.records) == 1
    # Remembered: the next write goes straight to the branch, with a new clone object too.
    again = StateStore(Clone(clone))
    assert again.update("code2", StateChange(read=[("m2", "x")]))
    assert sum("fleet-state/code2" in r.getMessage() for r in caplog.records) == 1
    reader = StateStore(Clone(fleet.clone("build1")))
    reader.fetch()
    assert set(reader.read("code2").read) == {("m1", "x"), ("m2", "x")}
    assert git(fleet.origin, "rev-list", "--count", "refs/heads/fleet-state/code2") == "1"


def test_merge_keeps_newest_presence():
    old = ServerState("code2")
    old.presence = {"timestamp": "2026-01-01T00:00:00Z", "activity": "old"}
    new = ServerState("code2")
    new.presence = {"timestamp": "2026-01-02T00:00:00Z", "activity": "new"}
    old.merge(new)
    assert old.presence["activity"] == "new"
    new.merge(old)
    assert new.presence["activity"] == "new"


T1, T2 = "2026-01-01T23:59:59Z", "2026-01-02T00:00:00Z"


@pytest.mark.parametrize("retired, presence, expected", [
    ({"at": T2, "presence": None}, None, True),                          # retired, never seen
    ({"at": T2, "presence": T1}, {"timestamp": T1}, True),               # the presence it saw
    ({"at": T2, "presence": T1}, {"timestamp": T2}, False),              # a monitor started again
    ({"at": T1, "presence": T1}, {"timestamp": T2}, False),              # whatever either clock says
    ({"at": "2099-01-01T00:00:00Z", "presence": T1}, {"timestamp": T2}, False),  # a clock far ahead
    ({"at": T2, "presence": T1}, {"timestamp": T2, "activity": "stopped"}, False),  # any other presence
    ({"at": T2, "presence": None}, {"timestamp": "garbage"}, False),
    ({"at": "not a time", "presence": None}, None, False),               # what does not parse retires no one
    ({"at": T2, "presence": 12}, None, False),
    ({"at": T2 + "x" * 100, "presence": None}, None, False),             # over the bound
    (T2, None, False),                                                   # not a record
    (None, {"timestamp": T2}, False),
])
def test_a_server_is_retired_until_it_publishes_presence_again(retired, presence, expected):
    doc = {"version": 1, "server": "ci-7", "read": [], "acks": []}
    if retired is not None:
        doc["retired"] = retired
    if presence is not None:
        doc["presence"] = presence
    state = ServerState.from_bytes(json.dumps(doc).encode(), "ci-7")
    assert state.is_retired() is expected
    assert "retired" not in state.extra  # a key of its own: written back only when it is valid
    assert ("retired" in json.loads(state.to_bytes())) is (state.retired is not None)


def test_retiring_records_the_presence_it_saw_and_a_running_monitor_drops_it(fleet):
    """--retire from one clone after the server's monitor wrote presence from another (a lost
    lease: the retirement is applied again to the state as it now is); a presence other than
    the one the retiring side checked fails it; a clean stop right after carries the record
    forward; any other presence drops it."""
    c2, ops = fleet.clone("code2"), fleet.clone("ops")
    first = {"timestamp": T1, "activity": "idle"}
    assert StateStore(Clone(c2)).update("code2", StateChange(read=[("m1", "build1")], presence=first))
    with pytest.raises(StateRefError, match="published presence while it was being retired"):
        StateStore(Clone(ops)).update("code2", StateChange(retire=True, seen=None))  # it saw none
    assert StateStore(Clone(ops)).update("code2", StateChange(retire=True, seen=T1))  # lease lost once, merged
    state = _remote_state(fleet, "code2")
    assert state["retired"]["presence"] == T1 and state["read"] == [["m1", "build1"]] and state["presence"]
    assert StateStore(Clone(ops)).read("code2").is_retired()
    store = StateStore(Clone(c2))
    assert store.update("code2", StateChange(presence={"timestamp": T2, "activity": "stopped"}))  # lease lost
    assert _remote_state(fleet, "code2")["retired"]["presence"] == T2 and store.read("code2").is_retired()
    assert store.update("code2", StateChange(presence={"timestamp": "2026-01-03T00:00:00Z", "activity": "idle"}))
    assert "retired" not in _remote_state(fleet, "code2") and not store.read("code2").is_retired()
    # Then a clean stop does not bring back a record that is gone.
    assert store.update("code2", StateChange(presence={"timestamp": "2026-01-04T00:00:00Z", "activity": "stopped"}))
    assert not store.read("code2").is_retired()


def test_a_retirement_is_read_from_refs_fleet_whenever_that_ref_exists():
    """Both ref names of a server are merged (the newest presence wins, by its own clock): the
    record is taken from refs/fleet/S, and from fleet-state/S only when there is no refs/fleet/S,
    so a record pushed under the name a server does not write cannot retire it, whatever
    presence is pushed beside it; a server whose clock runs fast stays the live one."""
    from fleet_state import takes_retirement

    own, other = ServerState("code2"), ServerState("code2")
    own.presence = {"timestamp": "2026-11-29T10:00:00Z", "activity": "idle"}
    other.presence = {"timestamp": "9999-12-31T23:59:59Z", "activity": "stopped"}
    other.retired = {"at": "2026-11-29T09:00:00Z", "presence": "9999-12-31T23:59:59Z"}
    mirrors = {"refs/fleet/code2", "refs/fleet-state/code2"}
    for order in (("refs/fleet/code2", own), ("refs/fleet-state/code2", other)), \
                 (("refs/fleet-state/code2", other), ("refs/fleet/code2", own)):
        merged = ServerState("code2")
        for local, state in order:
            merged.merge(state.copy(), retirement=takes_retirement(local, mirrors))
        assert merged.presence == other.presence and merged.retired is None and not merged.is_retired()
    # Only the fallback name exists (a host that refuses refs/fleet/*): its record is read.
    alone = ServerState("code2")
    alone.merge(other.copy(), retirement=takes_retirement("refs/fleet-state/code2", {"refs/fleet-state/code2"}))
    assert alone.is_retired()
    # A fast clock: its presence, two hours ahead under refs/fleet, wins over an old one beside it.
    fast, old = ServerState("code2"), ServerState("code2")
    fast.presence = {"timestamp": "2099-01-01T00:00:00Z", "activity": "idle"}
    old.presence = {"timestamp": "2026-11-27T00:00:00Z"}
    old.retired = {"at": "2026-11-27T01:00:00Z", "presence": "2026-11-27T00:00:00Z"}
    merged = ServerState("code2")
    merged.merge(old.copy(), retirement=takes_retirement("refs/fleet-state/code2", mirrors))
    merged.merge(fast.copy(), retirement=takes_retirement("refs/fleet/code2", mirrors))
    assert merged.presence == fast.presence and not merged.is_retired()


def test_mirrors_of_deleted_refs_go_even_when_one_of_them_is_locked(fleet, caplog):
    """A mirror left locked (a process killed while it wrote it) keeps only itself: the other
    mirrors of refs deleted on the remote are still dropped, and the one kept is said."""
    for server in ("aa", "bb", "cc"):
        StateStore(Clone(fleet.clone(server))).update(server, StateChange(read=[("m1", "x")]))
    reader = fleet.clone("reader")
    StateStore(Clone(reader)).fetch()
    for server in ("aa", "bb", "cc"):
        git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}{server}")
    (reader / ".git" / "refs" / "fleet" / "bb.lock").write_text("")
    store = StateStore(Clone(reader))
    store.fetch()
    assert sorted(store.read_all()) == ["bb"]
    assert any("refs/fleet/bb" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_mirrors_of_deleted_refs_wait_for_a_later_look_while_packed_refs_is_locked(fleet, caplog):
    """A packed-refs.lock left by a killed gc locks every deletion: the mirrors stay, said once,
    without a wait per mirror, and the next look deletes them."""
    for server in ("aa", "bb"):
        StateStore(Clone(fleet.clone(server))).update(server, StateChange(read=[("m1", "x")]))
    reader = fleet.clone("reader")
    StateStore(Clone(reader)).fetch()
    for server in ("aa", "bb"):
        git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}{server}")
    lock = reader / ".git" / "packed-refs.lock"
    lock.write_text("")
    store = StateStore(Clone(reader))
    store.fetch()
    assert sorted(store.read_all()) == ["aa", "bb"]
    assert any("2 mirrors of state refs" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    lock.unlink()
    store.fetch()
    assert store.read_all() == {}


def test_a_named_ref_gone_since_the_listing_leaves_the_look_standing(fleet, monkeypatch, caplog):
    """Past the bound, the named servers' refs are fetched after the branch is read; one deleted
    meanwhile is left out (the rest are fetched), and a remote gone meanwhile leaves the mirrors
    as last fetched, with a warning: neither stops the look."""
    import fleet_state

    reader_clone = fleet.clone("reader")  # before the states: a local clone would hold their objects
    for server in ("aa", "bb", "zz-code2"):
        StateStore(Clone(fleet.clone(server))).update(server, StateChange(read=[("m1", "x")]))
    git(reader_clone, "config", "core.ignorecase", "true")
    monkeypatch.setattr(fleet_state, "MAX_STATE_SERVERS", 2)
    reader = StateStore(Clone(reader_clone))
    reader.mirror_fleet()
    git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}zz-code2")
    git(fleet.origin, "gc", "-q", "--prune=now")  # its commit gone too: neither name nor id fetches it
    reader.fetch_named(["zz-code2"])
    assert sorted(reader.known_servers()) == ["aa", "bb"]
    reader.mirror_fleet()  # (listed again: zz-code2 is gone)
    StateStore(Clone(fleet.clones["bb"])).update("bb", StateChange(read=[("m2", "x")]))
    reader._listed = reader.poll()  # as a look past the bound leaves it
    git(reader_clone, "remote", "set-url", "origin", str(fleet.origin.parent / "gone.git"))
    reader.fetch_named(["bb"])
    assert any("could not be fetched" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_state_ref_deleted_between_the_listing_and_the_fetch_is_left_out(fleet, monkeypatch):
    """A look lists the remote, then fetches what moved: a ref deleted in between (an operator's
    git push origin :refs/fleet/S, or any member's) leaves the others fetched, never fails the
    look; its mirror goes at the next listing."""

    reader_clone = fleet.clone("reader")  # before the states: a local clone would hold their objects
    for server in ("aa", "bb"):
        StateStore(Clone(fleet.clone(server))).update(server, StateChange(read=[("m1", "x")]))
    reader = StateStore(Clone(reader_clone))
    listed = reader.poll
    def poll_then_delete():  # the listing, then the deletion, as two machines would race
        view = listed()
        git(fleet.origin, "update-ref", "-d", f"{REF_PREFIX}bb")
        git(fleet.origin, "gc", "-q", "--prune=now")
        return view
    monkeypatch.setattr(reader, "poll", poll_then_delete)
    view = reader.fetch()
    assert view.servers() == ["aa", "bb"] and reader.read("aa").has_read(("m1", "x"))
    monkeypatch.undo()
    StateStore(Clone(reader_clone)).mirror_fleet()
    assert StateStore(Clone(reader_clone)).known_servers() == ["aa"]


def test_state_refs_are_fetched_by_the_listed_commit_and_by_name_once_it_is_gone(fleet):
    """A listed state ref is fetched by its commit (git asks the remote for no ref list); when
    the ref moved after the listing and its old commit is gone, by name: the newer state."""
    reader_clone = fleet.clone("reader")  # before the states: a local clone would hold their objects
    writer = StateStore(Clone(fleet.clone("code2")))
    writer.update("code2", StateChange(read=[("m1", "x")]))
    reader = StateStore(Clone(reader_clone))
    view = reader.poll()
    assert reader.refspecs_to_fetch(view) == [f"+{view.state_tips[REF_PREFIX + 'code2']}:{REF_PREFIX}code2"]
    writer.update("code2", StateChange(read=[("m2", "x")]))  # moves after the listing
    git(fleet.origin, "gc", "-q", "--prune=now")  # and the listed commit is gone
    reader.fetch(view=view)
    assert reader.read("code2").has_read(("m2", "x"))
