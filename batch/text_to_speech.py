"""`POST /text-to-speech`: speech from text, as a WAV data URL.

The runner's default, Parler-TTS (`parler-tts/parler-tts-large-v1`), needs the `parler-tts`
package, which pins transformers 4.46 and so cannot be installed beside this service's
transformers 5. The default here is therefore MMS-TTS (`facebook/mms-tts-eng`), a VITS model
that transformers runs itself (`VitsModel` + `VitsTokenizer`); any VITS folder works (the
`facebook/mms-tts-*` languages written in Latin script, or with `uroman` installed, the
others). A Parler-TTS folder is loaded only where `parler_tts` is importable; `description`
steers Parler's voice and is not used by VITS, which has one voice per model.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import AudioResponse, MediaURL, TextToSpeechParams
from protocol.errors import InvalidRequest
from runtime.device import DeviceSpec

from .audio import step_each_token, wav_data_url
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_json, run_on_model

DEFAULT_MODEL = "facebook/mms-tts-eng"
PARLER_TYPE = "parler_tts"


@dataclass(frozen=True)
class Speech:
    samples: Any  # float32 numpy array, mono, in [-1, 1]
    sample_rate: int


@dataclass(frozen=True)
class Vits:
    model: Any  # VitsModel
    tokenizer: Any  # VitsTokenizer
    spec: DeviceSpec

    def speak(self, params: TextToSpeechParams, gate: StepGate) -> Speech:
        import torch

        inputs = self.tokenizer(params.text, return_tensors="pt")
        if inputs.input_ids.shape[-1] == 0:
            # The tokenizer keeps only the characters of the model's alphabet.
            raise InvalidRequest(
                "the text has no character this voice can speak (it reads "
                f"{_alphabet(self.tokenizer)}); send text in the model's language and script"
            )
        # VITS makes the whole waveform in one pass: no token to yield at, so the job's one
        # safe point is before it.
        gate.step()
        with torch.inference_mode():
            waveform = self.model(**inputs.to(self.spec.device)).waveform
        return Speech(waveform[0].float().cpu().numpy(), int(self.model.config.sampling_rate))


@dataclass(frozen=True)
class Parler:
    model: Any  # parler_tts.ParlerTTSForConditionalGeneration
    tokenizer: Any
    spec: DeviceSpec

    def speak(self, params: TextToSpeechParams, gate: StepGate) -> Speech:
        import torch

        description = self.tokenizer(params.description, return_tensors="pt")
        prompt = self.tokenizer(params.text, return_tensors="pt")
        with torch.inference_mode():
            audio = self.model.generate(
                input_ids=description.input_ids.to(self.spec.device),
                attention_mask=description.attention_mask.to(self.spec.device),
                prompt_input_ids=prompt.input_ids.to(self.spec.device),
                prompt_attention_mask=prompt.attention_mask.to(self.spec.device),
                logits_processor=[step_each_token(gate)],
            )
        return Speech(audio[0].float().cpu().numpy(), int(self.model.config.sampling_rate))


def _alphabet(tokenizer: Any) -> str:
    letters = sorted(c for c in tokenizer.get_vocab() if len(c) == 1 and c.isalnum())
    return "".join(letters)[:60] or "no letters"


def model_type(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("model_type", ""))
    except (OSError, ValueError):
        return ""


def load(path: Path, spec: DeviceSpec) -> Vits | Parler:
    kind = model_type(path)
    if kind == PARLER_TYPE:
        return _load_parler(path, spec)
    if kind != "vits":
        raise ValueError(
            f"{path.name} is a {kind or 'unknown'} model; text-to-speech runs VITS / MMS-TTS "
            f"models (such as {DEFAULT_MODEL}), and Parler-TTS where parler-tts is installed"
        )
    quiet_loading()
    from transformers import VitsModel, VitsTokenizer

    model = VitsModel.from_pretrained(path, dtype=spec.dtype)
    tokenizer = VitsTokenizer.from_pretrained(path)
    return Vits(model.to(spec.device).eval(), tokenizer, spec)


def _load_parler(path: Path, spec: DeviceSpec) -> Parler:
    try:
        from parler_tts import ParlerTTSForConditionalGeneration
    except ImportError as exc:
        raise RuntimeError(
            f"{path.name} is a Parler-TTS model and the parler-tts package is not installed "
            "(it needs transformers 4.46, this service runs 5.x); use a VITS model such as "
            f"{DEFAULT_MODEL}"
        ) from exc
    from transformers import AutoTokenizer

    quiet_loading()
    # parler-tts runs on transformers 4.x, whose keyword is torch_dtype.
    model = ParlerTTSForConditionalGeneration.from_pretrained(path, torch_dtype=spec.dtype)
    return Parler(model.to(spec.device).eval(), AutoTokenizer.from_pretrained(path), spec)


def speak(voice: Vits | Parler, params: TextToSpeechParams, gate: StepGate) -> Speech:
    """The job: a module-level function, which a worker process imports by name."""
    return voice.speak(params, gate)


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    params = await parse_json(request, TextToSpeechParams, state.config.max_upload_bytes)
    speech: Speech = await run_on_model(state, ROUTE, params.model_id, speak, params)
    # WAV encoding and base64 are CPU work: off the event loop, and off the device's worker.
    url = await asyncio.to_thread(wav_data_url, speech.samples, speech.sample_rate)
    return web.json_response(AudioResponse(audio=MediaURL(url=url)).model_dump())


ROUTE = BatchRoute(
    name="text-to-speech",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genTextToSpeech",
    summary="Text To Speech",
    description=(
        "Generate a text-to-speech audio file based on the provided text input and "
        "speaker description."
    ),
    request=TextToSpeechParams,
    response=AudioResponse,
)
