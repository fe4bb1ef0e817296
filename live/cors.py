"""CORS: what lets a page served from another origin call the service from a browser.

Two parts. A middleware answers preflights (`OPTIONS` with `Access-Control-Request-Method`)
for every route, before the route's own handler would refuse the method; a route with an
`OPTIONS` answer of its own (WHIP's, with `Accept-Post` and the ICE servers) keeps it, with the
preflight headers added. A response-prepare hook puts `Access-Control-Allow-Origin` and the
exposed headers on every other response, streamed ones (server-sent events, trickle reads) and
errors included, so that a page can read a JSON `detail` as well as an answer.

The service's guards are the bearer token, which a page must set in a header explicitly, and
capability URLs; never cookies or other credentials a browser adds by itself. So the answers
never carry `Access-Control-Allow-Credentials`, and `*` lets a page do only what its code could
do with curl and the same token or URL. An origin that is not allowed gets no CORS headers at
all: the browser then refuses the page its request (preflighted) or the answer (simple).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from protocol.errors import error_body
from protocol.trickle.headers import CLOSED, EXPECT_CONTENT, LATEST, RESET, SEQ

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ALLOW_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
# Always allowed: the token, JSON/SDP/trickle bodies, and the ETag precondition of a PATCH to a
# WebRTC resource (trickle ICE).
ALLOW_HEADERS = ("Authorization", "Content-Type", "If-Match")
# Allowed when a preflight asks for them: what EventSource sends on a reconnect and what trickle
# publishers send. Anything else asked for is left out, and the browser refuses the request.
OPTIONAL_HEADERS = ("Last-Event-ID", RESET, EXPECT_CONTENT)
EXPOSE_HEADERS = ", ".join(
    (
        "Location",  # the WHIP/WHEP resource to DELETE (and PATCH)
        "Link",  # ICE servers, and a WHIP answer's WHEP URL
        "ETag",  # a WHIP/WHEP resource's version, for If-Match
        "Accept-Post",
        "Accept-Patch",
        "Retry-After",  # 429 and 503
        "WWW-Authenticate",
        "X-Session-Id",  # the session a one-request WHIP start created
        SEQ,
        LATEST,
        CLOSED,
    )
)
MAX_AGE_S = 600
"""How long a browser may reuse a preflight: short enough that a narrowed --cors-origins
reaches pages within minutes."""


@dataclass(frozen=True)
class CorsPolicy:
    """Which origins may call the service: any (`*`), a list, or none (CORS off)."""

    any_origin: bool
    origins: frozenset[str]

    @classmethod
    def parse(cls, text: str) -> CorsPolicy:
        """`--cors-origins`: `*`, or comma-separated origins (`https://app.example`,
        `http://localhost:3000`); empty turns CORS off. Refuses what cannot be an origin."""
        entries = [e.strip() for e in text.split(",") if e.strip()]
        if entries == ["*"]:
            return cls(True, frozenset())
        if "*" in entries:
            raise ValueError("--cors-origins: give * alone, or a list of origins without *")
        return cls(False, frozenset(_origin(e) for e in entries))

    def allows(self, origin: str) -> bool:
        return self.any_origin or origin.lower() in self.origins

    def allow_origin(self, origin: str) -> str:
        # `*` is the honest answer for any origin: it cannot be combined with credentials,
        # which the service never asks for.
        return "*" if self.any_origin else origin


def _origin(entry: str) -> str:
    parts = urlsplit(entry)
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
    ):
        raise ValueError(
            f"--cors-origins: {entry!r} is not an origin; write scheme://host[:port] "
            "(https://app.example, http://localhost:3000), comma-separated, or *"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"--cors-origins: {entry!r} has a bad port") from None
    default = {"http": 80, "https": 443}[parts.scheme]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    # As browsers send it: lower case, no default port, no trailing slash.
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def is_preflight(request: web.Request) -> bool:
    return (
        request.method == hdrs.METH_OPTIONS
        and hdrs.ORIGIN in request.headers
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    )


def _allowed_headers(request: web.Request) -> str:
    asked = {
        h.strip().lower()
        for h in request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "").split(",")
    }
    return ", ".join((*ALLOW_HEADERS, *(h for h in OPTIONAL_HEADERS if h.lower() in asked)))


def add_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Answer preflights (outermost middleware) and mark every response for allowed origins.
    Does nothing when the policy allows no origin."""
    if not policy.any_origin and not policy.origins:
        return

    @web.middleware
    async def preflight(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not is_preflight(request):
            return await handler(request)
        origin = request.headers[hdrs.ORIGIN]
        if not policy.allows(origin):
            # No CORS headers: the browser blocks the page's request. The words are for whoever
            # reads the network panel.
            return web.json_response(
                error_body(f"the origin {origin} may not call this service (--cors-origins)"),
                status=403,
            )
        route = request.match_info.route
        if request.match_info.http_exception is None and route.method == hdrs.METH_OPTIONS:
            response = await handler(request)
        else:
            response = web.Response(status=204)
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOW_METHODS
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = _allowed_headers(request)
        response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = str(MAX_AGE_S)
        return response

    async def mark(request: web.Request, response: web.StreamResponse) -> None:
        if not policy.any_origin:
            # The answer depends on the Origin: caches must keep one per origin.
            response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None or not policy.allows(origin):
            return
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = policy.allow_origin(origin)
        response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS

    app.middlewares.insert(0, preflight)
    app.on_response_prepare.append(mark)
