"""Archive old mail out of the shared mailbox, and find messages wherever they are.

``coordination/messages.json`` grows with every message; every send and every cycle pays for its
size. An archive pass moves the messages that are done with and older than N days into
``coordination/archive/messages-YYYY-MM.json`` (by the month of their timestamp), by one
PROTOCOL.md transaction that writes the main file and every touched archive file together, so no
commit on the branch ever holds a message twice or loses one.

Done with: a broadcast by age alone; a message to one server or a list once every server it
names has handled it (``read`` for a single recipient, ``read_by``). Entries that are not valid
messages, or whose timestamp does not parse, stay in the main file.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
from typing import Any, Dict, List, Optional, Tuple

from fleet_common import utc_now
from fleet_mailbox import (
    MessageKey,
    entry_problem,
    find_message,
    is_direct,
    message_key,
    message_time,
    parse_document,
    read_mailbox,
    recipients,
    serialize,
)

log = logging.getLogger(__name__)

MAILBOX_PATH = "coordination/messages.json"
ARCHIVE_DIR = "coordination/archive"
_ARCHIVE_NAME = re.compile(r"^messages-(\d{4})-(\d{2})\.json$")
_ID_SECONDS = re.compile(r"^msg_(\d{9,11})_")


def archive_path(moment: _dt.datetime) -> str:
    return f"{ARCHIVE_DIR}/messages-{moment.year:04d}-{moment.month:02d}.json"


def is_done_with(msg: Dict[str, Any]) -> bool:
    """Every addressed server has handled it (a broadcast: always, age decides)."""
    rcpt = recipients(msg)
    if rcpt is None:
        return True
    if not rcpt:
        return True  # addressed to no valid server: nobody will ever handle it
    read_by = {s.lower() for s in msg.get("read_by") or [] if isinstance(s, str)}
    if is_direct(msg) and msg.get("read") is True:
        return True
    return rcpt <= read_by


def plan_archive(data: Dict[str, Any], days: float, now: Optional[_dt.datetime] = None
                 ) -> Tuple[List[Any], Dict[str, List[Dict[str, Any]]]]:
    """(entries that stay, archive path -> messages that move), order kept on both sides."""
    cutoff = (now or utc_now()) - _dt.timedelta(days=days)
    stay: List[Any] = []
    moves: Dict[str, List[Dict[str, Any]]] = {}
    for entry in data.get("messages", []):
        if entry_problem(entry) is not None:
            stay.append(entry)
            continue
        when = message_time(entry)
        if when is None or when >= cutoff or not is_done_with(entry):
            stay.append(entry)
            continue
        moves.setdefault(archive_path(when), []).append(entry)
    return stay, moves


def archive_mailbox(clone: Any, server: str, days: float,
                    now: Optional[_dt.datetime] = None) -> Dict[str, Any]:
    """One archive pass by one transaction; returns counts and a one-line summary."""
    result: Dict[str, Any] = {"archived": 0, "files": []}

    def change(tip: Optional[str]):
        blob, raw = read_mailbox(clone, tip)
        data = parse_document(raw, blob)
        stay, moves = plan_archive(data, days, now)
        if not moves:
            return None
        files: Dict[str, Optional[bytes]] = {}
        moved = 0
        for path, msgs in sorted(moves.items()):
            a_blob, a_raw = read_mailbox(clone, tip, path)
            archive = parse_document(a_raw, a_blob, path=path)  # a corrupt archive file stops the pass
            present = {message_key(m) for m in archive["messages"] if isinstance(m, dict)}
            for msg in msgs:
                if message_key(msg) not in present:  # idempotent: an earlier pass may have landed
                    archive["messages"].append(msg)
                    present.add(message_key(msg))
            moved += len(msgs)
            files[path] = serialize(archive)
        data["messages"] = stay
        files[MAILBOX_PATH] = serialize(data)
        result.update(archived=moved, files=sorted(moves))
        return files, f"{server}: archive {moved} messages older than {days:g} days"

    tx = clone.transact(change, author=server)
    result["commit"] = tx.commit
    if not tx.changed:
        result.update(archived=0, files=[])
    result["summary"] = (f"archived {result['archived']} messages into {', '.join(result['files'])}"
                         if result["archived"] else "nothing to archive")
    return result


def archive_files(clone: Any, tip: Optional[str]) -> List[str]:
    """Archive file paths at ``tip``, newest month first."""
    entries = clone.read_tree(tip, ARCHIVE_DIR)  # an unreadable tree raises: no "no archive"
    names = [e[3] for e in entries or () if e[1] == "blob" and _ARCHIVE_NAME.match(e[3])]
    return [f"{ARCHIVE_DIR}/{n}" for n in sorted(names, reverse=True)]


def find_anywhere(clone: Any, tip: Optional[str], msg_id: str,
                  sender: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """A message by id in the mailbox, else in the archive (the id's month first)."""
    from fleet_mailbox import MailboxCorrupt

    def search(path: str) -> Optional[Dict[str, Any]]:
        try:
            blob, raw = read_mailbox(clone, tip, path)
            if raw is None:
                return None
            return find_message(parse_document(raw, blob, path=path), msg_id, sender)
        except MailboxCorrupt:
            return None

    found = search(MAILBOX_PATH)
    if found is not None:
        return found
    files = archive_files(clone, tip)
    m = _ID_SECONDS.match(msg_id)
    if m:
        guess = archive_path(_dt.datetime.fromtimestamp(int(m.group(1)), _dt.timezone.utc))
        if guess in files:
            files.remove(guess)
            files.insert(0, guess)
    for path in files:
        found = search(path)
        if found is not None:
            return found
    return None


def archived_keys(clone: Any, tip: Optional[str]) -> List[MessageKey]:
    """Every message key in the archive (for tests and audits)."""
    keys: List[MessageKey] = []
    for path in archive_files(clone, tip):
        blob, raw = read_mailbox(clone, tip, path)
        keys.extend(message_key(m) for m in parse_document(raw, blob, path=path)["messages"]
                    if isinstance(m, dict))
    return keys
