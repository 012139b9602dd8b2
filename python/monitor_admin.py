"""The monitor's one-shot commands: ``--init``, ``--repair``, ``--status``, ``--archive-days``,
``--retry-dead``, ``--retire``, the service definitions, and how a new message is shown.

Each command runs and returns what to print (library code: the CLI in ``message_monitor``
prints it and maps errors to exit codes). The mailbox changes go through
:class:`fleet_mailbox.Mailbox`; the status file is read through :mod:`monitor_files`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from fleet_common import SuiteError, UsageError
from fleet_git import Clone, run_git
from fleet_mailbox import REPAIR_HISTORY, Mailbox, known_servers, serialize
from monitor_files import read_status_or_none

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import argparse
    from typing import Any, Dict, List, Optional

log = logging.getLogger("message_monitor")  # the monitor's log, as before the split

MONITOR_SCRIPT = "message_monitor.py"  # the CLI that service definitions run


# --------------------------------------------------------------------------- --init


def init_fleet(path: "os.PathLike[str] | str", branch: str = "main") -> str:
    """Create ``path`` as a clone of a new bare ``<path>.origin.git`` with an empty mailbox.

    On an existing clone without a mailbox, add one by the transaction. Returns what was done.
    """
    from fleet_git import check_branch_name

    check_branch_name(branch)
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise UsageError(f"--init: {target} is a file, not a folder")
    if target.exists() and (target / ".git").exists():
        clone = Clone(target, None)
        clone.fetch(allow_missing=True)
        tx = Mailbox(clone).create()  # --init alone may create the branch
        return "added a mailbox to the existing clone" if tx.changed else "already a fleet repository"
    if target.exists() and any(target.iterdir()):
        raise UsageError(f"--init: {target} exists and is not a git clone")
    origin = target.with_name(target.name + ".origin.git")
    if origin.exists():
        raise UsageError(f"--init: {origin} already exists")
    if target.parent.exists() and not target.parent.is_dir():
        raise UsageError(f"--init: {target.parent} is a file, not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    run_git(target.parent, "init", "--bare", "--quiet", str(origin))
    run_git(origin, "symbolic-ref", "HEAD", f"refs/heads/{branch}")
    blob = run_git(origin, "hash-object", "-w", "--stdin",
                   input=serialize({"messages": []})).stdout.decode().strip()
    sub = run_git(origin, "mktree", input=f"100644 blob {blob}\tmessages.json\n".encode()).stdout.decode().strip()
    root = run_git(origin, "mktree", input=f"040000 tree {sub}\tcoordination\n".encode()).stdout.decode().strip()
    env = {"GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "fleet"),
           "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "fleet@fleet.invalid"),
           "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "fleet"),
           "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "fleet@fleet.invalid")}
    commit = run_git(origin, "-c", "commit.gpgsign=false", "commit-tree", root, "-m",
                     "fleet: create the mailbox", env=env).stdout.decode().strip()
    run_git(origin, "update-ref", f"refs/heads/{branch}", commit)
    run_git(target.parent, "clone", "--quiet", str(origin.resolve()), str(target))
    return f"created {target} (origin: {origin})"


# --------------------------------------------------------------------------- showing a message

# What a shown message may take of a console line: every field comes from another machine
# (PROTOCOL.md, "Trust between servers"), so each is cut, not only the previews.
RENDER_ID_CHARS = 100  # id, from and each recipient (a valid server id has at most 64)
RENDER_WORD_CHARS = 40  # priority, type, timestamp
RENDER_RECIPIENTS = 5  # then "+N more"


def _render_to(to: Any) -> str:
    from structured_log import clip

    if not isinstance(to, list):
        return clip(to, RENDER_ID_CHARS)
    shown = ", ".join(clip(item, RENDER_ID_CHARS) for item in to[:RENDER_RECIPIENTS])
    more = len(to) - RENDER_RECIPIENTS
    return f"{shown} +{more} more" if more > 0 else shown


def render_message(msg: Dict[str, Any], *, terminal: bool) -> str:
    """How a new message is shown: a block on a terminal, one line for journald and pipes.

    Every field is redacted, neutralised and cut (``…``), so the whole stays a few hundred
    characters whatever the message holds.
    """
    from structured_log import clip, preview

    fields = {
        "from": clip(msg.get("from"), RENDER_ID_CHARS), "to": _render_to(msg.get("to")),
        "priority": clip(msg.get("priority") or "normal", RENDER_WORD_CHARS).upper(),
        "type": clip(msg.get("type") or "info", RENDER_WORD_CHARS),
        "subject": preview(str(msg.get("subject") or "(no subject)"), 100),
        "body": preview(str(msg.get("body") or ""), 200),
        "id": clip(msg.get("id"), RENDER_ID_CHARS),
        "when": clip(msg.get("timestamp") or "?", RENDER_WORD_CHARS),
    }
    if not terminal:
        return ("NEW MESSAGE id={id} from={from} to={to} priority={priority} type={type} "
                "subject=\"{subject}\" preview=\"{body}\"").format(**fields)
    return ("\n=== NEW MESSAGE [{priority}] from {from} to {to} ({type}, {when})\n"
            "    Subject: {subject}\n    {body}\n    id: {id}").format(**fields)

# --------------------------------------------------------------------------- one-shot commands

def option_name(dest: str) -> str:
    """``--auto-archive-days`` for the argparse destination ``auto_archive_days``."""
    return "--" + dest.replace("_", "-")


def _absolute(path: str) -> str:
    return path if _looks_windows_absolute(path) else str(Path(path).expanduser().resolve())


def _service_args(args: argparse.Namespace) -> List[str]:
    """The loop's options as given, for the command line of a service definition."""
    extra: List[str] = []
    if args.branch:
        extra += ["--branch", args.branch]
    for dest in ("heartbeat_minutes", "auto_archive_days"):
        if getattr(args, dest) is not None:
            extra += [option_name(dest), f"{getattr(args, dest):g}"]
    for dest in ("metrics_textfile", "rules", "upgrade_signed_by"):
        if getattr(args, dest):
            extra += [option_name(dest), _absolute(getattr(args, dest))]
    if args.mark_read:
        extra += ["--mark-read", args.mark_read]
    if args.on_message:
        extra += ["--on-message", args.on_message, "--on-message-timeout", f"{args.on_message_timeout:g}"]
    for dest in ("no_auto_reply", "legacy_marks", "heartbeat_on_main"):
        if getattr(args, dest):
            extra.append(option_name(dest))
    if args.quiet:
        extra.append("--quiet")
    return extra


