"""A bound on how long a received video frame may wait for aiortc's decoder: the one place where
this service reaches into aiortc's receiver.

aiortc's `RTCRtpReceiver` hands each complete encoded frame to its decoder thread through a
`queue.Queue` with no bound. When that thread falls behind (a machine starved of CPU), frames
wait there and the delay grows for as long as it stays behind. Encoded video cannot simply be
thinned out (each frame refers to the one before it), so `bound_decode_wait` swaps that queue,
per receiver and before its decoder starts, for a `FreshDecodeQueue`: once the oldest frame
waiting is older than `max_age_s`, everything waiting is dropped, the publisher is asked for a
keyframe and nothing reaches the decoder until one arrives. The request goes out through
aiortc's own path: the receiver sends a picture-loss indication (RTCP PLI) on its next packet
when its decoder-error flag is set, as it does after a failed decode.

aiortc has no setting for any of this; its private names are used here only, and
`bound_decode_wait` refuses (returns False, leaving aiortc as it is) if they are not found.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from aiortc import RTCRtpReceiver

logger = logging.getLogger(__name__)

MAX_DECODE_WAIT_S = 0.2  # older than this, waiting frames are dropped for the next keyframe
ASK_AGAIN_S = 1.0  # a keyframe asked for and not come by then is asked for again

_QUEUE = "_RTCRtpReceiver__decoder_queue"  # aiortc 1.x: the decoder thread's input
_ERROR = "_RTCRtpReceiver__decoder_error"  # set: a PLI goes out with the next packet
_THREAD = "_RTCRtpReceiver__decoder_thread"  # None until the receiver starts


def is_keyframe(mime: str, data: bytes) -> bool | None:
    """Whether an encoded frame (as aiortc's depayloader leaves it) can be decoded on its own;
    None for a codec this does not know."""
    if mime == "video/VP8":
        return bool(data) and not data[0] & 0x01  # frame tag: P bit clear = key frame
    if mime == "video/H264":
        at = data.find(b"\x00\x00\x01")
        while at != -1 and at + 3 < len(data):
            if data[at + 3] & 0x1F == 5:  # an IDR slice
                return True
            at = data.find(b"\x00\x00\x01", at + 3)
        return False
    return None


class FreshDecodeQueue(queue.Queue[Any]):
    """The decoder's input, holding frames no older than `max_age_s` (see the module's doc).

    Items are aiortc's `(codec, encoded frame)` pairs, or None (stop the decoder), which is
    never dropped. `clock` is there for tests."""

    def __init__(
        self,
        max_age_s: float,
        on_stale: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.max_age_s = max_age_s
        self.on_stale = on_stale
        self.clock = clock
        self.dropped = 0  # encoded frames never decoded
        self.waiting_for_key = False
        self.stalls = 0  # times the backlog was dropped
        self._asked_at = 0.0

    # queue.Queue's documented hooks for subclasses; called with its lock held.
    def _init(self, maxsize: int) -> None:
        self.queue: collections.deque[tuple[float, Any]] = collections.deque()

    def _qsize(self) -> int:
        return len(self.queue)

    def _get(self) -> Any:
        return self.queue.popleft()[1]

    def _put(self, item: Any) -> None:
        now = self.clock()
        key = None if item is None else is_keyframe(item[0].mimeType, item[1].data)
        if key is not None:  # a frame of a codec we can resync
            if self.queue and now - self.queue[0][0] > self.max_age_s:
                self._drop_waiting()
                if not key:
                    self.stalls += 1
                    self._ask_for_key(now)
            if self.waiting_for_key and not key:
                self.dropped += 1
                if now - self._asked_at > ASK_AGAIN_S:  # the request or its answer was lost
                    self._ask_for_key(now)
                return
            if key:
                self.waiting_for_key = False
        self.queue.append((now, item))

    def _drop_waiting(self) -> None:
        kept = collections.deque(w for w in self.queue if w[1] is None)  # a stop stays
        self.dropped += len(self.queue) - len(kept)
        self.queue = kept

    def _ask_for_key(self, now: float) -> None:
        self.waiting_for_key = True
        self._asked_at = now
        self.on_stale()


def bound_decode_wait(
    receiver: RTCRtpReceiver, max_age_s: float = MAX_DECODE_WAIT_S
) -> FreshDecodeQueue | None:
    """Give a video receiver that has not started yet a `FreshDecodeQueue`; None (aiortc left
    as it is, with a log line) when this aiortc's receiver does not look as expected."""
    current = getattr(receiver, _QUEUE, None)
    error = getattr(receiver, _ERROR, None)
    if (
        type(current) is not queue.Queue
        or not isinstance(error, threading.Event)
        or getattr(receiver, _THREAD, "missing") is not None
    ):
        logger.warning("aiortc's receiver changed: received frames wait for its decoder unbounded")
        return None
    fresh = FreshDecodeQueue(max_age_s, error.set)
    setattr(receiver, _QUEUE, fresh)
    return fresh
