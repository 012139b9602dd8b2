"""The shared mailbox, ``coordination/messages.json``: reading, addressing and pure changes.

Contract: PROTOCOL.md ("A message", "Bad input"). A mailbox is kept as the parsed JSON document
itself, so unknown fields, key order and message order survive every change. Changes are pure
functions of a document; they report whether anything changed, which makes every transaction
idempotent. Invalid entries are skipped by readers (with a warning naming their position) and
kept byte-for-byte in meaning by writers.
"""

from __future__ import annotations

import json
import os
import re
import time

from fleet_common import (
    BROADCAST,
    MAX_JSON_DEPTH,
    BadInput,
    SuiteError,
    get_logger,
    is_valid_server_id,
    load_json_bounded,
    parse_timestamp,
)
from fleet_secrets import LazyPattern

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    import datetime as _dt
    from typing import (
        AbstractSet,
        Any,
        Callable,
        Container,
        Dict,
        Final,
        FrozenSet,
        Iterable,
        Iterator,
        List,
        Mapping,
        Optional,
        Set,
        Tuple,
    )

    MessageKey = Tuple[str, str]  # (id, lower-case from): PROTOCOL.md "Identity"

    Plan = Optional[Tuple[Mapping[str, Optional[bytes]], str]]

log = get_logger(__name__)


MESSAGE_TYPES = ("info", "request", "response", "heartbeat", "warning", "update", "ack")
PRIORITIES = ("low", "normal", "high", "urgent")
MAILBOX_PATH: Final = "coordination/messages.json"  # defined here only; fleet_git re-exports it
# Bounds on a mailbox (or archive file) another member wrote (PROTOCOL.md "Trust between
# servers"): a busy fleet's hot mailbox is a few megabytes; a text beyond these is corrupt.
MAX_MAILBOX_BYTES: Final = 128 * 1024 * 1024  # a never-archived 100,000-message mailbox is ~72 MB
# One message as JSON (ASCII-escaped, as the mailbox holds it): every send and every cycle of every
# server pays for the hot mailbox's size, and a log belongs in a file the message names.
MAX_MESSAGE_BYTES: Final = 1024 * 1024


class MailboxCorrupt(SuiteError):
    """The remote ``messages.json`` does not parse; nothing may be written on top of it."""

    def __init__(self, blob: Optional[str], reason: str, *, path: str = MAILBOX_PATH) -> None:
        self.blob = blob
        self.path = path
        self.reason = reason
        hint = "run message_monitor.py --repair" if path == MAILBOX_PATH else "nothing was written"
        super().__init__(f"{path} on the remote does not parse ({reason}); {hint}")


class MailboxFull(SuiteError):
    """A change would write a mailbox (or archive file) larger than every reader reads
    (:data:`MAX_MAILBOX_BYTES`): nothing was written. Pushed, it would stop every server at once
    and leave nothing ``--repair`` could rebuild whole."""

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        super().__init__(f"{path} would grow to {size} bytes, more than the {MAX_MAILBOX_BYTES} every "
                         "reader reads; nothing was written (message_monitor.py --archive-days moves "
                         "old mail out of the mailbox)")


class MailboxTooLarge(MailboxCorrupt):
    """The mailbox is larger than this program reads (:data:`MAX_MAILBOX_BYTES`): it was not read,
    and ``--repair``, which could salvage only part of it, refuses."""


def message_size_problem(msg: Mapping[str, Any]) -> Optional[str]:
    """Why ``msg`` is larger than a message may be (:data:`MAX_MESSAGE_BYTES` as the mailbox holds
    it, JSON with non-ASCII escaped), or ``None``."""
    size = len(json.dumps(msg, ensure_ascii=True))
    if size <= MAX_MESSAGE_BYTES:
        return None
    return f"the message is {size} bytes as JSON, more than the {MAX_MESSAGE_BYTES} a message may be"


def new_message_id(now: Optional[float] = None) -> str:
    """``msg_<unix seconds>_<12 hex from os.urandom>``: unique even for senders in the same second."""
    return f"msg_{int(now if now is not None else time.time())}_{os.urandom(6).hex()}"


def message_key(msg: Mapping[str, Any]) -> MessageKey:
    return (str(msg.get("id")), str(msg.get("from", "")).lower())


def key_str(key: MessageKey) -> str:
    """A message key as one string (for JSON state files)."""
    return f"{key[1]}\x1f{key[0]}"


def key_from_str(text: str) -> MessageKey:
    sender, _, mid = text.partition("\x1f")
    return (mid, sender)


# --------------------------------------------------------------------------- parsing


class Document(dict):
    """A parsed mailbox document as :class:`Mailbox` caches it: shared and read-only by contract
    (writers change their own fresh parse). It remembers its :func:`split_entries`, so a big
    mailbox is checked entry by entry once, not by every step of a cycle."""

    __slots__ = ("split",)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.split: Optional[Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]] = None


