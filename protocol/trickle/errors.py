"""Errors raised by the trickle clients, named after go-livepeer's (trickle/trickle_subscriber.go).

    TrickleError
    ├── StreamNotFound          404: the channel does not exist (terminal)
    ├── EndOfStream             Lp-Trickle-Closed: the channel was closed (terminal)
    ├── SequenceNonexistent     470: the seq is not (or no longer) available; carries `latest`
    ├── SegmentExists           in-process publish to a seq that already holds data
    ├── SegmentDropped          the segment was dropped to keep its channel in its byte budget
    └── TrickleHTTPError        any other unexpected status (a redirect too); carries `status`
                                and the start of the answer's `body` (never in its message)

The server never raises these: it answers with go-livepeer's status codes instead. Messages say
what failed in words; they never carry what a remote server sent (its body can be anything,
and error texts reach clients in events).
"""

from __future__ import annotations

import os
import ssl

import aiohttp


class TrickleError(Exception):
    """Base of every trickle client error."""


class StreamNotFound(TrickleError, LookupError):
    def __init__(self, url: str) -> None:
        super().__init__(f"trickle channel not found: {url}")
        self.url = url


class EndOfStream(TrickleError):
    def __init__(self, url: str) -> None:
        super().__init__(f"trickle channel closed: {url}")
        self.url = url


class SequenceNonexistent(TrickleError, LookupError):
    def __init__(self, seq: int, latest: int) -> None:
        super().__init__(f"trickle seq {seq} not available (latest {latest})")
        self.seq = seq
        self.latest = latest


class SegmentExists(TrickleError, ValueError):
    def __init__(self, seq: int) -> None:
        super().__init__(f"trickle seq {seq} already holds data")
        self.seq = seq


class SegmentDropped(TrickleError):
    def __init__(self, seq: int) -> None:
        super().__init__(
            f"trickle seq {seq} was dropped before it was read whole: its channel was over "
            "its memory budget"
        )
        self.seq = seq


class TrickleHTTPError(TrickleError):
    """`name` says which URL it is to its user ("subscribe_url"); the URL itself when unset.
    `body`, the start of the answer, is for a program that knows the server; the message
    leaves it out."""

    def __init__(self, status: int, url: str, name: str | None = None, body: str = "") -> None:
        what = name or url
        if 300 <= status < 400:
            text = (
                f"{what} answered HTTP {status}, a redirect, which is not followed (trickle "
                "servers do not redirect, and a redirect could lead anywhere)"
            )
        else:
            text = f"{what} answered HTTP {status}"
        super().__init__(text)
        self.status = status
        self.url = url
        self.body = body


def client_error_in_words(exc: BaseException) -> str:
    """A failed request in words, for a client to read: aiohttp's messages carry tuples and
    reprs ("Connect call failed ('127.0.0.1', 1)"), which say nothing to a person."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert = exc.certificate_error
        reason = getattr(cert, "verify_message", "") or getattr(cert, "reason", "") or ""
        return f"the TLS certificate of {exc.host}:{exc.port} is not trusted" + (
            f" ({reason})" if reason else ""
        )
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return f"no TLS connection to {exc.host}:{exc.port} could be made"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"the host {exc.host} is not known"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # The errno's own text: asyncio's strerror holds the address as a tuple.
        errno = exc.os_error.errno
        reason = os.strerror(errno).lower() if errno and errno > 0 else "the connection failed"
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the server's answer was cut short"
    if isinstance(exc, (TimeoutError, aiohttp.ServerTimeoutError)):
        return "no answer in time"
    if isinstance(exc, ssl.SSLError):
        return "the TLS connection failed"
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    if isinstance(exc, TrickleError):
        return str(exc)
    return "the request failed"
