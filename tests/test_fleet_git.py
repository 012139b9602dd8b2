"""The plumbing transaction: objects we write are exactly what git would write."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import git

from fleet_git import MAX_OBJECT_BYTES, Clone, GitError, ObjectTooLarge, run_git


def test_trees_written_by_the_transaction_pass_fsck(fleet):
    c2 = fleet.clone("code2")
    for name in ("a.b", "a-b", "a0", "coordination.txt", "coordination-notes/x", "z"):
        path = c2 / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    (c2 / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(c2 / "tool.sh", 0o755)
    git(c2, "add", "-A")
    git(c2, "update-index", "--chmod=+x", "tool.sh")
    git(c2, "commit", "-qm", "odd names", "--no-gpg-sign")
    git(c2, "push", "-q", "origin", "main")
    clone = Clone(c2)
    changes = {"a/new.json": b"{}\n", "coordination/messages.json": b'{\n  "messages": []\n}\n',
               "code2/heartbeat.json": b"{}\n", "z": None}
    tx = clone.transact(lambda tip: (changes, "code2: test"), author="code2")
    assert tx.changed
    for repo in (c2, fleet.origin):
        proc = run_git(repo, "fsck", "--strict", "--no-dangling", check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    listing = git(fleet.origin, "ls-tree", "-r", "main")
    assert "100755 blob" in listing and "\ttool.sh" in listing
    assert "\ta/new.json" in listing and "\tcode2/heartbeat.json" in listing
    assert "\tz" not in listing
    # git's own tree for the same content is byte-identical
    work = fleet.clone("check")
    assert git(work, "write-tree") == git(work, "rev-parse", "HEAD^{tree}")


def test_deleting_the_last_file_of_a_folder_removes_the_folder(fleet):
    c2 = fleet.clone("code2")
    clone = Clone(c2)
    clone.transact(lambda tip: ({"tmp/only.txt": b"x"}, "add"), author="code2")
    clone.transact(lambda tip: ({"tmp/only.txt": None}, "remove"), author="code2")
    assert "tmp" not in git(fleet.origin, "ls-tree", "--name-only", "main").split()
    assert run_git(fleet.origin, "fsck", "--strict", check=False).returncode == 0


def test_the_tip_is_read_like_git_reads_it(fleet):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    assert Clone(c2).tip() == git(c2, "rev-parse", "origin/main")
    git(c2, "pack-refs", "--all")  # the tracking ref moves into packed-refs
    assert not (c2 / ".git" / "refs" / "remotes" / "origin" / "main").exists()
    assert Clone(c2).tip() == git(c2, "rev-parse", "origin/main")
    git(c2, "update-ref", "-d", "refs/remotes/origin/main")
    assert Clone(c2).tip() is None
    assert Clone(b1).fetch() == Clone(b1).tip() == git(fleet.origin, "rev-parse", "main")


def test_mailbox_reads_from_loose_objects_match_git(fleet):
    from send_message import send_message

    c2 = fleet.clone("code2")
    assert send_message("loose", from_sender="code2", build_repo_path=str(c2))
    clone = Clone(c2)
    tip = clone.tip()
    specs = [f"{tip}^{{tree}}", f"{tip}:coordination", f"{tip}:coordination/messages.json"]
    assert clone.objects.walk_loose(tip, "coordination/messages.json", MAX_OBJECT_BYTES) == clone.read_objects(specs)
    assert clone.objects.walk_loose(tip, "coordination/missing.json", MAX_OBJECT_BYTES)[-1] is None
    assert clone.objects.walk_loose(tip, "nowhere/x.json", MAX_OBJECT_BYTES)[1:] == [None, None]
    git(c2, "gc", "-q", "--prune=now")  # everything packed: git reads it
    assert clone.objects.walk_loose(tip, "coordination/messages.json", MAX_OBJECT_BYTES) is None
    assert Clone(c2).read_file(tip, "coordination/messages.json")[1] == \
        git(c2, "show", f"{tip}:coordination/messages.json").encode() + b"\n"


def test_network_hooks_belong_to_their_clone(fleet):
    calls = []

    def hook():
        calls.append("first")

    first, second = Clone(fleet.clone("code2")), Clone(fleet.clone("build1"))
    first.add_network_hook(hook)
    first.add_network_hook(hook)  # added once, however often a monitor starts
    second.add_network_hook(lambda: calls.append("second"))
    first.fetch()
    assert calls == ["first", "first"]  # before and after the one fetch, and no other clone's hook
    assert Clone(first.root).fetch() and calls == ["first", "first"]  # a new Clone starts with none


@pytest.mark.parametrize("object_format", ["sha1", "sha256"])
def test_the_fast_path_and_git_plumbing_write_the_same_objects(tmp_path, monkeypatch, object_format):
    from fleet_objects import ObjectStore, parse_tree

    repo = tmp_path / "repo"
    git(tmp_path, "init", "-q", f"--object-format={object_format}", str(repo))

    def runner(*args, input=None, env=None):
        return run_git(repo, *args, input=input, env=env)

    fast = ObjectStore(repo / ".git" / "objects", object_format, runner)
    monkeypatch.setenv("FLEET_GIT_PLUMBING", "1")
    slow = ObjectStore(repo / ".git" / "objects", object_format, runner)
    assert fast.fast and not slow.fast
    people = {"author": ("Build One", "build1@fleet.invalid"), "committer": ("Code Two", "code2@x.invalid")}
    ids = []
    for store in (slow, fast):  # git first: the fast path then finds every object there already
        blob = store.write("blob", b'{\n  "messages": []\n}\n')
        exe = store.write("blob", b"#!/bin/sh\n")
        sub = store.write_tree([("100644", "blob", blob, "messages.json")])
        root = store.write_tree([("40000", "tree", sub, "coordination"), ("100755", "blob", exe, "run.sh"),
                                 ("100644", "blob", blob, "coordination.txt")])
        first = store.write_commit(root, None, people, "fleet: create the mailbox", "1762250000 +0130")
        second = store.write_commit(root, first, people, "code2: x\n\n", "1762250060 -0800")
        ids.append((blob, exe, sub, root, first, second, store.write("tree", b"")))
    assert ids[0] == ids[1]
    assert len(ids[0][0]) == (64 if object_format == "sha256" else 40)
    root_tree = fast.read_loose(ids[0][3], MAX_OBJECT_BYTES)
    assert [e[3] for e in parse_tree(root_tree[1], fast.hexlen)] == ["coordination.txt", "coordination", "run.sh"]
    assert git(repo, "cat-file", "-p", ids[0][5]).endswith("code2: x")
    assert run_git(repo, "fsck", "--strict", "--no-dangling", check=False).returncode == 0


def test_a_transaction_over_plumbing_alone(fleet, monkeypatch):
    monkeypatch.setenv("FLEET_GIT_PLUMBING", "1")
    c2 = fleet.clone("code2")
    clone = Clone(c2)
    assert not clone.objects.fast
    tx = clone.transact(lambda tip: ({"coordination/messages.json": b"{}\n", "a/b/c.txt": b"c"}, "code2: x"),
                        author="code2")
    assert tx.changed and git(fleet.origin, "rev-parse", "main") == tx.commit
    assert clone.read_file(tx.commit, "a/b/c.txt") == (git(c2, "rev-parse", f"{tx.commit}:a/b/c.txt"), b"c")
    assert run_git(fleet.origin, "fsck", "--strict", check=False).returncode == 0


@pytest.mark.parametrize("packed", [False, True], ids=["loose", "packed"])
def test_an_object_over_the_bound_is_never_read(fleet, packed):
    """A blob from another machine is bounded before use: its header is read, its content not."""
    b1 = fleet.clone("build1")
    big = b"x" * 300_000
    (b1 / "coordination" / "huge.json").write_bytes(big)
    git(b1, "add", "-A")
    git(b1, "commit", "-q", "--no-gpg-sign", "-m", "a large file")
    if packed:
        git(b1, "gc", "-q", "--prune=now")
    clone = Clone(b1)
    tip = git(b1, "rev-parse", "HEAD").strip()
    assert clone.read_file(tip, "coordination/huge.json", max_bytes=300_000)[1] == big
    with pytest.raises(ObjectTooLarge) as caught:
        Clone(b1).read_file(tip, "coordination/huge.json", max_bytes=299_999)
    assert "300,000 bytes, more than the 299,999" in str(caught.value)
    with pytest.raises(ObjectTooLarge):
        clone.read_objects([f"{tip}:coordination/huge.json"], max_bytes=1000)
    # The batch is usable again at once, and reads what is within the bound.
    assert clone.read_objects([f"{tip}:coordination/messages.json"])[0][1] == "blob"


def _packs(clone_dir) -> int:
    return sum(1 for p in (clone_dir / ".git" / "objects" / "pack").glob("*.pack"))


def test_a_fetch_runs_git_maintenance_only_when_git_would_find_work(fleet):
    """Git's automatic maintenance after a fetch is replaced by its own test (too many packs
    or loose objects); when that says there is work, git's gc runs as the fetch would run it."""
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    git(c2, "config", "gc.autoDetach", "false")  # the gc finishes before the fetch returns
    git(c2, "config", "fetch.unpackLimit", "1")  # every fetch leaves a pack
    clone = Clone(c2)
    for n in range(3):
        Clone(b1).transact(lambda tip, n=n: ({f"f{n}.txt": b"%d" % n}, "add"), author="build1")
        clone.fetch()
    assert _packs(c2) >= 3 and not clone._maintenance_due()  # 50 packs is git's limit
    git(c2, "config", "gc.autoPackLimit", "2")
    clone = Clone(c2)
    assert clone._maintenance_due()
    git(c2, "config", "maintenance.auto", "false")  # the user said no: git would not run it either
    assert not Clone(c2)._maintenance_due()
    git(c2, "config", "--unset", "maintenance.auto")
    Clone(b1).transact(lambda tip: ({"last.txt": b"x"}, "add"), author="build1")
    clone.fetch()
    assert _packs(c2) == 1 and not clone._maintenance_due()  # gc --auto packed them into one
    assert run_git(c2, "fsck", "--strict", check=False).returncode == 0


