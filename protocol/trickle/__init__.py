"""The trickle protocol: HTTP segments over named channels, wire-compatible with go-livepeer.

Server: `TrickleServer` + `create_trickle_app` (an aiohttp sub-app). Clients: `TricklePublisher`
and `TrickleSubscriber` over HTTP, `LocalPublisher` and `LocalSubscriber` in process.
See protocol/trickle.md in the shared notes for the behaviour this follows.
"""

from .errors import (
    EndOfStream,
    SegmentDropped,
    SegmentExists,
    SequenceNonexistent,
    StreamNotFound,
    TrickleError,
    TrickleHTTPError,
    client_error_in_words,
)
from .local import LocalPublisher, LocalSubscriber
from .publisher import TricklePublisher, client_session
from .server import TRICKLE_SERVER, ChannelRefused, TrickleConfig, TrickleServer, create_trickle_app
from .subscriber import TrickleSubscriber

__all__ = [
    "TRICKLE_SERVER",
    "ChannelRefused",
    "EndOfStream",
    "LocalPublisher",
    "LocalSubscriber",
    "SegmentDropped",
    "SegmentExists",
    "SequenceNonexistent",
    "StreamNotFound",
    "TrickleConfig",
    "TrickleError",
    "TrickleHTTPError",
    "TricklePublisher",
    "TrickleServer",
    "TrickleSubscriber",
    "client_error_in_words",
    "client_session",
    "create_trickle_app",
]
