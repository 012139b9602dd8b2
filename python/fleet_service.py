"""Running the fleet monitor as a service on Linux (systemd) and Windows (Task Scheduler).

Contract:

- :class:`SystemdNotifier` speaks the ``sd_notify`` datagram protocol with the standard library
  only (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``). Every method is a no-op returning
  ``False`` outside systemd, on Windows, or where ``AF_UNIX`` is missing, and none ever raises.
  :meth:`SystemdNotifier.watchdog` is rate-limited, so it may be called from hot paths and from
  the git network hook (``clone.add_network_hook(notifier.keepalive)``).
- :func:`interruptible_sleep` sleeps in slices that keep the watchdog fed and returns as soon as
  the stop event is set; :func:`install_stop_handlers` turns SIGTERM / SIGINT (/ SIGBREAK) into a
  requested stop instead of a ``KeyboardInterrupt`` (STYLE.md rule 7: the monitor finishes the
  current step and exits 0).
- :class:`InstanceLock` keeps one monitor per server and clone: an OS-level lock on
  ``<repo>/<server>/state/monitor.lock`` plus ``monitor.pid`` (a never-committed path, PROTOCOL.md
  "The fleet repository"). The OS drops the lock when the process dies, so a crashed monitor's
  leftover files never block a restart. A held lock raises :class:`AlreadyRunning` (exit 1).
  :func:`monitor_running` probes that lock without taking it for longer than an instant (for
  health checks and ``--status``).
- :func:`render_systemd_unit` and :func:`render_task_scheduler` return service definitions as
  text; :func:`self_check` and :func:`restart_process` let the monitor restart into a freshly
  pulled version only when that version imports cleanly.

``monitor.pid`` format (JSON, written atomically after the lock is held, removed on release)::

    {"version": 1, "pid": 4242, "started_at": "2025-11-04T11:10:39Z",
     "argv": ["python/message_monitor.py", "--server", "code2"], "host": "build1"}

Library code: nothing here prints or exits.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path, PurePosixPath

import fleet_common
from fleet_common import SuiteError, UsageError, check_own_server_id, iso_utc, one_line
from fleet_git import LOCAL_TIMEOUT, NETWORK_TIMEOUT

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Final, List, Mapping, Optional, Sequence, Tuple, Union

log = logging.getLogger(__name__)

PID_FILE_VERSION: Final = 1
LOCK_NAME: Final = fleet_common.INSTANCE_LOCK_NAME  # the names live in RuntimePaths
PID_NAME: Final = fleet_common.PID_FILE_NAME
STATUS_MAX: Final = 200

# WatchdogSec: the monitor pings the watchdog before and after every git network call (the
# fleet_git network hook) and between sleep slices, so the longest silence is one network call
# (NETWORK_TIMEOUT, 60 s) plus the local plumbing around it. Twice the network timeout covers a
# fetch and a push back to back should a ping be skipped between them, and 60 s more covers local
# git (LOCAL_TIMEOUT, 30 s) and a slow disk: 60*2 + 60 = 180 s. A shorter value would have systemd
# kill a healthy monitor that is waiting on a slow remote.
WATCHDOG_SEC_DEFAULT: Final = int(NETWORK_TIMEOUT * 2 + 60)
# On SIGTERM the monitor finishes the current step, which may be one network call.
TIMEOUT_STOP_SEC: Final = int(NETWORK_TIMEOUT + LOCAL_TIMEOUT)
# Type=notify: READY=1 may come after a first fetch and push; give it the same room as the watchdog.
TIMEOUT_START_SEC: Final = WATCHDOG_SEC_DEFAULT
RESTART_SEC: Final = 10
# A version that fails to start is restarted at most 5 times in 10 minutes, then left failed
# (5 starts need at least 4 * RestartSec, so a crash loop always trips it; a monitor that runs
# for minutes between failures never does).
START_LIMIT_INTERVAL_SEC: Final = 600
START_LIMIT_BURST: Final = 5
TASK_NAME_DEFAULT: Final = "FleetMessageMonitor"

# Windows cannot interrupt a lock wait with Ctrl-C or Ctrl-Break, so a sleep there wakes up at
# least this often to let the signal handler run.
_NT_MAX_SLICE: Final = 1.0
_NOTIFY_TIMEOUT: Final = 1.0  # a full notify queue must never stall the monitor


def _notify_supported() -> bool:
    return os.name != "nt" and hasattr(socket, "AF_UNIX")


# --------------------------------------------------------------------------- systemd notify


class SystemdNotifier:
    """The ``sd_notify`` protocol: one datagram of ``KEY=value`` lines to ``NOTIFY_SOCKET``.

    ``env`` defaults to ``os.environ`` and is read once, here. ``clock`` (monotonic seconds) is
    injectable so the watchdog rate limit can be tested without sleeping.
    """

    def __init__(self, env: Optional[Mapping[str, str]] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        source = os.environ if env is None else env
        self._clock = clock
        # Reentrant: a stop handler (a signal handler, run in the main thread between two
        # bytecodes) may call stopping() while the interrupted code is inside notify().
        self._lock = threading.RLock()
        self._sock: Optional[socket.socket] = None
        self._sock_pid = 0
        self._warned = False
        self._last_ping: Optional[float] = None
        self._address: Optional[str] = None
        raw = source.get("NOTIFY_SOCKET") or ""
        if raw and _notify_supported():
            # "@name" is a Linux abstract socket: a leading NUL instead of a path.
            self._address = "\0" + raw[1:] if raw.startswith("@") else raw
        self._watchdog: Optional[float] = _parse_watchdog(source)

    @property
    def enabled(self) -> bool:
        """True when running under a systemd that listens for notifications."""
        return self._address is not None

    def watchdog_interval(self) -> Optional[float]:
        """The watchdog timeout in seconds, or None when there is no watchdog for this process."""
        return self._watchdog if self.enabled else None

    def notify(self, *lines: str) -> bool:
        """Send one datagram ``"\\n".join(lines)``; False when not sent. Never raises."""
        if self._address is None or not lines:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        with self._lock:
            try:
                sock = self._socket()
                sock.sendto(data, self._address)
                return True
            except OSError as exc:
                self._close()
                if not self._warned:
                    self._warned = True
                    log.debug("systemd notify socket %r not usable: %s",
                              self._address.replace("\0", "@"), exc)
                return False

    def _socket(self) -> socket.socket:
        # One socket, reopened after a failure or in a forked child (systemd checks the sender).
        if self._sock is None or self._sock_pid != os.getpid():
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(_NOTIFY_TIMEOUT)
            self._sock_pid = os.getpid()
        return self._sock

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def __del__(self) -> None:
        if getattr(self, "_sock", None) is not None:
            self._close()

    def ready(self, status: Optional[str] = None) -> bool:
        """``READY=1`` with ``MAINPID`` (and ``STATUS`` when given)."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status is not None:
            lines.append("STATUS=" + one_line(status, STATUS_MAX))
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        """``STATUS=`` one line, at most 200 characters (shown by ``systemctl status``)."""
        return self.notify("STATUS=" + one_line(text, STATUS_MAX))

    def watchdog(self) -> bool:
        """``WATCHDOG=1`` if a quarter of the watchdog interval has passed since the last one.

        True only when a datagram was sent; cheap enough for hot paths.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return False
        now = self._clock()
        with self._lock:
            if self._last_ping is not None and now - self._last_ping < interval / 4:
                return False
            # Counted even when the send fails, so a vanished socket costs nothing on hot paths.
            self._last_ping = now
        return self.notify("WATCHDOG=1")

    def keepalive(self) -> None:
        """A hook for ``Clone.add_network_hook`` and long loops: feed the watchdog if due."""
        self.watchdog()

    def stopping(self, status: Optional[str] = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append("STATUS=" + one_line(status, STATUS_MAX))
        return self.notify(*lines)

    def reloading(self) -> bool:
        # systemd 253+ wants the monotonic time with RELOADING=1 (Type=notify-reload).
        usec = int(time.monotonic() * 1_000_000)
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def _parse_watchdog(env: Mapping[str, str]) -> Optional[float]:
    raw_usec = env.get("WATCHDOG_USEC") or ""
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID") or ""
    if raw_pid:
        # WATCHDOG_PID names the process the watchdog is for; a child that inherited the
        # environment must not keep its parent alive.
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


_default_notifier: Optional[SystemdNotifier] = None
_default_lock = threading.RLock()


def default_notifier() -> SystemdNotifier:
    """A process-wide notifier built from ``os.environ`` on first use."""
    global _default_notifier
    with _default_lock:
        if _default_notifier is None:
            _default_notifier = SystemdNotifier()
        return _default_notifier


def keepalive() -> None:
    """Feed the systemd watchdog if due (process-wide notifier); a no-op outside systemd.

    Suitable for ``clone.add_network_hook(fleet_service.keepalive)``.
    """
    default_notifier().watchdog()


# --------------------------------------------------------------------------- sleeping


def interruptible_sleep(seconds: float, stop_event: threading.Event,
                        notifier: Optional[SystemdNotifier] = None,
                        clock: Callable[[], float] = time.monotonic) -> bool:
    """Wait ``seconds`` or until ``stop_event`` is set; True if stopped early.

    Waits in slices of at most a third of the watchdog interval and feeds the watchdog between
    them, so a long interval never lets systemd think the monitor hung.
    """
    interval = notifier.watchdog_interval() if notifier is not None else None
    max_slice: Optional[float] = interval / 3 if interval else None
    if os.name == "nt":
        max_slice = min(max_slice, _NT_MAX_SLICE) if max_slice else _NT_MAX_SLICE
    deadline = clock() + max(0.0, seconds)
    while True:
        if stop_event.is_set():
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        if notifier is not None:
            notifier.watchdog()
        if stop_event.wait(min(remaining, max_slice) if max_slice else remaining):
            return True


# --------------------------------------------------------------------------- stop signals


def _stop_signals() -> List[signal.Signals]:
    found = [signal.SIGTERM, signal.SIGINT]
    sigbreak = getattr(signal, "SIGBREAK", None)  # Windows: Ctrl-Break and console close
    if sigbreak is not None:
        found.append(sigbreak)
    # SIGHUP is deliberately absent: it is not a request to stop (a lost terminal, or reload).
    return found


def install_stop_handlers(on_stop: Callable[[str], None]) -> Callable[[], None]:
    """Route SIGTERM, SIGINT (and SIGBREAK on Windows) to ``on_stop(signal_name)``.

    No ``KeyboardInterrupt`` is raised: the caller finishes its current step and exits 0
    (STYLE.md rule 7). Returns a function that restores the previous handlers. Signal handlers
    can only be set from the main thread; elsewhere this does nothing and returns a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        log.debug("stop handlers not installed: not the main thread")
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        try:
            on_stop(name)
        except Exception:  # noqa: BLE001 - a failing callback must not surface at a random line
            log.exception("stop handler for %s failed", name)

    previous: Dict[int, Any] = {}
    for sig in _stop_signals():
        try:
            previous[sig] = signal.signal(sig, handler)
        except (OSError, ValueError) as exc:
            log.debug("cannot handle %s: %s", sig.name, exc)

    def restore() -> None:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (OSError, ValueError) as exc:
                log.debug("cannot restore %s: %s", sig, exc)
        previous.clear()

    return restore


# --------------------------------------------------------------------------- single instance


class AlreadyRunning(SuiteError):
    """Another monitor holds the lock for this server and clone (exit 1)."""

    def __init__(self, message: str, pid: Optional[int] = None, host: Optional[str] = None) -> None:
        super().__init__(message)
        self.pid = pid
        self.host = host


class InstanceLock:
    """One monitor per server and clone: ``<repo>/<server>/state/monitor.lock`` and ``.pid``.

    ``timeout`` (seconds, default 0) lets a freshly restarted monitor wait for its predecessor.
    """

    def __init__(self, repo: Union[str, os.PathLike[str]], server_id: str,
                 timeout: float = 0.0) -> None:
        self.repo = Path(repo)
        self.server_id = check_own_server_id(server_id)
        self.timeout = timeout
        self._lock: Any = None

    @property
    def lock_path(self) -> Path:
        return fleet_common.RuntimePaths(self.repo, self.server_id).instance_lock

    @property
    def pid_path(self) -> Path:
        return fleet_common.RuntimePaths(self.repo, self.server_id).pid

    @property
    def held(self) -> bool:
        return self._lock is not None

    def acquire(self) -> InstanceLock:
        if self._lock is not None:
            return self
        from filelock import Timeout

        fleet_common.runtime_dir(self.repo, self.server_id, fleet_common.STATE_SUBDIR)
        lock = fleet_common.file_lock(self.lock_path, timeout=self.timeout)
        try:
            lock.acquire()
        except Timeout:
            pid, host = read_pid_file(self.pid_path)
            who = f"pid {pid}" if pid is not None else "pid unknown"
            if host and host != socket.gethostname():
                who += f" on host {host}"
            raise AlreadyRunning(
                f"a monitor for server {self.server_id} on {self.repo} is already running ({who})",
                pid=pid, host=host,
            ) from None
        self._lock = lock
        try:
            fleet_common.atomic_write_json(self.pid_path, {
                "version": PID_FILE_VERSION,
                "pid": os.getpid(),
                "started_at": iso_utc(),
                "argv": list(sys.argv),
                "host": socket.gethostname(),
            })
        except BaseException:
            self._lock = None
            lock.release()
            raise
        log.debug("instance lock held", extra={"metadata": {
            "lock": str(self.lock_path), "pid": os.getpid()}})
        return self

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            # Only while the lock is still held, so a successor's pid file is never removed.
            self.pid_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.pid_path, exc)
        finally:
            lock.release()

    def __enter__(self) -> InstanceLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


