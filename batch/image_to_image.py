"""`POST /image-to-image`: an image transformed by a prompt. InstructPix2Pix models (the
default) follow an instruction with `image_guidance_scale`; any other diffusers model runs as
img2img with `strength`, through `AutoPipelineForImage2Image`."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import ImageResponse, ImageToImageForm
from protocol.errors import InvalidRequest
from runtime.device import DeviceSpec

from .images import image_response, one_image_per_seed, open_image
from .jobs import StepGate
from .models import pipeline_class_name, quiet_loading
from .route import BatchRoute, batch_state, parse_form, pick_seed, run_on_model
from .steps import few_step_defaults

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"
MAX_PIXELS = 2048 * 2048
MIN_SIDE = 64


def load(path: Path, spec: DeviceSpec) -> Any:
    quiet_loading()
    from diffusers import AutoPipelineForImage2Image, StableDiffusionInstructPix2PixPipeline

    if "InstructPix2Pix" in pipeline_class_name(path):
        pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(path, dtype=spec.dtype)
    else:
        pipe = AutoPipelineForImage2Image.from_pretrained(path, dtype=spec.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def generate(pipe: Any, form: ImageToImageForm, image: Any, seed: int, gate: StepGate) -> list[Any]:
    steps, guidance = few_step_defaults(form, form.model_id or DEFAULT_MODEL)
    kwargs: dict[str, Any] = {}
    if type(pipe).__name__ == "StableDiffusionInstructPix2PixPipeline":
        kwargs["image_guidance_scale"] = form.image_guidance_scale
    else:
        if int(steps * form.strength) < 1:
            # diffusers runs int(steps * strength) steps: none at all is the caller's mistake.
            raise InvalidRequest(
                f"num_inference_steps ({steps}) x strength ({form.strength}) leaves no "
                "denoising step; raise either"
            )
        kwargs["strength"] = form.strength
    return one_image_per_seed(
        pipe,
        form.num_images_per_prompt,
        seed,
        gate,
        prompt=form.prompt,
        image=image,
        negative_prompt=form.negative_prompt or None,
        guidance_scale=guidance,
        num_inference_steps=steps,
        **kwargs,
    )


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    form = await parse_form(request, ImageToImageForm, state.config.max_upload_bytes)
    if form.loras:
        raise InvalidRequest("loras are not supported by this service yet")
    image = await asyncio.to_thread(open_image, form.image, MAX_PIXELS, MIN_SIDE)
    seed = pick_seed(form.seed)
    images = await run_on_model(state, ROUTE, form.model_id, generate, form, image, seed)
    return await image_response(images, seed)


ROUTE = BatchRoute(
    name="image-to-image",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genImageToImage",
    summary="Image To Image",
    description="Apply image transformations to a provided image.",
    request=ImageToImageForm,
    response=ImageResponse,
)
