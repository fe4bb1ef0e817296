"""`POST /text-to-image`: images from a prompt, with the diffusers pipeline the model folder
names (SDXL, SD 1.5/2.x, turbo and Lightning variants) through `AutoPipelineForText2Image`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import ImageResponse, TextToImageParams
from protocol.errors import InvalidRequest
from runtime.device import DeviceSpec

from .images import image_response, one_image_per_seed
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_json, pick_seed, run_on_model
from .steps import few_step_defaults

DEFAULT_MODEL = "SG161222/RealVisXL_V4.0_Lightning"


def load(path: Path, spec: DeviceSpec) -> Any:
    quiet_loading()
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(path, dtype=spec.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def generate(pipe: Any, params: TextToImageParams, seed: int, gate: StepGate) -> list[Any]:
    steps, guidance = few_step_defaults(params, params.model_id or DEFAULT_MODEL)
    return one_image_per_seed(
        pipe,
        params.num_images_per_prompt,
        seed,
        gate,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt or None,
        width=params.width,
        height=params.height,
        guidance_scale=guidance,
        num_inference_steps=steps,
    )


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    params = await parse_json(request, TextToImageParams, state.config.max_upload_bytes)
    if params.loras:
        raise InvalidRequest("loras are not supported by this service yet")
    seed = pick_seed(params.seed)
    images = await run_on_model(
        state,
        ROUTE,
        params.model_id,
        generate,
        params,
        seed,
    )
    return await image_response(images, seed)


ROUTE = BatchRoute(
    name="text-to-image",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genTextToImage",
    summary="Text To Image",
    description="Generate images from text prompts.",
    request=TextToImageParams,
    response=ImageResponse,
)
