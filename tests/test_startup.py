"""The short commands import only what their work needs (fleet_cli, "Start-up").

Each command runs as a real process on a real fleet, through a wrapper that reports, at exit,
every module the process imported; the modules that the start-up rules defer must be absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import List, Set, Tuple

import pytest
from conftest import PYTHON_DIR, Fleet

import fleet_start

# Run a command's script as ``python3 python/<script>`` would, then name every imported module.
WRAPPER = """
import atexit, gc, sys
atexit.register(lambda: sys.stderr.write("\\nMODULES " + " ".join(sorted(sys.modules)) + "\\n"
                                         + f"COLLECTOR {int(gc.isenabled())} {gc.get_freeze_count()}\\n"))
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, script.rsplit("/", 1)[0])
with open(script, encoding="utf-8") as handle:
    code = compile(handle.read(), script, "exec")
exec(code, {"__name__": "__main__", "__file__": script})
"""

# Deferred by every short command: their import costs more than the work that might need them.
DEFERRED = {"typing", "logging", "random", "shutil", "bz2", "lzma", "dataclasses", "inspect",
            "structured_log", "message_queue", "fleet_archive", "auto_reply"}


def _run(script: str, *args: str) -> Tuple[Set[str], Tuple[int, int]]:
    """The modules the command imported, and (whether the cyclic collector runs, how many objects
    it leaves be) at its end."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", WRAPPER, (PYTHON_DIR / script).as_posix(), *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120,
                          text=True, encoding="utf-8", errors="replace")
    assert proc.returncode in (0, 1, 3), proc.stderr  # fleet_status: 1 is a warning (a stale server)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("MODULES ")]
    collector = [line.split()[1:] for line in proc.stderr.splitlines() if line.startswith("COLLECTOR ")]
    assert lines and collector, proc.stderr
    return set(lines[-1].split()[1:]), (int(collector[-1][0]), int(collector[-1][1]))


@pytest.fixture
def busy_fleet(fleet: Fleet) -> Fleet:
    fleet.clone("build1")
    fleet.clone("code2")
    return fleet


def _first_id(fleet: Fleet) -> str:
    return str(fleet.remote_messages()[-1]["id"])


@pytest.mark.parametrize("command", [
    ["send_message.py", "hello", "Subject", "--to", "code2", "--from", "build1", "--repo", "{build1}"],
    ["inbox.py", "list", "--repo", "{code2}", "--server", "code2"],
    ["inbox.py", "list", "--repo", "{code2}", "--server", "code2", "--json"],
    ["inbox.py", "show", "{id}", "--peek", "--repo", "{code2}", "--server", "code2", "--json"],
    ["fleet_status.py", "--repo", "{code2}"],
    ["fleet_status.py", "--repo", "{code2}", "--json"],
], ids=["send", "inbox-list", "inbox-list-json", "inbox-show", "status", "status-json"])
def test_a_short_command_imports_nothing_it_defers(busy_fleet: Fleet, command: List[str]) -> None:
    fleet = busy_fleet
    if command[0] != "send_message.py":
        assert not _run("send_message.py", "first", "--to", "code2", "--from", "build1",
                        "--repo", str(fleet.clones["build1"]))[0] & DEFERRED
    values = {"build1": str(fleet.clones["build1"]), "code2": str(fleet.clones["code2"])}
    if "{id}" in command:
        values["id"] = _first_id(fleet)
    imported, (collecting, frozen) = _run(command[0], *[arg.format(**values) for arg in command[1:]])
    assert not imported & DEFERRED, sorted(imported & DEFERRED)
    assert collecting  # held off while the suite loaded, if at all, and back on for the work
    if command[0] != "send_message.py":
        assert frozen > 10_000  # what the suite's modules made: the collector leaves it be (fleet_start.loaded)
    if command[:2] == ["inbox.py", "list"]:
        assert "datetime" not in imported  # a listing sorts by seconds (fleet_common.timestamp_seconds)
    if fleet_start.POSIX_SPAWN and command[0] == "fleet_status.py":
        # Every git call was started by the script without subprocess, and taken: neither it nor
        # threading is needed (fleet_common.LazyModule).
        assert not imported & {"subprocess", "threading", "selectors"}, sorted(imported)
    if command[0] == "send_message.py":
        assert "datetime" not in imported  # a send stamps its message with the time module alone
        # Nor the reading side, the queue (nothing was queued) or the breaker (no monitor persisted one);
        # the checks before sending do run.
        assert not imported & {"fleet_inbox", "fleet_report", "message_queue", "circuit_breaker"}
        assert {"fleet_secrets", "fleet_roster"} <= imported
        assert fleet.remote_messages()[-1]["subject"] == "Subject"


def test_the_self_check_leaves_bytecode_where_python_will_not_write_it(tmp_path) -> None:
    """With PYTHONDONTWRITEBYTECODE set, imports never write bytecode: every start compiles. The
    monitor's start and the self-check of a new version write it (fleet_service.compile_suite)."""
    prefix = tmp_path / "pycache"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX=str(prefix))
    env.pop("PYTHONPATH", None)

    def cached() -> Set[str]:
        return {path.name.split(".")[0] for path in prefix.rglob("*.pyc")}

    subprocess.run([sys.executable, str(PYTHON_DIR / "send_message.py"), "--help"], env=env,
                   stdout=subprocess.DEVNULL, check=True)
    assert "fleet_send" not in cached()  # Python wrote nothing on its own
    proc = subprocess.run([sys.executable, str(PYTHON_DIR / "message_monitor.py"), "--self-check"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    suite = {path.stem for path in PYTHON_DIR.glob("*.py")}
    assert suite <= cached()
