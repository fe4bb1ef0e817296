"""Errors raised by the trickle clients, named after go-livepeer's (trickle/trickle_subscriber.go).

    TrickleError
    ├── StreamNotFound          404: the channel does not exist (terminal)
    ├── EndOfStream             Lp-Trickle-Closed: the channel was closed (terminal)
    ├── SequenceNonexistent     470: the seq is not (or no longer) available; carries `latest`
    ├── SegmentExists           in-process publish to a seq that already holds data
    └── TrickleHTTPError        any other unexpected status; carries `status` and `body`

The server never raises these: it answers with go-livepeer's status codes instead.
"""

from __future__ import annotations


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


class TrickleHTTPError(TrickleError):
    def __init__(self, status: int, body: str, url: str) -> None:
        super().__init__(f"trickle HTTP {status} from {url}: {body.strip()[:200]}")
        self.status = status
        self.body = body
        self.url = url
