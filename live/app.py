"""The application factory: `create_app(settings)` composes the service from its parts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from batch import ROUTES as BATCH_ROUTES
from batch import add_batch_routes
from protocol.errors import error_middleware
from protocol.trickle import TrickleServer, create_trickle_app
from runtime.device import has_gpu
from runtime.runtime import Runtime

from .cors import add_cors
from .event_stream import add_event_stream_routes
from .health import add_health_routes
from .keys import METRICS, RUNTIME, SESSIONS, SETTINGS, TRICKLE
from .metrics import ServiceMetrics, add_metrics_route
from .openapi import add_openapi_routes
from .page import add_page_routes
from .pipelines import LivePipeline, builtin_pipelines
from .process_calls import class_path
from .routes import add_live_routes
from .sessions import Availability, SessionManager
from .settings import Settings
from .webrtc import bound_udp_ports, restrict_host_addresses
from .webrtc_routes import add_webrtc_routes

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, pipelines: dict[str, type[LivePipeline]] | None = None
) -> web.Application:
    """Build the service. Nothing starts until the app runs (aiohttp startup).

    `pipelines` replaces the built-in live pipelines (tests add their own).
    """
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    trickle_config = settings.trickle()
    trickle = app[TRICKLE] = TrickleServer(trickle_config)
    available = builtin_pipelines() if pipelines is None else pipelines
    if settings.worker_process:
        for cls in available.values():
            if not cls.passes_through:
                class_path(cls)  # one the worker process cannot import is refused now
    if settings.default_pipeline not in (*available, "auto"):
        raise ValueError(
            f"--default-pipeline {settings.default_pipeline!r} is not a live pipeline; "
            f"choose one of {', '.join(sorted(available))} or auto"
        )
    # One runtime for live and batch: shared weights, one worker per device. Its context comes
    # first so that it closes last, after every session and job that uses it.
    runtime = app[RUNTIME] = Runtime(settings.runtime())
    app.cleanup_ctx.append(_runtime_ctx)
    app[SESSIONS] = SessionManager(settings, trickle, available, runtime)
    app.cleanup_ctx.append(_sessions_ctx)
    # Registered before the trickle sub-app's own shutdown (which ends every channel), so that
    # sessions end first and their final status still reaches the events channel.
    app.on_shutdown.append(_stop_sessions)
    metrics = app[METRICS] = ServiceMetrics(
        app[SESSIONS], trickle, runtime, (op.path for r in BATCH_ROUTES for op in r.operations())
    )
    # Outermost, so that batch requests are counted with the status the client got.
    app.middlewares.insert(0, metrics.middleware)
    # Outermost of all, so that a preflight is answered before any route would refuse OPTIONS.
    add_cors(app, settings.cors())
    add_metrics_route(app)
    add_health_routes(app)
    add_live_routes(app)
    add_batch_routes(app, runtime, settings.batch())
    add_webrtc_routes(app)
    settings.udp_port_range()  # refuses a bad range now, not at the first peer
    app.cleanup_ctx.append(_udp_ports_ctx)
    if settings.ice_host_addresses:
        restrict_host_addresses(
            [a.strip() for a in settings.ice_host_addresses.split(",") if a.strip()]
        )
    add_event_stream_routes(app)
    add_page_routes(app)
    add_openapi_routes(app)
    # The JSON error middleware leaves the trickle sub-app alone: it answers in go-livepeer's
    # plain-text dialect (404/400/470), which Livepeer clients depend on.
    app.add_subapp(trickle_config.base_path.rstrip("/"), create_trickle_app(trickle))
    return app


async def _udp_ports_ctx(app: web.Application) -> AsyncIterator[None]:
    ports = app[SETTINGS].udp_port_range()
    if ports is None:
        yield
        return
    restore = bound_udp_ports(asyncio.get_running_loop(), *ports)
    yield
    restore()


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    # The devices are resolved at start (torch's import, CUDA's count: off the event loop), so
    # that a device this host lacks stops the service now, and /health lists them from the
    # start.
    try:
        await asyncio.to_thread(lambda: app[RUNTIME].devices)
    except ValueError as exc:
        raise StartupError(f"--devices: {exc}") from exc
    yield
    await app[RUNTIME].close()


async def _stop_sessions(app: web.Application) -> None:
    await app[SESSIONS].close()


class StartupError(Exception):
    """The service cannot start for a reason the operator can fix; said in one line."""


def check_default_pipeline(settings: Settings, known: Availability) -> None:
    """Refuse a --default-pipeline made for a GPU that cannot run on this GPU-less host: every
    session started without naming a pipeline would fail. (Missing weights on a GPU host only
    warn: they may be pulled while the service runs.)"""
    if settings.default_pipeline == "auto":
        return
    listed = next(p for p in known.pipelines if p["name"] == settings.default_pipeline)
    if listed["unavailable"] and listed["requires_gpu"] and not has_gpu():
        raise StartupError(
            f"--default-pipeline {listed['name']} cannot run here: {listed['unavailable']}"
        )


async def _sessions_ctx(app: web.Application) -> AsyncIterator[None]:
    manager = app[SESSIONS]
    # Checked once at start-up, off the event loop; the routes that show it start warm.
    known = await manager.availability()
    await asyncio.to_thread(check_default_pipeline, app[SETTINGS], known)
    for pipeline in known.pipelines:
        if pipeline["note"]:
            logger.warning("%s %s", pipeline["name"], pipeline["note"])
        if pipeline["name"] == "streamdiffusion" and pipeline["unavailable"]:
            # One clear line at start-up when the diffusion pipeline cannot run, and what to do.
            # Only the log names the folder: /pipelines, which is public, does not.
            logger.warning(
                "streamdiffusion unavailable: %s (models directory: %s)",
                pipeline["unavailable"],
                app[SETTINGS].models_dir,
            )
    logger.info("default live pipeline: %s", known.default)
    settings = app[SETTINGS]
    if settings.runner_host_set() and not settings.auth_token:
        logger.warning(
            "runner mode is on (--runner-hosts %s) but no --auth-token is set: anyone who "
            "reaches this port can make the service connect to those hosts",
            settings.runner_hosts,
        )
    yield
    # Every session is stopped and awaited: its tasks, threads and channels are released.
    await app[SESSIONS].close()