PID_FILE_MAX_BYTES: Final = 64 * 1024


def read_pid_file(path: Union[str, os.PathLike[str]]) -> Tuple[Optional[int], Optional[str]]:
    """``(pid, host)`` from a ``monitor.pid`` file; ``(None, None)`` when it cannot be read.

    Never through a symlink (a committed one could point at a device that never ends).
    """
    try:
        raw = fleet_common.read_local_file(path, max_bytes=PID_FILE_MAX_BYTES)
        data = fleet_common.load_json_bounded(raw or b"null", what=PID_NAME,
                                              max_bytes=PID_FILE_MAX_BYTES)
    except (OSError, SuiteError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    pid = data.get("pid")
    host = data.get("host")
    return (pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
            host if isinstance(host, str) else None)


def monitor_running(repo: Union[str, os.PathLike[str]], server_id: str) -> Optional[bool]:
    """Whether a monitor holds the single-instance lock of this clone and server right now.

    False when the lock is free or no monitor has ever run here (no lock file); None when it
    cannot be told (the lock file is unreadable, or not a regular file). Probes the OS lock for
    an instant and writes nothing, so health checks and ``--status`` can call it; a monitor
    asking about itself gets True.
    """
    from filelock import FileLock, Timeout

    path = fleet_common.RuntimePaths(repo, server_id).instance_lock
    try:
        info = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode) or fleet_common.is_link(info):
        return None  # a symlink or folder: the next monitor to start moves it aside
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    except OSError:
        return None
    lock.release()
    return False


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as one line to paste into this platform's shell."""
    if os.name == "nt":
        return subprocess.list2cmdline(list(argv))
    import shlex

    return " ".join(shlex.quote(arg) for arg in argv)


