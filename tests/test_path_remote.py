"""A look at the fleet whose remote is reached by a path (a folder on this machine or a share), on
real fleets: the remote's refs are read from its files as ``ls-remote`` reads them there, and one
fetch brings the branch and the state refs that moved (fleet_start.remote_folder,
fleet_start.remote_listing, fleet_state.StateStore._mirror_by_path)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from conftest import Fleet, activities, count_commands, git, git_commands, publish_presence

import fleet_start
from fleet_git import Clone, LocalRefLocked
from fleet_report import fleet_status
from fleet_start import PathLook, listed_refs, parse_state_ref, read_settings, remote_folder, remote_listing
from fleet_state import StateStore
from send_message import send_message


@pytest.fixture(autouse=True)
def nothing_left_started() -> Iterator[None]:
    yield
    fleet_start.stop_unused()
    fleet_start._CHOSEN.clear()






def _what_a_look_takes(refs: Dict[str, str]) -> Dict[str, str]:
    """The refs of a listing that a look reads: the branch and the state refs."""
    return {ref: oid for ref, oid in refs.items() if ref == "refs/heads/main" or parse_state_ref(ref)}


def _ls_remote(clone: Path) -> Dict[str, str]:
    return listed_refs(git(clone, *fleet_start.listing_args("main")).encode())


# --------------------------------------------------------------------------- the listing


def test_the_listing_read_from_the_files_is_what_ls_remote_lists(fleet: Fleet):
    """Refs created, moved and deleted at random, loose and packed (``pack-refs``, as a gc on the
    remote does), under both names, with names no look takes beside them: after every step the
    remote's files give what ``ls-remote`` gives."""
    viewer = fleet.clone("viewer")
    rnd = random.Random(14)
    head = git(fleet.origin, "rev-parse", "main")
    blob = git(fleet.origin, "hash-object", "-w", "--stdin", input=b'{"version": 1}\n')
    tree = git(fleet.origin, "mktree", input=f"100644 blob {blob}\tstate.json\n".encode())
    commits = [git(fleet.origin, "commit-tree", tree, "-m", f"state {i}") for i in range(4)] + [head]
    names = ([f"refs/fleet/srv{i}" for i in range(8)] + [f"refs/heads/fleet-state/srv{i}" for i in range(3)]
             + ["refs/fleet/nested/srv1", "refs/fleet/UPPER", "refs/heads/other", "refs/tags/v1"])
    folder = remote_folder({"remote.origin.url": str(fleet.origin)}, (), str(viewer))
    assert folder == os.path.realpath(fleet.origin)
    for step in range(60):
        action = rnd.random()
        if action < 0.6:
            git(fleet.origin, "update-ref", rnd.choice(names), rnd.choice(commits))
        elif action < 0.8:
            git(fleet.origin, "update-ref", "-d", rnd.choice(names), check=False)
        elif action < 0.9:
            git(fleet.origin, "pack-refs", "--all", "--prune")
        else:
            git(fleet.origin, "commit-tree", tree, "-m", "moved")  # an object, no ref: nothing to list
            git(fleet.origin, "update-ref", "refs/heads/main", rnd.choice(commits))
        listed = remote_listing(folder, "main")
        assert listed is not None
        assert _what_a_look_takes(listed) == _what_a_look_takes(_ls_remote(viewer)), step


