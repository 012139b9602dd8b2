"""The fleet at a glance: who is live, who is stale, who is being waited on.

The code of ``python/fleet_status.py``: that file is the command, the import name and the
documentation (usage, exit codes, what is read); this module is what it runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import re
import sys

from fleet_cli import sanitize
from fleet_common import (
    CLOCK_SKEW_TOLERANCE,
    BadInput,
    UsageError,
    default_repo_path,
    defer_logging_setup,
    format_duration,
    is_valid_server_id,
    iso_utc,
    one_line,
    parse_timestamp,
)
from fleet_git import MAILBOX_PATH, Clone
from fleet_mailbox import (
    Document,
    MailboxCorrupt,
    flag,
    is_addressed_to,
    known_servers,
    message_time,
    parse_document,
    read_mailbox,
    recipients,
    split_entries,
    strip_reply_prefixes,
)
from fleet_roster import (  # the roster's format lives there; these names stay importable from here
    MAX_DESCRIPTION_CHARS,
    MAX_ROSTER_SERVERS,
    Roster,
)
from fleet_roster import ROSTER_PATH as ROSTER_PATH
from fleet_roster import parse_roster as parse_roster
from fleet_roster import read_roster as read_roster
from fleet_roster import roster_warning as roster_warning
from fleet_secrets import LazyPattern
from fleet_state import (
    MAX_ID_CHARS,
    MAX_STATE_BYTES,
    STATE_FILE,
    ServerState,
    StateStore,
    has_acknowledged,
    has_read,
    takes_retirement,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Final, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Union


# Nagios plugin exit codes (as system_health.py).
EXIT_OK: Final = 0
EXIT_WARNING: Final = 1
EXIT_CRITICAL: Final = 2
EXIT_UNKNOWN: Final = 3

OK: Final = "ok"
WARNING: Final = "warning"
CRITICAL: Final = "critical"
_RANK: Final = {OK: 0, WARNING: 1, CRITICAL: 2}
_EXIT_FOR: Final = {OK: EXIT_OK, WARNING: EXIT_WARNING, CRITICAL: EXIT_CRITICAL}

LIVE: Final = "live"
STALE: Final = "stale"
NEVER_SEEN: Final = "never seen"
RETIRED: Final = "retired"  # left the fleet for good (message_monitor.py --retire): nobody waits for it

REPORT_VERSION: Final = 1
DEFAULT_STALE_AFTER: Final = 15 * 60.0
DEFAULT_UNREAD_AFTER: Final = 4 * 3600.0
STALE_INTERVALS: Final = 3  # a server's own interval: three missed cycles make it stale
MAX_BELIEVED_INTERVAL: Final = 6 * 3600.0  # a bigger published interval would hide a dead server
CRITICAL_FACTOR: Final = 4  # stale for 4x its limit: critical (for an expected server)

MAX_SERVERS: Final = MAX_ROSTER_SERVERS  # servers shown; more ids (say, from a mailbox full of typos) are counted

# Lengths of text from other machines that any output shows.
MAX_SUBJECT_CHARS: Final = 120
MAX_ACTIVITY_CHARS: Final = 60
MAX_SHORT_CHARS: Final = 40  # suite version, breaker state, timestamps

CHART_DAYS: Final = 14
THREADS_SHOWN: Final = 15
MAX_THREAD_HOPS: Final = 64  # in_reply_to links followed to find a thread's root
MAX_PARTICIPANTS_SHOWN: Final = 8
PAGE_REFRESH_SECONDS: Final = 60  # the page reloads itself (no script: a meta refresh)
PAGE_MODE: Final = 0o644  # the temporary file the page is written through is private (0600)

_DURATION_RE: Final = LazyPattern(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|secs|m|min|mins|h|hr|hrs|d|days?)?\s*$",
                                  re.IGNORECASE)  # compiled when a duration is given
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# --------------------------------------------------------------------------- small helpers


def parse_duration(text: str) -> float:
    """Seconds in ``90``, ``90s``, ``15m``, ``4h``, ``2d``; :class:`UsageError` otherwise."""
    m = _DURATION_RE.match(str(text))
    if not m:
        raise UsageError(f"invalid duration {text!r}: use a number with s, m, h or d (15m, 4h)")
    value = float(m.group(1)) * _UNIT_SECONDS[(m.group(2) or "s")[0].lower()]
    if not 0 < value < math.inf:
        raise UsageError(f"invalid duration {text!r}: must be more than zero and finite")
    return value


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def short_age(seconds: Optional[float]) -> str:
    """``12s``, ``47m``, ``5.0h``, ``3.2d``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _text(value: Any, limit: int) -> Optional[str]:
    """A string from another machine, cut to ``limit`` characters (``…`` when cut), every control
    character shown as an inert escape (:func:`fleet_cli.sanitize`: an ESC from mail can never
    drive a terminal)."""
    if not isinstance(value, str):
        return None
    return sanitize(value[:limit + 1], max_len=limit)