def test_refs_in_a_folder_are_read_like_git_reads_them(fleet):
    c2 = fleet.clone("code2")
    tip = git(c2, "rev-parse", "HEAD")
    for name in ("refs/fleet/a", "refs/fleet/b", "refs/fleet/deep/c", "refs/fleet-state/d"):
        git(c2, "update-ref", name, tip)
    expected = {"refs/fleet/a": tip, "refs/fleet/b": tip, "refs/fleet-state/d": tip}  # not deep/c
    assert Clone(c2).refs_in("refs/fleet/", "refs/fleet-state/") == expected
    git(c2, "pack-refs", "--all")  # into packed-refs
    assert Clone(c2).refs_in("refs/fleet/", "refs/fleet-state/") == expected
    other = git(c2, "commit-tree", git(c2, "rev-parse", "HEAD^{tree}"), "-m", "x")
    git(c2, "update-ref", "refs/fleet/a", other)  # a loose ref over its packed copy wins
    git(c2, "update-ref", "-d", "refs/fleet/b")
    (c2 / ".git" / "refs" / "fleet" / "e.lock").write_text(tip + "\n")  # being written: not a ref yet
    assert Clone(c2).refs_in("refs/fleet/") == {"refs/fleet/a": other}
    git(c2, "symbolic-ref", "refs/fleet/s", "refs/fleet/a")  # only git reads that: it is asked
    assert Clone(c2).refs_in("refs/fleet/") == {"refs/fleet/a": other, "refs/fleet/s": other}


