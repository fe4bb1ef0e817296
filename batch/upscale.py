"""`POST /upscale`: an image at four times its size, by the Stable Diffusion x4 upscaler."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import ImageResponse, UpscaleForm
from runtime.device import DeviceSpec

from .images import image_response, open_image
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_form, pick_seed, run_on_model

DEFAULT_MODEL = "stabilityai/stable-diffusion-x4-upscaler"
MAX_PIXELS = 1024 * 1024
"""The output has 16 times the pixels: a 1024x1024 input is already a 4096x4096 result."""
MIN_SIDE = 8


def load(path: Path, spec: DeviceSpec) -> Any:
    quiet_loading()
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(path, dtype=spec.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def generate(pipe: Any, form: UpscaleForm, image: Any, seed: int, gate: StepGate) -> Any:
    import torch

    result = pipe(
        prompt=form.prompt,
        image=image,
        num_inference_steps=form.num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        # This pipeline has only diffusers' older per-step callback.
        callback=gate.on_step,
        callback_steps=1,
    )
    return result.images[0]


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    form = await parse_form(request, UpscaleForm, state.config.max_upload_bytes)
    image = await asyncio.to_thread(open_image, form.image, MAX_PIXELS, MIN_SIDE)
    seed = pick_seed(form.seed)
    upscaled = await run_on_model(state, ROUTE, form.model_id, generate, form, image, seed)
    return await image_response([upscaled], seed)


ROUTE = BatchRoute(
    name="upscale",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genUpscale",
    summary="Upscale",
    description="Upscale an image by increasing its resolution.",
    request=UpscaleForm,
    response=ImageResponse,
)