def _count(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10 ** 12 else None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _worst(levels: Sequence[str]) -> str:
    return max(levels, key=lambda level: _RANK[level], default=OK)


# --------------------------------------------------------------------------- the roster


# --------------------------------------------------------------------------- one look at the remote


class Snapshot:
    """What one look at the remote found: the tip, the hot mailbox, the roster, every state."""

    __slots__ = ("branch", "tip", "mailbox", "roster", "states", "state_servers", "problems")

    def __init__(self, branch: str) -> None:
        self.branch = branch
        self.tip: Optional[str] = None
        self.mailbox: Dict[str, Any] = {"messages": []}
        self.roster = Roster()
        self.states: Dict[str, ServerState] = {}
        self.state_servers: List[str] = []
        self.problems: List[Tuple[str, str]] = []  # (level, one line)


def parse_mailbox(raw: Optional[bytes]) -> Dict[str, Any]:
    """The hot mailbox within bounds (size, depth, digits); :class:`BadInput` when it breaks one.

    Parsed by :func:`fleet_mailbox.parse_document`, the mailbox format's one reader; a
    :class:`fleet_mailbox.Document`, which remembers which entries are valid.
    """
    try:
        return Document(messages=parse_document(raw)["messages"])
    except MailboxCorrupt as exc:
        raise BadInput(f"{MAILBOX_PATH}: {exc.reason}") from None


def take_snapshot(clone: Clone) -> Snapshot:
    """One fetch of the branch and every state ref; the mailbox and the roster read as soon as the
    branch is in (the state refs' fetch may still run), then every state file.

    The mailbox and the roster are read as every reader reads them (:func:`read_mailbox`): a
    missing object is an error, never an empty mailbox. The state files are read in one batch
    rather than by :meth:`StateStore.read` one server at a time: after a fetch of many refs their
    objects are packed, and a ``cat-file`` process per server would cost more than the rest of the
    look. The merge of a server's two ref names and the handling of a state that breaks a bound
    are the same as there.
    """
    store = StateStore(clone)
    snap = Snapshot(clone.branch)
    early: Dict[str, Tuple[str, str, bytes]] = {}  # state files read while the fetch runs
    parsed: Dict[Tuple[str, str], Any] = {}  # and parsed: (spec, server) -> ServerState or BadInput

    def unmoved(mirrors: Mapping[str, str]) -> None:
        early.update(clone.read_objects_within(sorted({f"{oid}:{STATE_FILE}" for oid in mirrors.values()}),
                                               MAX_STATE_BYTES)[0])
        for local, oid in mirrors.items():
            key = (f"{oid}:{STATE_FILE}", local.rpartition("/")[2])
            item = early.get(key[0])
            if item is not None and item[1] == "blob" and key not in parsed:
                parsed[key] = _parsed_state(item[2], key[1])

    store.mirror_fleet(meanwhile=lambda tip: _read_branch(clone, tip, snap), unmoved=unmoved)
    mirrors = store.mirrored(mirrors=store.after_look)
    if store.left_out:  # past the bound: the roster's servers first, then those the mailbox names
        roster, mail = set(snap.roster.servers), known_servers(snap.mailbox)
        store.fetch_named(roster, mail)  # where refs are fetched by name, a crowd must not hide these
        mirrors = store.mirrored(first=roster, then=mail)
        held = len(set(mirrors.values())) + store.left_out
        snap.problems.append((WARNING, f"the remote holds the state refs of {held} servers; {store.left_out} "
                                       "of them are not read (the roster's first, then those the mailbox names)"))
    snap.state_servers = sorted(set(mirrors.values()))
    # By the ids the mirrors held when listed (loose objects are read without a process; two
    # refs may hold one commit).
    wanted = [(f"{store.tips[local]}:{STATE_FILE}", server) for local, server in sorted(mirrors.items())]
    found = _read_states(clone, [item for item in wanted if item[0] not in early], snap)
    found.update(early)
    for (spec, server), local in zip(wanted, sorted(mirrors)):
        state = snap.states.setdefault(server, ServerState(server))
        item = found.get(spec)
        if item is None or item[1] != "blob":
            continue
        read = parsed.get((spec, server)) or _parsed_state(item[2], server)
        if isinstance(read, BadInput):
            snap.problems.append((WARNING, f"state ref of {server} ignored: {read}"))
        else:
            state.merge(read, retirement=takes_retirement(local, mirrors))
    return snap


def _parsed_state(raw: bytes, server: str) -> Union[ServerState, BadInput]:
    """A state file as :meth:`ServerState.from_bytes` reads it, or why it cannot be read."""
    try:
        return ServerState.from_bytes(raw, server)
    except BadInput as exc:
        return exc


def _read_branch(clone: Clone, tip: Optional[str], snap: Snapshot) -> None:
    """The mailbox and the roster at the branch's ``tip`` (while the state refs may still come)."""
    snap.tip = tip
    if tip is None:
        snap.problems.append((WARNING, f"the branch {clone.branch} does not exist on the remote"))
    if tip:
        try:
            snap.mailbox = parse_mailbox(read_mailbox(clone, tip)[1])
        except MailboxCorrupt as exc:  # a folder there, or more than the suite reads
            snap.problems.append((CRITICAL, f"{exc} (sends queue until message_monitor.py --repair)"))
        except BadInput as exc:
            snap.problems.append((CRITICAL, f"{exc} (sends queue until message_monitor.py --repair)"))
        snap.roster = read_roster(clone, tip)
        if snap.roster.problem:
            snap.problems.append((WARNING, snap.roster.problem))


def _read_states(clone: Clone, wanted: Sequence[Tuple[str, str]], snap: Snapshot) -> Dict[str, Any]:
    """What ``cat-file`` gives for each (state file spec, server); one over the bound is left
    out, with a warning (one server's state cannot stop the look)."""
    found, left_out = clone.read_objects_within(sorted({spec for spec, _ in wanted}), MAX_STATE_BYTES)
    for spec, server in wanted:
        if spec in left_out:
            snap.states.setdefault(server, ServerState(server))
            snap.problems.append((WARNING, f"state ref of {server} ignored: {left_out[spec].reason}"))
    return found


# --------------------------------------------------------------------------- the report


class _Mail:
    """Per-server counters over the hot mailbox."""

    __slots__ = ("unread", "oldest_unread", "acks", "oldest_ack", "last_sent", "per_day")

    def __init__(self) -> None:
        self.unread = 0
        self.oldest_unread: Optional[Tuple[Optional[_dt.datetime], Dict[str, Any]]] = None
        self.acks = 0
        self.oldest_ack: Optional[Tuple[Optional[_dt.datetime], Dict[str, Any]]] = None
        self.last_sent: Optional[_dt.datetime] = None
        self.per_day = [0] * CHART_DAYS


def _older(candidate: Tuple[Optional[_dt.datetime], Dict[str, Any]],
           kept: Optional[Tuple[Optional[_dt.datetime], Dict[str, Any]]]) -> bool:
    """Whether ``candidate`` is older than ``kept`` (no readable timestamp counts as oldest)."""
    if kept is None:
        return True
    if kept[0] is None:
        return False
    return candidate[0] is None or candidate[0] < kept[0]


def _age_of(moment: Optional[_dt.datetime], now: _dt.datetime) -> Optional[float]:
    return None if moment is None else max(0.0, (now - moment).total_seconds())


def _stamp(moment: Optional[_dt.datetime]) -> Optional[str]:
    return iso_utc(moment) if moment is not None else None


def _oldest_entry(item: Optional[Tuple[Optional[_dt.datetime], Dict[str, Any]]],
                  now: _dt.datetime) -> Optional[Dict[str, Any]]:
    if item is None:
        return None
    when, msg = item
    return {"id": _text(msg.get("id"), MAX_ID_CHARS), "from": _text(msg.get("from"), MAX_SHORT_CHARS * 2),
            "subject": _text(msg.get("subject"), MAX_SUBJECT_CHARS) or "",
            "timestamp": _stamp(when), "age_seconds": _age_of(when, now)}


def presence_summary(state: Optional[ServerState], now: _dt.datetime) -> Optional[Dict[str, Any]]:
    """The published presence, each value bounded and typed; ``None`` when there is none."""
    presence = state.presence if state is not None else None
    if not isinstance(presence, dict):
        return None
    when = parse_timestamp(presence.get("timestamp"))
    if when is None:
        return None
    queue = presence.get("queue") if isinstance(presence.get("queue"), dict) else {}
    system = presence.get("system") if isinstance(presence.get("system"), dict) else {}
    interval = _number(presence.get("interval"))
    period = _number(presence.get("period"))
    healthy = presence.get("healthy")
    return {
        "timestamp": iso_utc(when),
        "age_seconds": _age_of(when, now),
        "started": _stamp(parse_timestamp(presence.get("started"))),
        "activity": _text(presence.get("activity"), MAX_ACTIVITY_CHARS),
        "healthy": healthy if isinstance(healthy, bool) else None,
        "suite_version": _text(presence.get("suite_version"), MAX_SHORT_CHARS),
        "queue": {"pending": _count(queue.get("pending")), "dead": _count(queue.get("dead"))},
        "breaker": _text(presence.get("breaker"), MAX_SHORT_CHARS),
        "interval": interval if interval is not None and interval > 0 else None,
        "period": period if period is not None and period > 0 else None,
        "system": {key: _number(system.get(key)) for key in ("cpu_usage", "memory_used_gb", "disk_free_gb")},
    }


def _seconds_ahead(seen: Optional[Dict[str, Any]], now: _dt.datetime) -> float:
    when = parse_timestamp(seen.get("timestamp")) if seen else None
    return 0.0 if when is None else (when - now).total_seconds()


def stale_limit(presence: Optional[Dict[str, Any]], stale_after: float) -> float:
    """``max(--stale-after, 3 x the server's own interval, 3 x its presence period)`` (a
    summary's, :func:`presence_summary`), each believed up to 6 h: a monitor publishes presence
    every period (``--heartbeat-minutes``), so three missed ones make it stale."""
    published = [presence.get(key) for key in ("interval", "period")] if presence else []
    return max([stale_after] + [STALE_INTERVALS * min(value, MAX_BELIEVED_INTERVAL) for value in published if value])


def _collect_servers(snap: Snapshot, messages: Sequence[Dict[str, Any]],
                     named_in: Sequence[Optional[Set[str]]]) -> Tuple[Dict[str, Set[str]], int]:
    """Every server id with where it was seen (``roster``, ``state`` ref, mail as ``sender`` or
    ``recipient``), at most MAX_SERVERS: the roster's first, then those with a state ref that
    mail names (:func:`known_servers`), those that sent mail, the other state refs, and the ids
    mail is only sent to (a crowd of state refs, or one message naming hundreds of ids, cannot
    push a real server out). ``named_in``: each message's :func:`recipients`."""
    found: Dict[str, Set[str]] = {}
    extra: Set[str] = set()

    def add(server: str, source: str) -> None:
        if server in found:
            found[server].add(source)
        elif len(found) < MAX_SERVERS:
            found[server] = {source}
        else:
            extra.add(server)

    senders: Dict[str, None] = {}  # ordered sets
    named: Dict[str, None] = {}
    for msg, rcpt in zip(messages, named_in):
        sender = msg["from"].lower()
        if is_valid_server_id(sender):
            senders.setdefault(sender)
        for server in sorted(rcpt or ()):
            named.setdefault(server)
    for server in snap.roster.servers:
        add(server, "roster")
    # Which of them come first matters only when they are more than are shown.
    crowded = len(set(snap.roster.servers).union(snap.state_servers, senders, named)) > MAX_SERVERS
    mail_named = known_servers(snap.mailbox) if crowded and snap.state_servers else set()
    for server in snap.state_servers:
        if server in mail_named:
            add(server, "state")
    for server in senders:
        add(server, "sender")
    for server in snap.state_servers:
        add(server, "state")
    for server in named:
        add(server, "recipient")
    return found, len(extra)


def _thread_roots(messages: Sequence[Dict[str, Any]]) -> List[str]:
    """Each message's thread root: the first id up its ``in_reply_to`` chain (bounded, cycle-safe)
    that has no parent in the hot mailbox (an archived original is the root of its replies)."""
    parent: Dict[str, Optional[str]] = {}
    for msg in messages:
        link = msg.get("in_reply_to")
        parent.setdefault(msg["id"], link if isinstance(link, str) and 0 < len(link) <= MAX_ID_CHARS else None)
    memo: Dict[str, str] = {}
    roots = []
    for msg in messages:
        seen: List[str] = []
        current = msg["id"]
        while current not in memo and len(seen) < MAX_THREAD_HOPS:
            seen.append(current)
            following = parent.get(current)
            if following is None or following in seen:
                break
            current = following
        root = memo.get(current, current)
        for item in seen:
            memo[item] = root
        roots.append(root)
    return roots


def build_report(snap: Snapshot, *, stale_after: float = DEFAULT_STALE_AFTER,
                 unread_after: float = DEFAULT_UNREAD_AFTER,
                 now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """The whole picture as a JSON-ready dict (see the module docstring for the levels)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    valid_pairs, invalid = split_entries(snap.mailbox)
    messages = [msg for _, msg in valid_pairs]
    times = [message_time(msg) for msg in messages]
    named_in = [recipients(msg) for msg in messages]
    servers, overflow = _collect_servers(snap, messages, named_in)
    problems = list(snap.problems)
    if overflow:
        problems.append((WARNING, f"{overflow} more server ids (from state refs and the mailbox) not shown; "
                                  f"at most {MAX_SERVERS} are"))
    mail = {server: _Mail() for server in servers}
    retired = _retired(snap.states, servers)
    unread_by = _count_mail(snap, messages, times, named_in, servers, mail, now.date(), retired)
    presence = {server: presence_summary(snap.states.get(server), now) for server in servers}
    for server, seen in sorted(presence.items()):
        ahead = _seconds_ahead(seen, now)
        if ahead > CLOCK_SKEW_TOLERANCE:  # live however long ago it stopped, until then
            problems.append((WARNING, f"{server}'s presence is stamped {format_duration(ahead)} ahead of this "
                                      "machine's clock: one of the two clocks is wrong"))
    # Expected servers: the roster's, else every server that has published presence.
    expected = set(snap.roster.servers) if snap.roster.servers else {
        server for server, seen in presence.items() if seen is not None}
    rows = [_server_row(server, servers[server], presence[server], snap.roster, mail[server],
                        server in expected, stale_after, unread_after, now, retired.get(server))
            for server in servers]
    rows.sort(key=_urgency)
    level = _worst([r["level"] for r in rows] + [p[0] for p in problems])
    report: Dict[str, Any] = {
        "version": REPORT_VERSION,
        "generated": iso_utc(now),
        "branch": snap.branch,
        "tip": snap.tip,
        "status": level,
        "exit_code": _EXIT_FOR[level],
        "thresholds": {"stale_after_seconds": stale_after, "unread_after_seconds": unread_after,
                       "stale_intervals": STALE_INTERVALS, "critical_factor": CRITICAL_FACTOR},
        "roster": snap.roster.to_dict(),
        "counts": _state_counts(rows),
        "messages": {"hot": len(messages), "invalid": len(invalid)},
        "servers": rows,
        "waited_on": _waited_on(rows),
        "stale": [{"server": r["id"], "age_seconds": r["presence"]["age_seconds"],
                   "limit_seconds": r["stale_limit"]} for r in rows if r["state"] == STALE],
        "problems": [{"level": lvl, "text": text} for lvl, text in problems],
        "chart": _chart_data(mail, now.date()),
        "threads": _threads(messages, times, unread_by, now),
    }
    report["summary"] = summary_line(report)
    return report


def _count_mail(snap: Snapshot, messages: List[Dict[str, Any]], times: Sequence[Optional[_dt.datetime]],
                named_in: Sequence[Optional[Set[str]]], servers: Mapping[str, Set[str]],
                mail: Dict[str, _Mail], today: _dt.date, retired: Mapping[str, str]) -> List[List[str]]:
    """Fill each server's counters from the hot mailbox (each message's time and
    :func:`recipients` given); returns, per message, who has not read it yet."""
    # A broadcast waits for every server that runs (roster, state ref, or mail it sent), not for
    # ids that only appear as a recipient (a typo reads nothing), nor for a retired server: this
    # also bounds what one broadcast costs when a mailbox names hundreds of made-up servers.
    everyone = [server for server, seen in servers.items() if seen != {"recipient"} and server not in retired]
    unread_by: List[List[str]] = []
    for msg, when, rcpt in zip(messages, times, named_in):
        _count_sent(mail.get(msg["from"].lower()), when, today)
        waiting: List[str] = []
        for server in (everyone if rcpt is None else sorted(rcpt)):
            counters = mail.get(server)
            if counters is not None and is_addressed_to(msg, server, rcpt) \
                    and _count_received(counters, server, (when, msg), snap.states):
                waiting.append(server)
        unread_by.append(waiting)
    return unread_by


def _retired(states: Mapping[str, ServerState], servers: Iterable[str]) -> Dict[str, str]:
    """server -> when it retired, for the servers that have (:meth:`ServerState.is_retired`)."""
    found = {}
    for server in servers:
        state = states.get(server)
        if state is not None and state.retired and state.is_retired():
            found[server] = state.retired["at"] or ""
    return found


def _count_sent(counters: Optional[_Mail], when: Optional[_dt.datetime], today: _dt.date) -> None:
    if counters is None or when is None:
        return
    if counters.last_sent is None or when > counters.last_sent:
        counters.last_sent = when
    day = (today - when.date()).days
    if 0 <= day < CHART_DAYS:
        counters.per_day[CHART_DAYS - 1 - day] += 1


def _count_received(counters: _Mail, server: str, item: Tuple[Optional[_dt.datetime], Dict[str, Any]],
                    states: Mapping[str, ServerState]) -> bool:
    """Count a message addressed to ``server``: unread, acknowledgement owed. True when unread."""
    msg = item[1]
    unread = not has_read(msg, server, states)
    if unread:
        counters.unread += 1
        if _older(item, counters.oldest_unread):
            counters.oldest_unread = item
    if flag(msg.get("ack_required")) and not has_acknowledged(msg, server, states):
        counters.acks += 1
        if _older(item, counters.oldest_ack):
            counters.oldest_ack = item
    return unread


def _state_counts(rows: List[Dict[str, Any]]) -> Dict[str, int]:
    counts = {"servers": len(rows), LIVE: 0, STALE: 0, "never_seen": 0, RETIRED: 0}
    for row in rows:
        counts["never_seen" if row["state"] == NEVER_SEEN else row["state"]] += 1
    return counts


def _waited_on(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The servers whose unread mail or owed acknowledgements are overdue."""
    return [{"server": r["id"], "unread": r["unread"]["count"], "unread_overdue": r["unread"]["overdue"],
             "oldest": r["unread"]["oldest"], "acks_owed": r["acks_owed"]["count"],
             "acks_overdue": r["acks_owed"]["overdue"]}
            for r in rows if r["unread"]["overdue"] or r["acks_owed"]["overdue"]]


def _chart_data(mail: Mapping[str, _Mail], today: _dt.date) -> Dict[str, Any]:
    return {"days": [(today - _dt.timedelta(days=CHART_DAYS - 1 - i)).isoformat() for i in range(CHART_DAYS)],
            "totals": [sum(m.per_day[i] for m in mail.values()) for i in range(CHART_DAYS)]}


_STATE_ORDER: Final = {NEVER_SEEN: 0, STALE: 1, LIVE: 2, RETIRED: 3}


def _urgency(row: Mapping[str, Any]) -> Tuple[int, int, float, str]:
    """Most urgent first: by level, then never seen before stale before live, then the oldest
    unread mail (none counts as new, unreadable timestamps as oldest), then by name."""
    oldest = row["unread"]["oldest"]
    age = 0.0 if oldest is None else (math.inf if oldest["age_seconds"] is None else oldest["age_seconds"])
    return (-_RANK[row["level"]], _STATE_ORDER[row["state"]], -age, row["id"])


def _server_row(server: str, sources: Set[str], presence: Optional[Dict[str, Any]], roster: Roster,
                counters: _Mail, is_expected: bool, stale_after: float, unread_after: float,
                now: _dt.datetime, retired: Optional[str] = None) -> Dict[str, Any]:
    limit = stale_limit(presence, stale_after)
    reasons: List[Tuple[str, str]] = []
    if retired is not None:  # nobody waits for it: its mail and acks are shown, never overdue
        state = RETIRED
        if server in roster.servers:
            reasons.append((WARNING, "retired, still in the roster"))
    elif presence is None:
        state = NEVER_SEEN
        if is_expected:
            reasons.append((CRITICAL, "in the roster, never seen"))
        else:
            reasons.append((WARNING, "never seen (no presence published)"))
    else:
        age = presence["age_seconds"]
        state = LIVE if age <= limit else STALE
        if state == STALE:
            critical = is_expected and age > CRITICAL_FACTOR * limit
            reasons.append((CRITICAL if critical else WARNING,
                            f"stale: last seen {short_age(age)} ago (limit {short_age(limit)})"))
        if presence["healthy"] is False:
            reasons.append((WARNING, "reports itself unhealthy"))
    unread = _oldest_entry(counters.oldest_unread, now)
    unread_overdue = retired is None and unread is not None and (
        unread["age_seconds"] is None or unread["age_seconds"] > unread_after)
    if unread_overdue:
        reasons.append((WARNING, f"{counters.unread} unread, oldest {short_age(unread['age_seconds'])}"))
    ack = _oldest_entry(counters.oldest_ack, now)
    ack_overdue = retired is None and ack is not None and (
        ack["age_seconds"] is None or ack["age_seconds"] > unread_after)
    if ack_overdue:
        reasons.append((WARNING, f"owes {counters.acks} acknowledgement(s), oldest {short_age(ack['age_seconds'])}"))
    return {
        "id": server,
        "description": _text(roster.servers.get(server), MAX_DESCRIPTION_CHARS),
        "in_roster": server in roster.servers,
        "seen_in": sorted(sources),
        "state": state,
        "retired": retired,
        "level": _worst([r[0] for r in reasons]),
        "reasons": [text for _lvl, text in reasons],
        "stale_limit": limit,
        "presence": presence,
        "unread": {"count": counters.unread, "overdue": unread_overdue, "oldest": unread},
        "acks_owed": {"count": counters.acks, "overdue": ack_overdue, "oldest": ack},
        "last_sent": _stamp(counters.last_sent),
        "last_sent_age_seconds": _age_of(counters.last_sent, now),
        "sent_per_day": counters.per_day,
    }


def _threads(messages: Sequence[Dict[str, Any]], times: Sequence[Optional[_dt.datetime]],
             unread_by: Sequence[Sequence[str]], now: _dt.datetime) -> List[Dict[str, Any]]:
    """The latest threads: subject, size, last activity, who took part, who has not read it."""
    roots = _thread_roots(messages)
    by_root: Dict[str, Dict[str, Any]] = {}
    for msg, when, root, waiting in zip(messages, times, roots, unread_by):
        thread = by_root.get(root)
        if thread is None:
            thread = by_root[root] = {"root": root, "subject": None, "first_subject": msg.get("subject"),
                                      "messages": 0, "last": None, "last_from": None,
                                      "participants": set(), "unread_by": set()}
        thread["messages"] += 1
        if msg["id"] == root and thread["subject"] is None:
            thread["subject"] = msg.get("subject")
        if thread["last"] is None or (when is not None and when >= thread["last"]):
            thread["last"] = when
            thread["last_from"] = msg["from"]
        thread["participants"].add(msg["from"].lower()[:MAX_SHORT_CHARS * 2])
        thread["unread_by"].update(waiting)
    epoch = _dt.datetime.min.replace(tzinfo=_dt.timezone.utc)
    latest = sorted(by_root.values(), key=lambda t: t["last"] or epoch, reverse=True)[:THREADS_SHOWN]
    out = []
    for t in latest:
        subject = strip_reply_prefixes(t["subject"] if t["subject"] is not None else t["first_subject"])
        people = sorted(t["participants"])
        out.append({
            "root": _text(t["root"], MAX_ID_CHARS),
            "subject": _text(subject, MAX_SUBJECT_CHARS) or "(no subject)",
            "messages": t["messages"],
            "last": _stamp(t["last"]),
            "last_age_seconds": _age_of(t["last"], now),
            "last_from": _text(t["last_from"], MAX_SHORT_CHARS * 2),
            "participants": [_text(p, MAX_SHORT_CHARS * 2) for p in people[:MAX_PARTICIPANTS_SHOWN]],
            "more_participants": max(0, len(people) - MAX_PARTICIPANTS_SHOWN),
            "unread_by": sorted(t["unread_by"]),
        })
    return out


def summary_line(report: Mapping[str, Any]) -> str:
    """The Nagios status line: ``FLEET WARNING - 5 servers: 3 live, 1 stale, 1 never seen; ...``."""
    c = report["counts"]
    parts = [f"{c['servers']} servers: {c[LIVE]} live, {c[STALE]} stale, {c['never_seen']} never seen"
             + (f", {c[RETIRED]} retired" if c[RETIRED] else "")]
    if report["waited_on"]:
        parts.append("waited on: " + ", ".join(w["server"] for w in report["waited_on"][:10]))
    critical = [r["id"] for r in report["servers"] if r["level"] == CRITICAL]
    if critical:
        parts.append("critical: " + ", ".join(critical[:10]))
    problems = [p["text"] for p in report["problems"]]
    if problems:
        parts.append(problems[0] + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    return f"FLEET {report['status'].upper()} - " + "; ".join(parts)


def fleet_status(clone: Clone, *, stale_after: float = DEFAULT_STALE_AFTER,
                 unread_after: float = DEFAULT_UNREAD_AFTER,
                 now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """One look at the remote, as a report. Raises :class:`RemoteUnavailable` (or another
    :class:`GitError`) when the remote or the clone cannot be read."""
    return build_report(take_snapshot(clone), stale_after=stale_after, unread_after=unread_after, now=now)


# --------------------------------------------------------------------------- terminal


_COLUMNS: Final = ("SERVER", "STATE", "SEEN", "DOING", "HEALTH", "VERSION", "QUEUE", "BREAKER",
                   "UNREAD", "OLDEST", "ACKS", "SENT", "SUBJECT")  # the oldest unread's
_DOING_WIDTH: Final = 18
_MIN_SUBJECT_WIDTH: Final = 16


def _cells(row: Mapping[str, Any]) -> List[str]:
    p = row["presence"] or {}
    queue = p.get("queue") or {}
    pending, dead = queue.get("pending"), queue.get("dead")
    health = {True: "ok", False: "BAD"}.get(p.get("healthy"), "-")
    oldest = row["unread"]["oldest"]
    return [
        row["id"], row["state"], short_age(p["age_seconds"]) if p else "-",
        (p.get("activity") or "-")[:_DOING_WIDTH], health, p.get("suite_version") or "-",
        f"{pending if pending is not None else '?'}/{dead if dead is not None else '?'}" if p else "-",
        p.get("breaker") or "-",
        str(row["unread"]["count"]), short_age(oldest["age_seconds"]) if oldest else "-",
        str(row["acks_owed"]["count"]),
        short_age(row["last_sent_age_seconds"]) if row["last_sent"] else "-",
        oldest["subject"] if oldest else "",
    ]


def render_terminal(report: Mapping[str, Any], *, color: bool = False, width: int = 120) -> str:
    """The status line, one aligned row per server (most urgent first), then who is waited on."""
    styles: Dict[str, str] = {}
    if color:
        from fleet_cli import level_styles

        levels = level_styles()
        styles = {OK: levels["INFO"], WARNING: levels["WARNING"], CRITICAL: levels["CRITICAL"],
                  "reset": levels["RESET"]}

    def paint(text: str, level: str) -> str:
        return f"{styles[level]}{text}{styles['reset']}" if styles else text

    tip = (report.get("tip") or "no tip")[:12]
    lines = [paint(report["summary"], report["status"]),
             f"branch {report['branch']} at {tip}, {report['generated']}; stale after "
             f"{short_age(report['thresholds']['stale_after_seconds'])}, unread after "
             f"{short_age(report['thresholds']['unread_after_seconds'])}", ""]
    lines.extend(_terminal_table(report["servers"], paint, width))
    if report["waited_on"] or report["stale"] or report["problems"]:
        lines.append("")
    lines.extend(_waited_on_line(item) for item in report["waited_on"])
    for item in report["stale"]:
        lines.append(f"stale: {item['server']}: last seen {short_age(item['age_seconds'])} ago "
                     f"(limit {short_age(item['limit_seconds'])})")
    for problem in report["problems"]:
        lines.append(paint(f"{problem['level']}: {problem['text']}", problem["level"]))
    return "\n".join(lines)


def _terminal_table(servers: Sequence[Mapping[str, Any]], paint: Callable[[str, str], str],
                    width: int) -> List[str]:
    """The header and one aligned row per server, the subject cut to the room left."""
    table = [list(_COLUMNS)] + [_cells(row) for row in servers]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS) - 1)]
    room = max(_MIN_SUBJECT_WIDTH, width - sum(w + 2 for w in widths))
    lines = []
    for index, cells in enumerate(table):
        subject = cells[-1] if len(cells[-1]) <= room else cells[-1][:room - 1] + "\u2026"
        text = ("  ".join(c.ljust(w) for c, w in zip(cells, widths)) + "  " + subject).rstrip()
        level = servers[index - 1]["level"] if index else OK
        lines.append(paint(text, level) if level != OK else text)
    return lines


