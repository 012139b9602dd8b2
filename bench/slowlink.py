"""A remote like a hosted one: ``git daemon`` on 127.0.0.1 behind a proxy that delays every byte.

The kernel's netem is not available on every machine, so the delay is added in user space: each
connection to the proxy opens one to ``git daemon``, and every chunk read in either direction is
forwarded half the round-trip time after it arrived (order kept, throughput not limited). A git
command then pays the round trips of its protocol exchange the way it would over a real link:
``ls-remote`` about one, ``fetch`` and ``push`` two or three.

Used by the benchmarks::

    with SlowRemote(base_dir, rtt_ms=100) as remote:
        url = remote.url("origin.git")        # git://127.0.0.1:<port>/origin.git

    with linked(fleet.origin, [clone, floor_clone], rtt_ms=100):
        ...                                   # both clones' origin is the slow remote here

and as a script, to try a fleet by hand over a slow link::

    python3 bench/slowlink.py --base DIR --rtt-ms 100     # prints the URL, runs until Ctrl+C

Only addresses on this machine are used (127.0.0.1), and everything stops with the context.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

READY_TIMEOUT = 10.0
CHUNK = 65536


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


class DelayProxy:
    """TCP proxy on 127.0.0.1 that delays each direction by ``one_way`` seconds."""

    def __init__(self, upstream_port: int, one_way: float) -> None:
        self.upstream_port = upstream_port
        self.one_way = one_way
        self.port = _free_port()
        self._listener: Optional[socket.socket] = None
        self._threads: List[threading.Thread] = []
        self._stopping = threading.Event()
        self._sockets: List[socket.socket] = []
        self.connections = 0

    def start(self) -> "DelayProxy":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        sock.settimeout(0.2)
        self._listener = sock
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(None)
                self._sockets.append(s)
            self._pipe(client, upstream)
            self._pipe(upstream, client)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        """Read from ``src`` as fast as it sends; write each chunk to ``dst`` ``one_way`` later."""
        pending: "queue.Queue[Tuple[float, Optional[bytes]]]" = queue.Queue()

        def reader() -> None:
            while True:
                try:
                    data = src.recv(CHUNK)
                except OSError:
                    data = b""
                pending.put((time.monotonic() + self.one_way, data or None))
                if not data:
                    return

        def writer() -> None:
            while True:
                due, data = pending.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    if data is None:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
                except OSError:
                    return

        self._spawn(reader)
        self._spawn(writer)

    def stop(self) -> None:
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
        for s in self._sockets:
            try:
                s.close()
            except OSError:
                pass


class SlowRemote:
    """``git daemon`` serving ``base`` (push enabled), reached through a :class:`DelayProxy`.

    ``rtt_ms=0`` still goes through the daemon (no proxy), so a figure at 0 ms and one at 100 ms
    differ only by the delay.
    """

    def __init__(self, base: "os.PathLike[str] | str", rtt_ms: float = 0.0) -> None:
        self.base = Path(base).resolve()
        self.rtt_ms = float(rtt_ms)
        self.daemon_port = _free_port()
        self._daemon: Optional["subprocess.Popen[bytes]"] = None
        self._proxy: Optional[DelayProxy] = None

    @property
    def port(self) -> int:
        return self._proxy.port if self._proxy is not None else self.daemon_port

    def url(self, repo_name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{repo_name}"

    def start(self) -> "SlowRemote":
        argv = ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack",
                f"--base-path={self.base}", "--listen=127.0.0.1", f"--port={self.daemon_port}",
                "--informative-errors", str(self.base)]
        kw = {"start_new_session": True} if os.name != "nt" else {}
        self._daemon = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        deadline = time.monotonic() + READY_TIMEOUT
        while not _accepts(self.daemon_port):
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("git daemon did not start")
            time.sleep(0.02)
        if self.rtt_ms > 0:
            self._proxy = DelayProxy(self.daemon_port, self.rtt_ms / 2000.0).start()
        return self

    def stop(self) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        proc, self._daemon = self._daemon, None
        if proc is not None and proc.poll() is None:
            if os.name != "nt":
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except OSError:
                    proc.terminate()
            else:
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> "SlowRemote":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def point_clones_at(clones, url: str) -> None:
    """Make every clone's ``origin`` the slow remote (fetch and push alike)."""
    for clone in clones:
        subprocess.run(["git", "remote", "set-url", "origin", url], cwd=str(clone), check=True,
                       stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def linked(origin: "os.PathLike[str] | str", clones: Sequence["os.PathLike[str] | str"],
           rtt_ms: Optional[float]) -> Iterator[Optional[SlowRemote]]:
    """For the ``with`` block, ``clones`` reach the bare repository ``origin`` over a link of
    ``rtt_ms`` (a :class:`SlowRemote` serving its folder), then the local path again.

    ``rtt_ms=None`` is the local path itself: the clones are left as they are. Measured commands
    and their floors go through the same link when both clones are given here."""
    if rtt_ms is None:
        yield None
        return
    origin = Path(origin).resolve()
    with SlowRemote(origin.parent, rtt_ms) as remote:
        point_clones_at(clones, remote.url(origin.name))
        try:
            yield remote
        finally:
            point_clones_at(clones, str(origin))


def measure_rtt(url: str, cwd: "os.PathLike[str] | str", reps: int = 5) -> float:
    """Median seconds of one ``git ls-remote`` through the link (about one round trip plus git)."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        subprocess.run(["git", "ls-remote", url, "refs/heads/main"], cwd=str(cwd), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="slowlink.py", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="folder holding the bare repositories to serve")
    parser.add_argument("--rtt-ms", type=float, default=100.0, help="round-trip time to add (ms)")
    args = parser.parse_args(argv)
    with SlowRemote(args.base, args.rtt_ms) as remote:
        print(f"serving {args.base} at {remote.url('<repo>.git')} with {args.rtt_ms:g} ms RTT; Ctrl+C stops",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
