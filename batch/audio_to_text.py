"""`POST /audio-to-text`: speech transcribed by Whisper (`WhisperForConditionalGeneration`
and `WhisperProcessor` from the model folder), with sentence or word timestamps.

Audio of any length up to `MAX_DURATION_S` is cut into Whisper's 30 s windows, transcribed one
window at a time (one window's samples and features in memory on the device's worker) and the
window's start added to its timestamps. Unlike the runner's chunked pipeline the windows do not
overlap, so a word spoken across a window boundary may be split or lost.
TODO(#12): seek to the last complete segment, as Whisper's own long-form decoding does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import AudioToTextForm, Chunk, TextResponse
from runtime.device import DeviceSpec

from .audio import DecodedAudio, decode_audio, step_each_token
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_form, run_on_model

DEFAULT_MODEL = "openai/whisper-large-v3"
SAMPLE_RATE = 16_000
"""Every Whisper model's feature extractor takes 16 kHz mono."""
WINDOW_S = 30.0
"""Whisper's input: 30 s of audio, 3000 mel frames, 1500 encoder positions."""
MAX_DURATION_S = 2 * 3600.0
"""Longer audio is a 400: two hours is 240 windows, minutes of device time, and 230 MB of
decoded PCM held while they run."""
TIME_PRECISION = 0.02
"""Seconds per timestamp token (<|0.00|>, <|0.02|>, ...)."""


@dataclass(frozen=True)
class Whisper:
    model: Any  # WhisperForConditionalGeneration
    processor: Any  # WhisperProcessor
    spec: DeviceSpec

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def generate(self, samples: Any, mode: str, gate: StepGate) -> tuple[list[int], list[float]]:
        """Whisper's tokens for one window of float samples (the decoder prompt left out), and
        with `mode` "word" each token's start time in the window."""
        extractor = self.processor.feature_extractor
        features = extractor(
            samples,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            return_attention_mask=mode == "word",
            # The mel spectrogram on the GPU where there is one (torch's STFT).
            device=self.spec.device if self.spec.device.startswith("cuda") else "cpu",
        )
        kwargs: dict[str, Any] = {}
        if mode == "word":
            kwargs["return_token_timestamps"] = True
            kwargs["attention_mask"] = features.attention_mask.to(self.spec.device)
        if getattr(self.model.generation_config, "is_multilingual", False):
            # Transcribe, never translate (English-only models refuse a task at all).
            kwargs["task"] = "transcribe"
        output = self.model.generate(
            features.input_features.to(self.spec.device, self.spec.dtype),
            return_timestamps=mode == "sentence",
            # One pass over this window: the windows are ours, not generate's long-form loop
            # (which, on text without a closing timestamp, would decode the window again).
            force_unique_generate_call=True,
            logits_processor=[step_each_token(gate)],
            **kwargs,
        )
        if mode == "word":
            sequence, times = output["sequences"][0], output["token_timestamps"][0].tolist()
        else:
            sequence, times = output[0], []
        tokens = [int(t) for t in sequence.tolist()]
        skip = self._prompt_length(tokens)
        return tokens[skip:], times[skip:]

    def _prompt_length(self, tokens: Sequence[int]) -> int:
        """The decoder prompt (<|startoftranscript|>, language, task, <|notimestamps|>): the
        leading special tokens, between <|endoftext|> and the first timestamp."""
        eot, first_timestamp = self.tokenizer.eos_token_id, self.timestamp_begin
        count = 0
        while count < len(tokens) and eot < tokens[count] < first_timestamp:
            count += 1
        return count

    @property
    def timestamp_begin(self) -> int:
        return int(self.model.generation_config.no_timestamps_token_id) + 1


def load(path: Path, spec: DeviceSpec) -> Whisper:
    quiet_loading()
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=spec.dtype)
    processor = WhisperProcessor.from_pretrained(path)
    rate = processor.feature_extractor.sampling_rate
    if rate != SAMPLE_RATE:
        raise ValueError(f"{path.name} takes {rate} Hz audio; Whisper models take {SAMPLE_RATE}")
    return Whisper(model.to(spec.device).eval(), processor, spec)