def _waited_on_line(item: Mapping[str, Any]) -> str:
    what = []
    if item["unread"]:
        oldest = item["oldest"] or {}
        what.append(f"{item['unread']} unread, oldest {short_age(oldest.get('age_seconds'))} "
                    f"\"{oldest.get('subject', '')}\" from {oldest.get('from')}")
    if item["acks_owed"]:
        what.append(f"{item['acks_owed']} acknowledgement(s) owed")
    return f"waited on: {item['server']}: " + "; ".join(what)


# --------------------------------------------------------------------------- HTML

_CSS: Final = (
    "body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;background:#f4f5f7;"
    "color:#1d2430}header,main{max-width:1200px;margin:0 auto;padding:12px 20px}"
    "h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:22px 0 8px}h3{font-size:16px;margin:0}"
    ".b{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-size:13px;"
    "vertical-align:middle}.b.ok{background:#2e7d32}.b.warning{background:#b26a00}"
    ".b.critical{background:#c62828}.meta{color:#5b6472;margin:0}"
    ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}"
    ".c{background:#fff;border-radius:6px;padding:10px 12px;border-left:6px solid #2e7d32;"
    "box-shadow:0 1px 2px rgba(0,0,0,.08)}.c.warning{border-color:#e69500}"
    ".c.critical{border-color:#c62828}.st{font-weight:600;margin:2px 0}.st.live{color:#2e7d32}"
    ".st.stale{color:#b26a00}.st.never{color:#c62828}.st.retired{color:#5b6472}"
    ".d{color:#5b6472;margin:2px 0;font-size:13px}"
    "dl{display:grid;grid-template-columns:auto 1fr;gap:1px 8px;margin:6px 0;font-size:13px}"
    "dt{color:#5b6472}dd{margin:0;overflow-wrap:anywhere}.r{color:#b26a00;font-size:13px;margin:4px 0}"
    ".c.critical .r{color:#c62828}svg{display:block}.bar{fill:#5c7cfa}.base{fill:#ccd}"
    "table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}"
    "th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e3e5e8;vertical-align:top}"
    "th{background:#eceef1}td.s{overflow-wrap:anywhere}.u{color:#b26a00;font-weight:600}"
    "ul.p{margin:4px 0;padding-left:18px}li.warning{color:#8a5300}li.critical{color:#c62828}"
    "footer{color:#5b6472;font-size:12px;max-width:1200px;margin:10px auto 20px;padding:0 20px}"
)
_CSP: Final = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_SPARK_BAR: Final = 9  # px per day in a card's chart (bar + gap)
_SPARK_HEIGHT: Final = 28
_CHART_BAR: Final = 44
_CHART_HEIGHT: Final = 120


