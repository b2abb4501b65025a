"""Who may talk to `rtsvc serve`: one admission check for every front end (no I/O here).

The plain websockets server (`rtsvc.serve.server`) and the Ray Serve deployment
(`rtsvc.serve.ray_serve`) both ask `check_request` about each HTTP request and websocket handshake
before anything else happens, and `token_matches` about each token, so the rules cannot drift:

- a header that must appear once (Host, Origin, Upgrade) appearing twice: 400;
- without a token the server answers only requests that name this machine in `Host` (localhost or a
  loopback address), whatever DNS says: a page from another site that points its own name at
  127.0.0.1 (DNS rebinding) is refused with 403;
- a browser handshake from an origin other than the page's own (or an --allowed-origin): 403;
- /v1/info (speaker names) needs the token when there is one: 401;
- a websocket upgrade anywhere but /v1/stream: 404; any method but GET and HEAD: 405.
"""

import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from rtsvc.serve.protocol import STREAM_PATH

INFO_PATH = "/v1/info"  # voice, speakers, defaults, controls and latency for the page, before Start
READ_METHODS = ("GET", "HEAD")
SINGLE_HEADERS = ("Host", "Origin", "Upgrade")


@dataclass(frozen=True)
class AccessRules:
    token: str | None = None
    allowed_origins: tuple[str, ...] = ()  # besides the page's own origin; "*" allows any


@dataclass(frozen=True)
class Refusal:
    """The HTTP answer to a request that may not go on."""

    status: HTTPStatus
    message: str  # one line, the body of a text/plain response
    allow: str | None = None  # the Allow header of a 405


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def host_header_is_loopback(value: str) -> bool:
    """`Host: 127.0.0.1:8765`, `[::1]:8765`, `localhost`: names this machine whatever DNS says."""
    host = value.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":")[0]
    return is_loopback(host)


def token_matches(wanted: str | None, given: object) -> bool:
    """True without a token; else a constant-time comparison (a non-string never matches)."""
    if not wanted:
        return True
    return isinstance(given, str) and hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                                                         wanted.encode())


def query_token(target: str) -> str | None:
    """The ?token= of a request target (how the page passes it: browsers cannot set headers)."""
    return (parse_qs(urlsplit(target).query).get("token") or [None])[0]


def origin_allowed(rules: AccessRules, origin: str | None, host: str | None) -> bool:
    """Non-browser clients send no Origin; the page this server serves connects from its own."""
    if origin is None or "*" in rules.allowed_origins or origin in rules.allowed_origins:
        return True
    return host is not None and origin in (f"http://{host}", f"https://{host}")


def check_request(rules: AccessRules, method: str, target: str,
                  headers: Iterable[tuple[str, str]]) -> Refusal | None:
    """None when the request may go on (a page file, /healthz, /v1/info or the handshake at
    /v1/stream), else the refusal to answer with. `headers`: every (name, value) as received."""
    seen: dict[str, list[str]] = {}
    for name, value in headers:
        seen.setdefault(name.lower(), []).append(value)
    for name in SINGLE_HEADERS:
        if len(seen.get(name.lower(), ())) > 1:
            return Refusal(HTTPStatus.BAD_REQUEST, f"duplicate {name} header")
    host = (seen.get("host") or [None])[0]
    origin = (seen.get("origin") or [None])[0]
    upgrade = (seen.get("upgrade") or [""])[0]
    if not rules.token and (host is None or not host_header_is_loopback(host)):
        return Refusal(HTTPStatus.FORBIDDEN, "this server only answers requests for localhost or a "
                       "loopback address (no --token)")
    path = urlsplit(target).path
    if path == STREAM_PATH:
        if not origin_allowed(rules, origin, host):
            return Refusal(HTTPStatus.FORBIDDEN, "origin not allowed")
        return None  # the websocket handshake goes on; the token comes with `start` (or ?token=)
    if upgrade.lower() == "websocket":
        return Refusal(HTTPStatus.NOT_FOUND, f"the websocket endpoint is {STREAM_PATH}")
    if method not in READ_METHODS:
        return Refusal(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD", allow=", ".join(READ_METHODS))
    if path == INFO_PATH and not token_matches(rules.token, query_token(target) or ""):
        return Refusal(HTTPStatus.UNAUTHORIZED, "token required (?token=)")
    return None


__all__ = ["INFO_PATH", "READ_METHODS", "AccessRules", "Refusal", "check_request", "host_header_is_loopback",
           "is_loopback", "origin_allowed", "query_token", "token_matches"]
