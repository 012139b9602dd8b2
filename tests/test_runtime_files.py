"""Runtime files (``<server>/logs|queue|state``): a symlink, file or folder of the wrong type is
moved aside and never followed, and local state of the wrong shape is set aside."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON_DIR, git, run_script

from fleet_git import Clone
from message_monitor import Monitor
from send_message import send_message

posix_only = pytest.mark.skipif(os.name == "nt", reason="symlinks, tmpfs and rlimits are POSIX here")


def monitor(path: Path, name: str, shown=None) -> Monitor:
    return Monitor(Clone(path), name, 0.05, show=(shown.append if shown is not None else None),
                   one_shot=True, auto_reply=False)


def queued_message(msg_id: str = "msg_1762254639_5f0c9a1be2d4") -> dict:
    return {"id": msg_id, "from": "code2", "to": "build1", "subject": "s", "body": "pending mail"}


# --------------------------------------------------------------------------- symlinks in place


@posix_only
def test_runtime_symlinks_are_moved_aside_never_followed(fleet, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    bashrc = outside / ".bashrc"
    bashrc.write_text("# keep me\n")
    c2 = fleet.clone("code2")
    server = c2 / "code2"
    server.mkdir()
    os.symlink(str(outside), server / "state")  # the whole state folder points elsewhere
    (server / "queue").mkdir()
    os.symlink(str(bashrc), server / "queue" / "message_queue.json")
    os.symlink(str(bashrc), server / "queue" / "message_queue.json.lock")
    assert send_message("hello", to="code2", from_sender="build1", build_repo_path=str(fleet.clone("build1")))
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert bashrc.read_text() == "# keep me\n"
    assert sorted(p.name for p in outside.iterdir()) == [".bashrc"]  # nothing written through
    for path in (server / "state", server / "queue" / "message_queue.json",
                 server / "queue" / "message_queue.json.lock"):
        assert not path.is_symlink()
        asides = list(path.parent.glob(path.name + ".corrupt-*"))
        assert len(asides) == 1 and asides[0].is_symlink(), path
    assert (server / "state" / "monitor_state.json").is_file()
    log = [json.loads(line) for line in (server / "logs" / "structured.log").read_text().splitlines()]
    critical = [r["message"] for r in log if r["level"] == "CRITICAL"]
    assert any("symbolic link" in m and "state" in m for m in critical), critical
    assert git(c2, "status", "--porcelain") == ""


@posix_only
def test_a_symlinked_monitor_lock_is_moved_aside(fleet, tmp_path):
    target = tmp_path / "precious"
    target.write_text("do not truncate\n")
    c2 = fleet.clone("code2")
    state = c2 / "code2" / "state"
    state.mkdir(parents=True)
    os.symlink(str(target), state / "monitor.lock")
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == "do not truncate\n"
    assert (state / "monitor.lock").is_file() and not (state / "monitor.lock").is_symlink()
    assert len(list(state.glob("monitor.lock.corrupt-*"))) == 1


@posix_only
def test_a_queue_symlinked_to_a_device_is_not_read(tmp_path):
    git(tmp_path, "init", "-q", "repo")  # runtime folders are checked in a clone
    repo = tmp_path / "repo"
    folder = repo / "code2" / "queue"
    folder.mkdir(parents=True)
    os.symlink("/dev/zero", folder / "message_queue.json")  # read_bytes() would never end
    # In a child with a memory cap and a timeout: a regression fails, it neither hangs nor
    # eats the machine's memory.
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(f"""
        import logging, resource, sys
        sys.path.insert(0, {str(PYTHON_DIR)!r})
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        logging.basicConfig(level=logging.CRITICAL, format="%(levelname)s %(message)s")
        from message_queue import MessageQueue
        queue = MessageQueue({str(repo)!r}, "code2")
        print(len(queue.get_pending()))
        queue.enqueue({queued_message()!r})
        print([e["id"] for e in queue.get_pending()])
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["0", "['msg_1762254639_5f0c9a1be2d4']"]
    assert "CRITICAL" in proc.stderr and "symbolic link" in proc.stderr
    assert not (folder / "message_queue.json").is_symlink()


def test_state_folder_as_a_file_is_moved_aside(fleet, caplog):
    c2 = fleet.clone("code2")
    (c2 / "code2").mkdir()
    (c2 / "code2" / "state").write_text("a file where the folder belongs")
    assert send_message("hello", to="code2", from_sender="build1", build_repo_path=str(fleet.clone("build1")))
    shown: list = []
    with caplog.at_level(logging.CRITICAL):
        assert monitor(c2, "code2", shown).cycle().ok
    assert [m["body"] for m in shown] == ["hello"]
    assert (c2 / "code2" / "state" / "monitor_state.json").is_file()
    aside = list((c2 / "code2").glob("state.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "a file where the folder belongs"
    assert any("not a folder" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- local state shape


@pytest.mark.parametrize("text", ['{"version": 1, "processed": 5}',
                                  '{"version": 1, "pending_marks": {"a": 1}}',
                                  '{"version": "2", "processed": []}'])
def test_local_state_of_the_wrong_shape_is_moved_aside(fleet, caplog, text):
    c2 = fleet.clone("code2")
    state = c2 / "code2" / "state"
    state.mkdir(parents=True)
    (state / "monitor_state.json").write_text(text)
    assert send_message("hello", to="code2", from_sender="build1", build_repo_path=str(fleet.clone("build1")))
    proc = run_script("message_monitor.py", "--repo", str(c2), "--server", "code2", "--once",
                      "--no-auto-reply")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    aside = list(state.glob("monitor_state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == text
    assert json.loads((state / "monitor_state.json").read_text())["version"] == 1