def _e(value: Any) -> str:
    """Escaped text for HTML (element content and quoted attributes alike)."""
    import html

    return html.escape("" if value is None else str(value), quote=True)


def _ago(seconds: Optional[float]) -> str:
    return "time unknown" if seconds is None else f"{short_age(seconds)} ago"


def _sparkline(counts: Sequence[int], top: int, days: Sequence[str]) -> str:
    width = _SPARK_BAR * len(counts)
    bars = []
    for i, n in enumerate(counts):
        if n:
            h = max(1, round(n * (_SPARK_HEIGHT - 2) / top))
            bars.append(f'<rect class="bar" x="{i * _SPARK_BAR}" y="{_SPARK_HEIGHT - 1 - h}" '
                        f'width="{_SPARK_BAR - 2}" height="{h}"/>')
    label = f"messages sent per day, {days[0]} to {days[-1]}: {', '.join(str(n) for n in counts)}"
    return (f'<svg width="{width}" height="{_SPARK_HEIGHT}" viewBox="0 0 {width} {_SPARK_HEIGHT}" '
            f'role="img" aria-label="{_e(label)}"><title>{_e(label)}</title>{"".join(bars)}'
            f'<rect class="base" x="0" y="{_SPARK_HEIGHT - 1}" width="{width}" height="1"/></svg>')