def test_what_only_git_can_list_is_left_to_git(fleet: Fleet, monkeypatch):
    viewer = fleet.clone("viewer")
    folder = str(fleet.origin)
    assert remote_listing(folder, "main") is not None
    # A symbolic ref among the state refs: git resolves it, a file read could not.
    git(fleet.origin, "symbolic-ref", "refs/fleet/alias", "refs/heads/main")
    assert remote_listing(folder, "main") is None
    git(fleet.origin, "symbolic-ref", "--delete", "refs/fleet/alias")
    assert remote_listing(folder, "main") is not None
    # Thousands of refs in a folder, or a packed-refs of megabytes: git reads those faster.
    monkeypatch.setattr(fleet_start, "MAX_REMOTE_REF_ENTRIES", 3)
    for i in range(4):
        git(fleet.origin, "update-ref", f"refs/fleet/srv{i}", "main")
    assert remote_listing(folder, "main") is None
    monkeypatch.undo()
    with open(fleet.origin / "packed-refs", "ab") as handle:
        handle.write(b"0" * (fleet_start.MAX_REMOTE_PACKED_REFS_BYTES + 1))
    assert remote_listing(folder, "main") is None
    (fleet.origin / "packed-refs").unlink()
    if os.path.exists("/dev/zero"):  # endless, and of no size: read no further than the bound
        (fleet.origin / "packed-refs").symlink_to("/dev/zero")
        assert remote_listing(folder, "main") is None
        (fleet.origin / "packed-refs").unlink()
    # The look then lists the remote as it always did, and still sees the state refs.
    monkeypatch.setattr(fleet_start, "MAX_REMOTE_REF_ENTRIES", 3)
    publish_presence(fleet.clone("build1"), "build1", "compiling")
    report = fleet_status(Clone(viewer))
    assert activities(report)["build1"] == "compiling"


# --------------------------------------------------------------------------- what is a path


def _settings(url: str, **more: str) -> Dict[str, str]:
    return {"remote.origin.url": url, **more}


def test_remote_folder_takes_only_what_git_reaches_by_path(tmp_path: Path, monkeypatch):
    fleet = Fleet(tmp_path)
    root = str(fleet.clone("viewer"))
    bare = os.path.realpath(fleet.origin)
    work = fleet.clone("work")  # a clone with a work tree, as a remote: git reads its .git
    (tmp_path / "gitfile").mkdir()
    (tmp_path / "gitfile" / ".git").write_text(f"gitdir: {work / '.git'}\n")
    ok = {
        str(fleet.origin): bare,
        f"file://{fleet.origin}": bare,
        str(tmp_path / "origin"): bare,  # git's local transport tries "<path>.git" too
        os.path.relpath(fleet.origin, root): bare,  # relative to the clone, as git runs there
        str(work): os.path.realpath(work / ".git"),
    }
    for url, folder in ok.items():
        assert remote_folder(_settings(url), (), root) == folder, url
    refused = [
        "git@example.com:fleet/build.git",  # host:path is ssh
        "ssh://example.com/fleet.git", "https://example.com/fleet.git", "git://127.0.0.1/origin.git",
        "file://example.com/srv/fleet.git",  # a host
        f"file://{str(fleet.origin).replace('/', '%2F', 1)}",  # escaped: git would decode it
        "ext::ssh example.com %S fleet",  # a remote helper
        str(tmp_path / "gitfile"),  # a .git file naming a folder elsewhere
        str(tmp_path / "nothing-here"),
    ]
    for url in refused:
        assert remote_folder(_settings(url), (), root) is None, url
    path = str(fleet.origin)
    assert remote_folder(_settings(path), {"remote.origin.url"}, root) is None  # two URLs
    for key in ("url.https://example.com/.insteadof", "remote.origin.uploadpack", "transfer.hiderefs",
                "uploadpack.hiderefs"):
        assert remote_folder(_settings(path, **{key: "x"}), (), root) is None, key
    git(fleet.origin, "config", "uploadpack.hideRefs", "refs/fleet/")
    assert remote_folder(_settings(path), (), root) is None  # hidden by the remote's own settings
    git(fleet.origin, "config", "--unset", "uploadpack.hideRefs")
    assert remote_folder(_settings(path), (), root) == bare
    monkeypatch.setenv("GIT_NAMESPACE", "team")
    assert remote_folder(_settings(path), (), root) is None


