"""Send one message to the fleet through the shared git repository.

The code of ``python/send_message.py``: that file is the command, the import name and the
documentation (usage, exit codes, what is read); this module is what it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from fleet_cli import ArgumentParser, run_cli
from fleet_common import (
    BROADCAST,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TEMPFAIL,
    SuiteError,
    UsageError,
    default_repo_path,
    defer_logging_setup,
    finite_number,
    get_logger,
    iso_utc,
    normalize_server_id,
    resolve_server_id,
    write_line,
)
from fleet_git import (
    STANDALONE_FRESHNESS,
    Clone,
    ObjectMissing,
    PushRejected,
    RemoteUnavailable,
)
from fleet_mailbox import (
    MESSAGE_TYPES,
    PRIORITIES,
    Mailbox,
    MailboxCorrupt,
    MailboxFull,
    commit_subject,  # noqa: F401 - importable from here, as before
    message_size_problem,
    new_message_id,
    reply_subject,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Dict, Final, List, Optional, Sequence, Tuple, Union

log = get_logger("send_message")  # the command's name, in logs as before

PROG: Final = "send_message"
QUICK_RETRY_WINDOW = 2.0  # a failure faster than this gets one quick retry before queueing


class SendResult:
    """What happened to one message. Truthy only when sent and verified by the remote."""

    __slots__ = ("ok", "status", "message_id", "message", "reason", "commit", "attempts")

    def __init__(self, ok: bool, status: str, message: Dict[str, Any], reason: str = "",
                 commit: Optional[str] = None, attempts: int = 0) -> None:
        self.ok = ok
        self.status = status  # "sent" | "queued" | "failed"
        self.message = message
        self.message_id: str = message.get("id", "")
        self.reason = reason
        self.commit = commit
        self.attempts = attempts

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"SendResult(ok={self.ok}, status={self.status!r}, message_id={self.message_id!r})"

    def to_dict(self) -> Dict[str, Any]:
        return {"ok": self.ok, "status": self.status, "message_id": self.message_id,
                "reason": self.reason, "commit": self.commit}


def normalize_recipients(to: Union[str, Sequence[str]]) -> Union[str, List[str]]:
    """``all``, one server id, or a list of ids (``a,b`` is a list); validated, lower-case."""
    items: List[str] = []
    for part in ([to] if isinstance(to, str) else list(to)):
        items.extend(p.strip() for p in str(part).split(",") if p.strip())
    if not items:
        raise UsageError("--to needs a server id or 'all'")
    ids = [normalize_server_id(item, allow_broadcast=True) for item in items]
    if BROADCAST in ids:
        if len(ids) > 1:
            raise UsageError("--to 'all' cannot be combined with other servers")
        return BROADCAST
    unique = list(dict.fromkeys(ids))
    return unique[0] if len(unique) == 1 else unique


def build_message(body: str, subject: Optional[str], to: Union[str, Sequence[str]], priority: str,
                  msg_type: str, sender: str, *, ack_required: bool = False,
                  in_reply_to: Optional[str] = None, auto: bool = False,
                  message_id: Optional[str] = None,
                  extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """A new message with the ten fields every sender writes, then the optional ones."""
    if not isinstance(body, str) or not body.strip():
        raise UsageError("the message body is empty")
    prio = str(priority).strip().lower()
    if prio not in PRIORITIES:
        raise UsageError(f"invalid priority {priority!r}: use one of {', '.join(PRIORITIES)}")
    kind = str(msg_type).strip().lower()
    if kind not in MESSAGE_TYPES:
        raise UsageError(f"invalid type {msg_type!r}: use one of {', '.join(MESSAGE_TYPES)}")
    if subject is None or not str(subject).strip():
        first = body.strip().splitlines()[0].strip()
        subject = first if len(first) <= 60 else first[:57] + "..."
    now = time.time()
    msg: Dict[str, Any] = {
        "id": message_id or new_message_id(now),
        "from": sender,
        "to": normalize_recipients(to),
        "subject": str(subject),
        "body": body,
        "type": kind,
        "priority": prio,
        "timestamp": iso_utc(),
        "read": False,
        "ack_required": bool(ack_required),
    }
    if ack_required:
        msg["ack_status"] = "pending"
        msg["acknowledged_by"] = []
    if in_reply_to:
        msg["in_reply_to"] = in_reply_to
    if auto:
        msg["auto"] = True
    if extra:
        for key, value in extra.items():
            msg.setdefault(key, value)
    too_large = message_size_problem(msg)
    if too_large:
        raise UsageError(f"{too_large}; put the text in a file and send its path")
    return msg


def deliver(clone: Clone, msg: Dict[str, Any], *, fresh_for: float = STANDALONE_FRESHNESS):
    """Append ``msg`` to the shared mailbox by one transaction; idempotent on (id, from).

    Raises :class:`RemoteUnavailable`, :class:`MailboxCorrupt`, :class:`BranchMissing` (bad
    input: never queued), :class:`ObjectMissing` or another :class:`GitError`.
    """
    return Mailbox(clone).deliver(msg, fresh_for=fresh_for)


def _find_original(clone: Clone, msg_id: str) -> Optional[Dict[str, Any]]:
    from fleet_archive import find_anywhere

    return find_anywhere(clone, clone.tip(), msg_id)


def send_message(body: str, subject: Optional[str] = None, to: Union[str, Sequence[str], None] = "all",
                 priority: str = "normal", msg_type: str = "info",
                 from_sender: Optional[str] = None, build_repo_path: Optional[str] = None, *,
                 ack_required: bool = False, reply_to: Optional[str] = None,
                 branch: Optional[str] = None, auto: bool = False, queue: bool = True,
                 message_id: Optional[str] = None, extra: Optional[Dict[str, Any]] = None,
                 clone: Optional[Clone] = None, allow_secret: bool = False) -> SendResult:
    """Send one message and verify it on the remote.

    Bad input raises :class:`UsageError` before any file or git operation, and so does a body or
    subject that holds a secret, unless ``allow_secret`` (then the send logs a warning). When the
    remote cannot be reached, or its mailbox does not parse, the message goes to the retry queue
    (``queue=True``) and the result is falsy with ``status == "queued"``.
    """
    secret = find_secret_in(body, subject)
    if secret and not allow_secret:
        raise UsageError(f"the message {secret} and was not sent; every server reads the mailbox "
                         "and git keeps it (--allow-secret sends it anyway)")
    sender = resolve_server_id(from_sender)
    if to is None and not reply_to:
        to = BROADCAST
    if clone is None:
        clone = Clone(build_repo_path or default_repo_path(), branch)

    if reply_to:
        original = _find_original(clone, reply_to)
        if original is None:
            try:
                clone.fetch()
                original = _find_original(clone, reply_to)
            except RemoteUnavailable:
                original = None
        if original is None and to is None:
            raise UsageError(f"--reply-to {reply_to}: no such message in the mailbox; give --to")
        if original is not None:
            if to is None:
                to = str(original.get("from", ""))
            if subject is None:
                subject = reply_subject(original.get("subject"))
    msg = build_message(body, subject, to if to is not None else BROADCAST, priority, msg_type, sender,
                        ack_required=ack_required, in_reply_to=reply_to, auto=auto,
                        message_id=message_id, extra=extra)
    if secret:
        log.warning("message %s: its %s; sending it as asked (--allow-secret)", msg["id"], secret,
                    extra={"metadata": {"id": msg["id"]}})
    return deliver_or_queue(clone, msg, queue=queue)


def find_secret_in(body: object, subject: object = None) -> str:
    """``"body holds a password"`` (which field, which kind of secret) or ``""`` when neither the
    body nor the subject holds one. Never the secret itself."""
    from fleet_secrets import find_secret  # no logging import: a send that logs nothing needs none

    for field, text in (("body", body), ("subject", subject)):
        if isinstance(text, str) and text:
            kind = find_secret(text)
            if kind:
                return f"{field} holds {kind}"
    return ""


def deliver_or_queue(clone: Clone, msg: Dict[str, Any], *, queue: bool = True) -> SendResult:
    """Deliver now; when that cannot be done now, queue (one quick retry at most)."""
    if queue and _breaker_open(clone, msg["from"]):
        return _queue(clone, msg, "the circuit breaker is open (the remote was unreachable)")
    started = time.monotonic()
    for attempt in (1, 2):
        try:
            tx = deliver(clone, msg)
        except MailboxCorrupt as exc:
            if not queue:
                return SendResult(False, "failed", msg, str(exc))
            return _queue(clone, msg, "the remote mailbox does not parse and needs "
                                      "message_monitor.py --repair")
        except MailboxFull as exc:  # until an archive pass makes room
            if not queue:
                return SendResult(False, "failed", msg, str(exc))
            return _queue(clone, msg, str(exc))
        except OSError as exc:  # this machine could not write (a full disk): the queue says whether it can
            reason = f"this clone could not be written: {exc}"
            return _queue(clone, msg, reason) if queue else SendResult(False, "failed", msg, reason)
        except PushRejected as exc:  # lost every race for a minute: the monitor tries later
            if not queue:
                return SendResult(False, "failed", msg, f"lost every push race: {exc.reason}")
            return _queue(clone, msg, "the shared branch is too busy right now (every push lost a race)")
        except ObjectMissing as exc:
            # Even after fetching every object again (a gc pruning under us, a damaged object
            # store): nothing was written; the message waits in the queue, never on an "empty"
            # mailbox.
            if not queue:
                return SendResult(False, "failed", msg, f"git objects unreadable in this clone: {exc.reason}")
            return _queue(clone, msg, f"git objects unreadable in this clone: {exc.reason}")
        except RemoteUnavailable as exc:
            quick = time.monotonic() - started < QUICK_RETRY_WINDOW
            if attempt == 1 and quick:
                time.sleep(0.3)
                continue
            if not queue:
                return SendResult(False, "failed", msg, f"remote unreachable: {exc.reason}")
            return _queue(clone, msg, f"remote unreachable: {exc.reason}")
        return SendResult(True, "sent", msg, commit=tx.commit, attempts=tx.attempts)
    raise AssertionError("unreachable")  # pragma: no cover


def _breaker_open(clone: Clone, server: str) -> bool:
    """True while the monitor's persisted circuit breaker says the remote is down.

    Read-only (the monitor owns the file); an unreadable file never blocks a send. Without the
    file (no monitor has persisted a breaker here) ``circuit_breaker`` is not even imported.
    """
    from fleet_common import RuntimePaths

    path = RuntimePaths(clone.root, server).breaker
    if not os.path.lexists(path):
        return False
    from circuit_breaker import breaker_open

    return breaker_open(path)


def _queue(clone: Clone, msg: Dict[str, Any], reason: str) -> SendResult:
    """Queue ``msg`` for the monitor. When even that fails (a full disk, a queue locked by a stuck
    process), the result is ``failed`` and names both reasons: the message exists only in the
    returned result then, and the CLI prints it so that nothing is lost."""
    from fleet_common import start_logging
    from message_queue import MessageQueue

    start_logging()  # the queue logs through logging directly
    try:
        MessageQueue(str(clone.root), msg["from"]).enqueue(msg, reason=reason)
    except (OSError, SuiteError) as exc:
        problem = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        log.error("message %s neither sent nor queued: %s; queueing failed: %s", msg["id"], reason,
                  problem, extra={"metadata": {"id": msg["id"], "reason": reason, "queue": problem}})
        return SendResult(False, "failed", msg, f"not sent ({reason}) and not queued ({problem})")
    log.warning("message %s queued: %s", msg["id"], reason,
                extra={"metadata": {"id": msg["id"], "reason": reason}})
    return SendResult(False, "queued", msg, reason)


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="send_message.py",
        description="Send a message to the fleet through the shared git repository.",
        epilog="Exit codes: 0 sent and verified, 1 failure, 2 bad usage, "
               "75 queued for the monitor to deliver, 130 interrupted; "
               "with --wait-reply: 0 an answer came, 124 none came in time (the message was sent).",
    )
    parser.add_argument("body", help="message text ('-' reads it from standard input)")
    parser.add_argument("subject", nargs="?", default=None, help="subject (default: the body's first line)")
    parser.add_argument("--to", default=None, help="server id, 'all' (default) or a comma-separated list")
    parser.add_argument("--from", dest="sender", default=None, help="sending server id (default: $SERVER_ID or code2)")
    parser.add_argument("--repo", default=None, help="fleet clone (default: $BUILD_REPO_PATH or K:/Projects/Build)")
    parser.add_argument("--branch", default=None, help="shared branch (default: the remote's default)")
    parser.add_argument("--priority", default="normal", type=str.lower, choices=PRIORITIES)
    parser.add_argument("--type", dest="msg_type", default="info", type=str.lower, choices=MESSAGE_TYPES)
    parser.add_argument("--ack-required", action="store_true", help="ask recipients to acknowledge")
    parser.add_argument("--reply-to", default=None, metavar="ID", help="answer message ID (default --to: its sender)")
    parser.add_argument("--no-queue", action="store_true", help="fail (exit 1) instead of queueing")
    parser.add_argument("--wait-reply", type=finite_number("--wait-reply", 0, 86400), default=None, metavar="SEC",
                        help="after sending, wait up to SEC seconds for the answer and print it")
    parser.add_argument("--allow-secret", action="store_true",
                        help="send a body that holds a password, token or key (refused otherwise, exit 2)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    return parser


def _setup_cli_logging(repo: Optional[str], server: Optional[str]) -> None:
    import logging

    from structured_log import setup_logging

    try:
        setup_logging(repo, server, console_level=logging.WARNING)
    except SuiteError:
        setup_logging(None, server, console_level=logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    return run_cli(PROG, lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    clone, sender, result = _send_from_args(args)
    reply = None
    if result.ok and args.wait_reply is not None:
        waited = _wait_after_send(args, clone, sender, result)
        if isinstance(waited, int):
            if args.json:  # the message was sent: a script still gets its id and outcome
                write_line(json.dumps({**result.to_dict(), "reply": None}, ensure_ascii=True))
            return waited
        reply = waited
    if args.json:
        out = result.to_dict()
        if reply is not None:
            out["reply"] = reply
        write_line(json.dumps(out, ensure_ascii=True))
    if reply is not None:
        return _show_reply(reply, args)
    return _report(result, args)


def _send_from_args(args: argparse.Namespace) -> Tuple[Clone, str, SendResult]:
    """Check the command line's ids, warn about recipients the roster does not name, send."""
    sender = resolve_server_id(args.sender)
    repo = args.repo or default_repo_path()
    body = sys.stdin.read().rstrip("\r\n") if args.body == "-" else args.body
    to = args.to if args.to is not None else (None if args.reply_to else BROADCAST)
    if to is not None:
        normalize_recipients(to)  # refuse bad ids before touching anything
    clone = Clone(repo, args.branch)
    if to is not None:
        from fleet_roster import roster_warning  # the roster names the fleet's servers

        unknown = roster_warning(clone, normalize_recipients(to))
        if unknown:
            write_line(f"{PROG}: warning: {unknown}", sys.stderr)
    root = str(clone.root)
    defer_logging_setup(lambda: _setup_cli_logging(root, sender))
    result = send_message(body, args.subject, to, args.priority, args.msg_type, sender,
                          ack_required=args.ack_required, reply_to=args.reply_to,
                          queue=not args.no_queue, clone=clone, allow_secret=args.allow_secret)
    return clone, sender, result


