"""The test git servers: real remotes on 127.0.0.1 that go down and come back on the same port."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import git
from gitserver import DEFAULT_MAILBOX, GitDaemon, HttpGitServer, make_bare, port_accepts

from fleet_git import Clone, RemoteUnavailable, run_git

NETWORK = 30.0  # a hung git call fails the test instead of hanging it


def net(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return run_git(repo, *args, check=False, timeout=NETWORK)


def commit_file(clone: Path, name: str, content: str, message: str) -> str:
    (clone / name).write_text(content)
    git(clone, "add", name)
    git(clone, "commit", "-q", "--no-gpg-sign", "-m", message)
    return git(clone, "rev-parse", "HEAD")


@pytest.fixture(params=["daemon", "http"])
def server(request):
    """One test body over both servers (STYLE.md 15)."""
    name = "git_daemon" if request.param == "daemon" else "http_git_server"
    return request.getfixturevalue(name)


def test_make_bare_holds_one_commit_with_the_mailbox(tmp_path):
    repo = make_bare(tmp_path, "origin.git")
    assert git(repo, "rev-parse", "--is-bare-repository") == "true"
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git(repo, "rev-list", "--count", "main") == "1"
    assert git(repo, "ls-tree", "-r", "--name-only", "main") == "coordination/messages.json"
    shown = run_git(repo, "show", "main:coordination/messages.json").stdout
    assert shown == DEFAULT_MAILBOX


def test_make_bare_other_branch_and_mailbox(tmp_path):
    mailbox = json.dumps({"messages": [{"id": "m1", "from": "a", "to": "b"}]}, indent=2).encode() + b"\n"
    repo = make_bare(tmp_path, "other", branch="trunk", mailbox=mailbox)
    assert git(repo, "symbolic-ref", "HEAD") == "refs/heads/trunk"
    assert run_git(repo, "show", "trunk:coordination/messages.json").stdout == mailbox


def test_clone_push_fetch(server, tmp_path):
    make_bare(tmp_path, "origin.git")
    url = server.url("origin.git")
    for name in ("a", "b"):
        proc = net(tmp_path, "clone", "-q", url, name)
        assert proc.returncode == 0, proc.stderr
    a, b = tmp_path / "a", tmp_path / "b"
    assert json.loads((a / "coordination" / "messages.json").read_text()) == {"messages": []}

    pushed = commit_file(a, "note.txt", "hello\n", "from a")
    proc = net(a, "push", "-q", "origin", "main")
    assert proc.returncode == 0, proc.stderr
    assert git(tmp_path / "origin.git", "rev-parse", "main") == pushed

    proc = net(b, "fetch", "-q", "origin")
    assert proc.returncode == 0, proc.stderr
    assert git(b, "rev-parse", "origin/main") == pushed


def test_stopped_remote_refuses_then_comes_back_on_the_same_port(server, tmp_path):
    make_bare(tmp_path, "origin.git")
    assert net(tmp_path, "clone", "-q", server.url("origin.git"), "a").returncode == 0
    a = tmp_path / "a"
    port = server.port

    server.stop()
    assert not port_accepts(port)
    proc = net(a, "fetch", "-q", "origin")
    assert proc.returncode != 0
    assert b"connect" in proc.stderr.lower(), proc.stderr
    server.stop()  # twice is fine

    server.start()
    assert server.port == port
    assert server.url("origin.git").endswith(f":{port}/origin.git")
    pushed = commit_file(a, "back.txt", "back\n", "after restart")
    proc = net(a, "push", "-q", "origin", "main")
    assert proc.returncode == 0, proc.stderr
    proc = net(a, "fetch", "-q", "origin")
    assert proc.returncode == 0, proc.stderr
    assert git(a, "rev-parse", "origin/main") == pushed


def test_suite_clone_sees_the_outage_as_remote_unavailable(fleet, server, tmp_path):
    # The fixtures serve tmp_path, where the conftest Fleet keeps its bare origin.
    clone = fleet.clone("code2")
    git(clone, "remote", "set-url", "origin", server.url("origin.git"))
    repo = Clone(clone)
    tip = repo.fetch()
    assert tip == fleet.remote_commits()[0]
    server.stop()
    with pytest.raises(RemoteUnavailable):
        repo.fetch()
    server.start()
    assert repo.fetch() == tip


@pytest.mark.parametrize("cls", [GitDaemon, HttpGitServer])
def test_context_manager_stops_and_stop_is_idempotent(cls, tmp_path, no_proxy):
    make_bare(tmp_path, "origin.git")
    with cls(tmp_path) as srv:
        port = srv.port
        assert port_accepts(port)
        assert net(tmp_path, "ls-remote", srv.url("origin.git")).returncode == 0
    assert not srv.running
    assert not port_accepts(port)
    srv.stop()
    srv.stop()


def test_url_before_start_is_an_error(tmp_path):
    for srv in (GitDaemon(tmp_path), HttpGitServer(tmp_path)):
        with pytest.raises(RuntimeError):
            srv.url("origin.git")
        srv.stop()  # never started: nothing to do


@pytest.mark.skipif(os.name == "nt", reason="checks a POSIX process id")
def test_daemon_process_is_gone_after_stop(git_daemon):
    pid = git_daemon.pid
    assert pid is not None
    git_daemon.stop()
    assert git_daemon.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_daemon_logs_to_a_file_in_the_base_folder(git_daemon, tmp_path):
    make_bare(tmp_path, "origin.git")
    assert net(tmp_path, "ls-remote", git_daemon.url("origin.git")).returncode == 0
    git_daemon.stop()
    assert "Request upload-pack for '/origin.git'" in (tmp_path / "git-daemon.log").read_text()


@pytest.mark.parametrize("status, marker", [(500, b"500"), (403, b"403"), (401, b"")])
def test_http_fail_with_then_cleared(http_git_server, tmp_path, status, marker):
    make_bare(tmp_path, "origin.git")
    url = http_git_server.url("origin.git")
    assert net(tmp_path, "clone", "-q", url, "a").returncode == 0
    a = tmp_path / "a"

    http_git_server.fail_with = status
    proc = net(a, "fetch", "-q", "origin")
    assert proc.returncode != 0
    assert marker in proc.stderr, proc.stderr
    assert http_git_server.requests[-1].status == status
    with pytest.raises(RemoteUnavailable):
        Clone(a).fetch()

    http_git_server.fail_with = None
    proc = net(a, "fetch", "-q", "origin")
    assert proc.returncode == 0, proc.stderr


def test_http_401_is_an_authentication_failure_without_a_prompt(http_git_server, tmp_path):
    make_bare(tmp_path, "origin.git")
    http_git_server.fail_with = 401
    proc = net(tmp_path, "ls-remote", http_git_server.url("origin.git"))
    assert proc.returncode != 0
    assert b"username" in proc.stderr.lower() or b"authentication" in proc.stderr.lower(), proc.stderr


def test_http_delay_still_answers(http_git_server, tmp_path):
    make_bare(tmp_path, "origin.git")
    http_git_server.delay = 0.05
    proc = net(tmp_path, "ls-remote", http_git_server.url("origin.git"), "refs/heads/main")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().endswith("\trefs/heads/main\n")


def test_http_stop_cuts_a_request_in_flight(http_git_server, tmp_path):
    # A slow server that goes down mid-request: the client fails, stop() does not wait it out.
    make_bare(tmp_path, "origin.git")
    http_git_server.delay = 120.0
    results = []
    client = threading.Thread(target=lambda: results.append(
        net(tmp_path, "ls-remote", http_git_server.url("origin.git"))))
    client.start()
    deadline = time.monotonic() + 10
    while http_git_server.active_connections == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert http_git_server.active_connections == 1
    http_git_server.stop()
    client.join(timeout=NETWORK)
    assert not client.is_alive()
    assert results[0].returncode != 0
    assert http_git_server.active_connections == 0


def test_http_gzip_request_body_is_understood(http_git_server, tmp_path):
    # Enough local commits that git's "have" lines pass 1 KiB, which git sends gzipped; protocol
    # v0 repeats earlier rounds in each stateless request, so the second round is over that size.
    make_bare(tmp_path, "origin.git")
    url = http_git_server.url("origin.git")
    for name in ("a", "b"):
        assert net(tmp_path, "clone", "-q", url, name).returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    # Newer dates than the shared commit, so negotiation walks them before it finds common ground.
    start = int(time.time()) + 3600
    head = git(a, "rev-parse", "HEAD")
    stream = "".join(
        f"commit refs/heads/main\ncommitter Fleet Test <fleet@example.invalid> {start + 60 * i} +0000\n"
        f"data 9\nlocal {i:03d}\n" + (f"from {head}\n" if i == 0 else "") + "\n"
        for i in range(60))
    run_git(a, "fast-import", "--quiet", input=stream.encode())
    pushed = commit_file(b, "new.txt", "new\n", "from b")
    assert net(b, "push", "-q", "origin", "main").returncode == 0

    proc = net(a, "-c", "protocol.version=0", "fetch", "-q", "origin")
    assert proc.returncode == 0, proc.stderr
    assert git(a, "rev-parse", "origin/main") == pushed
    assert any(r.content_encoding == "gzip" and r.status == 200 for r in http_git_server.requests), \
        http_git_server.requests


def test_http_chunked_push_body_is_understood(http_git_server, tmp_path):
    # A pack larger than http.postBuffer (minimum 64 KiB) is sent with chunked encoding.
    make_bare(tmp_path, "origin.git")
    assert net(tmp_path, "clone", "-q", http_git_server.url("origin.git"), "a").returncode == 0
    a = tmp_path / "a"
    (a / "blob.bin").write_bytes(os.urandom(300 * 1024))
    git(a, "add", "blob.bin")
    git(a, "commit", "-q", "--no-gpg-sign", "-m", "big")
    proc = net(a, "-c", "http.postBuffer=65536", "push", "-q", "origin", "main")
    assert proc.returncode == 0, proc.stderr
    assert git(tmp_path / "origin.git", "rev-parse", "main") == git(a, "rev-parse", "HEAD")
    assert any("chunked" in r.transfer_encoding.lower() for r in http_git_server.requests), \
        http_git_server.requests