def deliver_command(repo: Union[str, os.PathLike[str]], server_id: str) -> str:
    """The command that delivers a clone's retry queue once: one cycle of its monitor."""
    script = Path(__file__).resolve().parent / "message_monitor.py"
    return command_line([sys.executable, str(script), "--once", "--repo", str(repo),
                         "--server", check_own_server_id(server_id)])


# --------------------------------------------------------------------------- service definitions

_SYSTEMD_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def _check_text(value: str, what: str) -> str:
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise UsageError(f"{what} {value!r} contains a control character")
    return value


def _systemd_specifiers(value: str) -> str:
    # Unit files expand %-specifiers in almost every setting; "%%" is a literal percent sign.
    return value.replace("%", "%%")


def _systemd_exec_arg(value: str) -> str:
    """One ExecStart= argument, quoted per systemd.service(5) "Command lines"."""
    _check_text(value, "argument")
    text = _systemd_specifiers(value).replace("$", "$$")  # "$$" is a literal dollar sign
    if text == ";":
        return "\\;"  # a lone ";" would separate two commands
    if _SYSTEMD_SAFE.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _systemd_program(path: str) -> str:
    """ExecStart='s first word: specifiers expanded, but no "$" substitution, so "$" stays as it is."""
    _check_text(path, "python")
    text = _systemd_specifiers(path)
    return text if _SYSTEMD_SAFE.match(text.replace("$", "")) else '"' + text + '"'


