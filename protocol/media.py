"""Media of the live channels: MPEG-TS segments in, RGB frames out, and back (the only av import).

`StreamDecoder` turns the bytes of consecutive trickle segments into one continuous stream of
frames: each segment may come from a different encoder and restart its timestamps, so timestamps
are mapped onto one monotonic 90 kHz timeline. `SegmentEncoder` encodes frames with libx264 into
MPEG-TS, one GOP per segment, streaming each segment's bytes to a sink as they are produced.

Both are plain synchronous classes: the session runs them on threads of their own (PyAV releases
the GIL inside FFmpeg calls).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import av.error
import numpy as np

from .mpegts import PES, TSDemuxer

logger = logging.getLogger(__name__)

CLOCK = 90_000
TIME_BASE = Fraction(1, CLOCK)
MAX_GAP = 10 * CLOCK  # a jump ahead larger than this between segments is a timestamp restart
MAX_BACKSTEP = CLOCK // 2  # a segment starting further back than this restarted its clock
AUDIO_LEAD = CLOCK // 25  # audio muxed this far ahead of a video frame releases the frame


@dataclass(slots=True)
class VideoFrame:
    """A decoded frame on the session's timeline."""

    image: np.ndarray  # H x W x 3, uint8 RGB
    pts: int  # 90 kHz, monotonic over the whole stream
    arrived: float  # time.monotonic() when its last byte arrived
    index: int  # position in the stream, counting from 0


@dataclass(slots=True)
class AudioPacket:
    """Compressed audio carried from input to output unchanged (it bypasses the model)."""

    codec: str
    pts: int
    data: bytes


class Timeline:
    """Maps each segment's timestamps onto one increasing timeline.

    The first timestamp of a segment decides its offset: kept when it continues the previous
    segment, re-based right after the last output timestamp when it went back more than
    MAX_BACKSTEP or jumped ahead more than MAX_GAP (a new encoder or a restarted publisher).
    """

    def __init__(self) -> None:
        self.offset = 0
        self.last: int | None = None
        self.step = CLOCK // 30
        self._fresh = True

    def new_segment(self) -> None:
        self._fresh = True

    def map(self, pts: int) -> int:
        if self._fresh:
            self._fresh = False
            if self.last is not None:
                mapped = pts + self.offset
                # A little backwards is normal (audio interleaved behind video); a lot
                # backwards, or a big jump ahead, is a new encoder or a restart.
                if mapped < self.last - MAX_BACKSTEP or mapped > self.last + MAX_GAP:
                    self.offset = self.last + self.step - pts
        out = pts + self.offset
        if self.last is not None and out > self.last:
            self.step = min(out - self.last, CLOCK)
        self.last = out if self.last is None else max(self.last, out)
        return out


class StreamDecoder:
    """Decodes consecutive MPEG-TS segments (H.264 video; audio passed through).

    `size` (width, height) scales each frame to cover it and crops the centre, as ai-runner
    does; None keeps the input size. Bad data is counted in `errors`, never raised: the next
    good segment recovers.
    """

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self.timeline = Timeline()
        self.errors = 0
        self.frames = 0
        self._demuxer = TSDemuxer()
        self._codec: av.CodecContext | None = None
        self._codec_name = ""
        self._last_error = ""

    def begin_segment(self) -> None:
        # A fresh demuxer and decoder per segment: segments start with a keyframe and may come
        # from another encoder, so no state from the previous one may leak into this one.
        self._demuxer = TSDemuxer()
        self._codec = None
        self.timeline.new_segment()

    def feed(self, data: bytes) -> list[VideoFrame | AudioPacket]:
        return self._decode(self._demuxer.feed(data))

    def end_segment(self) -> list[VideoFrame | AudioPacket]:
        out = self._decode(self._demuxer.flush())
        if self._codec is not None:
            out.extend(self._decode_packet(None, 0))
        bad = self._demuxer.bad_packets + (1 if self._demuxer.skipped_bytes else 0)
        if bad:
            self.errors += bad
            self._last_error = (
                f"bad MPEG-TS data: {self._demuxer.skipped_bytes} bytes skipped, "
                f"{self._demuxer.bad_packets} bad packets"
            )
        return out

    def take_error(self) -> str:
        """The last error since the previous call ('' if none)."""
        error, self._last_error = self._last_error, ""
        return error

    def _decode(self, packets: list[PES]) -> list[VideoFrame | AudioPacket]:
        out: list[VideoFrame | AudioPacket] = []
        for pes in packets:
            if pes.pts is None:
                continue
            if pes.kind == "audio":
                out.append(AudioPacket(pes.codec, self.timeline.map(pes.pts), pes.data))
            elif pes.kind == "video":
                if self._codec is None or self._codec_name != pes.codec:
                    self._codec = _video_decoder(pes.codec)
                    self._codec_name = pes.codec
                out.extend(self._decode_packet(pes.data, pes.pts))
        return out

    def _decode_packet(self, data: bytes | None, pts: int) -> list[VideoFrame]:
        assert self._codec is not None
        packet = None
        if data is not None:
            packet = av.Packet(data)
            packet.pts = pts
            packet.time_base = TIME_BASE
        try:
            decoded = self._codec.decode(packet)
        except av.error.FFmpegError as exc:
            self.errors += 1
            self._last_error = f"video decode failed: {exc}"
            return []
        now = time.monotonic()
        frames = []
        for frame in decoded:
            if frame.pts is None:
                continue
            frames.append(
                VideoFrame(self._to_rgb(frame), self.timeline.map(frame.pts), now, self.frames)
            )
            self.frames += 1
        return frames

    def _to_rgb(self, frame: av.VideoFrame) -> np.ndarray:
        if self.size is None or (frame.width, frame.height) == self.size:
            return frame.to_ndarray(format="rgb24")
        width, height = self.size
        scale = max(width / frame.width, height / frame.height)
        scaled_w = max(width, round(frame.width * scale))
        scaled_h = max(height, round(frame.height * scale))
        image = frame.reformat(scaled_w, scaled_h, format="rgb24").to_ndarray()
        top = (scaled_h - height) // 2
        left = (scaled_w - width) // 2
        return np.ascontiguousarray(image[top : top + height, left : left + width])