def _chart(days: Sequence[str], totals: Sequence[int]) -> str:
    top = max(totals) or 1
    width = _CHART_BAR * len(totals)
    height = _CHART_HEIGHT + 34
    parts = []
    for i, (day, n) in enumerate(zip(days, totals)):
        x = i * _CHART_BAR
        h = round(n * (_CHART_HEIGHT - 16) / top)
        parts.append(f'<rect class="bar" x="{x + 6}" y="{_CHART_HEIGHT - h}" width="{_CHART_BAR - 12}" '
                     f'height="{h}"><title>{_e(day)}: {n}</title></rect>'
                     f'<text x="{x + _CHART_BAR // 2}" y="{_CHART_HEIGHT - h - 4}" text-anchor="middle" '
                     f'font-size="11">{n}</text><text x="{x + _CHART_BAR // 2}" y="{_CHART_HEIGHT + 16}" '
                     f'text-anchor="middle" font-size="11" fill="#5b6472">{_e(day[5:])}</text>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="messages sent per day by the whole fleet">{"".join(parts)}'
            f'<rect class="base" x="0" y="{_CHART_HEIGHT}" width="{width}" height="1"/></svg>')


def _card(row: Mapping[str, Any], top: int, days: Sequence[str]) -> str:
    p = row["presence"]
    state_class = {LIVE: "live", STALE: "stale", NEVER_SEEN: "never", RETIRED: "retired"}[row["state"]]
    facts = []
    if p:
        doing = f" ({p['activity']})" if p.get("activity") else ""
        facts.append(("Last seen", f"{_ago(p['age_seconds'])}{doing}"))
        health = {True: "healthy", False: "UNHEALTHY"}.get(p.get("healthy"), "unknown")
        queue = p.get("queue") or {}
        pending, dead = (queue.get(k) for k in ("pending", "dead"))
        facts.append(("Health", f"{health}; version {p.get('suite_version') or '?'}; queue "
                                f"{'?' if pending is None else pending} pending, "
                                f"{'?' if dead is None else dead} dead; breaker {p.get('breaker') or '?'}"))
    else:
        facts.append(("Last seen", "never"))
    unread = row["unread"]
    if unread["count"]:
        oldest = unread["oldest"]
        facts.append(("Unread", f"{unread['count']}, oldest {_ago(oldest['age_seconds'])}: "
                                f"\u201c{oldest['subject']}\u201d from {oldest['from']}"))
    else:
        facts.append(("Unread", "0"))
    facts.append(("Acks owed", str(row["acks_owed"]["count"])))
    facts.append(("Last sent", _ago(row["last_sent_age_seconds"]) if row["last_sent"] else "nothing in the mailbox"))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts)
    dl += f"<dt>Sent, {len(days)} d</dt><dd>{_sparkline(row['sent_per_day'], top, days)}</dd>"
    reasons = "".join(f'<p class="r">{_e(r)}</p>' for r in row["reasons"])
    roster = " \u00b7 in the roster" if row["in_roster"] else ""
    desc = f'<p class="d">{_e(row["description"])}</p>' if row.get("description") else ""
    return (f'<article class="c {row["level"]}"><h3>{_e(row["id"])}</h3>'
            f'<p class="st {state_class}">{_e(row["state"])}{roster}</p>{desc}{reasons}<dl>{dl}</dl></article>')


