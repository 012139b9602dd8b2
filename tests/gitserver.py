"""Real git servers on 127.0.0.1 for tests that need a remote which can go down.

Two servers share one API (``start()``, ``stop()``, ``url(name)``, ``port``, context manager):

- :class:`GitDaemon` runs ``git daemon`` (the ``git://`` protocol, push enabled).
- :class:`HttpGitServer` serves the smart HTTP protocol through ``git http-backend`` run as a CGI
  per request behind a ``ThreadingHTTPServer``; ``fail_with`` answers every request with an HTTP
  error (a server error or an authentication failure without stopping the server), ``delay`` slows
  every answer down.

Both pick a free port on the first ``start()`` and keep it across restarts, so a clone's
``origin`` URL stays valid while the remote is down and comes back (STYLE.md 15). ``start()``
returns only once ``git ls-remote`` gets an answer; ``stop()`` returns only once a connection to
the port is refused. Both are safe to stop twice.

:func:`make_bare` creates a bare repository holding one commit with ``coordination/messages.json``
(PROTOCOL.md, "The fleet repository").

Fixtures (import them into a test module): ``no_proxy`` (git's HTTP client never goes through a
proxy), ``git_daemon`` and ``http_git_server`` (started servers whose base path is the test's
``tmp_path``, stopped in the finalizer).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Dict, Iterator, List, Optional, Set, Tuple
from urllib.parse import unquote, urlsplit

import pytest

from fleet_git import git_env, run_git

log = logging.getLogger(__name__)

READY_TIMEOUT = 10.0  # seconds a server may take to answer its first ls-remote
STOP_GRACE = 3.0  # seconds between terminate and kill
PROBE_TIMEOUT = 5.0  # one readiness probe
PROBE_REPO = "gitserver-readiness-probe"  # never created: any answer about it proves the server is up
DEFAULT_MAILBOX = b'{\n  "messages": []\n}\n'
DAEMON_LOG = "git-daemon.log"
HTTP_LOG = "http-git-server.log"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                   "GIT_PROXY_COMMAND")


class GitServerError(RuntimeError):
    """A test git server could not start or stop as asked."""


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int) -> bool:
    """True when a TCP connection to 127.0.0.1:``port`` is accepted."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def _wait_refused(port: int, what: str) -> None:
    deadline = time.monotonic() + STOP_GRACE + 2.0
    while port_accepts(port):
        if time.monotonic() > deadline:
            raise GitServerError(f"{what} stopped but 127.0.0.1:{port} still accepts connections")
        time.sleep(0.02)


def _probe(cwd: Path, url: str) -> Tuple[int, bytes]:
    proc = run_git(cwd, "ls-remote", url, check=False, timeout=PROBE_TIMEOUT)
    return proc.returncode, proc.stderr


# --------------------------------------------------------------------------- repositories


def make_bare(base: Path, name: str, branch: str = "main", mailbox: bytes = DEFAULT_MAILBOX) -> Path:
    """Create ``<base>/<name>``: a bare repository whose ``branch`` holds one commit with
    ``coordination/messages.json`` = ``mailbox``; ``HEAD`` names ``branch``."""
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    repo = base / name
    run_git(base, "init", "--bare", "-q", "-b", branch, str(repo))

    def plumbing(*args: str, data: bytes) -> str:
        return run_git(repo, *args, input=data).stdout.decode().strip()

    blob = plumbing("hash-object", "-w", "--stdin", data=mailbox)
    sub = plumbing("mktree", data=f"100644 blob {blob}\tmessages.json\n".encode())
    root = plumbing("mktree", data=f"040000 tree {sub}\tcoordination\n".encode())
    identity = {
        "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "Fleet Test"),
        "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "fleet@example.invalid"),
        "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "Fleet Test"),
        "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "fleet@example.invalid"),
    }
    commit = run_git(repo, "-c", "commit.gpgsign=false", "commit-tree", root, "-m", "initial",
                     env=identity).stdout.decode().strip()
    run_git(repo, "update-ref", f"refs/heads/{branch}", commit)
    return repo


# --------------------------------------------------------------------------- git daemon