def test_the_clone_reads_its_remote_folder_from_git_s_settings(fleet: Fleet, tmp_path: Path, monkeypatch):
    viewer = fleet.clone("viewer")
    assert Clone(viewer).remote_folder() == os.path.realpath(fleet.origin)
    git(viewer, "config", "--add", "remote.origin.url", str(fleet.origin))
    assert Clone(viewer).remote_folder() is None  # a second URL: git decides
    git(viewer, "config", "--unset-all", "remote.origin.url")
    git(viewer, "config", "remote.origin.url", str(fleet.origin))
    glob = tmp_path / "global.gitconfig"
    glob.write_text(f'[url "git://127.0.0.1:9/origin.git"]\n\tinsteadOf = {fleet.origin}\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(glob))
    assert Clone(viewer).remote_folder() is None  # rewritten by the user's own settings
    values, repeated = read_settings(b"a.b\nx\0A.B\ny\0c.d\nz\0")
    assert values == {"a.b": "y", "c.d": "z"} and repeated == {"a.b"}


# --------------------------------------------------------------------------- the look


def _looking_fleet(fleet: Fleet) -> Path:
    """A viewer that has looked once; then new mail and a new presence."""
    b1 = fleet.clone("build1")
    viewer = fleet.clone("viewer")
    publish_presence(b1, "build1", "first")
    fleet_status(Clone(viewer))
    assert send_message("news", "hello", "viewer", from_sender="build1", build_repo_path=str(b1))
    publish_presence(b1, "build1", "compiling")
    return viewer


def test_a_look_by_path_takes_the_one_fetch_its_script_started(fleet: Fleet, tmp_path: Path, monkeypatch):
    viewer = _looking_fleet(fleet)
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_look(["--repo", str(viewer), "--json"])
    started = [args for _root, args in fleet_start._STARTED]
    assert len(started) == 2 and tuple(fleet_start.CONFIG_ARGS) in started  # the settings and the fetch
    fetch = next(args for args in started if "fetch" in args)
    tip = git(fleet.origin, "rev-parse", "main")
    assert "+refs/heads/main:refs/remotes/origin/main" in fetch
    assert f"+{git(fleet.origin, 'rev-parse', 'refs/fleet/build1')}:refs/fleet/build1" in fetch
    assert "--negotiation-tip=refs/remotes/origin/main" in fetch
    report = fleet_status(Clone(viewer))
    assert not fleet_start._STARTED  # both taken
    assert activities(report)["build1"] == "compiling" and report["tip"] == tip
    commands = git_commands(trace)
    assert (count_commands(commands, "fetch"), count_commands(commands, "ls-remote")) == (1, 0), commands
    # Nothing moved since: no fetch at all, and the same picture.
    trace.unlink()
    fleet_start.start_look(["--repo", str(viewer), "--json"])
    assert [args for _root, args in fleet_start._STARTED] == [tuple(fleet_start.CONFIG_ARGS)]
    again = fleet_status(Clone(viewer))
    assert activities(again) == activities(report) and not fleet_start._STARTED
    assert count_commands(git_commands(trace), "fetch") == 0


def test_a_command_that_started_nothing_chooses_the_path_itself(fleet: Fleet, tmp_path: Path, monkeypatch):
    """``inbox.py acks`` and a look from Python (or from Windows' script) start nothing early."""
    viewer = _looking_fleet(fleet)
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    report = fleet_status(Clone(viewer))
    assert activities(report)["build1"] == "compiling"
    commands = git_commands(trace)
    assert (count_commands(commands, "fetch"), count_commands(commands, "ls-remote")) == (1, 0), commands


def test_a_settings_file_git_reads_otherwise_is_looked_at_the_usual_way(fleet: Fleet, tmp_path: Path,
                                                                        monkeypatch, git_daemon):
    """The clone's settings file names a path, but the user's own settings rewrite it to a URL:
    the script follows git's reading, lists the remote and fetches the branch as over a network,
    and starts no fetch by what it read in the folder."""
    viewer = _looking_fleet(fleet)
    glob = tmp_path / "global.gitconfig"
    glob.write_text(f'[url "{git_daemon.url("origin.git")}"]\n\tinsteadOf = {fleet.origin}\n')
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(glob))
    trace = tmp_path / "trace"
    monkeypatch.setenv("GIT_TRACE", str(trace))
    fleet_start.start_look(["--repo", str(viewer), "--json"])
    assert fleet_start._CHOSEN[os.path.realpath(viewer)] == fleet_start.BY_LISTING
    report = fleet_status(Clone(viewer))
    assert activities(report)["build1"] == "compiling" and not fleet_start._STARTED
    commands = git_commands(trace)
    assert count_commands(commands, "ls-remote") == 1 and not any("negotiation-tip" in c for c in commands), commands