def render_html(report: Mapping[str, Any]) -> str:
    """One self-contained page: inline CSS and SVG, no script, a CSP that forbids scripts."""
    days = report["chart"]["days"]
    top = max([max(r["sent_per_day"]) for r in report["servers"]] + [1])
    cards = "".join(_card(row, top, days) for row in report["servers"])
    attention = _html_attention(report)
    threads = _html_threads(report["threads"])
    c = report["counts"]
    status = report["status"]
    tip = (report.get("tip") or "no tip")[:12]
    retired = f", {c[RETIRED]} retired" if c[RETIRED] else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="referrer" content="no-referrer">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">'
        f"<title>Fleet status</title><style>{_CSS}</style></head><body>"
        f'<header><h1>Fleet status <span class="b {_e(status)}">{_e(status.upper())}</span></h1>'
        f'<p class="meta">{c["servers"]} servers: {c[LIVE]} live, {c[STALE]} stale, '
        f'{c["never_seen"]} never seen{retired} \u00b7 branch {_e(report["branch"])} at {_e(tip)} \u00b7 '
        f'{report["messages"]["hot"]} messages in the hot mailbox \u00b7 made {_e(report["generated"])}</p>'
        f"</header><main>{attention}<h2>Servers</h2><div class=\"grid\">{cards}</div>"
        f"<h2>Messages sent per day (last {CHART_DAYS} days, hot mailbox)</h2>"
        f"{_chart(days, report['chart']['totals'])}"
        f"<h2>Latest threads</h2>{threads}</main>"
        f"<footer>Made by fleet_status.py at {_e(report['generated'])} from one fetch; nothing is "
        f"committed. Live means presence within max(stale-after "
        f"{_e(short_age(report['thresholds']['stale_after_seconds']))}, {STALE_INTERVALS}x the "
        f"server's interval).</footer></body></html>\n"
    )