class GitDaemon:
    """``git daemon`` serving every repository under ``base_path`` at ``git://127.0.0.1:PORT/``."""

    def __init__(self, base_path: Path) -> None:
        self.base_path = Path(base_path).resolve()
        self.port: Optional[int] = None
        self.log_path = self.base_path / DAEMON_LOG
        self._proc: Optional[subprocess.Popen[bytes]] = None
        self._log: Optional[IO[bytes]] = None

    def url(self, repo_name: str) -> str:
        if self.port is None:
            raise GitServerError("GitDaemon.url() before the first start()")
        return f"git://127.0.0.1:{self.port}/{repo_name}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        """The daemon's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self) -> GitDaemon:
        """Start (or restart on the same port); return once ``git ls-remote`` gets an answer."""
        if self.running:
            return self
        first = self.port is None
        # A free port found by binding port 0 can be taken by someone else before the daemon binds
        # it; on the first start only, try another one.
        for attempt in range(3):
            if first:
                self.port = free_port()
            try:
                self._spawn_and_wait()
                return self
            except GitServerError:
                in_use = "in use" in self.log_text().lower()
                if not (first and in_use and attempt < 2):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _spawn_and_wait(self) -> None:
        assert self.port is not None
        self.base_path.mkdir(parents=True, exist_ok=True)
        argv = ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={self.port}",
                f"--base-path={self.base_path}", "--export-all", "--enable=receive-pack",
                "--informative-errors", "--verbose", "--log-destination=stderr", str(self.base_path)]
        # The daemon's log goes to a file, so a full pipe can never block it.
        self._log = open(self.log_path, "ab")
        if os.name == "nt":
            kw: Dict[str, object] = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            kw = {"start_new_session": True}  # its own group: stop() kills per-connection children too
        self._proc = subprocess.Popen(argv, cwd=str(self.base_path), stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=self._log, env=git_env(hooks=True),
                                      **kw)  # type: ignore[call-overload]
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._release()
                raise GitServerError(f"git daemon on port {self.port} exited with {code}:\n{self.log_text()}")
            code, err = _probe(self.base_path, self.url(PROBE_REPO))
            # --informative-errors: a missing repository is reported by the daemon itself.
            if code == 0 or b"remote error" in err:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise GitServerError(f"git daemon on port {self.port} did not answer within "
                                     f"{READY_TIMEOUT:g} s; last probe: {err!r}\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the daemon and its connection handlers; return once the port refuses connections."""
        proc = self._proc
        if proc is None:
            return
        try:
            _terminate_tree(proc)
        finally:
            self._release()
        if self.port is not None:
            _wait_refused(self.port, "git daemon")

    def _release(self) -> None:
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> GitDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _terminate_tree(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` and its children (same process group / job tree); kill after a grace."""
    if os.name == "nt":
        if proc.poll() is None:
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False, timeout=30)
        try:
            proc.wait(timeout=STOP_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return
    if proc.poll() is not None:
        return
    # The whole group: connection handlers the daemon started would otherwise outlive it.
    _killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)  # type: ignore[attr-defined]
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------- smart HTTP


def _http_backend_argv(cwd: Path) -> List[str]:
    exec_path = run_git(cwd, "--exec-path").stdout.decode("utf-8", "replace").strip()
    for name in ("git-http-backend", "git-http-backend.exe"):
        candidate = Path(exec_path) / name
        if candidate.is_file():
            return [str(candidate)]
    return ["git", "http-backend"]


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on close so that stop() leaves nothing running.
    daemon_threads = False
    block_on_close = True
    owner: HttpGitServer

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up, or stop() cutting a connection, is expected here.
        log.debug("http git server: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.owner._track_connection(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track_connection(self.connection, False)

    def log_message(self, format: str, *args: object) -> None:
        self.server.owner._write_log(("%s " + format + "\n") % (self.address_string(), *args))

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def _serve(self) -> None:
        owner = self.server.owner
        if owner.delay > 0 and owner._stopping.wait(owner.delay):
            self.close_connection = True
            return
        failure = owner.fail_with
        if failure is not None:
            self._drain_body()
            owner._record(self, failure)
            body = f"fleet test server: forced {failure}\n".encode()
            self.send_response(failure)
            if failure == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="fleet"')
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)
            return
        self._run_backend()

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body, decoded from chunked transfer encoding when git sends it that way
        (a push larger than ``http.postBuffer``)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    return
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 65536))
                    if not data:
                        return
                    remaining -= len(data)
                    yield data
                self.rfile.readline(1024)
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            data = self.rfile.read(min(remaining, 65536))
            if not data:
                return
            remaining -= len(data)
            yield data

    def _drain_body(self) -> None:
        for _ in self._body_chunks():
            pass

    def _cgi_env(self) -> Dict[str, str]:
        owner = self.server.owner
        parts = urlsplit(self.path)
        env = dict(owner._env)
        env.update({
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": self.request_version,
            "SERVER_SOFTWARE": "fleet-test-git-server",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(owner.port),
            "REQUEST_METHOD": self.command,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(parts.path),
            "QUERY_STRING": parts.query,
            "REMOTE_ADDR": self.client_address[0],
            # http-backend allows receive-pack only to an authenticated user.
            "REMOTE_USER": "fleet",
            "GIT_PROJECT_ROOT": str(owner.base_path),
            "GIT_HTTP_EXPORT_ALL": "1",
        })
        env["CONTENT_TYPE"] = self.headers.get("Content-Type", "")
        length = self.headers.get("Content-Length")
        if length is not None and "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            env["CONTENT_LENGTH"] = length
        # Every request header as HTTP_*, as CGI does: Content-Encoding (gzip bodies, which
        # http-backend inflates itself) and Git-Protocol (protocol v2) among them.
        for key, value in self.headers.items():
            name = "HTTP_" + key.upper().replace("-", "_")
            if name not in ("HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "HTTP_PROXY"):
                env[name] = value
        return env

    def _run_backend(self) -> None:
        owner = self.server.owner
        proc = subprocess.Popen(owner._backend, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=self._cgi_env(), cwd=str(owner.base_path))
        owner._track_process(proc, True)
        errors: List[bytes] = []

        def feed() -> None:
            assert proc.stdin is not None
            try:
                for chunk in self._body_chunks():
                    proc.stdin.write(chunk)
            except (OSError, ValueError):
                pass  # the backend stopped reading (it answers an error) or stop() cut us off
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        def drain_stderr() -> None:
            assert proc.stderr is not None
            errors.append(proc.stderr.read())

        feeder = threading.Thread(target=feed, daemon=True)
        drainer = threading.Thread(target=drain_stderr, daemon=True)
        feeder.start()
        drainer.start()
        completed = False
        try:
            assert proc.stdout is not None
            head, rest = self._read_cgi_head(proc.stdout)
            status, headers = _parse_cgi_head(head)
            owner._record(self, status)
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            # The body is streamed as it comes; closing the connection marks its end.
            self.send_header("Connection", "close")
            self.end_headers()
            if rest:
                self.wfile.write(rest)
            while True:
                data = proc.stdout.read1(65536)  # type: ignore[attr-defined]
                if not data:
                    break
                self.wfile.write(data)
            self.wfile.flush()
            completed = True
        finally:
            if not completed and proc.poll() is None:
                proc.kill()  # the client hung up or stop() cut the connection
            feeder.join(timeout=READY_TIMEOUT)
            try:
                proc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            drainer.join(timeout=READY_TIMEOUT)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
            owner._track_process(proc, False)
            if errors and errors[0]:
                owner._write_log("http-backend: " + errors[0].decode("utf-8", "replace"))

    @staticmethod
    def _read_cgi_head(stream: IO[bytes]) -> Tuple[bytes, bytes]:
        buf = b""
        while True:
            for sep in (b"\r\n\r\n", b"\n\n"):
                index = buf.find(sep)
                if index >= 0:
                    return buf[:index], buf[index + len(sep):]
            data = stream.read1(65536)  # type: ignore[attr-defined]
            if not data:
                return buf, b""
            buf += data


def _parse_cgi_head(head: bytes) -> Tuple[int, List[Tuple[str, str]]]:
    """The HTTP status (CGI ``Status:``, 200 when absent, 502 for no output) and the headers."""
    if not head.strip():
        return 502, [("Content-Type", "text/plain")]
    status = 200
    headers: List[Tuple[str, str]] = []
    for line in head.decode("latin-1").replace("\r\n", "\n").split("\n"):
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key.lower() == "status":
            status = int(value.split(None, 1)[0])
        elif key.lower() not in ("content-length", "connection", "transfer-encoding"):
            headers.append((key, value))
    return status, headers


class RequestRecord:
    """One request the HTTP server answered (for assertions)."""

    __slots__ = ("method", "path", "status", "content_encoding", "transfer_encoding")

    def __init__(self, method: str, path: str, status: int, content_encoding: str,
                 transfer_encoding: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.content_encoding = content_encoding
        self.transfer_encoding = transfer_encoding

    def __repr__(self) -> str:
        return (f"RequestRecord({self.method} {self.path} -> {self.status}, "
                f"content_encoding={self.content_encoding!r}, transfer_encoding={self.transfer_encoding!r})")


class HttpGitServer:
    """Smart HTTP through ``git http-backend`` at ``http://127.0.0.1:PORT/<repo>``.

    ``fail_with`` (an HTTP status, e.g. 500, 401, 403) answers every request with that status while
    set; ``delay`` (seconds) is waited before every answer. Both may be changed while running.
    ``requests`` lists what was answered.
    """

    def __init__(self, base_path: Path, fail_with: Optional[int] = None, delay: float = 0.0) -> None:
        self.base_path = Path(base_path).resolve()
        self.fail_with = fail_with
        self.delay = delay
        self.port: Optional[int] = None
        self.log_path = self.base_path / HTTP_LOG
        self.requests: List[RequestRecord] = []
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._connections: Set[socket.socket] = set()
        self._processes: Set[subprocess.Popen[bytes]] = set()
        self._stopping = threading.Event()
        self._env: Dict[str, str] = {}
        self._backend: List[str] = []

    def url(self, repo_name: str) -> str:
        if self.port is None:
            raise GitServerError("HttpGitServer.url() before the first start()")
        return f"http://127.0.0.1:{self.port}/{repo_name}"

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def active_connections(self) -> int:
        """Connections being served right now (a test can wait for a request to be in flight)."""
        with self._lock:
            return len(self._connections)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def start(self) -> HttpGitServer:
        """Start (or restart on the same port); return once ``git ls-remote`` gets an answer."""
        if self._server is not None:
            return self
        self.base_path.mkdir(parents=True, exist_ok=True)
        if not self._backend:
            self._backend = _http_backend_argv(self.base_path)
        # The environment at start, so a backend run during a test's teardown sees the same one.
        self._env = git_env(hooks=True)
        self._stopping.clear()
        try:
            server = _Server(("127.0.0.1", self.port or 0), _Handler)
        except OSError as exc:
            raise GitServerError(f"HTTP git server cannot listen on 127.0.0.1:{self.port or 0}: {exc}") from exc
        server.owner = self
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"http-git-server-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            before = len(self.requests)
            code, err = _probe(self.base_path, self.url(PROBE_REPO))
            if code == 0 or len(self.requests) > before:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise GitServerError(f"HTTP git server on port {self.port} did not answer within "
                                     f"{READY_TIMEOUT:g} s; last probe: {err!r}\n{self.log_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop listening, cut open connections and running backends, join every thread."""
        server = self._server
        if server is None:
            return
        self._server = None
        self._stopping.set()
        try:
            server.shutdown()
            server.socket.close()  # refuse new connections before cutting the open ones
            with self._lock:
                connections = list(self._connections)
                processes = list(self._processes)
            for conn in connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for proc in processes:
                if proc.poll() is None:
                    proc.kill()
            server.server_close()
        finally:
            if self._thread is not None:
                self._thread.join(timeout=STOP_GRACE)
                self._thread = None
        if self.port is not None:
            _wait_refused(self.port, "HTTP git server")

    def __enter__(self) -> HttpGitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- used by the handler

    def _track_connection(self, conn: socket.socket, active: bool) -> None:
        with self._lock:
            if active:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _track_process(self, proc: subprocess.Popen[bytes], active: bool) -> None:
        with self._lock:
            if active:
                self._processes.add(proc)
            else:
                self._processes.discard(proc)

    def _record(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        with self._lock:
            self.requests.append(RequestRecord(
                handler.command, handler.path, status,
                handler.headers.get("Content-Encoding", ""), handler.headers.get("Transfer-Encoding", "")))

    def _write_log(self, text: str) -> None:
        with self._lock:
            with open(self.log_path, "ab") as handle:
                handle.write(text.encode("utf-8", "replace"))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def no_proxy(monkeypatch):
    """git's HTTP client goes straight to 127.0.0.1, whatever proxy the machine has."""
    for key in PROXY_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def git_daemon(tmp_path, no_proxy):
    """A started :class:`GitDaemon` serving ``tmp_path`` (so ``fleet.origin`` is ``url("origin.git")``)."""
    daemon = GitDaemon(tmp_path)
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def http_git_server(tmp_path, no_proxy):
    """A started :class:`HttpGitServer` serving ``tmp_path``."""
    server = HttpGitServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()
