"""Audio in and out of batch routes: uploads decoded with PyAV into mono 16-bit PCM at the
model's rate, held in fixed windows (a clear 400 for what is not audio), generated speech as
WAV data URLs, and the hook that lets a model's `generate` yield at each token.

Decoding is bounded: frames are resampled as they come and copied into windows of
`window_s` seconds, so the decoded audio costs 2 bytes a sample (16 kHz mono: 115 MB an hour,
as Whisper's own loader, which reads `s16le`) plus one window, never the source's rate,
channels or float samples; and the duration is capped (`max_duration_s`), checked from the
container's header before decoding and again while decoding, since a header can be absent or
wrong (a FLAC of silence is a few KB for hours)."""

from __future__ import annotations

import functools
import io
import logging
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.errors import InvalidRequest, in_words

from .media_input import open_upload

if TYPE_CHECKING:
    from .jobs import StepGate

logger = logging.getLogger(__name__)

FORMATS = "WAV, FLAC, MP3, M4A/AAC, Ogg/Opus, WebM, MP4"
"""What the docs promise; the other containers of `media_input.DEMUXERS` are read too."""


@dataclass(frozen=True)
class DecodedAudio:
    """Mono 16-bit PCM in consecutive windows of `window_samples` (the last one shorter)."""

    windows: list[np.ndarray]
    sample_rate: int
    window_samples: int

    @property
    def samples(self) -> int:
        return sum(len(window) for window in self.windows)

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    def float_windows(self) -> Iterator[tuple[float, np.ndarray]]:
        """(start in seconds, float32 samples in [-1, 1)) of each window, converted one at a
        time, so only one window's float copy is alive at once."""
        for index, window in enumerate(self.windows):
            start_s = index * self.window_samples / self.sample_rate
            yield start_s, window.astype(np.float32) / 32768.0


class _Windows:
    """Fills fixed-size int16 windows from decoded frames of any length."""

    def __init__(self, window_samples: int, max_samples: int, limit_msg: str) -> None:
        self.window_samples = window_samples
        self.max_samples = max_samples
        self.limit_msg = limit_msg
        self.done: list[np.ndarray] = []
        self.samples = 0
        self._current = np.empty(window_samples, dtype=np.int16)
        self._filled = 0

    def add(self, samples: np.ndarray) -> None:
        self.samples += len(samples)
        if self.samples > self.max_samples:
            raise InvalidRequest(self.limit_msg)
        while len(samples):
            take = min(len(samples), self.window_samples - self._filled)
            self._current[self._filled : self._filled + take] = samples[:take]
            self._filled += take
            samples = samples[take:]
            if self._filled == self.window_samples:
                self.done.append(self._current)
                self._current = np.empty(self.window_samples, dtype=np.int16)
                self._filled = 0

    def finish(self) -> list[np.ndarray]:
        if self._filled:
            self.done.append(self._current[: self._filled].copy())
        return self.done


def decode_audio(
    data: bytes,
    *,
    sample_rate: int,
    window_s: float,
    max_duration_s: float,
    field: str = "audio",
) -> DecodedAudio:
    """The first audio stream of an uploaded file, as mono 16-bit PCM at `sample_rate` in
    windows of `window_s` seconds. Blocking (PyAV): run it in a thread. Raises
    InvalidRequest for what is not a file FFmpeg reads, a file without an audio stream or
    without any decodable sample, and one longer than `max_duration_s`."""
    import av

    if not data:
        raise InvalidRequest(f"the {field} file is empty")
    limit_msg = (
        f"the {field} is longer than {max_duration_s / 60:g} minutes, the most this "
        "service transcribes in one request; split it"
    )
    try:
        container = open_upload(data)
    except av.EOFError as exc:  # the file ends inside its header
        raise InvalidRequest(f"the {field} file is truncated") from exc
    except (av.FFmpegError, ValueError, OSError) as exc:
        # One text, without FFmpeg's: what FFmpeg says here can name what the file names
        # (a playlist's entries), and no two refusals may tell files on this host apart.
        raise InvalidRequest(
            f"the {field} file is not audio this service can read ({FORMATS}), or it is damaged"
        ) from exc
    with container:
        if not container.streams.audio:
            held = ", ".join(sorted({s.type for s in container.streams})) or "nothing"
            raise InvalidRequest(
                f"the {field} file has no audio stream (it holds {held}); send an audio file "
                f"({FORMATS}) or a video with a sound track"
            )
        stream = container.streams.audio[0]
        declared = declared_duration_s(container, stream)
        if declared is not None and declared > max_duration_s:
            raise InvalidRequest(f"{limit_msg} (its header says {declared / 60:.1f} minutes)")
        windows = _Windows(
            round(window_s * sample_rate), int(max_duration_s * sample_rate), limit_msg
        )
        resampler, source = None, None
        bad_packets = 0
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.InvalidDataError:
                    # As the ffmpeg command line does: skip a damaged packet (a glitch, the
                    # header of a second file appended) and go on with the next.
                    bad_packets += 1
                    continue
                for frame in frames:
                    shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                    if shape != source:
                        # A resampler takes one input shape; files joined end to end can
                        # change rate or channels midway, as ffmpeg's filters allow.
                        _drain(resampler, windows)
                        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
                        source = shape
                    for out in resampler.resample(frame):
                        windows.add(out.to_ndarray()[0])
            _drain(resampler, windows)
        except InvalidRequest:
            raise
        except (av.FFmpegError, ValueError) as exc:
            raise InvalidRequest(
                f"the {field} file is damaged or uses something FFmpeg cannot decode: "
                f"{in_words(exc)}"
            ) from exc
    if bad_packets:
        logger.info("audio decoded with undecodable packets skipped count=%d", bad_packets)
    if windows.samples == 0:
        raise InvalidRequest(f"the {field} file's audio stream has no decodable sound in it")
    return DecodedAudio(windows.finish(), sample_rate, windows.window_samples)


def _drain(resampler: Any, windows: _Windows) -> None:
    """The samples a resampler still holds (its filter's delay)."""
    if resampler is not None:
        for out in resampler.resample(None):
            windows.add(out.to_ndarray()[0])


def declared_duration_s(container: Any, stream: Any) -> float | None:
    """The duration a file's header states (None when it states none)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Mono float samples in [-1, 1] as a 16-bit PCM WAV file."""
    clean = np.nan_to_num(np.asarray(samples, dtype=np.float32).reshape(-1))
    pcm = (np.clip(clean, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()


def wav_data_url(samples: np.ndarray, sample_rate: int) -> str:
    """The runner's `audio.url`: `data:audio/wav;base64,...` (ai-runner's audio_to_data_url)."""
    import base64

    return "data:audio/wav;base64," + base64.b64encode(wav_bytes(samples, sample_rate)).decode(
        "ascii"
    )


def step_each_token(gate: StepGate) -> Any:
    """A transformers LogitsProcessor that calls `gate.step()` once per generated token: the
    job's safe point to let live frames through, and to stop (JobCancelled) when its caller
    went away. It leaves the scores as they are."""
    return _step_processor_class()(gate)


@functools.cache
def _step_processor_class() -> type:
    # Built on first use: transformers is imported only where a model runs.
    from transformers import LogitsProcessor

    class StepEachToken(LogitsProcessor):
        def __init__(self, gate: StepGate) -> None:
            self.gate = gate

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.gate.step()
            return scores

    return StepEachToken