def run_one_shot(args: argparse.Namespace, repo: str, server: str, interval: float) -> Optional[str]:
    """Run a command that does not start the loop and return what to print (``""``: nothing);
    ``None`` when none was asked for."""
    if args.self_check:
        # Every module compiles (leaving its bytecode for the commands: fleet_service.compile_suite)
        # and imports; mcp_server only compiles, its SDK being an optional extra.
        from fleet_service import compile_suite

        compile_suite()
        for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
            if path.stem != "mcp_server":
                __import__(path.stem)
        return ""
    if args.print_systemd_unit or args.print_task_scheduler:
        from fleet_service import render_systemd_unit, render_task_scheduler

        common = {"python": sys.executable, "script": str(Path(__file__).resolve().with_name(MONITOR_SCRIPT)),
                  "repo": _absolute(repo), "server": server, "interval": interval,
                  "extra_args": _service_args(args)}
        if args.print_systemd_unit:
            text = render_systemd_unit(user=args.service_user, **common)
        else:
            text = render_task_scheduler(**common)
        return text.rstrip("\n")
    if args.status:
        return status_report(repo, server, as_json=args.json)
    if args.retry_dead:
        from message_queue import MessageQueue

        count = MessageQueue(str(Clone(repo).root), server).retry_dead()
        return f"{count} dead message(s) will be retried by the monitor"
    if args.repair:
        result = repair_mailbox(Clone(repo, args.branch), server)
        return result["summary"]
    if args.archive_days is not None:
        from fleet_archive import archive_pass

        result = archive_pass(Clone(repo, args.branch), server, args.archive_days)
        return result["summary"]
    if args.retire:
        return retire_server(Clone(repo, args.branch), server)["summary"]
    return None


