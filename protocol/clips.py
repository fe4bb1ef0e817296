"""Numbered test clips: frames that carry their index painted in pixels, so that whoever receives
them (tests, benchmarks, a deployment smoke test) can match each output frame to its input.

Also inputs we refuse (MPEG-2, VP9, audio only), so tests can check what a publisher is told."""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import av
import numpy as np

from .media import (
    AUDIO_LEAD,
    CLOCK,
    TIME_BASE,
    AudioPacket,
    EncoderSettings,
    SegmentEncoder,
    h264_encoder,
)
from .mpegts import TSMuxer

BITS = 12
BAND = 16  # rows at the top that carry the index


def numbered_frame(index: int, width: int = 128, height: int = 128) -> np.ndarray:
    """A moving gradient with `index` painted as BITS black/white blocks in the top band."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0] = (x * 2 + index * 3) % 256
    image[..., 1] = (y * 2 + index) % 256
    image[..., 2] = ((x + y) + index * 5) % 256
    block = width // BITS
    image[:BAND] = 0
    for bit in range(BITS):
        if index >> bit & 1:
            image[2 : BAND - 2, bit * block + 2 : (bit + 1) * block - 2] = 255
    return image


def read_index(image: np.ndarray) -> int | None:
    """The index painted by `numbered_frame`, or None if the band does not hold one."""
    width = image.shape[1]
    block = width // BITS
    if block < 6 or image.shape[0] < BAND:
        return None  # too small to carry an index
    margin = min(4, block // 3)
    band = image[4 : BAND - 4].mean(axis=2)
    index = 0
    for bit in range(BITS):
        value = band[:, bit * block + margin : (bit + 1) * block - margin].mean()
        if 60 < value < 190:
            return None  # neither black nor white: not a numbered frame
        if value >= 190:
            index |= 1 << bit
    return index


@dataclass
class Clip:
    """An encoded clip: `segments[s][f]` holds the bytes of frame f of segment s."""

    segments: list[list[bytes]]
    pts: list[int]
    fps: float
    audio_pts: list[int]

    def segment_bytes(self) -> list[bytes]:
        return [b"".join(frames) for frames in self.segments]


class _FrameSink:
    def __init__(self) -> None:
        self.segments: list[list[bytes]] = []
        self._current: list[bytes] = []

    def start(self) -> None:
        self.segments.append([])
        self._current = []

    def write(self, data: bytes) -> None:
        self._current.append(data)

    def end(self) -> None:
        # Trailer bytes written at close belong to the segment's last frame.
        if self._current and self.segments[-1]:
            self.segments[-1][-1] += b"".join(self._current)
        elif self._current:
            self.segments[-1].append(b"".join(self._current))
        self._current = []

    def frame_done(self, _pts: int) -> None:
        self.segments[-1].append(b"".join(self._current))
        self._current = []


def adts_header(payload_size: int, rate_index: int = 3, channels: int = 1) -> bytes:
    """The 7-byte ADTS header of one AAC-LC frame (rate index 3: 48 kHz)."""
    length = payload_size + 7
    return bytes(
        (
            0xFF,
            0xF1,
            (1 << 6) | (rate_index << 2) | (channels >> 2),
            ((channels & 3) << 6) | (length >> 11),
            (length >> 3) & 0xFF,
            ((length & 7) << 5) | 0x1F,
            0xFC,
        )
    )


def tone(
    seconds: float, first_pts: int = 0, hz: float = 440.0, codec: str = "aac"
) -> list[AudioPacket]:
    """A sine tone, 48 kHz, timestamps on the 90 kHz clock: AAC-LC ADTS packets (mono), or
    Opus packets of 20 ms (stereo, as WebRTC sends it)."""
    if codec == "opus":
        return _opus_tone(seconds, first_pts, hz)
    ctx = _audio_encoder("aac", "mono", "fltp")
    packets = []
    samples = int(seconds * RATE)
    for start in range(0, samples, 1024):
        frame = _sine(start, 1024, hz, "fltp", "mono")
        packets.extend(ctx.encode(frame))
    packets.extend(ctx.encode(None))
    return [
        AudioPacket(
            "aac",
            first_pts + int(p.pts * CLOCK // RATE),
            adts_header(p.size) + bytes(p),
        )
        for p in packets
        if p.pts is not None and p.pts >= 0
    ]


RATE = 48_000


def _audio_encoder(name: str, layout: str, fmt: str) -> av.CodecContext:
    ctx = av.CodecContext.create(name, "w")
    ctx.sample_rate = RATE
    ctx.layout = layout
    ctx.format = fmt
    ctx.time_base = Fraction(1, RATE)
    return ctx


def _sine(start: int, samples: int, hz: float, fmt: str, layout: str) -> av.AudioFrame:
    """`samples` of a sine from sample `start`, in every channel of `layout`."""
    t = (np.arange(start, start + samples) / RATE).astype(np.float32)
    wave = 0.3 * np.sin(2 * np.pi * hz * t)
    channels = 2 if layout == "stereo" else 1
    # Packed formats interleave the channels in one plane; planar ones have a plane each.
    data = np.repeat(wave, channels)[None, :] if fmt == "flt" else np.tile(wave, (channels, 1))
    frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
    frame.sample_rate = RATE
    frame.pts = start
    return frame


OPUS_FRAME = 960  # 20 ms at 48 kHz


def _opus_tone(seconds: float, first_pts: int, hz: float) -> list[AudioPacket]:
    # The wheel has both; "opus" is FFmpeg's experimental native encoder, libopus the real one.
    ctx = _audio_encoder("libopus", "stereo", "flt")
    ctx.options = {"frame_duration": "20", "application": "lowdelay"}
    packets = []
    for start in range(0, int(seconds * RATE) // OPUS_FRAME * OPUS_FRAME, OPUS_FRAME):
        packets.extend(ctx.encode(_sine(start, OPUS_FRAME, hz, "flt", "stereo")))
    packets.extend(ctx.encode(None))
    # Packets are numbered 20 ms apart from first_pts: the encoder's pre-skip (a negative
    # first pts) is the decoder's business, not the timeline's.
    return [
        AudioPacket("opus", first_pts + i * OPUS_FRAME * CLOCK // RATE, bytes(p))
        for i, p in enumerate(packets)
    ]


def make_clip(
    frames: int,
    fps: float = 30.0,
    width: int = 128,
    height: int = 128,
    segment_s: float = 1.0,
    first_pts: int = 0,
    audio: bool | Literal["aac", "opus"] = False,
    bframes: int = 0,
) -> Clip:
    """Encode `frames` numbered frames as MPEG-TS segments, keeping each frame's bytes apart.

    `audio` muxes a tone alongside, in sync: True or "aac" for AAC, "opus" for Opus. `bframes`
    > 0 encodes with that many B-frames (the SegmentEncoder never does): then the frames of a
    segment are in decode order and carry a DTS apart from their PTS.
    """
    codec = "aac" if audio is True else (audio or None)
    pts = [first_pts + round(i * CLOCK / fps) for i in range(frames)]
    pending = tone(frames / fps, first_pts, codec=codec) if codec else []
    audio_pts = [packet.pts for packet in pending]
    if bframes:
        segments = _bframe_segments(pts, width, height, segment_s, pending, bframes)
    else:
        sink = _FrameSink()
        settings = EncoderSettings(segment_s=segment_s)
        encoder = SegmentEncoder(sink, settings, on_frame=sink.frame_done)
        for i, frame_pts in enumerate(pts):
            batch = []
            while pending and pending[0].pts <= frame_pts + AUDIO_LEAD:
                batch.append(pending.pop(0))
            encoder.encode(numbered_frame(i, width, height), frame_pts, batch)
        encoder.close()
        segments = sink.segments
    sent = len(audio_pts) - len(pending)
    return Clip(segments, pts, fps, audio_pts[:sent])


def _bframe_segments(
    pts: list[int],
    width: int,
    height: int,
    segment_s: float,
    pending: list[AudioPacket],
    bframes: int,
) -> list[list[bytes]]:
    """Segments of an H.264 stream with B-frames: one encoder (one GOP) per segment, each
    packet muxed as it would be live, audio up to AUDIO_LEAD ahead of each packet's DTS."""
    settings = EncoderSettings(preset="veryfast", threads=1)
    codec = pending[0].codec if pending else None
    bounds = [0]  # the first frame of each segment
    for i, frame_pts in enumerate(pts):
        if frame_pts - pts[bounds[-1]] >= segment_s * CLOCK:
            bounds.append(i)
    segments = []
    for n, first in enumerate(bounds):
        last = bounds[n + 1] if n + 1 < len(bounds) else len(pts)
        encoder = h264_encoder(width, height, settings, bframes=bframes)
        muxer = TSMuxer("h264", codec)
        packets = []
        for i in range(first, last):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, width, height), format="rgb24")
            frame.pts = pts[i]
            frame.time_base = TIME_BASE
            packets.extend(encoder.encode(frame))
        packets.extend(encoder.encode(None))
        out = []
        for k, packet in enumerate(packets):
            data = muxer.tables() if k == 0 else b""
            data += muxer.video(bytes(packet), packet.pts, packet.dts, packet.is_keyframe)
            horizon = (packet.dts if k + 1 < len(packets) else pts[last - 1]) + AUDIO_LEAD
            while pending and pending[0].pts <= horizon:
                data += muxer.audio(pending[0].data, pending.pop(0).pts)
            out.append(data)
        segments.append(out)
    return segments


def foreign_clip(codec: Literal["mpeg2video", "vp9"], frames: int = 5, size: int = 64) -> bytes:
    """One MPEG-TS segment of numbered frames in a codec we do not decode, as FFmpeg muxes it
    (MPEG-2 as stream type 0x02; VP9 as private data 0x06 with no descriptor)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mpegts") as container:
        stream = container.add_stream("libvpx-vp9" if codec == "vp9" else codec, rate=30)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(numbered_frame(i, size, size), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def audio_only_clip(seconds: float = 1.0, codec: str = "aac") -> bytes:
    """One MPEG-TS segment carrying a tone and no video at all."""
    muxer = TSMuxer(None, codec)
    data = bytearray(muxer.tables())
    for packet in tone(seconds, codec=codec):
        data += muxer.audio(packet.data, packet.pts)
    return bytes(data)
