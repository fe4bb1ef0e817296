"""Numbered test clips: frames that carry their index painted in pixels, so that whoever receives
them (tests, benchmarks, a deployment smoke test) can match each output frame to its input."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from .media import AUDIO_LEAD, CLOCK, AudioPacket, EncoderSettings, SegmentEncoder

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


def tone(seconds: float, first_pts: int = 0, hz: float = 440.0) -> list[AudioPacket]:
    """A sine tone as AAC-LC ADTS packets, 48 kHz mono, timestamps on the 90 kHz clock."""
    rate = 48_000
    ctx = av.CodecContext.create("aac", "w")
    ctx.sample_rate = rate
    ctx.layout = "mono"
    ctx.format = "fltp"
    ctx.time_base = Fraction(1, rate)
    packets = []
    samples = int(seconds * rate)
    for start in range(0, samples, 1024):
        t = (np.arange(start, start + 1024) / rate).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(
            (0.3 * np.sin(2 * np.pi * hz * t))[None, :], format="fltp", layout="mono"
        )
        frame.sample_rate = rate
        frame.pts = start
        packets.extend(ctx.encode(frame))
    packets.extend(ctx.encode(None))
    return [
        AudioPacket(
            "aac",
            first_pts + int(p.pts * CLOCK // rate),
            adts_header(p.size) + bytes(p),
        )
        for p in packets
        if p.pts is not None and p.pts >= 0
    ]


def make_clip(
    frames: int,
    fps: float = 30.0,
    width: int = 128,
    height: int = 128,
    segment_s: float = 1.0,
    first_pts: int = 0,
    audio: bool = False,
) -> Clip:
    """Encode `frames` numbered frames as MPEG-TS segments, keeping each frame's bytes apart;
    with `audio`, a tone in AAC is muxed alongside, in sync."""
    sink = _FrameSink()
    encoder = SegmentEncoder(sink, EncoderSettings(segment_s=segment_s), on_frame=sink.frame_done)
    pts = [first_pts + round(i * CLOCK / fps) for i in range(frames)]
    pending = tone(frames / fps, first_pts) if audio else []
    audio_pts = [packet.pts for packet in pending]
    for i, frame_pts in enumerate(pts):
        batch = []
        while pending and pending[0].pts <= frame_pts + AUDIO_LEAD:
            batch.append(pending.pop(0))
        encoder.encode(numbered_frame(i, width, height), frame_pts, batch)
    encoder.close()
    sent = len(audio_pts) - len(pending)
    return Clip(sink.segments, pts, fps, audio_pts[:sent])