def test_a_branch_gone_since_the_listing_is_a_missing_branch(fleet: Fleet):
    """The remote's refs were read; then the branch was deleted and its commits pruned: the fetch
    by the listed commit is refused, by name finds nothing, and the look says the branch is gone
    (the state refs are fetched all the same)."""
    viewer = _looking_fleet(fleet)
    root = os.path.realpath(viewer)
    listed = remote_listing(str(fleet.origin), "main")
    before = fleet_start.refs_in(os.path.join(root, ".git"), ("refs/fleet/", "refs/fleet-state/"), 40)
    fetched = git(viewer, "rev-parse", "refs/remotes/origin/main")
    git(fleet.origin, "update-ref", "-d", "refs/heads/main")
    git(fleet.origin, "reflog", "expire", "--expire=now", "--all")
    git(fleet.origin, "gc", "-q", "--prune=now")
    fleet_start._CHOSEN[root] = PathLook(listed, before, fetched)
    store = StateStore(Clone(viewer))
    assert store.mirror_fleet() is None
    assert git(viewer, "rev-parse", "refs/remotes/origin/main") == fetched  # left as it was
    assert StateStore(Clone(viewer)).read("build1").presence["activity"] == "compiling"


def test_a_tracking_ref_that_stays_locked_is_a_local_fault(fleet: Fleet):
    viewer = _looking_fleet(fleet)
    lock = viewer / ".git" / "refs" / "remotes" / "origin" / "main.lock"
    lock.write_text("")
    try:
        with pytest.raises(LocalRefLocked, match="refs/remotes/origin/main stays locked"):
            StateStore(Clone(viewer)).mirror_fleet()
    finally:
        lock.unlink()
    report = fleet_status(Clone(viewer))
    assert activities(report)["build1"] == "compiling"


def test_the_state_files_left_alone_are_read_while_the_fetch_runs(fleet: Fleet):
    """``unmoved`` gets the mirrors the fetch leaves as they are; what it raises costs nothing but
    its own reading."""
    viewer = _looking_fleet(fleet)
    publish_presence(fleet.clone("build2"), "build2", "idle")
    fleet_status(Clone(viewer))
    publish_presence(fleet.clones["build1"], "build1", "testing")
    before = fleet_start.refs_in(os.path.join(viewer, ".git"), ("refs/fleet/", "refs/fleet-state/"), 40)
    seen: List[Dict[str, str]] = []

    def unmoved(mirrors):
        seen.append(dict(mirrors))
        raise OSError("a reading that failed")

    StateStore(Clone(viewer)).mirror_fleet(unmoved=unmoved)
    assert seen == [{ref: oid for ref, oid in before.items() if ref != "refs/fleet/build1"}]
    assert StateStore(Clone(viewer)).read("build1").presence["activity"] == "testing"


def test_a_tracking_ref_another_process_moved_on_meanwhile_is_never_moved_back(fleet: Fleet):
    """The remote's refs were read; then more mail came and the monitor's poll in the same clone
    fetched it: the look's fetch brings the branch by name, so the tracking ref stays on the newer
    commit, and the look reads that."""
    viewer = _looking_fleet(fleet)
    root = os.path.realpath(viewer)
    listed = remote_listing(str(fleet.origin), "main")
    before = fleet_start.refs_in(os.path.join(root, ".git"), ("refs/fleet/", "refs/fleet-state/"), 40)
    fetched = git(viewer, "rev-parse", "refs/remotes/origin/main")
    assert send_message("later", "more", "viewer", from_sender="build1", build_repo_path=str(fleet.clones["build1"]))
    git(viewer, "fetch", "-q", "origin", "+refs/heads/main:refs/remotes/origin/main")  # the monitor's poll
    newer = git(viewer, "rev-parse", "refs/remotes/origin/main")
    assert newer != listed["refs/heads/main"]
    fleet_start._CHOSEN[root] = PathLook(listed, before, fetched)
    assert StateStore(Clone(viewer)).mirror_fleet() == newer
    assert git(viewer, "rev-parse", "refs/remotes/origin/main") == newer


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="a FIFO holds the script where the signal must come")
def test_ctrl_c_while_the_script_reads_the_remote_is_an_interruption(fleet: Fleet):
    """The script reads the remote's refs before the suite loads (over a share, that can take a
    while): a Ctrl+C then ends the command as one during it does. The remote's ``packed-refs``
    is a FIFO here, which holds the script in its reading until the signal comes."""
    import signal
    import subprocess
    import sys

    from conftest import PYTHON_DIR

    viewer = fleet.clone("viewer")
    fifo = fleet.origin / "packed-refs"
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "fleet_status.py"), "--repo", str(viewer)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    writer = None
    try:
        deadline = time.monotonic() + 60
        while writer is None and time.monotonic() < deadline and proc.poll() is None:
            try:  # succeeds once the script has the FIFO open for reading
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.01)
        assert writer is not None, proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if writer is not None:
            os.close(writer)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and err == "fleet_status: interrupted\n" and out == "", err


