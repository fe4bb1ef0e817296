"""`GET /health`, polled by go-livepeer's worker every 5 s (protocol/trickle.md §3.7): IDLE with
no session, LOADING while one loads, ERROR if one failed, else OK. Beside it, the runner's
`/version`, `/hardware/info` and `/hardware/stats`."""

from __future__ import annotations

import asyncio
import functools
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

from aiohttp import web

from protocol.api import HardwareInformation, HardwareStats, Version

from .keys import RUNTIME, SESSIONS

PIPELINE = "live-video-to-video"


@functools.cache
def service_version() -> str:
    """The installed package's version. Read from its metadata on disk once (the app factory
    does, before serving): the routes that show it never touch the disk."""
    try:
        return package_version("live-v2v")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


async def get_health(request: web.Request) -> web.Response:
    """`status` as go-livepeer reads it; `capacity` is ours, beyond the spec: what the service
    can still take (sessions, model memory, device streams; see live/admission.py), in all and
    per device of `--devices` (`capacity.devices`)."""
    sessions = request.app[SESSIONS]
    status = sessions.health()
    if status in ("IDLE", "OK") and request.app[RUNTIME].loading():
        status = "LOADING"  # a model is loading for a batch route (or a warm list)
    body: dict[str, object] = {
        "status": status,
        "capacity": sessions.capacity().model_dump(mode="json"),
    }
    workers = request.app[RUNTIME].process_workers()
    if workers:  # --worker-process: each device's worker process, and why it failed
        body["workers"] = [w.status().model_dump(mode="json") for w in workers]
        failure = sessions.worker_failure()
        if failure is not None:
            body["error"] = failure
    return web.json_response(body)


async def get_version(request: web.Request) -> web.Response:
    model_id = await request.app[SESSIONS].default_pipeline_name()
    body = Version(pipeline=PIPELINE, model_id=model_id, version=service_version())
    return web.json_response(body.model_dump())


async def get_hardware_info(request: web.Request) -> web.Response:
    from runtime.hardware import gpu_info

    # torch's first import and CUDA queries block: off the event loop.
    gpus = await asyncio.get_running_loop().run_in_executor(None, gpu_info)
    model_id = await request.app[SESSIONS].default_pipeline_name()
    body = HardwareInformation(pipeline=PIPELINE, model_id=model_id, gpu_info=gpus)
    return web.json_response(body.model_dump())


async def get_hardware_stats(request: web.Request) -> web.Response:
    """The runner spec's fields, and ours beyond it: `capacity`, what the service can still
    take (as on /health). `gpu_stats` is the spec's map of GPUs, whatever `--devices` says; CPU
    workers, which have no place in it, show under `capacity.devices`."""
    from runtime.hardware import gpu_stats

    gpus = await asyncio.get_running_loop().run_in_executor(None, gpu_stats)
    model_id = await request.app[SESSIONS].default_pipeline_name()
    body = HardwareStats(
        pipeline=PIPELINE,
        model_id=model_id,
        gpu_stats=gpus,
        capacity=request.app[SESSIONS].capacity(),
    )
    return web.json_response(body.model_dump())


def add_health_routes(app: web.Application) -> None:
    service_version()
    app.router.add_get("/health", get_health)
    app.router.add_get("/version", get_version)
    app.router.add_get("/hardware/info", get_hardware_info)
    app.router.add_get("/hardware/stats", get_hardware_stats)