def _looks_windows_absolute(path: str) -> bool:
    return len(path) > 2 and path[1] == ":" and path[2] in "/\\"


# --------------------------------------------------------------------------- --retire

MAX_HEARTBEAT_BYTES = 64 * 1024  # <server>/heartbeat.json, as older tools write it


def retire_server(clone: Clone, server: str) -> Dict[str, Any]:
    """Record in ``server``'s state ref that it has left the fleet for good (key ``retired``,
    beside the presence readers take now; README, "State refs"): the status stops counting it
    stale or waited on, and the archive stops keeping mail for it to read. Its receipts stay.
    A monitor that publishes presence under this id again brings it back; nothing has to be
    undone.

    Refused (exit 2) while the server looks live: a presence within the status's stale limit
    that is not a monitor's clean stop, or, with no presence, an older tool's fresh
    ``<server>/heartbeat.json``; its mail would stop waiting for a server still reading it. A
    presence published while this runs fails it (exit 1). A server with no state ref is retired
    only when the hot mailbox names it (mail sent to an id that never ran, a typo); otherwise
    nothing waits for it already, and nothing is written (no ref for a server that never was)."""
    import datetime as _dt

    from fleet_report import DEFAULT_STALE_AFTER, presence_summary, short_age, stale_limit
    from fleet_state import FALLBACK_PREFIX, LOCAL_FALLBACK_PREFIX, STOPPED, StateChange, StateRefRefused, StateStore

    store = StateStore(clone)
    view = store.poll()
    tip = clone.fetch()
    if server not in view.servers() and server not in known_servers(Mailbox(clone).read(tip)[1]):
        return {"server": server, "retired": None,
                "summary": f"{server} has no state ref and no mail names it: nothing waits for it; "
                           "nothing written (check the id)"}
    store.fetch([server], view=view)
    state = store.read(server)
    now = _dt.datetime.now(_dt.timezone.utc)
    # Each ref name's presence on its own: one that is fresh (or stamped ahead) under either
    # name is a server that may be running, whatever the other name says.
    presences = [p for p in (presence_summary(one, now) for one in store.states_by_name(server)) if p]
    for seen in presences:
        if seen["activity"] != STOPPED and seen["age_seconds"] <= stale_limit(seen, DEFAULT_STALE_AFTER):
            raise UsageError(f"{server} looks live (presence {short_age(seen['age_seconds'])} ago): stop its "
                             "monitor (a clean stop says so) or wait until it is stale (a --once run stays "
                             f"live for {short_age(stale_limit(seen, DEFAULT_STALE_AFTER))}), then retire it")
    age = None if presences else _heartbeat_age(clone, tip, server, now)
    if age is not None and age <= DEFAULT_STALE_AFTER:
        raise UsageError(f"{server} looks live (its {server}/heartbeat.json is {short_age(age)} old): "
                         "stop it, or wait until it is stale, then retire it")
    names = store.retirement_refs(server, view)
    change = StateChange(retire=True, seen=state.presence_stamp())
    try:
        store.update(server, change, names=names)
    except StateRefRefused:
        if names[0] not in view.state_tips:  # no ref yet, on a host that refuses refs/fleet/*
            try:
                store.update(server, change, names=(FALLBACK_PREFIX + server, LOCAL_FALLBACK_PREFIX + server))
            except StateRefRefused:
                raise SuiteError(f"the remote refuses both {names[0]} and {FALLBACK_PREFIX}{server}: "
                                 f"{server} cannot be retired on this host") from None
        else:
            raise SuiteError(f"the remote refuses {names[0]}, which holds {server}'s state and is where a "
                             f"retirement is read: {server} cannot be retired while the host refuses it") from None
    store.fetch([server])  # a presence under the other ref name meanwhile would end it at once
    state = store.read(server)
    if not state.is_retired():
        raise SuiteError(f"{server} published presence while it was being retired: its monitor is running")
    return {"server": server, "retired": state.retired["at"] if state.retired else None,
            "summary": f"{server} retired: nobody waits for it any more; a monitor started again "
                       "under this id brings it back"}


