"""The batch pipelines of the Livepeer AI API, as routes of the service: one module per
pipeline, all on the runtime's shared model cache and device worker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from protocol.errors import Unavailable
from protocol.model_ids import BadModelId, check_model_id
from protocol.openapi import Operation
from runtime.runtime import Runtime

from . import (
    audio_to_text,
    image_to_image,
    image_to_text,
    image_to_video,
    llm,
    segment_anything_2,
    text_to_image,
    text_to_speech,
    upscale,
)
from .config import BatchConfig
from .jobs import BatchJobs
from .models import lease_model
from .route import BATCH, BatchRoute, BatchState
from .videos import VIDEO_OPERATION, VIDEO_PATH, VIDEOS, VideoStore, get_video

logger = logging.getLogger(__name__)

ROUTES: tuple[BatchRoute, ...] = (
    text_to_image.ROUTE,
    image_to_image.ROUTE,
    image_to_video.ROUTE,
    upscale.ROUTE,
    llm.ROUTE,
    audio_to_text.ROUTE,
    text_to_speech.ROUTE,
    image_to_text.ROUTE,
    segment_anything_2.ROUTE,
)


def operations() -> list[Operation]:
    return [
        *(operation for route in ROUTES for operation in route.operations()),
        VIDEO_OPERATION,
    ]


def add_batch_routes(app: web.Application, runtime: Runtime, config: BatchConfig) -> None:
    """Mount every batch route on `app`; the models in `config.warm` start loading at start."""
    warm = [parse_warm(entry) for entry in config.warm]  # a bad entry fails here, at start
    app[BATCH] = BatchState(runtime, config, BatchJobs(runtime, config.max_jobs))
    app[VIDEOS] = VideoStore(config.video_store_bytes, config.video_ttl_s)
    for route in ROUTES:
        for operation, handler in route.routes():
            app.router.add_route(operation.method, operation.path, handler)
    app.router.add_get(VIDEO_PATH, get_video)
    if warm:

        async def warm_ctx(app: web.Application) -> AsyncIterator[None]:
            for route, model_id in warm:
                await start_loading(runtime, route, model_id, config.retry_after_s)
            yield

        app.cleanup_ctx.append(warm_ctx)


def parse_warm(entry: str) -> tuple[BatchRoute, str]:
    name, _, model_id = entry.partition("=")
    for route in ROUTES:
        if route.name == name.strip():
            model_id = model_id.strip() or route.default_model
            try:
                return route, check_model_id(model_id)
            except BadModelId as exc:
                raise ValueError(f"--warm {entry!r}: {exc}") from None
    known = ", ".join(route.name for route in ROUTES)
    raise ValueError(f"--warm {entry!r}: {name!r} is not a batch route; choose from {known}")


async def start_loading(runtime: Runtime, route: BatchRoute, model_id: str, retry: float) -> None:
    """Start loading a route's model in the background (the service does not wait for it:
    /health says LOADING meanwhile)."""
    try:
        lease = await lease_model(runtime, route.name, model_id, route.load, retry)
    except Unavailable as exc:
        if exc.retry_after_s is None:  # not on this machine: say so once, at start
            logger.warning("cannot warm %s for %s: %s", model_id, route.name, exc.msg)
        return
    lease.release()  # already loaded