def _systemd_env(name: str, value: str) -> str:
    _check_text(value, name)
    text = _systemd_specifiers(f"{name}={value}")
    return 'Environment="' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _require_absolute(value: str, what: str) -> str:
    _check_text(value, what)
    if not PurePosixPath(value).is_absolute():
        raise UsageError(f"{what} must be an absolute path for a systemd unit, got {value!r}")
    return value


def _interval_text(interval: float) -> str:
    value = fleet_common.check_number(interval, "interval", fleet_common.MIN_INTERVAL,
                                      fleet_common.MAX_INTERVAL)
    return f"{value:g}"


def render_systemd_unit(*, python: str, script: str, repo: str, server: str, interval: float,
                        user: Optional[str] = None, working_directory: Optional[str] = None,
                        watchdog_sec: int = WATCHDOG_SEC_DEFAULT,
                        extra_args: Sequence[str] = ()) -> str:
    """A ``.service`` unit for ``/etc/systemd/system/`` running the monitor under a watchdog."""
    server_id = check_own_server_id(server)
    _require_absolute(python, "python")
    _require_absolute(script, "script")
    _require_absolute(repo, "repo")
    workdir = _require_absolute(working_directory or repo, "working directory")
    if user is not None and (not user or not re.match(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*\$?$", user)):
        raise UsageError(f"invalid user name {user!r}")
    if int(watchdog_sec) <= 0:
        raise UsageError(f"watchdog_sec must be positive, got {watchdog_sec!r}")
    if any(ch in python for ch in "\"'\\"):
        # systemd takes the program's path as written (no quotes, no escapes, no "$$"): one it
        # would refuse to start is refused here, with the reason, not at the service's start.
        raise UsageError(f"python {python!r}: systemd cannot start a program whose path holds a quote "
                         "or a backslash; use a link without them")
    argv = [python, script, "--repo", repo, "--server", server_id,
            "--interval", _interval_text(interval), *extra_args]
    exec_start = " ".join([_systemd_program(python)] + [_systemd_exec_arg(arg) for arg in argv[1:]])
    lines = [
        "[Unit]",
        f"Description={_systemd_specifiers(f'Fleet message monitor ({server_id})')}",
        "After=network-online.target",
        "Wants=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_SEC}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        # The monitor reports READY=1 itself; only its main process may notify. A restart into a
        # new version uses exec, which keeps the main pid.
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        f"WorkingDirectory={_systemd_specifiers(workdir)}",
        _systemd_env("PYTHONUNBUFFERED", "1"),
        _systemd_env("BUILD_REPO_PATH", repo),
        _systemd_env("SERVER_ID", server_id),
    ]
    if user is not None:
        lines.append(f"User={user}")
    lines += [
        "Restart=always",
        f"RestartSec={RESTART_SEC}",
        f"WatchdogSec={int(watchdog_sec)}",
        f"TimeoutStartSec={TIMEOUT_START_SEC}",
        f"TimeoutStopSec={TIMEOUT_STOP_SEC}",
        # SIGTERM to the monitor only: it finishes its current git step, then exits 0; anything
        # still left when TimeoutStopSec runs out is killed.
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


_PS_SINGLE_QUOTES = re.compile("['\u2018\u2019\u201a\u201b]")


def _ps_quote(value: str) -> str:
    """A PowerShell single-quoted string: nothing is expanded, ``'`` is doubled.

    PowerShell also ends a single-quoted string at the typographic quotes U+2018..U+201B, so
    those are doubled too (as its own ``EscapeSingleQuotedStringContent`` does).
    """
    _check_text(value, "value")
    return "'" + _PS_SINGLE_QUOTES.sub(lambda m: m.group(0) * 2, value) + "'"


def render_task_scheduler(*, python: str, script: str, repo: str, server: str, interval: float,
                          task_name: str = TASK_NAME_DEFAULT, extra_args: Sequence[str] = ()) -> str:
    """A PowerShell script (run as Administrator) that registers and starts a Scheduled Task."""
    server_id = check_own_server_id(server, windows=True)
    if not task_name.strip():
        raise UsageError("task name must not be empty")
    for arg in extra_args:
        _check_text(arg, "argument")
    # The action's argument string is parsed by the Windows C runtime of python.exe.
    arguments = subprocess.list2cmdline(
        [script, "--repo", repo, "--server", server_id, "--interval", _interval_text(interval),
         *extra_args])
    lines = [
        f"# Registers the fleet message monitor for server {server_id} as a Scheduled Task.",
        "# Run in an elevated PowerShell. The task runs as SYSTEM: make sure SYSTEM can use the",
        "# clone (git refuses a repository owned by another user until it is trusted, e.g.",
        f"#   git config --system --add safe.directory {repo}",
        "# ) and can reach the remote (credentials, SSH keys).",
        "$ErrorActionPreference = 'Stop'",
        f"$taskName = {_ps_quote(task_name)}",
        f"$action = New-ScheduledTaskAction -Execute {_ps_quote(python)} "
        f"-Argument {_ps_quote(arguments)} -WorkingDirectory {_ps_quote(repo)}",
        "$trigger = New-ScheduledTaskTrigger -AtStartup",
        # Restart on failure for ever, never time out, one instance only (the InstanceLock is
        # the second line of defence).
        "$settings = New-ScheduledTaskSettingsSet -RestartCount 999 "
        "-RestartInterval (New-TimeSpan -Minutes 1) -ExecutionTimeLimit ([TimeSpan]::Zero) "
        "-StartWhenAvailable -MultipleInstances IgnoreNew "
        "-AllowStartIfOnBatteries -DontStopIfGoingOnBatteries",
        "$principal = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount "
        "-RunLevel Highest",
        "Register-ScheduledTask -TaskName $taskName -Action $action -Trigger $trigger "
        "-Settings $settings -Principal $principal "
        f"-Description {_ps_quote(f'Fleet message monitor ({server_id})')} -Force | Out-Null",
        "Start-ScheduledTask -TaskName $taskName",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- restarting

_SERVICE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def compile_suite() -> bool:
    """Write the bytecode of each of the suite's modules that lacks it or whose source changed.

    Python caches the bytecode of what it imports, unless ``PYTHONDONTWRITEBYTECODE`` is set (some
    machines and service managers set it): then every short command (a send, an inbox read) would
    compile its modules again on every start, which costs more than its git work. The monitor runs
    this when it starts and the self-check of a new version runs it too, so those commands find
    the bytecode. Whether every module compiled; a folder that cannot be written is no error (the
    commands then compile as before). Prints nothing.
    """
    import compileall

    suite = Path(__file__).resolve().parent
    return bool(compileall.compile_dir(str(suite), maxlevels=0, quiet=2))


def self_check(python: str, script: str, timeout: float = 60) -> Optional[str]:
    """Run ``python script --self-check``; None when it exits 0, else a one-line reason.

    The child does not inherit the systemd notify variables, so it can never tell systemd
    anything on the monitor's behalf.
    """
    env = {k: v for k, v in os.environ.items() if k not in _SERVICE_ENV}
    argv = [python, script, "--self-check"]
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"self-check timed out after {timeout:g} s"
    except OSError as exc:
        return f"self-check could not start {python}: {exc}"
    if proc.returncode == 0:
        return None
    last = ""
    for line in reversed(proc.stderr.decode("utf-8", "replace").splitlines()):
        if line.strip():
            last = line.strip()[:300]
            break
    code = (f"killed by signal {-proc.returncode}" if proc.returncode < 0
            else f"exit {proc.returncode}")
    return f"self-check failed ({code}): {last or 'no output on stderr'}"


def restart_process(argv: Sequence[str]) -> None:
    """Replace this process with ``sys.executable *argv`` (argv: the script and its arguments).

    POSIX: ``os.execv`` keeps the pid, which systemd's ``NotifyAccess=main`` requires; it does
    not return. The lock file descriptors are close-on-exec, so the new process can take the
    :class:`InstanceLock`; release it first anyway so ``monitor.pid`` is rewritten cleanly.

    Windows has no exec: the new process is started in the same console and this returns, so
    the caller must release its :class:`InstanceLock` before calling and then exit 0. Under Task
    Scheduler the task's restart settings (RestartCount/RestartInterval) still cover a failing
    task; note that the scheduler tracks the process it started, not this successor.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except (OSError, ValueError):
            pass
    command = [sys.executable, *argv]
    if os.name == "nt":
        subprocess.Popen(command, creationflags=0)
        return
    os.execv(sys.executable, command)
