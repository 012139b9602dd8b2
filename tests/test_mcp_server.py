"""The MCP server as agents see it: real server processes driven by the SDK's own stdio client.

Two clones of one bare origin, two server ids, one ``mcp_server.py`` process for each, real git
underneath. The SDK (``requirements-mcp.txt``) needs Python 3.10+: below that, or without the
extra, these tests skip and say why; the one-line "what to install" test runs everywhere.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional

import pytest
from conftest import PYTHON_DIR, ROOT, git, run_script

SDK_REASON = ("the MCP SDK needs Python 3.10+ (this is Python {}.{}); the MCP server is an optional "
              "extra: pip install -r requirements-mcp.txt").format(*sys.version_info[:2])
needs_sdk = pytest.mark.skipif(sys.version_info < (3, 10), reason=SDK_REASON)

TOOLS = {"send_message", "fetch_inbox", "read_message", "get_thread", "mark_read", "acknowledge",
         "search_messages", "wait_for_mail", "fleet_status"}
CALL_TIMEOUT = 120.0  # seconds for one tool call: a hang fails the test instead of hanging it
SESSION_TIMEOUT = 240.0  # a whole test body
TOOL_LIST_TOKEN_BUDGET = 800  # characters / 4 of tools/list; README "For coding agents" quotes it


@pytest.fixture
def sdk():
    """The SDK's client side, or a skip that says what is missing."""
    pytest.importorskip("mcp", reason=SDK_REASON)
    import anyio
    import mcp

    return anyio, mcp


class ToolFailed(AssertionError):
    """A tool call returned a tool error (``is_error``) where a result was expected."""


class Agent:
    """One MCP client session to one ``mcp_server.py`` process, as an agent would hold it."""

    def __init__(self, session: Any, server: str, errlog: Path, instructions: Optional[str] = None) -> None:
        self.session = session
        self.server = server
        self.errlog = errlog
        self.instructions = instructions

    async def raw(self, tool: str, **arguments: Any) -> Any:
        return await self.session.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT)

    async def call(self, tool: str, **arguments: Any) -> Dict[str, Any]:
        result = await self.raw(tool, **arguments)
        text = "".join(block.text for block in result.content)
        if result.is_error:
            raise ToolFailed(f"{self.server}: {tool}({arguments}) failed: {text}\n"
                             f"server stderr: {self.errlog.read_text(errors='replace')}")
        return json.loads(text)

    async def error(self, tool: str, **arguments: Any) -> str:
        result = await self.raw(tool, **arguments)
        text = "".join(block.text for block in result.content)
        assert result.is_error, f"{tool}({arguments}) should have failed, returned {text}"
        return text


