"""The HTTP server the app runs on, with bounds on what one connection may hold.

aiohttp's server waits for a request's headers as long as the connection stays open, and
accepts connections until the process runs out of files. So, per connection:

- the request line and headers must arrive within `header_timeout_s` of the connection opening
  (or of the first byte of a later request on it); past it the client gets 408 and the
  connection is closed, whether it sent nothing or dripped a byte at a time;
- a connection with no request in flight is closed after `idle_timeout_s` (aiohttp's
  keep-alive timeout);
- while a request's body is being read, a gap of `body_timeout_s` without a byte closes the
  connection (a gap while the service itself is not reading does not count: a trickle publisher
  streams a segment for as long as it lasts, with pauses up to a segment's length);

and across connections at most `max_connections` are open. A connection past the limit takes
the place of the one idle the longest (no request in flight: silent, dripping headers, or kept
alive between requests), so that a flood of idle connections cannot shut real clients out;
when every open connection has a request in flight, it gets 503 and is closed at once.

Request bodies are not inflated (`auto_decompress` off): see protocol/requests.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_server import Server

from protocol.http_errors import QuietRequestHandler

logger = logging.getLogger(__name__)

FILES_HEADROOM = 256
"""Open files kept free beside the connections: models, recordings, WebRTC's UDP sockets."""
ACCEPT_ERROR = "socket.accept() out of system resource"
"""What asyncio reports (through the loop's exception handler) at each failed accept()."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0
    body_timeout_s: float = 60.0
    max_connections: int = 512


def fitted_max_connections(wanted: int) -> int:
    """`wanted`, or less where the open-files limit (RLIMIT_NOFILE) would not leave
    FILES_HEADROOM files beside that many connections."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or wanted + FILES_HEADROOM <= soft:
        return wanted
    fitted = max(1, soft - FILES_HEADROOM)
    logger.warning(
        "--max-connections %d lowered to %d: the open-files limit (ulimit -n) is %d and %d "
        "files are kept for other uses; raise the limit to allow more",
        wanted,
        fitted,
        soft,
        FILES_HEADROOM,
    )
    return fitted


def _answer(status: str, msg: str, extra: str = "") -> bytes:
    body = json.dumps({"detail": {"msg": msg}}).encode()
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"{extra}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedRequestHandler(QuietRequestHandler):
    """aiohttp's connection protocol with the header and body timeouts, and what the server
    needs to know to pick a connection to close: whether a request is in flight."""

    def __init__(self, manager: GuardedServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = manager
        self.limits = manager.limits
        self.idle_since = self._loop.time()
        self._finished = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # of the last request whose headers arrived
        self._body_seen = 0.0

    @property
    def idle(self) -> bool:
        """No request in flight or waiting: nothing would be lost by closing it."""
        return self._request_count == self._finished and not self._messages

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.guard.admit(self):
            assert self.transport is not None
            self.transport.write(self.guard.busy_answer)
            self.force_close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.guard.forget(self)
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and not body.is_eof():
            self._body_seen = self._loop.time()
        elif data and self._header_timer is None and self.idle:
            # The first byte of a new request: its headers must all come within the timeout.
            self._arm_header_timer()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:
            self._headers_arrived()

    async def _handle_request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super()._handle_request(*args, **kwargs)
        finally:
            self._finished += 1
            if self.idle:
                self.idle_since = self._loop.time()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            # A client's malformed request (a line over 8190 bytes, too many headers): it got
            # its 400; a traceback per attempt would let anyone flood the log.
            # Its kind only: aiohttp's message quotes the client's bytes.
            self.guard.bad_requests.log("malformed request answered 400: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)

    def _arm_header_timer(self) -> None:
        self._header_timer = self._loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _headers_arrived(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body = self._messages[-1][1] if self._messages else None
        if self._body is not None and not self._body.is_eof():
            self._body_seen = self._loop.time()
            if self._body_timer is None:
                self._body_timer = self._loop.call_at(
                    self._body_seen + self.limits.body_timeout_s, self._check_body
                )

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        if self.idle:  # never in the middle of an answer to an earlier request
            self.transport.write(self.guard.late_headers_answer)
        self.force_close()

    def _check_body(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            return
        now = self._loop.time()
        if self._reading_paused or self._buffer_paused:
            # The service is not reading (its buffer is full): the client is not the one late.
            self._body_seen = now
        deadline = self._body_seen + self.limits.body_timeout_s
        if now < deadline:
            self._body_timer = self._loop.call_at(deadline, self._check_body)
            return
        logger.debug("request body stalled for %.0f s: connection closed", now - self._body_seen)
        self.force_close()


class GuardedServer(Server):
    """aiohttp's server, making GuardedRequestHandler connections and holding the count."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self._open: dict[GuardedRequestHandler, None] = {}
        self._refusals = RateLimitedLog(logger, interval_s=10.0)
        self.bad_requests = RateLimitedLog(logger, interval_s=10.0)
        self.busy_answer = _answer(
            "503 Service Unavailable",
            f"the service has {limits.max_connections} connections open with requests in "
            "flight (--max-connections); retry later",
            "Retry-After: 1\r\n",
        )
        self.late_headers_answer = _answer(
            "408 Request Timeout",
            f"the request's headers did not all arrive within {limits.header_timeout_s:g} s "
            "(--http-header-timeout-s)",
        )

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def admit(self, handler: GuardedRequestHandler) -> bool:
        if len(self._open) >= self.limits.max_connections:
            idle = [h for h in self._open if h.idle]
            if not idle:
                self._refusals.log(
                    "connection refused (503): %d connections open, all with a request in "
                    "flight (--max-connections)",
                    len(self._open),
                )
                return False
            oldest = min(idle, key=lambda h: h.idle_since)
            self.forget(oldest)
            oldest.force_close()
        self._open[handler] = None
        return True

    def forget(self, handler: GuardedRequestHandler) -> None:
        self._open.pop(handler, None)


class ServiceRunner(web.AppRunner):
    """`web.AppRunner` serving through GuardedServer: what `live-v2v serve` runs."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(
            app, keepalive_timeout=limits.idle_timeout_s, auto_decompress=False, **kwargs
        )
        self.limits = limits

    async def _make_server(self) -> Server:
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            limits=self.limits,
            **plain._kwargs,
        )


class RateLimitedLog:
    """A warning said at most once per interval, with the count of those left unsaid."""

    def __init__(self, log: logging.Logger, interval_s: float) -> None:
        self.log_ = log
        self.interval_s = interval_s
        self._last = -math.inf
        self._unsaid = 0

    def log(self, msg: str, *args: Any) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._unsaid += 1
            return False
        unsaid, self._unsaid, self._last = self._unsaid, 0, now
        self.log_.warning(msg + " (%d more like it since the last said)", *args, unsaid)
        return True


def quiet_accept_errors(
    loop: asyncio.AbstractEventLoop, interval_s: float = 10.0
) -> Callable[[], None]:
    """Say asyncio's failed accept() (out of files) once per interval, not once per attempt;
    other loop errors go where they went. Returns what undoes it."""
    previous = loop.get_exception_handler()
    said = RateLimitedLog(logger, interval_s)

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") == ACCEPT_ERROR:
            said.log(
                "cannot accept connections: %s; the open-files limit (ulimit -n) is reached, "
                "lower --max-connections or raise the limit",
                context.get("exception"),
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)
