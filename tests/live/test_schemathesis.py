"""Property-based API tests: schemathesis sends the real service requests generated from its
/openapi.json (valid and invalid ones), and checks that no answer is a server error and that
every answer is one the document describes (its status, its body's schema).

The service runs as users run it (aiohttp's AppRunner on 127.0.0.1, real HTTP), with a bearer
token, and tiny random-weight models for the batch routes, loaded at start (`warm`).
schemathesis sends its requests with its own blocking client (requests), so the service runs
on an event loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import copy
import io
import random
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import requests
from aiohttp import web

from live.app import create_app
from live.openapi import openapi_document
from live.settings import Settings
from tests.waiting import wait_until

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

T = TypeVar("T")

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WARM = "text-to-image,image-to-image,image-to-video,upscale"
LOAD_S = 120.0
"""Bound for the four tiny batch models to load (a few seconds on two cores)."""
REQUEST_TIMEOUT_S = 60.0
MAX_EXAMPLES = 25

# The batch routes (JSON and multipart), the live session routes and the service's small GETs.
# Not the WebRTC and trickle routes (SDP and media bodies, the latter answered in go-livepeer's
# plain-text dialect), nor the page, the docs and the document itself.
OPERATIONS = [
    "genTextToImage",
    "genImageToImage",
    "genImageToVideo",
    "genUpscale",
    "genLiveVideoToVideo",
    "getLiveSession",
    "updateLiveSessionParams",
    "stopLiveSession",
    "listPipelines",
    "health",
    "version",
]

CONFIG = {
    # Reproducible: the same requests on every run. No shrinking (a failure is reported as
    # found) and no example database written to the work tree. Hypothesis' deadline is off
    # (schemathesis' default): a batch request runs a model.
    "seed": 1,
    "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True, "database": "none"},
    # 503 is the service's documented "unavailable" answer (a model that is not on this
    # machine, a model loading, a full queue, the live-session limit), with Retry-After where it
    # passes, and its body is still checked against the document; any other 5xx is an error.
    "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
}

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]

# The document GET /openapi.json serves (the fixture checks that it is). The schema is loaded
# here, at collection, rather than from the running service through
# `schemathesis.pytest.from_fixture`: that loader reads `request.node._nodeid`, which pytest
# 9.2 no longer has (schemathesis 4.32.5). Loaded here, each operation is a test of its own.
DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(
    copy.deepcopy(DOCUMENT), config=schemathesis.Config.from_dict(CONFIG)
).include(operation_id=OPERATIONS)

# -- What the batch routes may be asked to compute ------------------------------------------
# Generated requests may be as large as the routes allow (2048x2048 pixels, 200 steps, 8
# images): minutes each on two cores even with the tiny models. So before a request is sent,
# those fields, where they hold a valid value, are lowered to the smallest work (valid stays
# valid; an invalid value, which the route must refuse, is sent as generated), and set so
# where absent (their defaults are large: 1024x576, 25-100 steps). And where a
# valid request carries an image, it is a real 64x64 PNG rather than what was generated
# (random bytes, or a 1x1 image, too small for every route), so that the models' answers are
# checked too; invalid requests keep theirs.
BATCH_PATHS = {"/text-to-image", "/image-to-image", "/image-to-video", "/upscale"}
SMALLEST = {"width": 64, "height": 64, "num_inference_steps": 2, "num_images_per_prompt": 1}


def _png(side: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


PNG = _png()


def body_properties(path: str) -> dict[str, Any]:
    (media,) = DOCUMENT["paths"][path]["post"]["requestBody"]["content"].values()
    name = media["schema"]["$ref"].rsplit("/", 1)[-1]
    return DOCUMENT["components"]["schemas"][name]["properties"]


def valid_int(value: object, prop: dict[str, Any]) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (
        prop.get("minimum", value) <= value <= prop.get("maximum", value)
        and value % prop.get("multipleOf", 1) == 0
    )


def bound_work(case: Any) -> None:
    if case.path not in BATCH_PATHS or not isinstance(case.body, dict):
        return
    props = body_properties(case.path)
    for name, smallest in SMALLEST.items():
        if name not in props:
            continue
        value = case.body.get(name, smallest)  # absent: the default, the largest work yet
        if valid_int(value, props[name]) and value >= smallest:
            case.body[name] = smallest
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if positive and "image" in case.body:
        case.body["image"] = PNG


# -- Live sessions ----------------------------------------------------------------------------
# A random session id is never a session's, so only the 404 of the session routes would be
# checked: every other valid request gets the id of a session started for it (and stopped
# after it, as is every session a start request started, so that the next ones still fit
# under the service's session limit).
START_PATHS = {"/live-video-to-video", "/live-video-to-video/"}
SESSION_PATHS = {"/live-video-to-video/{id}", "/live-video-to-video/{id}/params"}
# Picks half of the cases, the same ones on every run.
_half = random.Random(1)


def start_session(url: str) -> str:
    response = requests.post(
        f"{url}/live-video-to-video", json={}, headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


def stop_session(url: str, session_id: str) -> None:
    response = requests.delete(
        f"{url}/live-video-to-video/{session_id}", headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code in (200, 404), response.text  # 404: the request stopped it


def use_a_session(case: Any, url: str) -> str | None:
    """Start a session for `case` and put its id in the path, for every other valid case."""
    if case.path not in SESSION_PATHS:
        return None
    positive = case.meta is None or case.meta.generation.mode.is_positive
    if not positive or _half.random() < 0.5:
        return None
    session_id = start_session(url)
    case.path_parameters["id"] = session_id
    return session_id


# -- The service ----------------------------------------------------------------------------


class ServiceThread:
    """The service on its own event loop in a thread, listening on 127.0.0.1, started as
    live/cli.py starts it."""

    def __init__(self, settings: Settings) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="service", daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(
            create_app(settings), access_log=None, shutdown_timeout=5.0, handler_cancellation=True
        )
        self.run(self.runner.setup())
        self.run(web.TCPSite(self.runner, "127.0.0.1", 0).start())
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        try:
            self.run(self.runner.cleanup())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


async def wait_loaded(url: str) -> None:
    """Until /health no longer says LOADING: the warm models are loaded."""
    async with aiohttp.ClientSession() as http:

        async def loaded() -> bool:
            async with http.get(f"{url}/health") as response:
                return (await response.json())["status"] != "LOADING"

        await wait_until(loaded, "the warm batch models to load", within=LOAD_S, poll=0.1)


async def served_document(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/openapi.json") as response:
        assert response.status == 200
        return await response.json()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as tests/runtime/test_tiny_models.py has it: the tiny models gain
    nothing from more, and while other processes load the two CPUs, two threads ran each
    generation 200 times slower (6 s instead of 0.03 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def service_url(tiny_models_dir: Path, one_torch_thread: None) -> Iterator[str]:
    settings = Settings(auth_token=TOKEN, models_dir=tiny_models_dir, warm=WARM)
    service = ServiceThread(settings)
    try:
        service.run(wait_loaded(service.url))
        assert service.run(served_document(service.url)) == DOCUMENT
        yield service.url
    finally:
        service.close()


@schema.parametrize()
def test_api_answers_as_documented(case: Any, service_url: str) -> None:
    bound_work(case)
    session_id = use_a_session(case, service_url)
    try:
        response = case.call_and_validate(
            base_url=service_url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
        )
        if case.path in START_PATHS and response.status_code == 200:
            stop_session(service_url, response.json()["session_id"])
    finally:
        if session_id is not None:
            stop_session(service_url, session_id)