def _video_decoder(codec: str) -> av.CodecContext:
    ctx = av.CodecContext.create(codec, "r")
    # Slice threads decode a frame in parallel without holding frames back; frame threads
    # would add one frame of delay per thread.
    ctx.thread_type = "SLICE"
    ctx.thread_count = 2
    return ctx


class SegmentSink(Protocol):
    """Where encoded segments go; called on the encoder's thread."""

    def start(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...


class _SinkFile(io.RawIOBase):
    def __init__(self, sink: SegmentSink) -> None:
        self._sink = sink

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._sink.write(bytes(data))
        return len(data)


@dataclass
class EncoderSettings:
    segment_s: float = 1.0  # one GOP per segment; a keyframe starts each one
    preset: str = "superfast"
    crf: int = 23
    threads: int = 2


class SegmentEncoder:
    """Encodes RGB frames to MPEG-TS segments (H.264, libx264 zerolatency, no B-frames).

    A segment ends when `segment_s` of input time has passed, or the frame size changes; each
    segment is a fresh mux and encoder, so it starts with PAT/PMT and an IDR frame. Bytes reach
    the sink as soon as each frame is muxed. `on_frame(pts)` is called once a frame's bytes have
    been handed to the sink.
    """

    def __init__(
        self,
        sink: SegmentSink,
        settings: EncoderSettings | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> None:
        self.sink = sink
        self.settings = settings or EncoderSettings()
        self.on_frame = on_frame
        self.segments = 0
        self._container: av.container.OutputContainer | None = None
        self._stream: av.VideoStream | None = None
        self._audio: av.AudioStream | None = None
        self._segment_start = 0
        self._last_pts: int | None = None
        self._size = (0, 0)
        self._carry_audio = False

    def encode(self, image: np.ndarray, pts: int, audio: Sequence[AudioPacket] = ()) -> None:
        """Encode one frame, then mux the passthrough `audio` packets that go with it.

        FFmpeg's interleaver holds a video packet until a packet of every other stream with a
        later timestamp arrives; callers pass audio up to one frame ahead (`AUDIO_LEAD`) so that
        the frame leaves at once rather than with the next one.
        """
        if self._last_pts is not None and pts <= self._last_pts:
            return  # the muxer needs increasing timestamps; a late duplicate is dropped
        height, width = image.shape[:2]
        wants_audio = any(packet.codec == "aac" for packet in audio)
        if (
            self._container is None
            or (width, height) != self._size
            or pts - self._segment_start >= self.settings.segment_s * CLOCK
            or (wants_audio and self._audio is None)
        ):
            self._close_segment()
            self._open_segment(width, height, pts, wants_audio)
        assert self._container is not None and self._stream is not None
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts = pts
        frame.time_base = TIME_BASE
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self._last_pts = pts
        for packet in audio:
            self._mux_audio(packet)
        if self.on_frame is not None:
            self.on_frame(pts)

    def _mux_audio(self, packet: AudioPacket) -> None:
        # AAC in ADTS framing goes into MPEG-TS as it came; other codecs are not carried yet.
        if self._container is None or self._audio is None or packet.codec != "aac":
            return
        out = av.Packet(packet.data)
        out.pts = out.dts = packet.pts
        out.time_base = TIME_BASE
        out.stream = self._audio
        try:
            self._container.mux(out)
        except av.error.FFmpegError as exc:
            logger.debug("audio packet dropped error=%s", exc)

    def close(self) -> None:
        self._close_segment()

    def _open_segment(self, width: int, height: int, pts: int, audio: bool) -> None:
        self.sink.start()
        container = av.open(
            _SinkFile(self.sink),
            "w",
            format="mpegts",
            # flush_packets: every packet reaches the sink at once (no 32 KiB buffering);
            # omit_video_pes_length=0: PES lengths let our demuxer emit a frame without
            # waiting for the next one.
            options={"flush_packets": "1", "omit_video_pes_length": "0"},
        )
        stream = container.add_stream("libx264", rate=30)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuv420p"
        stream.time_base = TIME_BASE
        stream.codec_context.time_base = TIME_BASE
        stream.thread_count = self.settings.threads
        stream.codec_context.options = {
            "preset": self.settings.preset,
            "tune": "zerolatency",
            "bf": "0",
            "crf": str(self.settings.crf),
            "forced-idr": "1",
        }
        self._audio = None
        self._carry_audio = self._carry_audio or audio
        if self._carry_audio:
            # Only its parameters are used: ADTS packets are muxed without re-encoding.
            self._audio = container.add_stream("aac", rate=48000)
        self._container = container
        self._stream = stream
        self._segment_start = pts
        self._size = (width, height)
        self.segments += 1

    def _close_segment(self) -> None:
        if self._container is None:
            return
        container, stream = self._container, self._stream
        self._container = self._stream = self._audio = None
        try:
            assert stream is not None
            for packet in stream.encode(None):
                container.mux(packet)
            container.close()
        finally:
            self.sink.end()