def parse_document(raw: Optional[bytes], blob: Optional[str] = None, *,
                   path: str = MAILBOX_PATH) -> Dict[str, Any]:
    """The mailbox document from a blob's bytes (absent or blank: an empty mailbox).

    ``raw is None`` must mean that the file is absent from a tree that was read (Clone.read_file
    raises when an object is missing). Raises :class:`MailboxCorrupt` when the text is not JSON,
    has no message list, or breaks a bound: more than :data:`MAX_MAILBOX_BYTES`, nesting deeper
    than ``MAX_JSON_DEPTH``, an overlong number. ``path`` names the file (the mailbox or an
    archive file) in the error.
    """
    if raw is None or not raw.strip():
        return {"messages": []}
    try:
        # PowerShell 5 writes a BOM; the bounded reader allows it.
        data = load_json_bounded(raw, what="the text", max_bytes=MAX_MAILBOX_BYTES)
    except BadInput as exc:
        raise MailboxCorrupt(blob, _short(exc), path=path) from None
    if not isinstance(data, dict):
        raise MailboxCorrupt(blob, "top level is not an object", path=path)
    messages = data.setdefault("messages", [])
    if isinstance(messages, dict):  # PowerShell's ConvertTo-Json unrolls a one-element array
        data["messages"] = [messages]
    elif not isinstance(messages, list):
        raise MailboxCorrupt(blob, "'messages' is not a list", path=path)
    return data


