"""The seam between the frame loop and the transports: a `FrameSource` feeds a session, each
`FrameSink` reads it. The loop knows nothing of MPEG-TS, HTTP or RTP; a transport is a
source/sink pair and nothing else (trickle in `trickle_io`, frames in memory in `memory_io`).

Everything that crosses the seam is on the 90 kHz clock (`pts` with `time_base` 1/90000).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from protocol.media import TIME_BASE, AudioPacket, HasPicture, VideoFrame

from .stats import SessionStats

MediaItem = VideoFrame | AudioPacket


class InputFailed(Exception):
    """The source cannot go on (an unreachable input, a refused URL); ends the session."""


class OutputClosed(Exception):
    """A sink's receiver is gone for good (its channel deleted or closed)."""


@dataclass(slots=True)
class OutputFrame(HasPicture):
    """A processed frame on its way out, with the input frame's timing. Sinks encode its
    `picture`: the input's decoded frame when a pipeline passed it through unchanged, which
    then may have no RGB at all (`HasPicture`)."""

    rgb: np.ndarray | None  # H x W x 3 uint8 RGB; None: `decoded` has the picture
    pts: int
    arrived: float  # time.monotonic() when the input frame's bytes arrived
    loading: bool  # a loading frame standing in while the pipeline (re)loads
    time_base: Fraction = TIME_BASE
    decoded: av.VideoFrame | None = None  # the input's decoded frame, where the picture is it


@dataclass
class MediaContext:
    """What the loop lends its sources and sinks: where to report, where to count."""

    error: Callable[[str], None]
    """Report a problem as an `error` event (plain words: what was wrong, what to send)."""
    stats: SessionStats
    log: logging.Logger | logging.LoggerAdapter[logging.Logger]
    needs_rgb: bool = True
    """Whether the pipeline reads RGB. False (it passes its input through): a source leaves
    the RGB image out of frames whose decoded frame has the picture as it is, and nothing
    converts it on the way (`HasPicture`)."""


class FrameSource(ABC):
    """Decoded video frames and compressed audio, in stream order, until the input ends."""

    name: str = "source"
    arrives_live: bool = False
    """Frames arrive when they were captured (a WebRTC publisher), never ahead of time: the
    loop releases them at once instead of pacing them, since holding a frame that arrived
    late behind an earlier one only adds delay."""

    @abstractmethod
    def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        """Iterate the input. Ending means the input ended; `InputFailed` means it cannot
        be read. Frames come as they are decoded: the loop paces them."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the source holds (called once, after iteration stopped)."""


class FrameSink(ABC):
    """Takes processed frames (the newest, when it is ready) and the audio that goes with them."""

    name: str = "sink"
    primary: bool = False
    """The session's own output: when it closes for good the session ends ("output closed"),
    and its deliveries are the session's `frames_out`."""
    realtime: bool = False
    """Watched as it happens (a WebRTC viewer's encoder): a frame goes to the other sinks only
    once a real-time sink has sent it, so their encoders (trickle segments, recordings, which
    buffer anyway) do not compete with it for the machine's cores. `send` must not wait for
    the network."""

    @property
    def wanted(self) -> bool:
        """Whether anyone receives what this sink sends now (read on the event loop, once a
        frame). While not, the loop hands it no frame (sent nor dropped) and calls `pause`
        once; the session's `frames_out` then counts what the other sinks send."""
        return True

    async def pause(self) -> None:  # noqa: B027 - optional hook
        """Nobody receives the frames for now: end what is under way (a segment), so that
        the next frame sent starts afresh (at a keyframe)."""

    async def open(self, context: MediaContext) -> None:  # noqa: B027 - optional hook
        """Called once before the first frame."""

    @abstractmethod
    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        """Deliver one frame and the audio up to its time. True when the frame went out,
        False when it was dropped. Raises `OutputClosed` when the receiver is gone."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release (called once, also after `OutputClosed`)."""
