"""Numbered test clips: frames that carry their index painted in pixels, so that whoever receives
them (tests, benchmarks, a deployment smoke test) can match each output frame to its input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .media import CLOCK, EncoderSettings, SegmentEncoder

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
    band = image[4 : BAND - 4].mean(axis=2)
    index = 0
    for bit in range(BITS):
        value = band[:, bit * block + 4 : (bit + 1) * block - 4].mean()
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


def make_clip(
    frames: int,
    fps: float = 30.0,
    width: int = 128,
    height: int = 128,
    segment_s: float = 1.0,
    first_pts: int = 0,
) -> Clip:
    """Encode `frames` numbered frames as MPEG-TS segments, keeping each frame's bytes apart."""
    sink = _FrameSink()
    encoder = SegmentEncoder(sink, EncoderSettings(segment_s=segment_s), on_frame=sink.frame_done)
    pts = [first_pts + round(i * CLOCK / fps) for i in range(frames)]
    for i, frame_pts in enumerate(pts):
        encoder.encode(numbered_frame(i, width, height), frame_pts)
    encoder.close()
    return Clip(sink.segments, pts, fps)