def test_a_loose_object_that_inflates_past_its_header_is_not_inflated_whole(tmp_path):
    """A damaged loose object whose stream holds far more than its header declares: read_loose
    leaves it to git (None) without inflating all of it."""
    import tracemalloc
    import zlib

    repo = tmp_path / "r"
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "remote", "add", "origin", str(tmp_path / "nowhere.git"))
    oid = "ab" * 20
    folder = repo / ".git" / "objects" / oid[:2]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / oid[2:]).write_bytes(zlib.compress(b"blob 10\0" + b"\0" * (64 << 20)))
    store = Clone(repo).objects
    tracemalloc.start()
    try:
        assert store.read_loose(oid, 4096) is None
        assert tracemalloc.get_traced_memory()[1] < 4 << 20
    finally:
        tracemalloc.stop()


def test_objects_read_loose_are_what_cat_file_gives(tmp_path, monkeypatch):
    """read_objects_within reads ``<oid>`` and ``<oid>:<path>`` from loose objects when it can;
    whatever the object (absent path, a tree where a file is, an unsorted tree, a commit over
    the bound on the way to a small file, trailing or missing bytes), the answer is git's."""
    repo = tmp_path / "r"
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "remote", "add", "origin", str(tmp_path / "nowhere.git"))

    def obj(kind: str, data: bytes) -> str:
        return git(repo, "hash-object", "-w", "-t", kind, "--literally", "--stdin", input=data)

    def tree(*entries):  # raw, in the order given
        return obj("tree", b"".join(m + b" " + n + b"\0" + bytes.fromhex(o) for m, n, o in entries))

    def commit(top: str, text: str = "m") -> str:
        return obj("commit", f"tree {top}\nauthor a <a> 1 +0000\ncommitter a <a> 1 +0000\n\n{text}\n".encode())

    def damaged(oid: str, change) -> str:
        path = repo / ".git" / "objects" / oid[:2] / oid[2:]
        os.chmod(path, 0o644)
        path.write_bytes(change(path.read_bytes()))
        return oid

    blob = obj("blob", b'{"version": 1}')
    small = tree((b"100644", b"state.json", blob))
    cases = {
        "file": (f"{commit(small)}:state.json", 4096),
        "absent": (f"{commit(tree((b'100644', b'other', blob)))}:state.json", 4096),
        "a folder": (f"{commit(tree((b'40000', b'state.json', tree((b'100644', b'x', blob)))))}:state.json", 4096),
        "unsorted": (f"{commit(tree((b'100644', b'z', blob), (b'100644', b'state.json', blob)))}:state.json", 4096),
        "over the bound": (f"{commit(tree((b'100644', b'state.json', obj('blob', b'x' * 5000))))}:state.json", 4096),
        "big commit, small file": (f"{commit(small, 'y' * 3000)}:state.json", 1024),
        "root tree": (f"{commit(small)}:", 4096),
        "commit": (commit(small, "plain"), 4096),
        "trailing bytes": (damaged(commit(small, "trailing"), lambda raw: raw + b"GARBAGE"), 4096),
        "truncated": (damaged(commit(small, "cut"), lambda raw: raw[:-4]), 4096),
        "missing": ("0" * 40, 4096),
    }

    def answers():
        clone, out = Clone(repo), {}
        for name, (spec, limit) in cases.items():
            try:
                found, left_out = clone.read_objects_within([spec], limit)
                out[name] = (found.get(spec, "left out"), {k: v.reason for k, v in left_out.items()})
            except GitError as exc:
                out[name] = (type(exc).__name__, str(exc))
        return out

    loose = answers()
    monkeypatch.setenv("FLEET_GIT_PLUMBING", "1")
    assert answers() == loose
    assert loose["unsorted"][0] is None and loose["big commit, small file"][0][2] == b'{"version": 1}'


