"""Read the fleet mailbox: list, show, follow a thread, mark read, acknowledge, search, wait.

Usage::

    python3 python/inbox.py [list] [--all] [--since 2h|ISO] [--from ID] [--priority P] [--limit N]
                            [--include-archive] [--bodies] [--json] [--count]
    python3 python/inbox.py show ID [--from SENDER] [--peek] [--json]
    python3 python/inbox.py thread ID [--from SENDER] [--json]
    python3 python/inbox.py mark-read ID... | --all [--before 2h|ISO]
    python3 python/inbox.py ack ID [--from SENDER] [--note TEXT] [--no-message] [--json]
    python3 python/inbox.py acks [--json]
    python3 python/inbox.py search WORDS... [--include-archive] [--limit N] [--json]
    python3 python/inbox.py wait [--timeout SEC] [--reply-to ID] [--peek] [--json]

Every command takes ``--repo``, ``--server`` and ``--branch`` (defaults: ``BUILD_REPO_PATH``,
``SERVER_ID``, the remote's default branch). Mail is read from the fetched branch, never from the
working tree, and nothing is written to the working tree or the shared branch: read marks and
acknowledgements go to this server's state ref (PROTOCOL.md, "Per-server state refs"). Before
reading, one ``git fetch`` brings the shared branch and this server's own state ref by their exact
names (busy or idle, one network call); a clone that does not mirror that ref yet lists the remote
first, since another clone of the server may have written it. ``acks``, which needs other servers'
state refs, lists the remote and fetches the ones that moved.

Importable: ``Inbox(repo=None, server=None, branch=None)`` has one method per command, each
returning a plain JSON-ready dict (messages shaped by :func:`message_view`); the CLI is a thin
shell over it. Bad input raises :class:`fleet_common.UsageError` (an id shared by two senders:
:class:`AmbiguousId`); an unreachable remote raises :class:`fleet_git.RemoteUnavailable`.

Everything read here comes from another machine: text is bounded before it is returned, terminal
output goes through :func:`fleet_cli.sanitize` / :func:`fleet_cli.preview`, and JSON
output is ASCII-escaped.

Exit codes: 0 done; 3 (:data:`EXIT_UNREAD`) ``list --count`` found mail (0 when none); 124
(:data:`EXIT_TIMEOUT`) ``wait`` saw nothing arrive in time; 75 ``ack`` recorded, its answer message
queued for the monitor to deliver; 2 bad usage or bad input (unknown or malformed id, bad duration);
1 any other failure (the remote unreachable), one line on stderr; 130 interrupted by Ctrl+C.
"""

# The code is in fleet_inbox (fleet_cli explains why a command's script stays this small); the
# first fetch starts before it loads (fleet_start).
import sys

import fleet_start

with fleet_start.Loading("inbox", __name__):  # (a Ctrl+C meanwhile: "interrupted", exit 130)
    if __name__ == "__main__":
        fleet_start.start_poll(sys.argv[1:], unless=("acks",))  # every command but acks polls first
    from fleet_inbox import *  # noqa: F401,F403  (``import inbox`` offers what it always offered)
    from fleet_inbox import main

if __name__ == "__main__":
    fleet_start.leave(main())