def _wait_after_send(args: argparse.Namespace, clone: Clone, sender: str,
                     result: SendResult) -> Union[int, Dict[str, Any]]:
    """The answer to a message just sent, or an exit code. The message is out whatever happens
    here, so each failure says so rather than the handler's plain "error"."""
    if not args.json and not args.quiet:
        write_line(f"Sent {result.message_id} to {_describe_to(result.message['to'])}; "
                   f"waiting up to {args.wait_reply:g} s for an answer")
    try:
        return _wait_reply(clone, sender, result.message_id, args.wait_reply)
    except KeyboardInterrupt:
        write_line(f"{PROG}: sent {result.message_id}; interrupted while waiting", sys.stderr)
        return EXIT_INTERRUPTED
    except SuiteError as exc:
        write_line(f"{PROG}: sent {result.message_id}, but could not wait for an answer: {exc}",
                   sys.stderr)
        return EXIT_FAILURE


def _report(result: SendResult, args: argparse.Namespace) -> int:
    """The outcome of a send without ``--wait-reply``, as an exit code and at most two lines."""
    if result.ok:
        if not args.json and not args.quiet:
            write_line(f"Sent {result.message_id} to {_describe_to(result.message['to'])} "
                       f"(verified on origin at {str(result.commit)[:12]})")
        return EXIT_OK
    if result.status == "queued":
        write_line(f"{PROG}: queued {result.message_id}: {result.reason}; "
                   "the monitor will deliver it", sys.stderr)
        return EXIT_TEMPFAIL
    if not args.no_queue:
        # Neither sent nor queued: the message exists nowhere else, so it goes to stderr as one
        # JSON line after the reason, ready to send again (PROTOCOL.md: nothing is lost).
        import json

        write_line(f"{PROG}: error: message {result.message_id} {result.reason}; "
                   "the message follows as JSON", sys.stderr)
        write_line(json.dumps(result.message, ensure_ascii=True), sys.stderr)
        return EXIT_FAILURE
    write_line(f"{PROG}: error: {result.reason}", sys.stderr)
    return EXIT_FAILURE


def _wait_reply(clone: Clone, sender: str, msg_id: str, seconds: float) -> Dict[str, Any]:
    """Wait for an answer to the message just sent (``inbox.Inbox.wait``); marks it read."""
    from fleet_inbox import Inbox

    return Inbox(server=sender, clone=clone).wait(timeout=seconds, reply_to=msg_id)


def _show_reply(reply: Dict[str, Any], args: argparse.Namespace) -> int:
    from fleet_inbox import EXIT_TIMEOUT, render_full

    if not reply["arrived"]:
        write_line(f"send_message: no answer within {args.wait_reply:g} s (the message was sent)",
                   sys.stderr)
        return EXIT_TIMEOUT
    if not args.json:
        write_line("\n\n".join(render_full(view) for view in reply["messages"]))
    return EXIT_OK


def _describe_to(to: Any) -> str:
    return ", ".join(to) if isinstance(to, list) else str(to)


if __name__ == "__main__":
    raise SystemExit(main())