@pytest.mark.skipif(sys.platform == "win32", reason="the remote here is a POSIX shell command (git's ext transport)")
def test_a_network_call_that_times_out_returns_at_its_limit_and_stops_its_helper(tmp_path):
    """A remote that never answers, whose helper also leaves a detached child holding git's
    pipes: the call ends at its limit, and the helper is gone with git (the detached child has
    left git's tree, as a daemon would, and is not git's to kill)."""
    import time

    import psutil

    from fleet_git import RemoteUnavailable

    repo = tmp_path / "repo"
    git(tmp_path, "init", "-q", str(repo))
    git(repo, "config", "protocol.ext.allow", "always")
    git(repo, "remote", "add", "origin", "ext::sh -c (sleep% 37% &);% sleep% 300")
    started = time.monotonic()
    try:
        with pytest.raises(RemoteUnavailable, match="no answer within 2 s"):
            Clone(repo).network_git("ls-remote", "origin", timeout=2)
        assert time.monotonic() - started < 10
        assert not [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", "300"]]
    finally:  # the detached child left git's tree: it is not git's to kill (a daemon would be spared so)
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] == ["sleep", "37"]:
                process.kill()


@pytest.mark.skipif(sys.platform == "win32", reason="the remote's upload-pack here is a POSIX shell command")
def test_an_answer_whose_output_another_process_holds_open_is_read_whole_once_git_ends(fleet, caplog):
    """git ended, but a process it left behind holds its stderr open (an ssh master, say): its
    answer is read whole (an empty listing would drop every state-ref mirror, a push that landed
    would read as failed), a second or so after git ended, not at the network limit."""
    import time

    import psutil

    clone = Clone(fleet.clone("code2"))
    git(clone.root, "config", "remote.origin.uploadpack",
        "sh -c '(sleep 38 </dev/null >/dev/null &); exec git-upload-pack \"$@\"' upload-pack")
    started = time.monotonic()
    try:
        done = clone.network_git("ls-remote", "origin", timeout=30)
        assert done.returncode == 0 and b"\trefs/heads/main\n" in done.stdout
        assert time.monotonic() - started < 10
        assert any("holds its output open" in r.getMessage() for r in caplog.records)
    finally:
        for process in psutil.process_iter(["cmdline"]):
            if process.info["cmdline"] == ["sleep", "38"]:
                process.kill()