def test_a_clone_without_the_branch_s_tracking_ref_fetches_only_what_it_lacks(tmp_path: Path, monkeypatch):
    """A clone of the work branch only (``--single-branch``), looking at the mailbox branch that
    grows from it: it has every object but the last commit's, and the look's fetch tells the
    remote so (it negotiates from all the clone has, not from a tracking ref it lacks), so the
    remote sends that commit, not the history again."""
    fleet = Fleet(tmp_path, branch="work")
    seed = fleet.clone("seed")
    for i in range(3):
        (seed / f"f{i}.txt").write_text(f"work {i}\n")
        git(seed, "add", "-A")
        git(seed, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", f"work {i}")
    git(seed, "push", "-q", "origin", "work", "work:mail")
    viewer = tmp_path / "viewer"
    git(tmp_path, "clone", "-q", "--no-local", "--single-branch", "-b", "work", str(fleet.origin), str(viewer))
    assert send_message("hello", "one", "code2", from_sender="build1", build_repo_path=str(seed), branch="mail")
    trace = tmp_path / "packets"
    monkeypatch.setenv("GIT_TRACE_PACKET", str(trace))
    report = fleet_status(Clone(viewer, branch="mail"))
    assert report["tip"] == git(fleet.origin, "rev-parse", "mail")
    told = [line for line in trace.read_text(errors="replace").splitlines() if "fetch> have " in line]
    assert git(viewer, "rev-parse", "work") in " ".join(told)  # the commit it shares with the branch


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown to another user needs root")
def test_a_remote_git_refuses_is_never_read_by_hand(fleet: Fleet, monkeypatch):
    """A remote git refuses (another user's folder: "dubious ownership"; a transport the settings
    forbid) or reaches elsewhere (a ``remote.origin.vcs`` helper) is looked at through git, so an
    idle look says UNKNOWN as every other command does, never OK from files git would not read."""
    viewer = _looking_fleet(fleet)
    fleet_status(Clone(viewer))  # nothing moves from here on
    root = str(viewer)
    path = str(fleet.origin)
    assert remote_folder(_settings(path), (), root) is not None
    for key in ("protocol.file.allow", "protocol.allow", "remote.origin.vcs"):
        assert remote_folder(_settings(path, **{key: "never"}), (), root) is None, key
    monkeypatch.setenv("GIT_ALLOW_PROTOCOL", "https")
    assert remote_folder(_settings(path), (), root) is None
    monkeypatch.delenv("GIT_ALLOW_PROTOCOL")
    git(viewer, "config", "protocol.file.allow", "never")
    with pytest.raises(Exception, match="not allowed|transport"):
        fleet_status(Clone(viewer))
    git(viewer, "config", "--unset", "protocol.file.allow")
    for folder, _dirs, files in os.walk(fleet.origin):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chown(name, 65534, 65534)
    assert remote_folder(_settings(path), (), root) is None
    with pytest.raises(Exception, match="dubious ownership"):
        fleet_status(Clone(viewer))
