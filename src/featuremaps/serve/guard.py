"""Who may talk to the viewer: the Host, token, Origin and fetch-site checks.

The viewer runs code and reads memory on the user's machine, so every request passes
these checks, whatever address the server binds:

- **Host** (against DNS rebinding): a loopback name or address (``localhost``,
  ``127.0.0.0/8``, ``::1``, also as ``[::1]:8000``), the bound address itself, or a
  name given with ``--allow-host``. Anything else gets 400.
- **Token**: a server bound beyond loopback without ``--allow-host`` (or with a wildcard
  one) makes up an access token, printed at start as a URL with ``?token=...`` (as
  Jupyter does). A request with it gets an HttpOnly, SameSite=Strict cookie;
  requests with neither get 403 saying where the token is.
- **Origin**: when a request carries one, its scheme, host and port must be those of the
  server as the browser addressed it (``http://localhost:9999`` against a server on
  8000 is refused). API requests that a browser marks as cross-site are refused too.

Example:
    >>> g = Guard.for_bind("0.0.0.0", 8000)
    >>> g.token is not None and g.host_allowed("127.0.0.2") and not g.host_allowed("evil.test")
    True
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from ..errors import FeatureMapsError

WILDCARD_BINDS = ("0.0.0.0", "::", "")
TOKEN_PARAM = "token"
_Scope = dict[str, Any]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, IPv6 with or without brackets) is this machine only.

    Example:
        >>> [is_loopback(h) for h in ("localhost", "127.0.0.2", "[::1]", "0.0.0.0", "x.org")]
        [True, True, True, False, False]
    """
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a ``Host`` header value, or None when it is malformed.

    Example:
        >>> split_host("[::1]:8000"), split_host("LocalHost."), split_host("a:b")
        (('::1', 8000), ('localhost', None), None)
    """
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port = rest[1:] if rest else ""
    else:
        if value.count(":") > 1:
            return None
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()) or len(port) > 5:
        return None
    return name.lower().rstrip("."), int(port) if port else None


def _normalize(given: str) -> str:
    name = given.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name and name != "*":
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            name = ""  # a port or a scheme: refused below
    if not name or any(c in name for c in "/ @?#"):
        raise FeatureMapsError(
            f"--allow-host {given!r}: give a host name or address as browsers will type it "
            "(e.g. myhost.lan or 192.168.1.5), without scheme, port or path"
        )
    return name


@dataclass(frozen=True)
class Guard:
    """The access rules of one server (see the module docstring).

    Args:
        port: the port the server listens on (names the token cookie).
        allow_hosts: names accepted in ``Host`` beside the loopback ones; ``*`` is any
            name and ``*.example.org`` any name under it.
        token: the access token every request must carry, or None (loopback only).
    """

    port: int = 8000
    allow_hosts: tuple[str, ...] = ()
    token: str | None = None
    bind: str = "127.0.0.1"

    @classmethod
    def for_bind(
        cls, bind: str, port: int, allow_hosts: Sequence[str] = (), token: str | None = None
    ) -> Guard:
        """The guard for a server bound to ``bind``: a token when reachable by anyone.

        A loopback bind needs no token; a specific non-loopback address is accepted as a
        ``Host``; a bind beyond loopback without ``allow_hosts`` or with a wildcard among
        them makes up a token (unless one is given).
        """
        names = tuple(dict.fromkeys(_normalize(n) for n in allow_hosts))
        bind_name = bind.strip().lower()
        if bind_name.startswith("[") and bind_name.endswith("]"):
            bind_name = bind_name[1:-1]
        exposed = not is_loopback(bind_name)
        if exposed and bind_name not in WILDCARD_BINDS and bind_name not in names:
            names = (*names, bind_name)
        wildcard = any("*" in n for n in names)
        if exposed and (not allow_hosts or wildcard) and token is None:
            token = secrets.token_urlsafe(24)
        return cls(port=port, allow_hosts=names, token=token, bind=bind_name)

    @property
    def cookie(self) -> str:
        """Name of the cookie that carries the token (per port: cookies ignore ports)."""
        return f"featuremaps-token-{self.port}"

    def host_allowed(self, name: str) -> bool:
        """Whether a ``Host`` name (no port, lower case) is accepted."""
        if is_loopback(name):
            return True
        for allowed in self.allow_hosts:
            if allowed == "*" or allowed == name:
                return True
            if allowed.startswith("*.") and name.endswith(allowed[1:]):
                return True
        return False

    def origin_allowed(self, origin: str, host_port: int | None) -> bool:
        """Whether ``Origin`` is the server as the browser addressed it: http, host, port."""
        scheme, sep, rest = origin.partition("://")
        if not sep or scheme.lower() != "http" or "/" in rest:
            return False
        parts = split_host(rest)
        if parts is None:
            return False
        name, port = parts
        return self.host_allowed(name) and (port or 80) == (host_port or 80)

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (
            given is not None and secrets.compare_digest(given.encode(), self.token.encode())
        )

    def urls(self) -> list[str]:
        """The addresses to open (with the token when one is needed)."""
        wildcard = self.bind in WILDCARD_BINDS
        hosts = [socket.gethostname(), "127.0.0.1"] if wildcard else [self.bind]
        suffix = "?" + urlencode({TOKEN_PARAM: self.token}) if self.token else ""
        return [f"http://{_bracket(h)}:{self.port}/{suffix}" for h in hosts]

    def refusal(self) -> str:
        return (
            "this viewer needs its access token: open the address with ?token=... that "
            "`featuremaps serve` printed in its terminal when it started (the first visit "
            "with it stores the token as a cookie)"
        )


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class GuardMiddleware:
    """ASGI middleware applying a :class:`Guard` to every HTTP request."""

    def __init__(self, app: Any, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: _Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from starlette.requests import Request
        from starlette.responses import JSONResponse, PlainTextResponse

        request = Request(scope)
        api = scope["path"].startswith("/api/")
        g = self.guard

        def refuse(status: int, message: str) -> Any:
            headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
            if api:
                return JSONResponse({"detail": message}, status_code=status, headers=headers)
            return PlainTextResponse(message, status_code=status, headers=headers)

        parts = split_host(request.headers.get("host", ""))
        if parts is None or not g.host_allowed(parts[0]):
            await refuse(400, "Invalid host header")(scope, receive, send)
            return
        origin = request.headers.get("origin")
        if origin is not None and not g.origin_allowed(origin, parts[1]):
            await refuse(403, f"cross-origin request from {origin} refused")(scope, receive, send)
            return
        if api and request.headers.get("sec-fetch-site") in ("cross-site", "same-site"):
            await refuse(403, "cross-site request refused")(scope, receive, send)
            return
        set_cookie = False
        if g.token is not None:
            given = request.query_params.get(TOKEN_PARAM)
            if given is not None:
                if not g.token_ok(given):
                    await refuse(403, "wrong access token. " + g.refusal())(scope, receive, send)
                    return
                set_cookie = True
            elif not (g.token_ok(request.cookies.get(g.cookie)) or g.token_ok(_bearer(request))):
                await refuse(403, g.refusal())(scope, receive, send)
                return
        if not set_cookie:
            await self.app(scope, receive, send)
            return
        # The response itself (no redirect: a Strict cookie set on a redirect reached from
        # another site would not come back with the redirected request); the page then
        # drops the token from the address bar (viewer.js).
        cookie = dict(key=g.cookie, value=g.token, httponly=True, samesite="strict", path="/")
        header = _cookie_header(**cookie)  # type: ignore[arg-type]

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"set-cookie", header)]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _bearer(request: Any) -> str | None:
    auth: str = request.headers.get("authorization", "")
    kind, _, value = auth.partition(" ")
    return value.strip() if kind.lower() in ("bearer", "token") and value else None


def _cookie_header(**cookie: Any) -> bytes:
    from starlette.responses import Response

    r = Response()
    r.set_cookie(**cookie)
    return r.headers["set-cookie"].encode("latin-1")