def _html_attention(report: Mapping[str, Any]) -> str:
    """The "Needs attention" list: problems, critical servers, who is waited on, who is stale."""
    problems = "".join(f'<li class="{_e(p["level"])}">{_e(p["text"])}</li>' for p in report["problems"])
    waited = "".join(
        f'<li>{_e(w["server"])}: {w["unread"]} unread'
        f'{", oldest " + _e(_ago((w["oldest"] or {}).get("age_seconds"))) if w["oldest"] else ""}'
        f'{"; " + str(w["acks_owed"]) + " acknowledgement(s) owed" if w["acks_owed"] else ""}</li>'
        for w in report["waited_on"])
    stale = "".join(f'<li>{_e(s["server"])}: last seen {_e(_ago(s["age_seconds"]))} '
                    f'(limit {_e(short_age(s["limit_seconds"]))})</li>' for s in report["stale"])
    critical = "".join(f'<li class="critical">{_e(r["id"])}: {_e("; ".join(r["reasons"]))}</li>'
                       for r in report["servers"] if r["level"] == CRITICAL)
    if not (problems or critical or waited or stale):
        return ""
    return ('<h2>Needs attention</h2><ul class="p">' + problems + critical
            + (f"<li>Waited on<ul>{waited}</ul></li>" if waited else "")
            + (f"<li>Stale<ul>{stale}</ul></li>" if stale else "") + "</ul>")