def read_mailbox(clone: Any, tip: Optional[str], path: str = MAILBOX_PATH) -> Tuple[Optional[str], Optional[bytes]]:
    """(blob id, text) of the mailbox (or an archive file) at ``tip``; ``(None, None)`` when
    absent from a tree that was read.

    A folder or submodule at the path is a corrupt mailbox (:class:`MailboxCorrupt`, which
    ``--repair`` rebuilds), never an absent one; a missing object raises ``ObjectMissing``.
    """
    from fleet_git import NotAFile, ObjectTooLarge

    try:
        return clone.read_file(tip, path)
    except ObjectTooLarge as exc:
        raise MailboxTooLarge(exc.oid, exc.reason, path=path) from None
    except NotAFile as exc:
        raise MailboxCorrupt(exc.oid, exc.reason, path=path) from None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def serialize(data: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON, ``indent=2``, ASCII-escaped, final newline (PROTOCOL.md)."""
    return (json.dumps(data, indent=2, ensure_ascii=True) + "\n").encode("ascii")


MAX_KEY_CHARS: Final = 512  # an id or sender longer than this makes the entry invalid


def entry_problem(entry: Any) -> Optional[str]:
    """Why an entry is not a valid message, or ``None`` when it is."""
    if not isinstance(entry, dict):
        return f"not an object ({type(entry).__name__})"
    for field in ("id", "from"):
        value = entry.get(field)
        if not isinstance(value, str) or not value.strip():
            return f"'{field}' is missing or not a string"
        if len(value) > MAX_KEY_CHARS:  # it names the message in receipts: bounded there too
            return f"'{field}' is longer than {MAX_KEY_CHARS} characters"
    to = entry.get("to")
    if isinstance(to, list):
        if not to or not all(isinstance(item, str) for item in to):
            return "'to' is an empty list or holds a non-string"
    elif not isinstance(to, str):
        return "'to' is missing or not a string or list"
    for field in ("subject", "body", "type", "priority", "timestamp"):
        value = entry.get(field)
        if value is not None and not isinstance(value, str):
            return f"'{field}' is not a string"
    for field in ("read_by", "acknowledged_by"):
        value = entry.get(field)
        if value is not None and not isinstance(value, list):
            return f"'{field}' is not a list"
    return None


def split_entries(data: Mapping[str, Any]) -> Tuple[List[Tuple[int, Dict[str, Any]]], List[Tuple[int, str]]]:
    """(valid (position, message) pairs, invalid (position, problem) pairs) of a document.

    Worked out once per cached (read-only) document: a big mailbox is not checked entry by
    entry again by every step of a cycle.
    """
    cached = getattr(data, "split", None) if isinstance(data, Document) else None
    if cached is not None:
        return cached
    valid: List[Tuple[int, Dict[str, Any]]] = []
    invalid: List[Tuple[int, str]] = []
    for index, entry in enumerate(data.get("messages", [])):
        problem = entry_problem(entry)
        if problem is None:
            valid.append((index, entry))
        else:
            invalid.append((index, problem))
    if isinstance(data, Document):
        data.split = (valid, invalid)
    return valid, invalid


def valid_messages(data: Mapping[str, Any], *, warn: bool = True) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(position, message) for every valid entry; invalid ones are skipped with a warning."""
    valid, invalid = split_entries(data)
    if warn:
        for index, problem in invalid:
            log.warning("mailbox entry #%d skipped: %s", index, problem,
                        extra={"metadata": {"position": index, "problem": problem}})
    return iter(valid)


def flag(value: Any) -> bool:
    """A message's flag (``ack_required``, ``read``, ``auto``) as older tools wrote it: ``true``,
    ``"true"``, ``"True"``, ``"yes"``, ``1``; the one reading every module uses."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return isinstance(value, (int, float)) and value == 1


def recipients(msg: Mapping[str, Any]) -> Optional[Set[str]]:
    """Lower-case server ids in ``to``; ``None`` for a broadcast. Invalid ids match no one."""
    to = msg.get("to")
    items = to if isinstance(to, list) else [to]
    names = [item.strip().lower() for item in items if isinstance(item, str)]
    if BROADCAST in names:
        return None
    return {name for name in names if is_valid_server_id(name)}


def known_servers(data: Mapping[str, Any], roster: Iterable[str] = (),
                  receipts: Optional[Iterable[str]] = None) -> Set[str]:
    """Every server the fleet knows: senders and named recipients in the mailbox, servers in
    ``read_by``/``acknowledged_by`` (they read mail), the roster and whoever has receipts."""
    known: Set[str] = set()
    for _, msg in valid_messages(data, warn=False):
        names = [msg.get("from")]
        to = msg.get("to")
        names.extend(to if isinstance(to, list) else [to])
        for field in ("read_by", "acknowledged_by"):
            value = msg.get(field)
            if isinstance(value, list):
                names.extend(value)
        known.update(name.strip().lower() for name in names
                     if isinstance(name, str) and is_valid_server_id(name.strip().lower()))
    known.update(roster)
    if receipts:
        known.update(name for name in receipts if is_valid_server_id(name))
    return known


def is_direct(msg: Mapping[str, Any]) -> bool:
    """To exactly one server (a list of one id counts as that id)."""
    rcpt = recipients(msg)
    to = msg.get("to")
    return rcpt is not None and len(rcpt) == 1 and (isinstance(to, str) or len(to) == 1)


_RECIPIENTS_UNKNOWN: Final = frozenset({"(recipients not worked out)"})


def is_addressed_to(msg: Mapping[str, Any], server: str,
                    rcpt: Optional[AbstractSet[str]] = _RECIPIENTS_UNKNOWN) -> bool:
    """Whether ``msg`` is for ``server`` (named in ``to``, or a broadcast) and not from it;
    ``rcpt``: its :func:`recipients`, when already worked out."""
    if str(msg.get("from", "")).lower() == server:
        return False
    if rcpt is _RECIPIENTS_UNKNOWN:
        rcpt = recipients(msg)
    return rcpt is None or server in rcpt


_NAME_SETS: Dict[int, Tuple[List[Any], int, FrozenSet[str]]] = {}  # id(list) -> (list, its length, names)
_NAME_SETS_CAP: Final = 4096


def names_server(value: Any, server: str) -> bool:
    """Whether a receipt list (``read_by``, ``acknowledged_by``) names ``server``, in any letter
    case. A long list's lower-cased names are worked out once and kept while the list stays as it
    is: a look at the fleet asks this for every message and every server, and one member's
    100,000-name list made it take minutes."""
    if not isinstance(value, list):
        return False
    if len(value) < 64:
        return any(isinstance(item, str) and item.lower() == server for item in value)
    known = _NAME_SETS.get(id(value))
    if known is None or known[0] is not value or known[1] != len(value):
        if len(_NAME_SETS) >= _NAME_SETS_CAP:
            _NAME_SETS.clear()
        known = (value, len(value), frozenset(item.lower() for item in value if isinstance(item, str)))
        _NAME_SETS[id(value)] = known
    return server in known[2]


def is_handled_by(msg: Mapping[str, Any], server: str, local: Container[MessageKey] = frozenset()) -> bool:
    """PROTOCOL.md: in ``read_by``, or ``read`` true and ``to`` names the server alone, or local state."""
    if names_server(msg.get("read_by"), server):
        return True
    if flag(msg.get("read")) and is_direct(msg):
        return True
    return message_key(msg) in local


def message_time(msg: Mapping[str, Any]) -> Optional[_dt.datetime]:
    return parse_timestamp(msg.get("timestamp"))


def find_message(data: Mapping[str, Any], msg_id: str, sender: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The last valid message with this id (and sender, when given)."""
    found = None
    for _, msg in valid_messages(data, warn=False):
        if msg["id"] == msg_id and (sender is None or msg["from"].lower() == sender.lower()):
            found = msg
    return found


# --------------------------------------------------------------------------- changes


def has_message(data: Mapping[str, Any], key: MessageKey) -> bool:
    return any(message_key(msg) == key for _, msg in valid_messages(data, warn=False))


def mark_handled(data: Dict[str, Any], server: str, keys: Iterable[MessageKey],
                 acknowledge: Iterable[MessageKey] = ()) -> int:
    """Record that ``server`` processed these messages; return how many changed.

    ``read_by`` gains the server; the legacy ``read`` flag is set only for a message to this
    server alone, so one reader never hides a broadcast from the others. Messages in
    ``acknowledge`` also gain the server in ``acknowledged_by`` and ``ack_status: acknowledged``.
    """
    wanted = set(keys)
    acks = set(acknowledge)
    wanted |= acks
    changed = 0
    for _, msg in valid_messages(data, warn=False):
        key = message_key(msg)
        if key not in wanted or not is_addressed_to(msg, server):
            continue
        touched = False
        read_by = msg.get("read_by")
        if not isinstance(read_by, list):
            read_by = msg["read_by"] = [] if read_by is None else read_by
            touched = True
        if not names_server(read_by, server):
            read_by.append(server)
            touched = True
        if is_direct(msg) and msg.get("read") is not True:
            msg["read"] = True
            touched = True
        if key in acks:
            acked = msg.get("acknowledged_by")
            if not isinstance(acked, list):
                acked = msg["acknowledged_by"] = []
            if not names_server(acked, server):
                acked.append(server)
                touched = True
            # ack_status speaks for the whole message: set for mail to this server alone, so one
            # acknowledgement never reads as everyone's to an older tool.
            if is_direct(msg) and msg.get("ack_status") != "acknowledged":
                msg["ack_status"] = "acknowledged"
                touched = True
        if touched:
            changed += 1
    return changed


_RE_PREFIX = re.compile(r"^\s*(?:(?:re|aw|sv|fw|fwd)\s*(?:\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def strip_reply_prefixes(subject: Any) -> str:
    return _RE_PREFIX.sub("", str(subject or "")).strip()


def reply_subject(subject: Any) -> str:
    """Exactly one ``Re: `` in front, however many the original had (issue: "Re: Re: Re: ...")."""
    base = strip_reply_prefixes(subject)
    return f"Re: {base}" if base else "Re: (no subject)"


def is_reply_subject(subject: Any) -> bool:
    return bool(re.match(r"^\s*re\s*(?:\[\d+\])?\s*:", str(subject or ""), re.IGNORECASE))


# --------------------------------------------------------------------------- blob-level changes
#
# A busy fleet's mailbox grows to megabytes. Parsing it is unavoidable once per blob (a writer
# must know it parses), but json.dumps with indent=2 runs the pure-Python encoder and costs many
# times the parse. PROTOCOL.md fixes the layout (indent=2, ASCII, final newline), so a writer
# splices the text instead of re-serialising the whole document: an appended message goes before
# the closing bracket, a marked message replaces its own block. Every splice is checked to sit on
# the canonical layout; anything else falls back to a full rewrite.

_TAIL = b"\n  ]\n}\n"
_EMPTY_TAIL = b'"messages": []\n}\n'
_BLOCK_START = b"\n    {\n"
_BLOCK_END = b"\n    }"
PARSE_CACHE_SIZE: Final = 2  # documents a Mailbox keeps: the tip it read and the one it wrote


class DocumentCache:
    """Parsed documents keyed by blob id (a blob id names immutable content). What it hands out
    is shared: callers read it and never change it; a writer parses its own copy."""

    def __init__(self, size: int = PARSE_CACHE_SIZE) -> None:
        self.size = size
        self._parsed: Dict[str, Document] = {}

    def parse(self, raw: Optional[bytes], blob: Optional[str], *, path: str = MAILBOX_PATH) -> Document:
        if blob is not None and blob in self._parsed:
            return self._parsed[blob]
        data = Document(parse_document(raw, blob, path=path))
        if blob is not None:
            while len(self._parsed) >= self.size:
                del self._parsed[next(iter(self._parsed))]
            self._parsed[blob] = data
        return data


def parse_cached(raw: Optional[bytes], blob: Optional[str], cache: Optional[DocumentCache] = None) -> Dict[str, Any]:
    """:func:`parse_document` through ``cache`` (a :class:`Mailbox`'s), else parsed afresh.
    Callers must not mutate the result: it may be shared."""
    if cache is None:
        return Document(parse_document(raw, blob))
    return cache.parse(raw, blob)


def _indented(msg: Mapping[str, Any]) -> bytes:
    text = json.dumps(msg, indent=2, ensure_ascii=True)
    return ("\n".join("    " + line for line in text.split("\n"))).encode("ascii")


def _last_key_is_messages(data: Mapping[str, Any]) -> bool:
    return bool(data) and list(data)[-1] == "messages" and isinstance(data["messages"], list)


def _messages_close_the_text(raw: Optional[bytes]) -> bool:
    """Whether the text's last top-level key (a line indented by two spaces) is ``"messages"``.
    The parsed document cannot tell: with a key written twice (``{"x": 1, "messages": [...],
    "x": []}``) its last key is ``messages`` while the text ends with the other one, whose "]"
    an append would then have opened."""
    if raw is None:
        return False
    last = raw.rfind(b'\n  "')
    return last != -1 and raw.startswith(b'\n  "messages": [', last)


def _single_or_checked(raw: Optional[bytes], data: Mapping[str, Any]) -> bool:
    """Whether the text's final "]" closes the list the parsed document reads as ``messages``.
    With ``messages`` the only key, it does whatever the text repeats (the last value of a key is
    the one a parser keeps, and it ends the text). With other keys too, the text is checked line
    by line (:func:`_messages_close_the_text`, :func:`_one_line_per_key`): a scan of the whole text
    (about 0.2 s for 78 MiB), paid only by mailboxes that carry keys of their own."""
    if len(data) == 1:
        return True
    return _messages_close_the_text(raw) and _one_line_per_key(raw, data)


def _one_line_per_key(raw: Optional[bytes], data: Mapping[str, Any]) -> bool:
    """Whether the text has exactly one line at the top level (indented by two spaces) for each
    key of the parsed document: none written twice, nothing nested laid out as if it were a key."""
    return raw is not None and raw.count(b'\n  "') == len(data)


def _spliceable(raw: Optional[bytes]) -> bool:
    """Whether a change may edit the text in place: it is laid out as this suite writes it (two
    spaces, ASCII only, a final newline; PROTOCOL.md). Anything else (an older tool's raw UTF-8,
    no final newline) is written again whole, in the contract's layout."""
    return raw is not None and raw.startswith(b'{\n  "') and raw.endswith(b"\n") and raw.isascii()


def append_to_blob(raw: Optional[bytes], blob: Optional[str], msg: Dict[str, Any],
                   key: MessageKey, cache: Optional[DocumentCache] = None) -> Optional[bytes]:
    """The new mailbox text with ``msg`` appended, or ``None`` when it is already there."""
    data = parse_cached(raw, blob, cache)
    if has_message(data, key):
        return None
    if _spliceable(raw) and _last_key_is_messages(data) and _single_or_checked(raw, data):
        # The text parses and its last key holds the list, so the final "]" closes that list.
        if data["messages"] and raw.endswith(_TAIL):
            return raw[:-len(_TAIL)] + b",\n" + _indented(msg) + _TAIL
        if not data["messages"] and raw.endswith(_EMPTY_TAIL):
            return raw[:-len(_EMPTY_TAIL)] + b'"messages": [\n' + _indented(msg) + _TAIL
    fresh = parse_document(raw, blob)
    fresh["messages"].append(msg)
    return serialize(fresh)


def _find_block(raw: bytes, msg: Mapping[str, Any], start: int = 0) -> Optional[Tuple[int, int]]:
    """(start, end) of ``msg``'s canonical text block in ``raw``, or ``None``."""
    needle = b'\n      "id": ' + json.dumps(msg["id"], ensure_ascii=True).encode("ascii")
    expected = _indented(msg)
    pos = raw.find(needle, start)
    while pos != -1:
        begin = raw.rfind(_BLOCK_START, 0, pos + 1)
        end = raw.find(_BLOCK_END, pos)
        if begin != -1 and end != -1:
            first = begin + 1  # keep the newline before the block
            last = end + len(_BLOCK_END)
            if raw[first:last] == expected:
                return first, last
        pos = raw.find(needle, pos + 1)
    return None


def _copy_for_marks(msg: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of a cached message that :func:`mark_handled` may change: a shallow copy with its
    own copies of the lists it appends to. No deep copy: its cost and recursion would follow
    whatever nesting another member put into the message."""
    new = dict(msg)
    for field in ("read_by", "acknowledged_by"):
        if isinstance(new.get(field), list):
            new[field] = list(new[field])
    return new


def mark_in_blob(raw: Optional[bytes], blob: Optional[str], server: str, keys: Iterable[MessageKey],
                 acknowledge: Iterable[MessageKey] = (),
                 cache: Optional[DocumentCache] = None) -> Tuple[Optional[bytes], int]:
    """(new text, messages changed) after :func:`mark_handled`; text ``None`` when nothing changed.

    Each changed message's block is replaced in place when the text is on the canonical layout.
    """
    data = parse_cached(raw, blob, cache)
    wanted = set(keys) | set(acknowledge)
    targets = [msg for _, msg in valid_messages(data, warn=False) if message_key(msg) in wanted]
    edits: List[Tuple[int, int, bytes]] = []
    spliceable = _spliceable(raw)
    changed = 0
    for msg in targets:
        new = _copy_for_marks(msg)
        if not mark_handled({"messages": [new]}, server, keys, acknowledge):
            continue
        changed += 1
        where = _find_block(raw, msg) if spliceable and raw is not None else None
        if where is None:
            spliceable = False
        else:
            edits.append((where[0], where[1], _indented(new)))
    if not changed:
        return None, 0
    if spliceable and raw is not None and len({e[0] for e in edits}) == len(edits):
        out = bytearray(raw)
        for begin, end, text in sorted(edits, reverse=True):
            out[begin:end] = text
        return bytes(out), changed
    fresh = parse_document(raw, blob)
    return serialize(fresh) if mark_handled(fresh, server, keys, acknowledge) else None, changed


# --------------------------------------------------------------------------- repair


# A token of JSON structure in a broken text, once escapes are masked: a string (JSON strings hold
# no raw line break, so an unterminated one costs at most the rest of its line) or a bracket.
_STRUCTURE = LazyPattern(r'"[^"\n]*"|[][{}]')  # compiled by a repair


def _object_spans(text: str) -> Dict[int, int]:
    """start -> end of every balanced ``{...}`` in ``text`` that nests no deeper than
    ``MAX_JSON_DEPTH``, found in one pass with a bounded amount of memory per level.

    Unbalanced brackets (a cut-off file, markers in the middle of an object) start afresh.
    """
    masked = text.replace("\\\\", "__").replace('\\"', "__")  # same length: positions stay
    spans: Dict[int, int] = {}
    openers = bytearray()  # every open bracket, to match the closing ones
    frames: Dict[int, List[int]] = {}  # level -> [start, deepest nesting inside] while shallow
    for match in _STRUCTURE.finditer(masked):
        char = match.group()[0]
        if char == '"':
            continue
        if char in "{[":
            level = len(openers)
            openers.append(ord(char))
            frames[level] = [match.start(), 0]
            # The frame MAX_JSON_DEPTH + 1 levels out now nests too deep to be a candidate.
            frames.pop(level - MAX_JSON_DEPTH - 1, None)
            continue
        want = ord("{") if char == "}" else ord("[")
        if not openers or openers[-1] != want:
            openers.clear()
            frames.clear()
            continue
        openers.pop()
        level = len(openers)
        frame = frames.pop(level, None)
        if frame is None:
            continue
        depth = frame[1] + 1
        parent = frames.get(level - 1)
        if parent is not None and parent[1] < depth:
            parent[1] = depth
        if char == "}" and depth <= MAX_JSON_DEPTH:
            spans[frame[0]] = match.end()
    return spans


def _collect_messages(value: Any, found: List[Dict[str, Any]]) -> None:
    """Message-like objects in a parsed value, in text order (no recursion: the value is bounded,
    and a walk with a stack costs nothing per level)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if "id" in item and ("from" in item or "to" in item):
                found.append(item)
            elif isinstance(item.get("messages"), list):
                found.extend(m for m in item["messages"] if isinstance(m, dict) and "id" in m)
            else:
                stack.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def salvage_messages(text: str) -> List[Dict[str, Any]]:
    """Every message-like JSON object that can be read from a broken mailbox text.

    A legacy merge once committed conflict markers into the file: the objects between the
    markers are intact JSON, so each ``{`` that opens a balanced object is tried, outermost
    first; an object that parses is searched for messages (objects with an ``id`` and a
    ``from`` or ``to``) and skipped as a whole. Bounded like every read of another member's
    text: the first :data:`MAX_MAILBOX_BYTES` characters, objects no deeper than
    ``MAX_JSON_DEPTH``, numbers of bounded length; nothing in the text can make it recurse.
    """
    text = text[:MAX_MAILBOX_BYTES]
    spans = _object_spans(text)
    found: List[Dict[str, Any]] = []
    pos = text.find("{")
    while pos != -1:
        end = spans.get(pos)
        if end is not None:
            try:
                value = load_json_bounded(text[pos:end], what="a salvaged object", max_bytes=MAX_MAILBOX_BYTES)
            except BadInput:
                pass
            else:
                _collect_messages(value, found)
                pos = text.find("{", end)
                continue
        pos = text.find("{", pos + 1)
    return found


def _merge_lists(a: Any, b: Any) -> Any:
    if not isinstance(a, list) or not isinstance(b, list):
        return a if isinstance(a, list) else b
    merged = list(a)
    seen = {_list_item_key(item) for item in merged}  # linear, however long the lists are
    for item in b:
        key = _list_item_key(item)
        if key not in seen:
            seen.add(key)
            merged.append(item)
    return merged


def _list_item_key(item: Any) -> str:
    return item if isinstance(item, str) else "\0" + json.dumps(item, sort_keys=True)


def merge_copies(kept: Dict[str, Any], other: Dict[str, Any]) -> bool:
    """Fold a second copy of the same message into ``kept``: read receipts and acks are unions."""
    changed = False
    for field in ("read_by", "acknowledged_by"):
        if field in other:
            merged = _merge_lists(kept.get(field), other[field])
            if merged != kept.get(field):
                kept[field] = merged
                changed = True
    if other.get("read") is True and kept.get("read") is not True:
        kept["read"] = True
        changed = True
    if other.get("ack_status") == "acknowledged" and kept.get("ack_status") != "acknowledged":
        kept["ack_status"] = "acknowledged"
        changed = True
    for field, value in other.items():
        if field not in kept:
            kept[field] = value
            changed = True
    return changed


_CONFLICT_MARK = LazyPattern(r"^(<<<<<<< |\|\|\|\|\|\|\| |=======\r?$|>>>>>>> )", re.MULTILINE)  # compiled by a repair


def conflict_sides(text: str) -> List[str]:
    """The two texts a committed merge conflict stands for: every hunk resolved to its first side
    (``<<<<<<<`` to ``=======``), then every hunk to its second (to ``>>>>>>>``); a diff3 base
    (``|||||||``) is left out. None when the text holds no conflict markers.

    git leaves the lines both sides share outside the markers: a message cut by a hunk (its
    opening ``{`` before the markers, its last fields after them) is whole only in a side's text.
    Built from slices between the marker lines (a few times the text's size, however many lines).
    """
    marks = list(_CONFLICT_MARK.finditer(text))
    if not any(m.group(1).startswith("<") for m in marks):
        return []
    sides: List[List[str]] = [[], []]
    where = None  # None: shared; 0: first side; 1: second side; 2: the diff3 base
    start = 0
    for mark in marks:
        kind = mark.group(1)[0]
        nxt = {"<": 0 if where is None else None, "|": 2 if where == 0 else None,
               "=": 1 if where in (0, 2) else None, ">": -1 if where == 1 else None}[kind]
        if nxt is None:
            continue  # a marker-like line out of place: it is text of the side it is in
        end = text.find("\n", mark.start())
        end = len(text) if end == -1 else end + 1
        segment = text[start:mark.start()]
        if where is None:
            sides[0].append(segment)
            sides[1].append(segment)
        elif where in (0, 1):
            sides[where].append(segment)
        where = None if nxt == -1 else nxt
        start = end
    tail = text[start:]
    if where is None:
        sides[0].append(tail)
        sides[1].append(tail)
    elif where in (0, 1):
        sides[where].append(tail)
    return ["".join(side) for side in sides]


def repair_document(good: Optional[Dict[str, Any]], broken_text: str) -> Tuple[Dict[str, Any], int, int]:
    """The last good document plus every message salvaged from the broken text.

    Returns (document, messages kept from the good version, messages salvaged that it lacked).
    Nothing readable is lost: copies of a message already kept only add their read receipts. A
    committed merge conflict is read as each of its sides too (:func:`conflict_sides`), so a
    message that a hunk cut in two is found whole.
    """
    doc = good if good is not None else {"messages": []}
    by_key: Dict[MessageKey, Dict[str, Any]] = {}
    for _, msg in valid_messages(doc, warn=False):
        by_key.setdefault(message_key(msg), msg)
    kept = len(doc["messages"])
    salvaged = 0
    found: List[Dict[str, Any]] = []
    for text in (broken_text, *conflict_sides(broken_text)):
        found.extend(salvage_messages(text))
    for msg in found:
        key = message_key(msg)
        if key in by_key:
            merge_copies(by_key[key], msg)
        else:
            by_key[key] = msg
            doc["messages"].append(msg)
            salvaged += 1
    return doc, kept, salvaged


# --------------------------------------------------------------------------- the mailbox of a clone


def commit_subject(msg: Mapping[str, Any]) -> str:
    """``<from> -> <to>: <subject>``, as the older tools wrote it (one line)."""
    to = msg["to"]
    target = ",".join(to) if isinstance(to, list) else to
    subject = " ".join(str(msg.get("subject") or "").split())
    return f"{msg['from']} -> {target}: {subject}"[:200]


REPAIR_HISTORY: Final = 500  # commits --repair searches back for the last version that parses
_CREATE_MESSAGE: Final = "fleet: create the mailbox"



class Mailbox:
    """Every read and every change of the shared mailbox of one :class:`fleet_git.Clone`.

    Reads go through the mailbox's own parse cache (:class:`DocumentCache`): the documents it
    returns are shared and read-only by contract (a cycle reads the tip, then marks it, and
    parses once); every change parses or splices its own copy. Changes are PROTOCOL.md
    transactions (``Clone.transact``): each is idempotent, so a retry after a lost race or a lost
    answer adds nothing twice. A mailbox that does not parse raises :class:`MailboxCorrupt` and
    is never written on, except by :meth:`repair`.
    """

    def __init__(self, clone: Any) -> None:
        self.clone = clone
        self.cache = DocumentCache()

    # ----------------------------------------------------------------- reads

    def read_raw(self, commit: Optional[str], path: str = MAILBOX_PATH) -> Tuple[Optional[str], Optional[bytes]]:
        """(blob id, text) of the mailbox (or an archive file) at ``commit`` (:func:`read_mailbox`)."""
        return read_mailbox(self.clone, commit, path)

    def parse(self, raw: Optional[bytes], blob: Optional[str], path: str = MAILBOX_PATH) -> Document:
        """The document of a blob read elsewhere (a batch ``cat-file``), through the cache."""
        return self.cache.parse(raw, blob, path=path)

    def read(self, commit: Optional[str], path: str = MAILBOX_PATH) -> Tuple[Optional[str], Document]:
        """(blob id, document) at ``commit``; the document must not be mutated.

        Raises :class:`MailboxCorrupt` (also for a folder or submodule at the path) and
        ``ObjectMissing``; an absent file is an empty mailbox with blob ``None``.
        """
        blob, raw = self.read_raw(commit, path)
        return blob, self.cache.parse(raw, blob, path=path)

    # ----------------------------------------------------------------- changes

    def change(self, plan: Callable[[Optional[str]], Plan], *, author: str, fresh_for: float = 0.0,
               create_branch: bool = False) -> Any:
        """Run ``plan(tip) -> (path -> content, commit message) | None`` as one transaction
        (the only place the mailbox's writers reach ``Clone.transact``). A file larger than every
        reader reads is never written (:class:`MailboxFull`)."""
        def bounded(tip: Optional[str]) -> Plan:
            planned = plan(tip)
            for path, data in (planned[0].items() if planned is not None else ()):
                if data is not None and len(data) > MAX_MAILBOX_BYTES:
                    raise MailboxFull(path, len(data))
            return planned

        return self.clone.transact(bounded, author=author, fresh_for=fresh_for, create_branch=create_branch)

    def deliver(self, msg: Dict[str, Any], *, fresh_for: float,
                elsewhere: Optional[Callable[[Optional[str]], bool]] = None) -> Any:
        """Append ``msg``; idempotent on (id, from): a message already there changes nothing, nor
        does one that ``elsewhere(tip)`` finds (a queued retry: the archive may hold it by now)."""
        key = message_key(msg)

        def plan(tip: Optional[str]) -> Plan:
            blob, raw = self.read_raw(tip)
            new_raw = append_to_blob(raw, blob, msg, key, self.cache)
            if new_raw is None or (elsewhere is not None and elsewhere(tip)):
                return None  # already delivered (an earlier push landed, its answer was lost)
            return {MAILBOX_PATH: new_raw}, commit_subject(msg)

        return self.change(plan, author=msg["from"], fresh_for=fresh_for)

    def mark(self, server: str, keys: Iterable[MessageKey], acks: Iterable[MessageKey] = (), *,
             fresh_for: float) -> Any:
        """Legacy read marks (``read_by``/``acknowledged_by`` in the mailbox), one commit at most."""
        keys, acks = set(keys), set(acks)

        def plan(tip: Optional[str]) -> Plan:
            blob, raw = self.read_raw(tip)
            new_raw, changed = mark_in_blob(raw, blob, server, keys, acks, self.cache)
            if new_raw is None:
                return None
            noun = "message" if changed == 1 else "messages"
            return {MAILBOX_PATH: new_raw}, f"{server}: mark {changed} {noun} read"

        return self.change(plan, author=server, fresh_for=fresh_for)

    def put_file(self, path: str, data: bytes, message: str, *, author: str, fresh_for: float) -> Any:
        """Write one file beside the mailbox (a legacy ``<server>/heartbeat.json``)."""
        return self.change(lambda tip: ({path: data}, message), author=author, fresh_for=fresh_for)

    def create(self) -> Any:
        """An empty mailbox on the clone's branch (``--init``, the one writer that may create the
        branch); nothing changes when a mailbox is there."""
        def plan(tip: Optional[str]) -> Plan:
            _, raw = self.clone.read_file(tip, MAILBOX_PATH)
            if raw is not None:
                return None
            return {MAILBOX_PATH: serialize({"messages": []})}, _CREATE_MESSAGE

        return self.change(plan, author="fleet", create_branch=True)

    def last_good(self, tip: Optional[str], max_history: int) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
        """(document, commit) of the newest of the last ``max_history`` versions that parses."""
        from fleet_git import run_git

        revs = run_git(self.clone.root, "rev-list", f"--max-count={max_history}", str(tip), "--",
                       MAILBOX_PATH).stdout.decode().split()
        for rev in revs:
            try:
                blob, raw = self.read_raw(rev)
                return parse_document(raw, blob), rev
            except MailboxCorrupt:
                continue
        return None, None

    def repair(self, server: str, *, max_history: int = REPAIR_HISTORY,
               archived: Optional[Callable[[Optional[str], List[Dict[str, Any]]], Set[int]]] = None
               ) -> Dict[str, Any]:
        """Rebuild an unparseable mailbox on the remote: the last version that parses plus every
        message salvaged from the broken one, by the transaction. Reports what it kept and salvaged.

        ``archived(tip, messages)``: which of them (their ``id()``) the archive holds already (an
        older tool's stale copy merged back in); they are left out, never brought back as new mail."""
        result: Dict[str, Any] = {"repaired": False, "kept": 0, "salvaged": 0, "good_commit": None,
                                  "dropped": 0}

        def plan(tip: Optional[str]) -> Plan:
            raw: Optional[bytes] = None  # a folder or submodule there: nothing to salvage
            try:
                blob, raw = self.read_raw(tip)
                parse_document(raw, blob)
                return None  # parses (already fine, or repaired meanwhile by someone else)
            except MailboxTooLarge as exc:  # never read: rebuilding would drop all of it
                raise MailboxCorrupt(exc.blob, f"{exc.reason}; --repair would lose messages, so it refuses") from None
            except MailboxCorrupt:
                pass
            if raw is not None and len(raw) > MAX_MAILBOX_BYTES:
                # Salvage reads only the bound's worth of text: rebuilding would drop the rest.
                raise MailboxCorrupt(blob, f"{len(raw)} bytes, more than the {MAX_MAILBOX_BYTES} this "
                                           "program reads; --repair would lose messages, so it refuses")
            good, good_commit = self.last_good(tip, max_history)
            doc, kept, salvaged = repair_document(good, (raw or b"").decode("utf-8", "replace"))
            there = archived(tip, [m for _, m in valid_messages(doc, warn=False)]) if archived else set()
            if there:
                doc["messages"] = [m for m in doc["messages"] if id(m) not in there]
            result.update(kept=kept, salvaged=salvaged, good_commit=good_commit, dropped=len(there))
            return ({MAILBOX_PATH: serialize(doc)},
                    f"{server}: repair the mailbox (kept {kept}, salvaged {salvaged})")

        tx = self.change(plan, author=server)
        result["repaired"] = tx.changed
        result["commit"] = tx.commit
        if tx.changed:
            base = result["good_commit"][:12] if result["good_commit"] else "no earlier version"
            result["summary"] = (f"mailbox repaired at {str(tx.commit)[:12]}: kept {result['kept']} entries "
                                 f"from {base}, salvaged {result['salvaged']} more from the broken file")
            if result["dropped"]:
                result["summary"] += f", left out {result['dropped']} the archive holds already"
            log.warning("%s", result["summary"], extra={"metadata": {k: v for k, v in result.items()
                                                                     if k != "summary"}})
        else:
            result["summary"] = "the mailbox parses; nothing to repair"
        return result
