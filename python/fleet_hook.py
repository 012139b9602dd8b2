"""``message_monitor.py --on-message CMD``: run a command for each new message, safely.

This is how an agent gets woken: the monitor starts ``CMD`` once for each new message addressed to
its server, with the message as JSON on standard input and its id, sender, subject and priority
in ``FLEET_MSG_ID``, ``FLEET_MSG_FROM``, ``FLEET_MSG_SUBJECT`` and ``FLEET_MSG_PRIORITY`` (plus
``FLEET_SERVER`` and ``FLEET_REPO``). Nothing from the message is ever put into a command line or
a shell: ``CMD`` is split once, by the operator's own quoting, and run without a shell.

Contract:
- A command is started and not waited for: the cycle goes on. Each later cycle reaps finished
  commands (a non-zero exit is logged as a warning) and stops any that ran past the time limit
  (logged). At most :data:`MAX_RUNNING` run at once; further messages wait their turn in order.
- Once per message, never skipped: the monitor records a message as owed a command before it
  shows it (``monitor_files.MonitorState.hook_owed``), and the record goes just before the
  command starts (``on_start``), so a restart neither starts one twice nor forgets one that was
  still waiting: those start after the restart. A monitor that stops kills what is still
  running (it has started: it is not started again); ``--once`` waits for every command it
  started, each up to the time limit, before it exits.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import threading
import time
from collections import deque

from fleet_common import UsageError, get_logger
from fleet_start import own_group

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Deque, Dict, Iterable, List, Mapping, Tuple

log = get_logger(__name__)

MAX_RUNNING = 4
ENV_TEXT_LIMIT = 1000  # characters of a subject or id put into the environment
STDIN_LIMIT = 4 * 1024 * 1024


def _env_text(value: Any) -> str:
    """A message field fit for an environment variable: bounded, no control characters."""
    text = "" if value is None else str(value)
    text = "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in text[:ENV_TEXT_LIMIT])
    return text.encode("utf-8", "replace").decode("utf-8")


def split_command(command: str, *, windows: bool = os.name == "nt") -> List[str]:
    """The operator's command as an argument list: POSIX quoting; on Windows backslashes are kept
    and the double quotes around a word (``"C:\\Program Files\\python.exe"``) are taken off, as
    Windows programs read their command line (they are put back where needed when it starts)."""
    try:
        argv = shlex.split(command, posix=not windows)
    except ValueError as exc:
        raise UsageError(f"--on-message: cannot split the command: {exc}") from None
    if windows:
        argv = [word[1:-1] if len(word) >= 2 and word[0] == word[-1] == '"' else word for word in argv]
    if not argv:
        raise UsageError("--on-message needs a command")
    return argv


class MessageHook:
    """Start the ``--on-message`` command for messages; reap and time-limit the runs."""

    def __init__(self, command: str, timeout: float, *, repo: "os.PathLike[str] | str",
                 server: str, max_running: int = MAX_RUNNING,
                 on_start: Callable[[Dict[str, Any]], None] = lambda msg: None,
                 owed: Iterable[Mapping[str, Any]] = ()) -> None:
        self.argv = split_command(command)
        self.timeout = float(timeout)
        self.repo = str(repo)
        self.server = server
        self.max_running = max_running
        self.on_start = on_start
        self.running: List[Tuple[subprocess.Popen, float, str]] = []
        self.waiting: Deque[Dict[str, Any]] = deque(dict(msg) for msg in owed)

    def run(self, msg: Mapping[str, Any]) -> None:
        """Start the command for ``msg`` now, or as soon as a slot frees."""
        self.waiting.append(dict(msg))
        self._start_waiting()

    def _start_waiting(self) -> None:
        self.reap(start=False)
        while self.waiting and len(self.running) < self.max_running:
            self._start(self.waiting.popleft())

    def _start(self, msg: Dict[str, Any]) -> None:
        self.on_start(msg)
        msg_id = _env_text(msg.get("id"))
        env = dict(os.environ)
        env.update({"FLEET_MSG_ID": msg_id, "FLEET_MSG_FROM": _env_text(msg.get("from")),
                    "FLEET_MSG_SUBJECT": _env_text(msg.get("subject")),
                    "FLEET_MSG_PRIORITY": _env_text(msg.get("priority") or "normal"),
                    "FLEET_SERVER": self.server, "FLEET_REPO": self.repo})
        data = _stdin_json(msg)
        kw = own_group()  # a Ctrl+C meant for the monitor is not the command's
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, env=env, cwd=self.repo, **kw)
        except OSError as exc:
            log.warning("--on-message command could not start for %s: %s", msg_id, exc,
                        extra={"metadata": {"id": msg_id}})
            return
        # Fed from a thread: a command that never reads its input must not block the cycle.
        threading.Thread(target=_feed, args=(proc, data), daemon=True).start()
        self.running.append((proc, time.monotonic() + self.timeout, msg_id))
        log.info("--on-message started for %s (pid %d)", msg_id, proc.pid,
                 extra={"metadata": {"id": msg_id, "pid": proc.pid}})

    def reap(self, *, start: bool = True) -> None:
        """Collect finished commands, stop those past the time limit, start waiting ones."""
        still: List[Tuple[subprocess.Popen, float, str]] = []
        now = time.monotonic()
        for proc, deadline, msg_id in self.running:
            code = proc.poll()
            if code is None and now >= deadline:
                _kill(proc)
                log.warning("--on-message for %s ran past %g s and was stopped", msg_id, self.timeout,
                            extra={"metadata": {"id": msg_id, "pid": proc.pid}})
                continue
            if code is None:
                still.append((proc, deadline, msg_id))
            elif code != 0:
                log.warning("--on-message for %s exited with %d", msg_id, code,
                            extra={"metadata": {"id": msg_id, "exit": code}})
        self.running = still
        if start:
            self._start_waiting()

    def drain(self, stop: Callable[[], bool] = lambda: False) -> None:
        """Run every waiting command and wait for all, each up to the time limit (``--once``),
        or until ``stop()`` says the monitor is asked to stop."""
        self._start_waiting()
        while (self.running or self.waiting) and not stop():
            time.sleep(0.05)
            self.reap()

    def stop(self) -> None:
        """Stop every running command (the monitor is stopping); waiting ones stay owed."""
        for proc, _deadline, msg_id in self.running:
            if proc.poll() is None:
                _kill(proc)
                log.warning("--on-message for %s stopped with the monitor", msg_id)
        self.running = []
        if self.waiting:
            log.warning("--on-message waits for %d message(s); it runs for them when the monitor "
                        "starts again", len(self.waiting))
            self.waiting.clear()


def _stdin_json(msg: Mapping[str, Any]) -> bytes:
    """The message as the command reads it: JSON, always whole. One past :data:`STDIN_LIMIT`
    (another member's text: the mailbox bounds only the whole file) has its long texts and lists
    cut, marked ``"truncated": true``; the JSON text itself is never cut."""
    data = json.dumps(msg, ensure_ascii=True).encode("ascii")
    chars = STDIN_LIMIT // 8
    while len(data) > STDIN_LIMIT:
        cut = {str(k)[:200]: _shortened(v, chars) for k, v in list(msg.items())[:100]}
        data = json.dumps({**cut, "truncated": True}, ensure_ascii=True).encode("ascii")
        chars //= 4
    return data


def _shortened(value: Any, chars: int) -> Any:
    """A field cut to ``chars`` characters (lists to their first 100 such items; nested objects
    to nothing: a message's own fields are texts and lists of texts)."""
    if isinstance(value, str):
        return value[:chars]
    if isinstance(value, list):
        return [_shortened(item, chars) if not isinstance(item, (list, dict)) else None for item in value[:100]]
    return None if isinstance(value, dict) else value


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    try:
        assert proc.stdin is not None
        proc.stdin.write(data)
        proc.stdin.close()
    except (OSError, ValueError):
        pass  # the command exited or does not read its input: that is its business


def _kill(proc: subprocess.Popen) -> None:
    """Kill the command and anything it started (its own process group / session)."""
    try:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        else:
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass

