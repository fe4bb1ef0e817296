"""What this service changes in aiortc's video receiver, per receiver (a peer connection that
is not given these is left as aiortc makes it): frames end on their RTP marker bit
(`end_frames_on_marker`), and a bound on how long a received frame may wait for the decoder
(`bound_decode_wait`). The only place where this service reaches into aiortc's receiver.

aiortc's jitter buffer ends a video frame only when the first packet of the next one arrives:
one frame interval (33 ms at 30 fps) late on every receiving hop (bench/webrtc_latency.py).
Browsers end a frame on its marker bit; `MarkerJitterBuffer` does too, and notes when each
frame's first and last packets arrived, which `FreshDecodeQueue` keeps for the decoded frame
(`arrivals`): the start of the service's own delay.

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
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket

logger = logging.getLogger(__name__)

MAX_DECODE_WAIT_S = 0.2  # older than this, waiting frames are dropped for the next keyframe
ASK_AGAIN_S = 1.0  # a keyframe asked for and not come by then is asked for again

_QUEUE = "_RTCRtpReceiver__decoder_queue"  # aiortc 1.x: the decoder thread's input
_ERROR = "_RTCRtpReceiver__decoder_error"  # set: a PLI goes out with the next packet
_THREAD = "_RTCRtpReceiver__decoder_thread"  # None until the receiver starts
_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # made by the receiver's constructor
ARRIVALS_KEPT = 64  # frames whose arrival times wait for their decoded frame (2 s at 30 fps)


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


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame leaves it as soon as its last packet (the one
    with the RTP marker bit) is in; a frame whose marker packet is lost still completes
    aiortc's way, on the next frame's first packet. Each frame it hands on carries
    `first_at` and `last_at`: when its first and last packets came in (time.monotonic())."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self._first_at: dict[int, float] = {}  # RTP timestamp -> its first packet's arrival

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        now = time.monotonic()
        if packet.timestamp not in self._first_at:
            if len(self._first_at) >= ARRIVALS_KEPT:  # frames that never completed
                del self._first_at[next(iter(self._first_at))]
            self._first_at[packet.timestamp] = now
        pli, frame = super().add(packet)
        if frame is not None:
            frame.first_at = self._first_at.pop(frame.timestamp, now)  # type: ignore[attr-defined]
            frame.last_at = now  # type: ignore[attr-defined]
        return pli, frame

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        if self._origin is not None:
            packets: list[RtpPacket] = []
            for count in range(self._capacity):
                packet = self._packets[(self._origin + count) % self._capacity]
                if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                    break  # a gap, or the next frame: aiortc's own rule decides
                packets.append(packet)
                if packet.marker:
                    self.remove(count + 1)
                    data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
                    return JitterFrame(data=data, timestamp=packets[0].timestamp)
        return super()._remove_frame(sequence_number)


def end_frames_on_marker(receiver: RTCRtpReceiver) -> MarkerJitterBuffer | None:
    """Give a video receiver that has not started yet a `MarkerJitterBuffer`; None (aiortc
    left as it is, with a log line) when this aiortc's receiver does not look as expected."""
    current = getattr(receiver, _BUFFER, None)
    if (
        type(current) is not JitterBuffer
        or not current._is_video
        or getattr(receiver, _THREAD, "missing") is not None
    ):
        logger.warning("aiortc's receiver changed: video frames end one frame late")
        return None
    buffer = MarkerJitterBuffer(current.capacity)
    setattr(receiver, _BUFFER, buffer)
    return buffer


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
        self.arrivals: collections.OrderedDict[int, tuple[float, float, float]] = (
            collections.OrderedDict()
        )
        """Frame timestamp (the decoded frame's pts) -> when its first and last packets
        arrived and when it was queued for the decoder, for frames not yet taken by `arrival`;
        filled when the receiver's jitter buffer is a `MarkerJitterBuffer`."""

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
        if item is not None:
            self._note_arrival(item[1], now)
        self.queue.append((now, item))

    def _note_arrival(self, frame: Any, now: float) -> None:
        last_at = getattr(frame, "last_at", None)
        if last_at is None:
            return
        if len(self.arrivals) >= ARRIVALS_KEPT:
            self.arrivals.popitem(last=False)
        self.arrivals[frame.timestamp] = (frame.first_at, last_at, now)

    def arrival(self, pts: int | None) -> tuple[float, float, float] | None:
        """When the frame decoded with `pts` arrived (see `arrivals`); the frames queued
        before it that were never decoded are let go. Event loop only, like `put`."""
        found = self.arrivals.pop(pts, None) if pts is not None else None
        if found is not None:
            while self.arrivals and next(iter(self.arrivals.values()))[2] <= found[2]:
                self.arrivals.popitem(last=False)
        return found

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
