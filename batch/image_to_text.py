"""`POST /image-to-text`: a caption of an image by BLIP, as the runner's image-to-text
pipeline makes it (BlipForConditionalGeneration with its BlipProcessor). With a prompt, BLIP
captions conditionally: the caption continues the prompt, and the text returned starts with it
("a photography of" -> "a photography of a red car").

Decoding is greedy, so the same image and prompt give the same text. The decoder runs on the
device's inference worker and yields to live frames between tokens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import ImageToTextForm, ImageToTextResponse
from protocol.errors import InvalidRequest
from runtime.device import DeviceSpec

from .images import open_image
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_form, run_on_model

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
MAX_PIXELS = 4096 * 4096
"""BLIP sees the image at 384x384 whatever its size: a large photo costs only its decoding."""
MIN_SIDE = 8
MAX_NEW_TOKENS = 32
"""A caption is a sentence: BLIP's own default (20 tokens, the prompt's included) cuts some off
mid-phrase; 32 new tokens fit one and bound the job."""


@dataclass(frozen=True)
class Captioner:
    model: Any  # BlipForConditionalGeneration
    processor: Any  # BlipProcessor
    spec: DeviceSpec

    @property
    def max_prompt_tokens(self) -> int:
        """The prompt's tokens and the new ones must fit the text decoder's positions."""
        return int(self.model.config.text_config.max_position_embeddings) - MAX_NEW_TOKENS


def load(path: Path, spec: DeviceSpec) -> Captioner:
    quiet_loading()
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(path)
    model = BlipForConditionalGeneration.from_pretrained(path, dtype=spec.dtype)
    return Captioner(model.to(spec.device).eval(), processor, spec)


def _gate_steps(gate: StepGate) -> Any:
    """Stopping criteria that never stop generation but call `gate.step()` once per token:
    the decoder's safe point to let live frames through, and to stop (JobCancelled) when the
    request went away."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class GateStep(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> Any:
            gate.step()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([GateStep()])


def caption(captioner: Captioner, prompt: str, image: Any, gate: StepGate) -> str:
    """The caption of `image`, continuing `prompt` when there is one (on the worker's
    thread). Raises InvalidRequest for a prompt too long for the decoder."""
    import torch

    processor, spec = captioner.processor, captioner.spec
    inputs = processor(images=image, text=prompt or None, return_tensors="pt")
    kwargs: dict[str, Any] = {
        "pixel_values": inputs["pixel_values"].to(spec.device, spec.dtype),
    }
    if prompt:
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens > captioner.max_prompt_tokens:
            raise InvalidRequest(
                f"the prompt is {prompt_tokens} tokens long; at most "
                f"{captioner.max_prompt_tokens} fit this model"
            )
        kwargs["input_ids"] = inputs["input_ids"].to(spec.device)
        kwargs["attention_mask"] = inputs["attention_mask"].to(spec.device)
    with torch.inference_mode():
        ids = captioner.model.generate(
            **kwargs,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            num_beams=1,
            stopping_criteria=_gate_steps(gate),
        )
    return str(processor.decode(ids[0], skip_special_tokens=True)).strip()


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    form = await parse_form(request, ImageToTextForm, state.config.max_upload_bytes)
    image = await asyncio.to_thread(open_image, form.image, MAX_PIXELS, MIN_SIDE)
    text = await run_on_model(
        state,
        ROUTE,
        form.model_id,
        caption,
        form.prompt,
        image,
    )
    return web.json_response(ImageToTextResponse(text=text).model_dump())


ROUTE = BatchRoute(
    name="image-to-text",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genImageToText",
    summary="Image To Text",
    description="Transform image files to text.",
    request=ImageToTextForm,
    response=ImageToTextResponse,
)
