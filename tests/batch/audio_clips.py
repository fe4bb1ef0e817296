"""Audio files made at test time with PyAV: a tone (or silence) in a given container, codec,
sample rate and channel layout, and a video-only MP4."""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np


@dataclass(frozen=True)
class Kind:
    """A container and codec, as a file extension names them."""

    extension: str
    container: str
    codec: str


WAV = Kind("wav", "wav", "pcm_s16le")
FLAC = Kind("flac", "flac", "flac")
MP3 = Kind("mp3", "mp3", "libmp3lame")
OGG_OPUS = Kind("ogg", "ogg", "libopus")
M4A_AAC = Kind("m4a", "mp4", "aac")
WEBM_OPUS = Kind("webm", "webm", "libopus")


def tone(
    kind: Kind,
    seconds: float,
    rate: int,
    layout: str = "mono",
    *,
    hz: float = 440.0,
    bit_rate: int | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """`seconds` of a sine at `hz` (0: silence), encoded as `kind` at `rate` Hz. Frames are
    made one at a time, so a long file costs no more memory than a short one."""
    channels = 2 if layout == "stereo" else 1
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=kind.container, options=options or {}) as out:
        stream = out.add_stream(kind.codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        total, done = round(seconds * rate), 0
        while done < total:
            count = min(1024, total - done)
            t = np.arange(done, done + count) / rate
            wave = 0.3 * np.sin(2 * np.pi * hz * t) if hz else np.zeros(count)
            planes = np.tile(wave.astype(np.float32), (channels, 1))
            frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
            frame.sample_rate = rate
            frame.pts = done
            for packet in stream.encode(frame):
                out.mux(packet)
            done += count
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def video_only_mp4(frames: int = 5, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), i * 40, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()