def transcribe(whisper: Whisper, audio: DecodedAudio, mode: str, gate: StepGate) -> TextResponse:
    """Whisper on each 30 s window in turn; `mode` is "sentence", "word" or "none"."""
    model = whisper.model
    attention = model.config._attn_implementation
    texts: list[str] = []
    chunks: list[Chunk] = []
    try:
        for start_s, samples in audio.float_windows():
            gate.step()
            length_s = len(samples) / audio.sample_rate
            tokens, times = whisper.generate(samples, mode, gate)
            texts.append(_text(whisper, tokens))
            if mode == "sentence":
                found = _segments(whisper, tokens, length_s)
            elif mode == "word":
                found = _words(whisper, tokens, times, length_s)
            else:
                found = []
            chunks += [
                Chunk(timestamp=[_at(start_s + start), _at(start_s + end)], text=text)
                for start, end, text in found
            ]
    finally:
        if model.config._attn_implementation != attention:
            # Token timestamps switch the model to eager attention (they read the
            # cross-attention weights); the next request gets the faster kernel back.
            model.set_attn_implementation(attention)
    return TextResponse(text=" ".join(t for t in texts if t), chunks=chunks)


def _at(seconds: float) -> float:
    return round(seconds, 2)


def _text(whisper: Whisper, tokens: list[int]) -> str:
    # decode() drops timestamp tokens by id, and special ones with skip_special_tokens.
    return str(whisper.tokenizer.decode(tokens, skip_special_tokens=True)).strip()


def _segments(
    whisper: Whisper, tokens: list[int], length_s: float
) -> list[tuple[float, float, str]]:
    """Whisper's `<|t0|> text <|t1|><|t1|> text <|t2|>` as (start, end, text) in the window.
    Text after the last timestamp (the window or the token budget ended mid-sentence) ends
    at the window's end; times are clipped to the window's audio."""
    eot, first_timestamp = whisper.tokenizer.eos_token_id, whisper.timestamp_begin
    found: list[tuple[float, float, str]] = []
    start: float | None = None
    last = 0.0
    text: list[int] = []

    def close(end: float) -> None:
        words = _text(whisper, text)
        if words:
            begin = min(start if start is not None else last, end)
            found.append((begin, end, words))
        text.clear()

    for token in tokens:
        if token == eot:
            break
        if token >= first_timestamp:
            time = min((token - first_timestamp) * TIME_PRECISION, length_s)
            if text:
                close(time)
                start = None
            else:
                start = time
            last = time
        elif token < eot:
            text.append(token)
    if text:
        close(length_s)
    return found


def _words(
    whisper: Whisper, tokens: list[int], times: list[float], length_s: float
) -> list[tuple[float, float, str]]:
    """Words as (start, end, text) in the window: a token whose text starts with a space
    begins a word; a word ends when the token after its last one starts."""
    eot = whisper.tokenizer.eos_token_id
    words: list[tuple[float, list[int]]] = []
    ends: list[float] = []
    for i, token in enumerate(tokens):
        if token == eot:
            break
        if token > eot:
            continue  # special and timestamp tokens
        time = min(times[i], length_s)
        end = min(times[i + 1], length_s) if i + 1 < len(times) else time
        if not words or str(whisper.tokenizer.decode([token])).startswith(" "):
            words.append((time, [token]))
            ends.append(end)
        else:
            words[-1][1].append(token)
            ends[-1] = end
    found = []
    for (start, ids), end in zip(words, ends, strict=True):
        text = _text(whisper, ids)
        if text:
            found.append((start, max(start, end), text))
    return found


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    form = await parse_form(request, AudioToTextForm, state.config.max_upload_bytes)
    audio = await asyncio.to_thread(
        decode_audio,
        form.audio,
        sample_rate=SAMPLE_RATE,
        window_s=WINDOW_S,
        max_duration_s=MAX_DURATION_S,
    )
    mode = form.timestamps
    result = await run_on_model(
        state,
        ROUTE,
        form.model_id,
        transcribe,
        audio,
        mode,
    )
    return web.json_response(result.model_dump())


ROUTE = BatchRoute(
    name="audio-to-text",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genAudioToText",
    summary="Audio To Text",
    description="Transcribe audio files to text.",
    request=AudioToTextForm,
    response=TextResponse,
)