def server_env() -> Dict[str, str]:
    """The test's hermetic environment (git config, HOME), as ``run_script`` passes it."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@asynccontextmanager
async def agent(repo: Path, server: str, *extra: str) -> AsyncIterator[Agent]:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(
        command=sys.executable,
        args=[str(PYTHON_DIR / "mcp_server.py"), "--repo", str(repo), "--server", server, *extra],
        env=server_env())
    errlog = repo.parent / f"{server}.mcp-stderr.txt"
    with open(errlog, "w", encoding="utf-8") as err:
        async with stdio_client(params, errlog=err) as (read, write):
            async with ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT) as session:
                started = await session.initialize()
                yield Agent(session, server, errlog, started.instructions)


def run(sdk, body) -> None:
    """Run an async test body with a deadline (a hang is a failure, never a hang)."""
    anyio, _ = sdk

    async def bounded() -> None:
        with anyio.fail_after(SESSION_TIMEOUT):
            await body()

    anyio.run(bounded)


def tool_list_json(listing: Any) -> str:
    """The JSON of a ``tools/list`` result as it travels (compact, by alias, no nulls)."""
    return listing.model_dump_json(by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- tests


@needs_sdk
def test_two_agents_list_send_fetch_read_and_acknowledge(fleet, sdk):
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")

    async def body() -> None:
        async with agent(b1, "build1") as build1, agent(c2, "code2") as code2:
            listing = await code2.session.list_tools()
            assert {tool.name for tool in listing.tools} == TOOLS
            assert "never as instructions" in (code2.instructions or "")
            for tool in listing.tools:
                assert tool.description and "\n" not in tool.description, tool.name
            assert len(tool_list_json(listing)) / 4 <= TOOL_LIST_TOKEN_BUDGET

            sent = await build1.call("send_message", to="code2", body="Build 4411 is green.",
                                     subject="Nightly build", priority="high", ack_required=True)
            assert sent["status"] == "sent" and sent["message_id"].startswith("msg_")
            mid = sent["message_id"]

            inbox = await code2.call("fetch_inbox")
            assert inbox["count"] == 1
            [listed] = inbox["messages"]
            assert listed["id"] == mid and listed["from"] == "build1" and listed["read"] is False
            assert listed["subject"] == "Nightly build" and listed["priority"] == "high"
            assert "body" not in listed  # the list is lean: bodies come with read_message

            read = await code2.call("read_message", id=mid)
            assert read["message"]["body"] == "Build 4411 is green."
            assert (await code2.call("fetch_inbox"))["count"] == 0  # marked read
            everything = await code2.call("fetch_inbox", unread_only=False)
            assert [(m["id"], m["read"]) for m in everything["messages"]] == [(mid, True)]

            found = await code2.call("search_messages", words="4411")
            assert [m["id"] for m in found["messages"]] == [mid]

            acked = await code2.call("acknowledge", id=mid, note="deployed")
            assert acked["acknowledged"]["id"] == mid and acked["acknowledged"]["acknowledged"] is True
            # the acknowledgement reaches the sender: a reply in its inbox, in the same thread
            mail = await build1.call("fetch_inbox")
            replies = [m for m in mail["messages"] if m.get("in_reply_to") == mid]
            assert len(replies) == 1 and replies[0]["from"] == "code2"
            thread = await build1.call("get_thread", id=mid)
            assert {m["id"] for m in thread["messages"]} >= {mid, replies[0]["id"]}
            assert (await build1.call("mark_read", ids=[replies[0]["id"]]))["marked"] == 1
            assert (await build1.call("fetch_inbox"))["count"] == 0

    run(sdk, body)
    assert git(b1, "status", "--porcelain") == "" and git(c2, "status", "--porcelain") == ""


@needs_sdk
def test_wait_for_mail_returns_on_arrival_and_times_out_without_blocking_the_server(fleet, sdk):
    anyio, _ = sdk
    b1, c2 = fleet.clone("build1"), fleet.clone("code2")

    async def body() -> None:
        async with agent(b1, "build1") as build1, agent(c2, "code2") as code2:
            quiet = await code2.call("wait_for_mail", timeout_seconds=1)
            assert quiet == {"arrived": False, "messages": []}

            waited: List[Dict[str, Any]] = []
            done = anyio.Event()

            async def wait() -> None:
                waited.append(await code2.call("wait_for_mail", timeout_seconds=120))
                done.set()

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait)
                # the server answers other calls while one waits (the wait runs in a thread)
                assert (await code2.call("fetch_inbox"))["count"] == 0
                assert not done.is_set()
                sent = await build1.call("send_message", to="code2", body="are you there?")
            [result] = waited
            assert result["arrived"] is True
            assert [(m["id"], m["body"]) for m in result["messages"]] == [(sent["message_id"], "are you there?")]

            # waiting for a reply to one message: code2 answers, build1's wait returns it
            async def wait_reply() -> None:
                waited.append(await build1.call("wait_for_mail", timeout_seconds=120,
                                                reply_to=sent["message_id"]))

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(wait_reply)
                await code2.call("send_message", to="build1", body="yes", reply_to=sent["message_id"])
            reply = waited[-1]
            assert reply["arrived"] is True
            assert [(m["in_reply_to"], m["body"]) for m in reply["messages"]] == [(sent["message_id"], "yes")]

    run(sdk, body)


@needs_sdk
def test_fleet_status_is_the_status_report(fleet, sdk):
    b1 = fleet.clone("build1")
    try:
        import fleet_status  # noqa: F401
        have_status = True
    except ImportError:  # the status module arrives separately; the tool says it is missing
        have_status = False

    async def body() -> None:
        async with agent(b1, "build1") as build1:
            await build1.call("send_message", to="code2", body="status?")
            if not have_status:
                assert "not part of this installation" in await build1.error("fleet_status")
                return
            status = await build1.call("fleet_status")
            rows = {row["id"]: row for row in status["servers"]}
            assert {"build1", "code2"} <= set(rows)
            assert rows["code2"]["unread"]["count"] == 1

    run(sdk, body)
    if have_status:
        cli = run_script("fleet_status.py", "--repo", str(b1), "--json")
        assert cli.returncode in (0, 1, 2), cli.stderr
        assert {row["id"] for row in json.loads(cli.stdout)["servers"]} >= {"build1", "code2"}


@needs_sdk
def test_a_client_that_leaves_during_a_wait_does_not_keep_the_server_alive(fleet, sdk):
    """Raw JSON-RPC on the pipes: the SDK's client would kill the server itself on leaving."""
    c2 = fleet.clone("code2")
    errlog = fleet.base / "code2.mcp-stderr.txt"
    with open(errlog, "wb") as err:
        proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "mcp_server.py"), "--repo", str(c2),
                                 "--server", "code2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=server_env())
    lines: "queue.Queue[bytes]" = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()

    def send(message: Dict[str, Any]) -> None:
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")
        proc.stdin.flush()

    def answer() -> Dict[str, Any]:
        return json.loads(lines.get(timeout=CALL_TIMEOUT))

    try:
        send({"id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}})
        assert answer()["id"] == 1
        send({"method": "notifications/initialized"})
        send({"id": 2, "method": "tools/call", "params": {"name": "wait_for_mail",
                                                          "arguments": {"timeout_seconds": 300}}})
        send({"id": 3, "method": "tools/call", "params": {"name": "fetch_inbox", "arguments": {}}})
        assert answer()["id"] == 3  # answered while the wait goes on
        proc.stdin.close()  # the agent's client goes away in the middle of the wait
        assert proc.wait(timeout=CALL_TIMEOUT) == 0, errlog.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        reader.join(timeout=10)


@needs_sdk
def test_bad_input_is_a_tool_error_with_the_cli_reason(fleet, sdk):
    c2 = fleet.clone("code2")
    unknown = "msg_1762254639_000000000000"
    cli = run_script("inbox.py", "--repo", str(c2), "--server", "code2", "show", unknown)
    assert cli.returncode == 2, cli.stderr
    cli_reason = cli.stderr.strip().split("error: ", 1)[-1]

    async def body() -> None:
        async with agent(c2, "code2") as code2:
            text = await code2.error("read_message", id=unknown)
            assert text.endswith(cli_reason) and "\n" not in text
            assert "\n" not in await code2.error("get_thread", id="../../etc/passwd")
            assert "at most 300" in await code2.error("wait_for_mail", timeout_seconds=301)
            assert "invalid server id" in await code2.error("send_message", to="Build 1!", body="hi")
            assert "since" in (await code2.error("fetch_inbox", since="yesterday-ish")).lower()
            # the server is still there after every error
            assert (await code2.call("fetch_inbox"))["count"] == 0

    run(sdk, body)


@needs_sdk
def test_hostile_text_from_another_machine_comes_back_as_valid_json(tmp_path, sdk):
    """A lone surrogate (valid JSON escape, invalid UTF-8) must not break the protocol's stream."""
    from conftest import Fleet

    mailbox = {"messages": [{
        "id": "msg_1762254639_5f0c9a1be2d4", "from": "build1", "to": "code2",
        "subject": "half a pair \ud800 \u001b[31m", "body": "body \udfff end", "type": "info",
        "priority": "normal", "timestamp": "2025-11-04T11:10:39Z", "read": False, "ack_required": False}]}
    hostile = Fleet(tmp_path, mailbox=json.dumps(mailbox, indent=2).encode("ascii"))  # escaped surrogates
    c2 = hostile.clone("code2")

    async def body() -> None:
        async with agent(c2, "code2") as code2:
            [listed] = (await code2.call("fetch_inbox"))["messages"]
            assert listed["subject"].startswith("half a pair ")
            read = await code2.call("read_message", id=listed["id"])
            assert read["message"]["body"].startswith("body ")
            assert (await code2.call("fetch_inbox"))["count"] == 0

    run(sdk, body)


@needs_sdk
def test_send_with_the_remote_down_is_a_queued_result(fleet, git_daemon, sdk):
    b1 = fleet.clone("build1")
    git(b1, "remote", "set-url", "origin", git_daemon.url("origin.git"))

    async def body() -> None:
        async with agent(b1, "build1") as build1:
            git_daemon.stop()
            queued = await build1.call("send_message", to="code2", body="during the outage")
            assert queued["status"] == "queued" and queued["message_id"].startswith("msg_")
            assert "unreachable" in queued["reason"]

    run(sdk, body)
    pending = json.loads((b1 / "build1" / "queue" / "message_queue.json").read_text())["items"]
    assert [item["message"]["body"] for item in pending] == ["during the outage"]
    assert fleet.remote_messages() == []


@needs_sdk
def test_start_errors_are_one_line_and_stdout_stays_clean(fleet, sdk):
    c2 = fleet.clone("code2")
    bad_id = run_script("mcp_server.py", "--repo", str(c2), "--server", "Code 2!")
    assert bad_id.returncode == 2 and bad_id.stdout == ""
    assert len(bad_id.stderr.strip().splitlines()) == 1 and "invalid server id" in bad_id.stderr
    not_a_clone = run_script("mcp_server.py", "--repo", str(fleet.base / "nowhere"), "--server", "code2")
    assert not_a_clone.returncode == 2 and not_a_clone.stdout == ""
    assert len(not_a_clone.stderr.strip().splitlines()) == 1
    # a client that goes away at once: exit 0, nothing but the protocol (here: nothing) on stdout
    closed = run_script("mcp_server.py", "--repo", str(c2), "--server", "code2", input="")
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout == ""


def test_without_the_sdk_it_says_what_to_install(tmp_path):
    """Any Python: in a virtual environment without the extra, one line naming the requirements file."""
    venv = tmp_path / "bare-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = subprocess.run([str(python), str(PYTHON_DIR / "mcp_server.py"), "--server", "code2"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120,
                          env=server_env(), cwd=str(ROOT))
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -r requirements-mcp.txt" in lines[0], proc.stderr


@needs_sdk
def test_long_mail_comes_in_bounded_results_and_only_what_was_returned_is_read(fleet, sdk):
    """An agent's client may cut or drop a long tool result: bodies share 100,000 characters a
    result, a long body is read in parts, and wait_for_mail marks read only what it returned."""
    from mcp_server import MAX_BODY_CHARS
    from send_message import send_message

    b1, c2 = fleet.clone("build1"), fleet.clone("code2")
    long_body = "".join(f"{i:07d} " for i in range(30_000))  # 240,000 characters
    ids = [send_message(body, f"part {n}", to="code2", from_sender="build1", build_repo_path=str(b1)).message_id
           for n, body in enumerate((long_body, "b" * 60_000, "c" * 60_000))]

    async def body() -> None:
        async with agent(c2, "code2") as code2:
            got = await code2.call("wait_for_mail", timeout_seconds=5)
            assert [m["id"] for m in got["messages"]] == ids[:1] and got["more"] == 2
            assert got["messages"][0]["truncated"] is True and len(got["messages"][0]["body"]) == MAX_BODY_CHARS // 2
            assert (await code2.call("fetch_inbox"))["count"] == 2  # what it did not return is unread
            parts, offset = [], 0
            while offset is not None:
                read = (await code2.call("read_message", id=ids[0], offset=offset))["message"]
                parts.append(read["body"])
                offset = read.get("next_offset")
            assert "".join(parts) == long_body and len(parts) == 3
            thread = await code2.call("get_thread", id=ids[1])
            assert sum(len(m.get("body", "")) for m in thread["messages"]) <= MAX_BODY_CHARS
            rest = await code2.call("wait_for_mail", timeout_seconds=5)
            assert [m["id"] for m in rest["messages"]] == ids[1:2] and rest["more"] == 1

    run(sdk, body)


@needs_sdk
@pytest.mark.skipif(os.name != "posix", reason="SIGTERM")
def test_sigterm_during_a_slow_call_leaves_no_git_behind(fleet, sdk, http_git_server):
    """Stopped by its service manager or client while a call waits on a slow remote: nothing of
    that call's git (nor its HTTP helper) lives on to write refs, or land a push, afterwards."""
    import signal

    import psutil

    c2 = fleet.clone("code2")
    git(c2, "remote", "set-url", "origin", http_git_server.url("origin.git"))
    http_git_server.delay = 30.0
    with open(fleet.base / "code2.mcp-stderr.txt", "wb") as err:
        proc = subprocess.Popen([sys.executable, str(PYTHON_DIR / "mcp_server.py"), "--repo", str(c2),
                                 "--server", "code2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=err, env=server_env())
    try:
        for message in ({"id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}},
                {"method": "notifications/initialized"},
                {"id": 2, "method": "tools/call", "params": {"name": "fetch_inbox", "arguments": {}}}):
            proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")
            proc.stdin.flush()
        deadline = time.monotonic() + 30
        while http_git_server.active_connections < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stdin.close()
    where = str(c2.resolve())
    deadline = time.monotonic() + 5
    while [p for p in psutil.process_iter(["cwd"]) if p.info["cwd"] == where]:
        assert time.monotonic() < deadline, "a git of the stopped server still runs"
        time.sleep(0.1)
