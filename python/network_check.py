"""Can this server reach the fleet repository's remote? A step-by-step connectivity check.

Contract:

- :func:`parse_remote` turns a git remote URL into ``(scheme, host, port)``. Forms: ``https://``,
  ``http://``, ``ssh://[user@]host[:port]/path`` (also ``git+ssh://``, ``ssh+git://``), scp-like
  ``[user@]host:path``, ``git://host[:port]/path``, IPv6 literals in brackets. Default ports:
  443, 80, 22, 9418. A local path (``/srv/x.git``, ``./x``, ``C:/Projects/Build.git``,
  ``K:\\Projects\\Build``, ``\\\\server\\share``) or ``file://`` URL is ``("local", None, None)``:
  a Windows drive letter is never read as an scp-like host, as git itself decides
  (``url_is_local_not_ssh``).
- :func:`test_connectivity` resolves the remote (a clone's ``origin``, a URL, or the default
  below) and runs the checks in order, stopping at the first that fails: ``dns``
  (``getaddrinfo``), ``tcp`` (connect to the first address that answers), and for http(s)
  ``http`` (a HEAD request to ``scheme://host:port/`` without following redirects; any HTTP
  status means the server is reachable). A local remote needs no network: one ``local`` check,
  success at once. The result is a :class:`ConnectivityResult` dict; ``failed_step`` names the
  step that failed (``None`` on success).
- Default remote (no argument): ``origin`` of the clone at ``BUILD_REPO_PATH`` when that is set
  and is a clone, else of the clone holding the current directory, else ``https://github.com/``.
- Credentials in a URL (``https://user:token@host``) never reach the result, the message or the
  logs: only host, port and a redacted URL do.
- Library code raises :class:`fleet_common.UsageError` for a URL it cannot parse, a timeout that
  is not positive, or a folder that is not a clone with an ``origin``.

CLI::

    python3 python/network_check.py [--repo PATH_OR_URL] [--timeout SEC] [--json]

Prints a summary (or the result as JSON with ``--json``). Exit codes: 0 the remote is reachable,
1 it is not (the one-line reason on stderr), 2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

from fleet_cli import ArgumentParser, run_cli
from fleet_common import (
    EXIT_FAILURE,
    EXIT_OK,
    SuiteError,
    UsageError,
    check_number,
    dump_json_text,
    finite_number,
    get_logger,
    write_line,
    write_text,
)

TYPE_CHECKING = False  # typing is for type checkers only: fleet_cli, "Start-up"
if TYPE_CHECKING:
    from typing import Any, Dict, Final, List, Optional, Sequence, Tuple, TypedDict

    class CheckResult(TypedDict):
        ok: bool
        ms: float
        detail: str

    class ConnectivityResult(TypedDict):
        success: bool
        message: str
        latency_ms: Optional[float]
        host: Optional[str]
        port: Optional[int]
        scheme: str
        remote: str  # the remote URL with credentials replaced by ***
        checks: Dict[str, CheckResult]
        failed_step: Optional[str]

log = get_logger(__name__)

DEFAULT_TIMEOUT: Final = 5.0
# Each step's timeout: under 10 ms no handshake completes; over 10 minutes is a hang, not a check.
MIN_TIMEOUT: Final = 0.01
MAX_TIMEOUT: Final = 600.0
DEFAULT_REMOTE: Final = "https://github.com/"
DEFAULT_PORTS: Final = {"https": 443, "http": 80, "ssh": 22, "git": 9418}
# Each TCP attempt gets the whole timeout; trying a few addresses lets an IPv4 address answer
# when an IPv6 one is black-holed, without letting a long address list stretch the check.
MAX_TCP_ADDRESSES: Final = 3
MAX_DETAIL: Final = 300

_SCHEME_ALIASES: Final = {
    "https": "https", "http": "http", "ssh": "ssh", "git+ssh": "ssh", "ssh+git": "ssh",
    "git": "git", "file": "local",
}
_DRIVE_RE: Final = re.compile(r"^[A-Za-z]:")
_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")






# --------------------------------------------------------------------------- parsing


def parse_remote(url: str) -> Tuple[str, Optional[str], Optional[int]]:
    """``(scheme, host, port)`` of a git remote URL; ``("local", None, None)`` for a path.

    ``scheme`` is one of ``https``, ``http``, ``ssh``, ``git``, ``local``. The host never
    carries credentials; an IPv6 literal comes without its brackets. Raises
    :class:`UsageError` for an empty URL, an unsupported scheme, a missing host or a bad port.
    """
    text = (url or "").strip()
    if not text:
        raise UsageError("empty remote URL")
    if _is_local_path(text):
        return "local", None, None
    m = _SCHEME_RE.match(text)
    if m:
        return _parse_scheme_url(text, m.group(1).lower())
    return _parse_scp_like(text)


def _is_local_path(text: str) -> bool:
    # git's url_is_local_not_ssh: a path has no colon, or a slash before the first colon, or a
    # DOS drive prefix. The drive rule applies on every OS: fleets share Windows paths.
    if _DRIVE_RE.match(text) or text.startswith(("/", "\\", ".", "~")):
        return True
    if _SCHEME_RE.match(text):
        return False
    colon = _scp_colon(text)
    if colon < 0:
        return True
    slash = text.find("/")
    return 0 <= slash < colon


def _scp_colon(text: str) -> int:
    """Index of the colon ending the host of ``[user@]host:path`` (brackets may hold colons)."""
    at = text.find("@")
    start = at + 1 if 0 <= at < max(text.find(":"), 0) else 0
    if text[start:start + 1] == "[":
        close = text.find("]", start)
        if close > 0 and text[close + 1:close + 2] == ":":
            return close + 1
    return text.find(":")


def _parse_scheme_url(text: str, raw_scheme: str) -> Tuple[str, Optional[str], Optional[int]]:
    scheme = _SCHEME_ALIASES.get(raw_scheme)
    if scheme is None:
        raise UsageError(f"unsupported remote URL scheme {raw_scheme!r} (use https, http, ssh, git or file)")
    if scheme == "local":
        return "local", None, None
    try:
        parts = urlsplit(text)
        host = parts.hostname
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"cannot parse remote URL {redact_url(text)}: {exc}") from None
    if not host:
        raise UsageError(f"remote URL {redact_url(text)} has no host")
    return scheme, host, port if port is not None else DEFAULT_PORTS[scheme]


def _parse_scp_like(text: str) -> Tuple[str, Optional[str], Optional[int]]:
    colon = _scp_colon(text)
    hostpart = text[:colon]
    host = hostpart.rpartition("@")[2]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c in host for c in "[]@/\\ "):
        raise UsageError(f"cannot parse remote URL {redact_url(text)}: no host before ':'")
    return "ssh", host.lower(), DEFAULT_PORTS["ssh"]


def redact_url(url: str) -> str:
    """``url`` safe to show or log: an http(s) userinfo (often a bare token) and any password
    become ``***``; an ssh user name such as ``git@`` is kept."""
    text = (url or "").strip()
    m = _SCHEME_RE.match(text)
    if not m:
        return text  # scp-like or a path: only ever a user name, never a password
    try:
        parts = urlsplit(text)
    except ValueError:
        return f"{m.group(0)}***"
    userinfo, sep, hostport = parts.netloc.rpartition("@")
    if not sep:
        return text
    scheme = _SCHEME_ALIASES.get(m.group(1).lower(), "")
    user, has_pw, _ = userinfo.partition(":")
    if scheme in ("https", "http") or not user:
        shown = "***"
    else:
        shown = f"{user}:***" if has_pw else user
    return urlunsplit(SplitResult(parts.scheme, f"{shown}@{hostport}", parts.path, parts.query,
                                  parts.fragment))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- which remote


def _origin_of(folder: Path) -> Optional[str]:
    """``origin`` of the clone holding ``folder``; ``None`` when there is none."""
    from fleet_git import run_git

    if not folder.is_dir():
        return None
    try:
        proc = run_git(folder, "remote", "get-url", "origin", check=False)
    except SuiteError:  # git missing or timed out: no origin we can read
        return None
    if proc.returncode != 0:
        return None
    value = proc.stdout.decode("utf-8", "surrogateescape").strip()
    return value or None


def _is_bare_repository(folder: Path) -> bool:
    from fleet_git import run_git

    try:
        proc = run_git(folder, "rev-parse", "--is-bare-repository", check=False)
    except SuiteError:
        return False
    return proc.returncode == 0 and proc.stdout.strip() == b"true"


def default_remote(cwd: Optional[Path] = None, build_repo: Optional[str] = None) -> str:
    """The remote to check when none is named: ``origin`` of ``build_repo`` (``BUILD_REPO_PATH``
    when not given), else of the clone holding ``cwd``, else :data:`DEFAULT_REMOTE`."""
    if build_repo is None:
        build_repo = os.environ.get("BUILD_REPO_PATH") or ""
    if build_repo:
        found = _origin_of(Path(build_repo))
        if found:
            return found
    found = _origin_of(Path(cwd) if cwd is not None else Path.cwd())
    return found or DEFAULT_REMOTE


def resolve_remote(repo_or_url: Optional[str]) -> str:
    """The remote URL to check for ``repo_or_url``: a clone's ``origin``, a bare repository
    itself (a local remote), a URL as given, or :func:`default_remote` for ``None``."""
    if repo_or_url is None or not str(repo_or_url).strip():
        return default_remote()
    text = str(repo_or_url).strip()
    if _SCHEME_RE.match(text) or not Path(text).is_dir():
        return text
    folder = Path(text)
    found = _origin_of(folder)
    if found:
        return found
    if _is_bare_repository(folder):
        return text
    raise UsageError(f"{folder} is not a git clone with a remote 'origin'")


# --------------------------------------------------------------------------- checks


def _describe(exc: BaseException) -> str:
    text = str(exc) or ("timed out" if isinstance(exc, socket.timeout) else type(exc).__name__)
    text = " ".join(text.split())
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL - 3] + "..."


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


def _resolve(host: str, port: int, timeout: float) -> List[Tuple[int, Any]]:
    """``(family, sockaddr)`` pairs for ``host``; ``getaddrinfo`` has no timeout of its own, so
    it runs in a daemon thread that we stop waiting for after ``timeout`` seconds."""
    box: Dict[str, Any] = {}

    def lookup() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = exc

    worker = threading.Thread(target=lookup, name=f"dns-{host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise socket.timeout(f"no answer within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    seen = set()
    result: List[Tuple[int, Any]] = []
    for family, _type, _proto, _canon, sockaddr in box["infos"]:
        if sockaddr[0] not in seen:
            seen.add(sockaddr[0])
            result.append((family, sockaddr))
    if not result:
        raise socket.gaierror(f"no address for {host}")
    return result


def _connect(addresses: List[Tuple[int, Any]], port: int, timeout: float) -> Tuple[str, float]:
    """Connect to the first address that accepts; ``(address, connect ms)``."""
    errors: List[str] = []
    for _family, sockaddr in addresses[:MAX_TCP_ADDRESSES]:
        address = str(sockaddr[0])
        start = time.perf_counter()
        try:
            conn = socket.create_connection((address, port), timeout=timeout)
        except OSError as exc:
            errors.append(f"{address}: {_describe(exc)}" if len(addresses) > 1 else _describe(exc))
            continue
        elapsed = _ms(start)
        conn.close()
        return address, elapsed
    raise OSError("; ".join(errors))


def _http_probe(url: str, timeout: float) -> str:
    """Status line of a HEAD request to ``url``; any HTTP answer means the server is there."""
    import requests  # lazy: heavy, and only http(s) remotes need it

    with requests.Session() as session:
        response = session.head(url, timeout=timeout, allow_redirects=False)
        try:
            return f"HTTP {response.status_code} {response.reason or ''}".strip()
        finally:
            response.close()


def test_connectivity(repo_or_url: Optional[str] = None,
                      timeout: float = DEFAULT_TIMEOUT) -> ConnectivityResult:
    """Check that the remote of ``repo_or_url`` can be reached (see the module docstring).

    ``timeout`` (seconds) bounds each step: the DNS lookup, each TCP attempt, the HTTP request.
    """
    timeout = check_number(timeout, "timeout", MIN_TIMEOUT, MAX_TIMEOUT)
    remote = resolve_remote(repo_or_url)
    scheme, host, port = parse_remote(remote)
    shown = redact_url(remote)
    checks: Dict[str, CheckResult] = {}
    result: ConnectivityResult = {
        "success": False, "message": "", "latency_ms": None, "host": host, "port": port,
        "scheme": scheme, "remote": shown, "checks": checks, "failed_step": None,
    }

    def finish(failed: Optional[str], message: str) -> ConnectivityResult:
        result["success"] = failed is None
        result["failed_step"] = failed
        result["message"] = message
        log.info("network check: %s", message, extra={"metadata": {
            "remote": shown, "scheme": scheme, "host": host, "port": port, "success": failed is None,
            "failed_step": failed, "latency_ms": result["latency_ms"],
            "checks": {name: dict(check) for name, check in checks.items()}}})
        return result

    if scheme == "local" or host is None or port is None:
        checks["local"] = {"ok": True, "ms": 0.0, "detail": f"local remote {shown}: no network needed"}
        return finish(None, f"Local remote {shown}: no network needed")

    where = _hostport(host, port)
    start = time.perf_counter()
    try:
        addresses = _resolve(host, port, timeout)
    except (OSError, UnicodeError) as exc:
        checks["dns"] = {"ok": False, "ms": _ms(start), "detail": _describe(exc)}
        return finish("dns", f"DNS lookup of {host} failed: {_describe(exc)}")
    listed = ", ".join(str(addr[0]) for _f, addr in addresses[:MAX_TCP_ADDRESSES])
    checks["dns"] = {"ok": True, "ms": _ms(start), "detail": f"{host} -> {listed}"}

    start = time.perf_counter()
    try:
        address, connect_ms = _connect(addresses, port, timeout)
    except OSError as exc:
        checks["tcp"] = {"ok": False, "ms": _ms(start), "detail": _describe(exc)}
        return finish("tcp", f"TCP connect to {where} failed: {_describe(exc)}")
    checks["tcp"] = {"ok": True, "ms": connect_ms, "detail": f"connected to {_hostport(address, port)}"}
    result["latency_ms"] = connect_ms
    summary = f"Reached {where} ({scheme}) in {connect_ms:.1f} ms"

    if scheme in ("http", "https"):
        url = f"{scheme}://{where}/"
        start = time.perf_counter()
        try:
            status = _http_probe(url, timeout)
        except ImportError:
            checks["http"] = {"ok": True, "ms": 0.0, "detail": "skipped: requests is not installed"}
            return finish(None, summary)
        except Exception as exc:  # noqa: BLE001 - requests raises many kinds; each is a failure here
            checks["http"] = {"ok": False, "ms": _ms(start), "detail": _describe(exc)}
            return finish("http", f"HTTP request to {url} failed: {_describe(exc)}")
        checks["http"] = {"ok": True, "ms": _ms(start), "detail": status}
        summary += f", {status}"
    return finish(None, summary)


test_connectivity.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


# --------------------------------------------------------------------------- CLI


def format_summary(result: ConnectivityResult) -> List[str]:
    """Human-readable lines for a result (the CLI's output without ``--json``)."""
    head = "OK" if result["success"] else f"FAILED at {result['failed_step']}"
    lines = [f"{head}: {result['message']}", f"  remote: {result['remote']}"]
    for name, check in result["checks"].items():
        state = "ok  " if check["ok"] else "FAIL"
        lines.append(f"  {name:<5} {state} {check['ms']:9.1f} ms  {check['detail']}")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(
        prog="network_check.py",
        description="Check that the fleet repository's remote can be reached (DNS, TCP, HTTP).")
    parser.add_argument("--repo", default=None, metavar="PATH_OR_URL",
                        help="a clone (its origin is checked) or a remote URL; default: origin of "
                             "BUILD_REPO_PATH, else of the current clone, else github.com")
    parser.add_argument("--timeout", type=finite_number("--timeout", MIN_TIMEOUT, MAX_TIMEOUT),
                        default=DEFAULT_TIMEOUT, metavar="SEC",
                        help=f"seconds allowed for each step (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    return run_cli("network_check", lambda: _check(args))


def _check(args: argparse.Namespace) -> int:
    result = test_connectivity(args.repo, timeout=args.timeout)
    if args.json:
        write_text(dump_json_text(result))
    else:
        for line in format_summary(result):
            write_line(line)
    if result["success"]:
        return EXIT_OK
    write_line(result["message"], sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
