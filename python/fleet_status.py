"""The fleet at a glance: who is live, who is stale, who is being waited on.

Usage::

    python3 python/fleet_status.py [--repo PATH] [--branch B] [--stale-after 15m] [--unread-after 4h]
                                   [--json] [--html FILE] [-q]

Computed when someone looks and never committed (PROTOCOL.md, "Per-server state refs"): the
branch's ``git fetch`` and, beside it, a listing of the remote followed by a fetch of the state
refs that moved (:meth:`StateStore.mirror_fleet`; from a remote reached by a path, its refs read
from its files and one fetch of the branch and the state refs that moved) bring the shared
branch and every server's state ref, up to 1,000 servers', as they are now (nothing, when
nothing moved); the hot mailbox
``coordination/messages.json`` and the roster are read as every reader reads them (from loose
objects, else one ``cat-file``) as soon as the branch is in, and every server's ``state.json``
the same way (what is not loose, in one ``cat-file`` for all). The archive is never read, so
the cost does not grow with it; the 14-day chart therefore counts the mail still in the hot
mailbox.

Servers: every server with a state ref, every server id in ``from``/``to`` of the hot mailbox, and
the optional roster ``coordination/servers.json`` (``{"version": 1, "servers": [{"id": "build1",
"description": "..."}]}``, whose format :mod:`fleet_roster` owns; ``send_message.py`` also uses it to
warn about a ``--to`` that the roster does not name). A bad roster is reported, never fatal.

Live or stale: a server is *live* while its last presence (``presence.timestamp`` in its state
ref) is at most ``max(--stale-after, 3 x its own published interval, 3 x its presence period)``
old (each believed up to 6 hours), *stale* after that, and *never seen* without a presence. A
timestamp in the future counts as now. A server whose presence is still the one its retirement
saw (``message_monitor.py --retire``) is *retired*: shown after the others of its level, its mail
and owed acknowledgements never overdue, and nothing waits for it; a roster that still names it
is a warning.

Levels and exit codes (a Nagios plugin, like ``system_health.py``):

* 2 CRITICAL: an *expected* server never seen, or stale for 4x its limit. Expected are the
  roster's servers when there is a roster, else every server that has published presence. A hot
  mailbox that does not parse is critical too (every send queues until ``--repair``).
* 1 WARNING: any other stale or never-seen server; a server that reports itself unhealthy; mail
  waiting unread, or an acknowledgement owed, for longer than ``--unread-after`` (a message
  without a readable timestamp counts as old); a retired server the roster names; a bad roster or
  state ref.
* 0 OK: everything else.
* 3 UNKNOWN: the remote (or the clone) cannot be read, or the page cannot be written; one line on
  stderr. Bad usage exits 2 (argparse's convention, shared with the suite; a monitoring system reads
  it as critical, the safe reading of a misconfigured check); Ctrl+C 130.

Output: a table for a terminal (one row per server, most urgent first, coloured by level unless
piped or ``NO_COLOR`` is set), ``--json`` for scripts, ``--html FILE`` for one self-contained page
(inline CSS and SVG, no script, a Content-Security-Policy that forbids scripts; every value from
mail or state refs is escaped). The first line of the table is the Nagios status line.

Everything read from the shared repository is bounded (sizes, nesting, text lengths, the number
of servers) before use (PROTOCOL.md, "Trust between servers").
"""

# The code is in fleet_report (fleet_cli explains why a command's script stays this small); the
# first network calls start before it loads (fleet_start).
import sys

import fleet_start

with fleet_start.Loading("fleet_status", __name__):  # (a Ctrl+C meanwhile: "interrupted", exit 130)
    if __name__ == "__main__":
        fleet_start.start_look(sys.argv[1:])
    from fleet_report import *  # noqa: F401,F403  (``import fleet_status`` offers what it always offered)
    from fleet_report import main

if __name__ == "__main__":
    fleet_start.leave(main())
