"""`POST /text-to-image`: images from a prompt, with the diffusers pipeline the model folder
names (SDXL, SD 1.5/2.x, turbo and Lightning variants) through `AutoPipelineForText2Image`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import ImageResponse, Media, TextToImageParams
from protocol.errors import InvalidRequest
from protocol.openapi import Operation
from runtime.device import DeviceSpec

from .images import png_data_urls
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_json, pick_seed, run_on_model
from .steps import few_step_defaults

DEFAULT_MODEL = "SG161222/RealVisXL_V4.0_Lightning"


def load(path: Path, spec: DeviceSpec) -> Any:
    from diffusers import AutoPipelineForText2Image

    quiet_loading()
    pipe = AutoPipelineForText2Image.from_pretrained(path, dtype=spec.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def generate(pipe: Any, params: TextToImageParams, seed: int, gate: StepGate) -> list[Any]:
    """One image per seed (seed, seed+1, ...), one at a time: the peak memory of one image
    whatever the count, as the runner does."""
    import torch

    steps, guidance = few_step_defaults(params, params.model_id or DEFAULT_MODEL)
    images = []
    for i in range(params.num_images_per_prompt):
        generator = torch.Generator("cpu").manual_seed(seed + i)
        result = pipe(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt or None,
            width=params.width,
            height=params.height,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=generator,
            callback_on_step_end=gate.on_step_end,
        )
        images.append(result.images[0])
    return images


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
        lambda pipe, gate: generate(pipe, params, seed, gate),
    )
    urls = await png_data_urls(images)
    body = ImageResponse(
        images=[Media(url=url, seed=seed + i, nsfw=False) for i, url in enumerate(urls)]
    )
    return web.json_response(body.model_dump())


ROUTE = BatchRoute(
    name="text-to-image",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation=Operation(
        method="POST",
        path="/text-to-image",
        operation_id="genTextToImage",
        summary="Text To Image",
        description="Generate images from text prompts.",
        request=TextToImageParams,
        request_type="application/json",
        response=ImageResponse,
        errors=(400, 401, 413, 415, 422, 500, 503),
        tags=("generate",),
    ),
)