def test_a_network_call_that_ended_before_its_wait_began_is_no_timeout(fleet):
    """A look waits for its processes until one deadline: one that finished meanwhile is read,
    not taken for a timeout."""
    import time

    clone = Clone(fleet.clone("code2"))
    proc = clone.start_network_git("ls-remote", "origin")
    proc.wait()
    done = clone.finish_network_git(proc, deadline=time.monotonic() - 1)
    assert done.returncode == 0 and b"refs/heads/main" in done.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="the slow git here is a POSIX shell wrapper")
def test_a_fetch_given_more_refspecs_than_a_pipe_holds_by_a_slow_starting_git_completes(fleet, tmp_path,
                                                                                         monkeypatch):
    """A network call waits in steps; its standard input (thousands of refspecs for
    ``fetch --stdin``, more than a pipe buffer) reaches git whole however late git starts
    reading it."""
    import shutil

    real = shutil.which("git")
    slow = tmp_path / "slowbin"
    slow.mkdir()
    (slow / "git").write_text(f'#!/bin/sh\nsleep 0.8\nexec {real} "$@"\n')
    (slow / "git").chmod(0o755)
    source = fleet.clone("build1")
    tip = git(source, "rev-parse", "HEAD").strip()
    git(fleet.origin, "update-ref", "--stdin",
        input="".join(f"create refs/fleet/s{n:04d} {tip}\n" for n in range(2000)).encode())
    clone = Clone(fleet.clone("code2"))
    specs = "".join(f"+refs/fleet/s{n:04d}:refs/fleet/s{n:04d}\n" for n in range(2000)).encode()
    assert len(specs) > 65536
    monkeypatch.setenv("PATH", f"{slow}{os.pathsep}{os.environ['PATH']}")
    done = clone.fetch_git("--quiet", "--no-tags", "--stdin", "origin", input=specs)
    assert done.returncode == 0, done.stderr
    assert len(clone.refs_in("refs/fleet/")) == 2000