def _html_threads(threads: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in threads:
        unread = (f'<span class="u">unread by {_e(", ".join(t["unread_by"]))}</span>'
                  if t["unread_by"] else "all read")
        people = ", ".join(t["participants"]) + (f" +{t['more_participants']}" if t["more_participants"] else "")
        rows.append(f'<tr><td class="s">{_e(t["subject"])}</td><td>{t["messages"]}</td>'
                    f'<td>{_e(_ago(t["last_age_seconds"]))} from {_e(t["last_from"])}</td>'
                    f'<td class="s">{_e(people)}</td><td>{unread}</td></tr>')
    if not rows:
        return "<p>No mail in the hot mailbox.</p>"
    return ("<table><tr><th>Thread</th><th>Msgs</th><th>Last</th><th>Between</th><th>Unread</th></tr>"
            + "".join(rows) + "</table>")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from fleet_cli import ArgumentParser

    parser = ArgumentParser(
        prog="fleet_status.py",
        description="The fleet at a glance: presence, mail waiting, acknowledgements owed.",
        epilog="Exit codes (Nagios): 0 ok, 1 warning, 2 critical (or bad usage), 3 unknown "
               "(the remote cannot be read), 130 interrupted.",
    )
    parser.add_argument("--repo", default=None, help="fleet clone (default: $BUILD_REPO_PATH or K:/Projects/Build)")
    parser.add_argument("--branch", default=None, help="shared branch (default: the remote's default)")
    parser.add_argument("--stale-after", type=_duration_arg, default=DEFAULT_STALE_AFTER, metavar="DURATION",
                        help="presence older than this is stale (default 15m; at least 3x a server's interval)")
    parser.add_argument("--unread-after", type=_duration_arg, default=DEFAULT_UNREAD_AFTER, metavar="DURATION",
                        help="unread mail or owed acks older than this is a warning (default 4h)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--html", default=None, metavar="FILE", help="write the status page to FILE")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing (the exit code tells)")
    return parser


def _setup_logging() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="fleet_status: %(levelname)s: %(message)s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fleet_cli import run_cli

    args = _parser().parse_args(argv)
    defer_logging_setup(_setup_logging)

    def unknown(exc: BaseException) -> Tuple[int, str]:
        """A look that could not finish is Nagios UNKNOWN (exit 3), not a failure of the fleet:
        the status line on stdout, where Nagios reads it (with ``--json``, as an object)."""
        line = f"FLEET UNKNOWN - cannot read the fleet: {one_line(exc)}"
        if args.json:
            line = json.dumps({"version": REPORT_VERSION, "status": "unknown", "exit_code": EXIT_UNKNOWN,
                               "summary": line}, ensure_ascii=True)
        return EXIT_UNKNOWN, line

    return run_cli("fleet_status", lambda: _look(args), on_failure=unknown,
                   failure_stream=sys.stderr if args.quiet else sys.stdout)


def _look(args: argparse.Namespace) -> int:
    from fleet_common import atomic_write_bytes, write_line

    clone = Clone(args.repo or default_repo_path(), args.branch)
    report = fleet_status(clone, stale_after=args.stale_after, unread_after=args.unread_after)
    if args.html:
        try:
            # Published: readable by a web server's user from the moment it is in place.
            atomic_write_bytes(args.html, render_html(report).encode("utf-8"), mode=PAGE_MODE)
        except OSError as exc:
            write_line(f"FLEET UNKNOWN - cannot write {args.html}: {one_line(exc)}",
                       sys.stderr if args.quiet else sys.stdout)
            return EXIT_UNKNOWN
    if args.json:
        write_line(json.dumps(report, ensure_ascii=True))  # one line: indenting costs a fetch
    elif not args.quiet:
        from fleet_cli import color_wanted, terminal_columns

        write_line(render_terminal(report, color=color_wanted(sys.stdout), width=terminal_columns(120)))
    return int(report["exit_code"])


if __name__ == "__main__":
    raise SystemExit(main())
