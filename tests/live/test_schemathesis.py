"""Property-based API tests: schemathesis reads the real service's /openapi.json and sends it
requests generated from the document (valid and invalid), checking that no answer is a server
error and that every answer is one the document describes (status, body schema).

The service runs as users run it (aiohttp's AppRunner on 127.0.0.1, real HTTP), with a bearer
token and tiny random-weight models for the batch routes, loaded at start (`warm`); the
requests go out from schemathesis' own HTTP client (requests), so the service runs on an event
loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
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
"""Bound for the four tiny batch models to load (seconds, on two cores they take a few)."""
REQUEST_TIMEOUT_S = 60.0
MAX_EXAMPLES = 25

# What runs: the batch routes (JSON and multipart) and the live session routes. Not the
# WebRTC and trickle routes (bodies that are SDP or media, answered in their own dialects) nor
# the page and docs.
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
    # Reproducible: the same requests on every run.
    "seed": 1,
    "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True, "database": "none"},
}

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


class ServiceThread:
    """The service on its own event loop in a thread, listening on 127.0.0.1."""

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
def service_url(tiny_models_dir: Path) -> Iterator[str]:
    settings = Settings(auth_token=TOKEN, models_dir=tiny_models_dir, warm=WARM)
    service = ServiceThread(settings)
    try:
        service.run(wait_loaded(service.url))
        assert service.run(served_document(service.url)) == DOCUMENT
        yield service.url
    finally:
        service.close()


DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(
    copy.deepcopy(DOCUMENT), config=schemathesis.Config.from_dict(CONFIG)
).include(operation_id=OPERATIONS)


@schema.parametrize()
def test_api_answers_as_documented(case: Any, service_url: str) -> None:
    case.call_and_validate(
        base_url=service_url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
    )
