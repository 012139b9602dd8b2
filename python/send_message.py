"""Send one message to the fleet through the shared git repository.

Usage::

    python3 python/send_message.py "Hello fleet" "Test Subject" --to all
    python3 python/send_message.py - "Build log" --to build1 < log.txt   # body from stdin

The message is appended to ``coordination/messages.json`` by the PROTOCOL.md transaction (a commit
built with plumbing on the fetched branch, pushed as a compare-and-swap, verified by the remote);
the working tree and index of the clone are never touched.

Importable: ``send_message(body, subject=None, to="all", ...)`` returns a :class:`SendResult`
that is truthy only when the message is sent and verified, and always carries the message id.

Every server of the fleet reads the mailbox, and git keeps it forever: a body or subject that
holds a credential (a password, a token, a private key: ``fleet_secrets.find_secret``) is refused
as bad input, naming the kind of secret and never the secret, unless ``--allow-secret``
(``allow_secret=True``) says to send it anyway.

Start-up cost: a send is a short process, so it imports only what every send needs (argparse,
``fleet_common``, ``fleet_cli``, ``fleet_git``, ``fleet_mailbox``; ``fleet_secrets`` and
``fleet_roster`` for the checks before sending; ``circuit_breaker`` when a monitor has persisted a
breaker in this clone).
``message_queue`` (a message queued), ``fleet_archive`` (a reply to a message no longer in the hot
mailbox) and ``fleet_inbox`` (``--wait-reply``) are imported when needed; :mod:`fleet_cli`,
"Start-up", says what every short command defers and why. ``bench/send.py`` measures the result.

Exit codes: 0 sent and verified; 2 bad usage or bad input (a ``--branch`` the remote does not
have included: it is never created, nor queued); 75 not deliverable now, queued in
``<server>/queue/message_queue.json`` for the monitor to deliver; 1 any other failure (one-line
reason on stderr); 130 interrupted by Ctrl+C. With ``--wait-reply SEC`` the message is sent first,
whatever happens next, then: 0 an answer came (printed), 124 no answer within SEC.
"""

# The code is in fleet_send (fleet_cli explains why a command's script stays this small).
from fleet_send import *  # noqa: F401,F403  (``import send_message`` offers what it always offered)
from fleet_send import main

if __name__ == "__main__":
    raise SystemExit(main())
