"""network_check: URL parsing, and real checks against listeners on 127.0.0.1 only."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from conftest import git, run_script

import network_check as nc
from fleet_common import UsageError

SECRET = "s3cretT0ken"


# --------------------------------------------------------------------------- servers


def _wait_listening(port: int, deadline: float = 5.0) -> None:
    end = time.monotonic() + deadline
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """requests honours proxy variables; a request to 127.0.0.1 must never leave the machine."""
    for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def tcp_port() -> Iterator[int]:
    """A listening TCP socket: the kernel completes the handshake without an accept()."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_port() -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class _NotFound(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = b"nothing here\n"
        self.send_response(404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = _answer
    do_HEAD = _answer

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a TLS hello sent to this plain-HTTP server is expected in one test


@pytest.fixture
def http_port() -> Iterator[int]:
    server = _QuietServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        _wait_listening(port)
        yield port
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("url, expected", [
    ("git@github.com:org/repo.git", ("ssh", "github.com", 22)),
    ("github.com:org/repo.git", ("ssh", "github.com", 22)),
    ("deploy@git.example.com:repo", ("ssh", "git.example.com", 22)),
    ("git@[::1]:org/repo.git", ("ssh", "::1", 22)),
    ("ssh://git@host:2222/x", ("ssh", "host", 2222)),
    ("ssh://host/x", ("ssh", "host", 22)),
    ("ssh://git@[2001:db8::1]:2200/x.git", ("ssh", "2001:db8::1", 2200)),
    ("git+ssh://git@host/x", ("ssh", "host", 22)),
    ("https://user:tok@host/x.git", ("https", "host", 443)),
    ("https://tok@host:8443/x.git", ("https", "host", 8443)),
    ("https://github.com/org/repo.git", ("https", "github.com", 443)),
    ("HTTPS://GitHub.COM/org/repo", ("https", "github.com", 443)),
    ("http://host/x", ("http", "host", 80)),
    ("http://[::1]:8080/x", ("http", "::1", 8080)),
    ("git://127.0.0.1:9999/x", ("git", "127.0.0.1", 9999)),
    ("git://host/x", ("git", "host", 9418)),
    ("file:///tmp/x", ("local", None, None)),
    ("file://C:/Projects/Build.git", ("local", None, None)),
    ("/abs/path", ("local", None, None)),
    ("./relative/x.git", ("local", None, None)),
    ("../x.git", ("local", None, None)),
    ("repo.git", ("local", None, None)),
    ("some/dir:with-colon", ("local", None, None)),
    ("C:/Projects/Build.git", ("local", None, None)),
    ("K:\\Projects\\Build", ("local", None, None)),
    ("c:relative", ("local", None, None)),
    ("\\\\server\\share\\Build.git", ("local", None, None)),
    ("  git@github.com:org/repo.git\n", ("ssh", "github.com", 22)),
])
def test_parse_remote(url, expected):
    assert nc.parse_remote(url) == expected


@pytest.mark.parametrize("url", ["", "   ", "ftp://host/x", "https:///x", "ssh://host:notaport/x",
                                 "https://host:99999/x", "@:x"])
def test_parse_remote_refuses_what_it_cannot_read(url):
    with pytest.raises(UsageError):
        nc.parse_remote(url)


def test_parse_error_does_not_echo_credentials():
    with pytest.raises(UsageError) as info:
        nc.parse_remote(f"https://user:{SECRET}@host:notaport/x")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("url, shown", [
    (f"https://user:{SECRET}@host/x.git", "https://***@host/x.git"),
    (f"https://{SECRET}@host/x.git", "https://***@host/x.git"),
    (f"ssh://git:{SECRET}@host:2222/x", "ssh://git:***@host:2222/x"),
    ("ssh://git@host/x", "ssh://git@host/x"),
    ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
    ("https://host/x", "https://host/x"),
])
def test_redact_url(url, shown):
    assert nc.redact_url(url) == shown


# --------------------------------------------------------------------------- local remotes


def test_clone_with_local_origin_needs_no_network(fleet):
    clone = fleet.clone("code2")
    result = nc.test_connectivity(str(clone))
    assert result["success"] is True
    assert result["failed_step"] is None
    assert result["scheme"] == "local"
    assert (result["host"], result["port"], result["latency_ms"]) == (None, None, None)
    assert list(result["checks"]) == ["local"]
    assert result["checks"]["local"]["ok"] is True
    assert Path(result["remote"]) == fleet.origin


def test_bare_repository_and_file_url_are_local(fleet):
    assert nc.test_connectivity(str(fleet.origin))["checks"].keys() == {"local"}
    assert nc.test_connectivity(fleet.origin.as_uri())["success"] is True


def test_folder_that_is_not_a_clone_is_bad_usage(tmp_path):
    with pytest.raises(UsageError):
        nc.test_connectivity(str(tmp_path))


@pytest.mark.parametrize("timeout", [0, -1, "soon"])
def test_timeout_must_be_positive(fleet, timeout):
    with pytest.raises(UsageError):
        nc.test_connectivity(str(fleet.origin), timeout=timeout)


# --------------------------------------------------------------------------- default remote


def test_default_is_origin_of_build_repo_path(fleet, monkeypatch):
    clone = fleet.clone("code2")
    monkeypatch.setenv("BUILD_REPO_PATH", str(clone))
    result = nc.test_connectivity()
    assert result["success"] is True
    assert Path(result["remote"]) == fleet.origin


def test_default_falls_back_to_current_clone(fleet, tmp_path, monkeypatch, tcp_port):
    clone = fleet.clone("build1")
    git(clone, "remote", "set-url", "origin", f"git://127.0.0.1:{tcp_port}/Build.git")
    not_a_clone = tmp_path / "plain"
    not_a_clone.mkdir()
    monkeypatch.setenv("BUILD_REPO_PATH", str(not_a_clone))
    monkeypatch.chdir(clone / "coordination")
    assert nc.default_remote() == f"git://127.0.0.1:{tcp_port}/Build.git"


def test_default_without_any_clone_is_github(tmp_path):
    # Only resolved, never contacted.
    assert nc.default_remote(cwd=tmp_path, build_repo="") == nc.DEFAULT_REMOTE
    assert nc.parse_remote(nc.DEFAULT_REMOTE) == ("https", "github.com", 443)


# --------------------------------------------------------------------------- real sockets


@pytest.mark.parametrize("template", ["ssh://git@127.0.0.1:{port}/Build.git",
                                      "git://127.0.0.1:{port}/Build.git"])
def test_listening_port_is_reachable(tcp_port, template):
    result = nc.test_connectivity(template.format(port=tcp_port), timeout=2)
    assert result["success"] is True, result["message"]
    assert result["failed_step"] is None
    assert (result["host"], result["port"]) == ("127.0.0.1", tcp_port)
    assert list(result["checks"]) == ["dns", "tcp"]
    assert all(check["ok"] for check in result["checks"].values())
    assert isinstance(result["latency_ms"], float)
    assert result["message"].startswith(f"Reached 127.0.0.1:{tcp_port}")


def test_clone_whose_origin_is_a_network_url(fleet, tcp_port):
    clone = fleet.clone("code2")
    git(clone, "remote", "set-url", "origin", f"ssh://git@127.0.0.1:{tcp_port}/Build.git")
    result = nc.test_connectivity(str(clone), timeout=2)
    assert result["success"] is True
    assert result["port"] == tcp_port


def test_closed_port_fails_at_tcp(closed_port):
    result = nc.test_connectivity(f"git://127.0.0.1:{closed_port}/x", timeout=2)
    assert result["success"] is False
    assert result["failed_step"] == "tcp"
    assert result["message"].startswith(f"TCP connect to 127.0.0.1:{closed_port} failed: ")
    assert result["checks"]["dns"]["ok"] is True
    assert result["checks"]["tcp"]["ok"] is False
    assert "http" not in result["checks"]
    assert result["latency_ms"] is None


def test_http_404_still_means_reachable(http_port, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"http://user:{SECRET}@127.0.0.1:{http_port}/Build.git"
    result = nc.test_connectivity(url, timeout=2)
    assert result["success"] is True, result["message"]
    assert list(result["checks"]) == ["dns", "tcp", "http"]
    assert result["checks"]["http"]["detail"].startswith("HTTP 404")
    assert result["remote"] == f"http://***@127.0.0.1:{http_port}/Build.git"
    assert SECRET not in json.dumps(result)
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps([getattr(r, "metadata", None) for r in caplog.records])


def test_failed_http_step_is_named_without_credentials(http_port, caplog):
    # TLS spoken to a plain-HTTP server: TCP connects, the HTTP step fails.
    caplog.set_level(logging.DEBUG)
    result = nc.test_connectivity(f"https://user:{SECRET}@127.0.0.1:{http_port}/Build.git", timeout=2)
    assert result["success"] is False
    assert result["failed_step"] == "http"
    assert result["message"].startswith(f"HTTP request to https://127.0.0.1:{http_port}/ failed: ")
    assert result["checks"]["tcp"]["ok"] is True
    assert isinstance(result["latency_ms"], float)
    assert SECRET not in json.dumps(result)
    assert SECRET not in caplog.text


def test_unresolvable_host_fails_at_dns():
    # RFC 6761: .invalid never resolves; only the resolver is asked.
    result = nc.test_connectivity("https://git.nonexistent.invalid/Build.git", timeout=2)
    assert result["success"] is False
    assert result["failed_step"] == "dns"
    assert result["message"].startswith("DNS lookup of git.nonexistent.invalid failed: ")
    assert list(result["checks"]) == ["dns"]
    assert result["port"] == 443


# --------------------------------------------------------------------------- CLI


def test_cli_json_success_and_credentials_hidden(http_port):
    proc = run_script("network_check.py", "--repo", f"http://{SECRET}@127.0.0.1:{http_port}/x.git",
                      "--timeout", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["success"] is True
    assert result["checks"]["http"]["ok"] is True
    assert SECRET not in proc.stdout + proc.stderr


def test_cli_failure_exit_1_with_reason_on_stderr(closed_port):
    proc = run_script("network_check.py", "--repo", f"ssh://git:{SECRET}@127.0.0.1:{closed_port}/x",
                      "--timeout", "2")
    assert proc.returncode == 1
    assert f"TCP connect to 127.0.0.1:{closed_port} failed" in proc.stderr
    assert "FAILED at tcp" in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr


def test_cli_default_remote_from_build_repo_path(fleet):
    clone = fleet.clone("code2")
    proc = run_script("network_check.py", env={"BUILD_REPO_PATH": str(clone)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK: Local remote")


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--timeout", "abc"], ["--bogus"],
                                  ["--repo", "ftp://host/x"]])
def test_cli_bad_usage_exit_2(args):
    proc = run_script("network_check.py", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip()


def test_main_in_process(fleet, tmp_path, capsys):
    assert nc.main(["--repo", str(fleet.origin)]) == 0
    assert "local" in capsys.readouterr().out
    assert nc.main(["--repo", str(tmp_path)]) == 2
    assert "not a git clone" in capsys.readouterr().err