def _heartbeat_age(clone: Clone, tip: Optional[str], server: str, now: Any) -> Optional[float]:
    """Seconds since an older tool's ``<server>/heartbeat.json`` at ``tip`` (``None``: none, or
    unreadable)."""
    from fleet_common import load_json_bounded, parse_timestamp

    try:
        raw = clone.read_file(tip, f"{server}/heartbeat.json", MAX_HEARTBEAT_BYTES)[1] if tip else None
        doc = load_json_bounded(raw, what="a heartbeat", max_bytes=MAX_HEARTBEAT_BYTES) if raw else None
    except SuiteError:  # (bad input too)
        return None
    moment = parse_timestamp(doc.get("timestamp")) if isinstance(doc, dict) else None
    return None if moment is None else max(0.0, (now - moment).total_seconds())


# --------------------------------------------------------------------------- --repair and --status


def repair_mailbox(clone: Clone, server: str, *, max_history: int = REPAIR_HISTORY) -> Dict[str, Any]:
    """Rebuild an unparseable mailbox on the remote (:meth:`fleet_mailbox.Mailbox.repair`),
    leaving out the copies the archive holds already."""
    from fleet_archive import archived_copies

    return Mailbox(clone).repair(server, max_history=max_history,
                                 archived=lambda tip, msgs: archived_copies(clone, tip, msgs))


def status_report(repo: str, server: str, *, as_json: bool = False) -> str:
    """One screen: health, breaker, queue, last cycle and the 24-hour metrics summary."""
    import json

    from fleet_service import deliver_command, monitor_running
    from message_queue import MessageQueue
    from monitoring_metrics import MetricsCollector
    from system_health import get_system_health

    root = Clone(repo).root
    health = get_system_health(str(root), server)
    last = read_status_or_none(root, server)
    queue = MessageQueue(str(root), server).stats()
    metrics = MetricsCollector(str(root), server).get_summary(hours=24)
    running = monitor_running(root, server)
    if last is not None:
        last["running"] = running
    data = {"server": server, "repo": str(root), "health": health, "monitor": last,
            "queue": queue, "metrics": metrics}
    if as_json:
        return json.dumps(data, indent=2, default=str)
    lines = [f"Fleet monitor status for {server} at {root}",
             f"Health: {health['overall']}"]
    for name, check in health.get("checks", {}).items():
        lines.append(f"  {name:<16}{check.get('status', '?'):<9}{check.get('message', '')}")
    if last:
        state = {True: "running", False: "not running"}.get(running, "unknown")
        cycles = last.get("iterations")
        lines.append(f"Monitor: {state} (pid {last.get('pid')}), started {last.get('started_at')}, "
                     f"{cycles} cycle{'' if cycles == 1 else 's'}, every {last.get('interval')} s")
        lines.append(f"  last cycle {last.get('last_cycle_at')}: {last.get('last_cycle')}")
        lines.append(f"  last successful fetch: {last.get('last_fetch_ok_at')}")
    else:
        lines.append("Monitor: has not run on this clone yet")
    lines.append(f"Retry queue: {queue.get('pending')} pending, {queue.get('dead')} dead, "
                 f"{queue.get('sent')} recently sent")
    if queue.get("pending") and running is False:
        lines.append("  WARNING: no monitor runs on this clone, so nothing will deliver them; run: "
                     + deliver_command(root, server))
    lines.append("Last 24 hours:")
    counters = metrics.get("counters", {})
    lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counters.items()))
    for op, st in sorted(metrics.get("operations", {}).items()):
        lines.append(f"  {op:<12} {st['count']:>6} runs, {st['success_rate'] * 100:5.1f} % ok, "
                     f"p50 {st['p50_ms']:.0f} ms, p95 {st['p95_ms']:.0f} ms, max {st['max_ms']:.0f} ms")
    return "\n".join(lines)
