"""`POST /image-to-video`: a still image animated by Stable Video Diffusion. The runner's route
answers with the frames as images (`frames[0][i]`), which a gateway encodes into a video; the
gateway-shaped routes answer as the gateway does, with the URL of that video (an MP4)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import GatewayVideoResponse, ImageToVideoForm, Media, VideoResponse
from runtime.device import DeviceSpec

from .images import open_image, png_data_urls
from .jobs import StepGate
from .models import quiet_loading
from .route import BATCH, BatchRoute, batch_state, parse_form, pick_seed, run_on_model
from .videos import VIDEOS, encode_mp4, video_url

DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"
MAX_PIXELS = 2048 * 2048
MIN_SIDE = 16
"""The pipeline resizes the image to the asked size; only a degenerate one is refused."""
DECODE_CHUNK = 8
"""Frames decoded at once: bounds the VAE's peak memory, whatever the frame count."""


def load(path: Path, spec: DeviceSpec) -> Any:
    quiet_loading()
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(path, dtype=spec.dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(spec.device)


def generate(pipe: Any, form: ImageToVideoForm, image: Any, seed: int, gate: StepGate) -> list[Any]:
    import torch

    result = pipe(
        image=image,
        height=form.height,
        width=form.width,
        fps=form.fps,
        motion_bucket_id=form.motion_bucket_id,
        noise_aug_strength=form.noise_aug_strength,
        num_inference_steps=form.num_inference_steps,
        decode_chunk_size=DECODE_CHUNK,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=gate.on_step_end,
    )
    return list(result.frames[0])


async def animate(request: web.Request) -> tuple[ImageToVideoForm, list[Any], int]:
    """The request's form, the frames of its video and their seed."""
    state = batch_state(request)
    form = await parse_form(request, ImageToVideoForm, state.config.max_upload_bytes)
    image = await asyncio.to_thread(open_image, form.image, MAX_PIXELS, MIN_SIDE)
    seed = pick_seed(form.seed)
    frames = await run_on_model(state, ROUTE, form.model_id, generate, form, image, seed)
    return form, frames, seed


async def handle(request: web.Request) -> web.Response:
    _, frames, seed = await animate(request)
    urls = await png_data_urls(frames)
    body = VideoResponse(frames=[[Media(url=url, seed=seed, nsfw=False) for url in urls]])
    return web.json_response(body.model_dump())


async def handle_gateway(request: web.Request) -> web.Response:
    form, frames, seed = await animate(request)
    # Encoding is CPU work: off the event loop, and off the device's worker.
    video = await asyncio.to_thread(encode_mp4, frames, form.fps)
    name = request.app[VIDEOS].put(video)
    url = video_url(request, request.app[BATCH].config.public_url, name)
    body = GatewayVideoResponse(images=[Media(url=url, seed=seed, nsfw=False)])
    return web.json_response(body.model_dump())


ROUTE = BatchRoute(
    name="image-to-video",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genImageToVideo",
    summary="Image To Video",
    description="Generate a video from a provided image.",
    request=ImageToVideoForm,
    response=VideoResponse,
    gateway_handler=handle_gateway,
    gateway_response=GatewayVideoResponse,
)
