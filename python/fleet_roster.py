"""The fleet's roster, ``coordination/servers.json``: the servers a fleet expects.

Format (optional file on the shared branch)::

    {"version": 1, "servers": [{"id": "build1", "description": "..."}]}

Owner of the format: :func:`parse_roster` reads it within bounds (size, nesting, number of
servers, description length; PROTOCOL.md "Trust between servers") and never raises for bad
content, which becomes a one-line ``problem``. ``fleet_status`` shows it; the send path asks
:func:`roster_warning` about a ``--to`` the roster does not name, so this module imports nothing
beyond :mod:`fleet_common` and :mod:`fleet_git`.
"""

from __future__ import annotations

from fleet_common import BROADCAST, BadInput, UsageError, load_json_bounded, normalize_server_id
from fleet_git import GitError

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Dict, Final, Optional

    from fleet_git import Clone

ROSTER_PATH: Final = "coordination/servers.json"
ROSTER_VERSION: Final = 1
MAX_ROSTER_BYTES: Final = 256 * 1024
MAX_ROSTER_DEPTH: Final = 4  # {"servers": [{"id": ...}]} is 3 levels
MAX_ROSTER_SERVERS: Final = 300
MAX_DESCRIPTION_CHARS: Final = 200


class Roster:
    """``coordination/servers.json``: the servers a fleet expects, with their descriptions.

    ``present`` says whether the file exists; ``problem`` is a one-line reason when it could not
    be used (then ``servers`` holds what could be read, possibly nothing).
    """

    __slots__ = ("present", "servers", "problem")

    def __init__(self, present: bool = False, servers: Optional[Dict[str, str]] = None,
                 problem: Optional[str] = None) -> None:
        self.present = present
        self.servers: Dict[str, str] = servers or {}  # id -> description, in the file's order
        self.problem = problem

    def names(self, server: str) -> bool:
        return server.lower() in self.servers

    def to_dict(self) -> Dict[str, Any]:
        return {"present": self.present, "servers": len(self.servers), "problem": self.problem}


def parse_roster(raw: Optional[bytes]) -> Roster:
    """A roster from the file's bytes (``None``: no roster); never raises for bad content."""
    if raw is None:
        return Roster()
    try:
        doc = load_json_bounded(raw, what=ROSTER_PATH, max_bytes=MAX_ROSTER_BYTES,
                                max_depth=MAX_ROSTER_DEPTH)
    except BadInput as exc:
        return Roster(True, problem=str(exc))
    entries = doc.get("servers") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return Roster(True, problem=f'{ROSTER_PATH} is not {{"version": 1, "servers": [...]}}')
    servers: Dict[str, str] = {}
    skipped = 0
    for entry in entries[:MAX_ROSTER_SERVERS]:
        name = entry.get("id") if isinstance(entry, dict) else None
        try:
            server = normalize_server_id(name)
        except UsageError:
            skipped += 1
            continue
        description = entry.get("description")  # made inert where it is shown
        servers.setdefault(server, description[:MAX_DESCRIPTION_CHARS] if isinstance(description, str) else "")
    problems = []
    if skipped:
        problems.append(f"{skipped} entries skipped (each must be {{\"id\": <server id>}})")
    if len(entries) > MAX_ROSTER_SERVERS:
        problems.append(f"only the first {MAX_ROSTER_SERVERS} of {len(entries)} servers read")
    version = doc.get("version", ROSTER_VERSION)
    if isinstance(version, int) and version > ROSTER_VERSION:
        problems.append(f"version {version} is newer than this program's {ROSTER_VERSION}; "
                        "known keys read")
    return Roster(True, servers, f"{ROSTER_PATH}: " + "; ".join(problems) if problems else None)


def read_roster(clone: Clone, tip: Optional[str]) -> Roster:
    """The roster at ``tip`` of the shared branch; a bad or unreadable one is a ``problem``."""
    if tip is None:
        return Roster()
    try:
        _blob, raw = clone.read_file(tip, ROSTER_PATH, MAX_ROSTER_BYTES)
    except GitError as exc:
        return Roster(True, problem=f"{ROSTER_PATH} could not be read: {exc}")
    return parse_roster(raw)


def roster_warning(clone: Clone, to: Any) -> Optional[str]:
    """One line when a roster exists and ``to`` (``all``, an id or a list of ids, as
    ``send_message.normalize_recipients`` returns it) names a server it does not: a typo would
    otherwise go out to no one, in silence. ``None`` otherwise (no roster, a bad one, ``all``)."""
    names = [to] if isinstance(to, str) else list(to)
    if not names or names == [BROADCAST]:
        return None
    roster = read_roster(clone, clone.tip())
    unknown = [name for name in names if not roster.names(name)]
    if not roster.servers or not unknown:
        return None
    return f"--to {', '.join(unknown)}: not in the roster {ROSTER_PATH}; sending anyway"
