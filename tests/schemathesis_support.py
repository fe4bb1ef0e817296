"""What the two schemathesis runs share: tests/live/test_schemathesis.py (the service's own
/openapi.json) and tests/batch/test_runner_spec.py (Livepeer's runner spec, tests/data/).

Both run the real service as users run it (aiohttp's AppRunner on 127.0.0.1, real HTTP), with
a bearer token and the tiny random-weight models of every batch route, loaded at start.
schemathesis sends its requests with its own blocking client (requests), so the service runs
on an event loop in a thread of its own. And both keep the work a generated request asks of
the models small, the same way (`bound_work`).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import math
import struct
import threading
import wave
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

import batch
from live.app import create_app
from live.openapi import openapi_document
from live.settings import Settings
from tests.waiting import wait_until

T = TypeVar("T")

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
WARM = ",".join(route.name for route in batch.ROUTES)
"""Every batch route's tiny model, loaded before the first request."""
LOAD_S = 120.0
"""Bound for the tiny batch models to load (a few seconds on two cores)."""
REQUEST_TIMEOUT_S = 60.0

# 503 is the service's documented "unavailable" answer (a model that is not on this machine, a
# model loading, a full queue, the live-session limit), with Retry-After where it passes; any
# other 5xx is an error.
NOT_A_SERVER_ERROR = {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}


# -- What the batch routes may be asked to compute ------------------------------------------
# Generated requests may be as large as the routes allow (2048x2048 pixels, 200 steps, 8
# images, 4096 tokens; the runner spec bounds nothing at all): minutes each on two cores even
# with the tiny models. So before a request is sent, those fields, where they hold a value this
# service accepts, are lowered to the smallest work (valid stays valid; a value the service
# refuses is sent as generated, and answered by a quick 422), and set so where absent (their
# defaults are large: 1024x576, 25-100 steps, 256 tokens). The bounds are this service's own,
# from its document, whichever document generated the request.
#
# And where a valid request carries a file, it is a real one (a 64x64 PNG, a second of WAV)
# rather than what was generated (random bytes, or a 1x1 image, too small for every route), so
# that the models' answers are checked too; invalid requests keep theirs.

OURS = openapi_document()
SMALLEST = {
    "width": 64,
    "height": 64,
    "num_inference_steps": 2,
    "num_images_per_prompt": 1,
    "max_tokens": 8,
}
SHORTEST = {"text": 40}
"""Text to speak: VITS makes speech as long as its text, in one pass."""


def png(side: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 80, 40)).save(out, format="PNG")
    return out.getvalue()


def wav(seconds: float = 1.0, rate: int = 16_000, hz: float = 440.0) -> bytes:
    """A mono 16-bit WAV of a sine, written by the standard library."""
    samples = [
        round(0.3 * 32767 * math.sin(2 * math.pi * hz * i / rate))
        for i in range(round(seconds * rate))
    ]
    out = io.BytesIO()
    with wave.open(out, "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(struct.pack(f"<{len(samples)}h", *samples))
    return out.getvalue()


FILES = {"image": png(), "audio": wav()}
SMALL_FILES = {"/upscale": {"image": png(16)}}
"""The upscaler's answer is 4x its image: 64x64 from 16x16 took 0.05 s, 256x256 0.5 s."""
# Valid /llm requests answer as one JSON body and as a stream, in turns.
_stream = itertools.cycle([True, False])


def our_properties(path: str) -> dict[str, Any]:
    """The properties of `path`'s request body in this service's document ({} for none)."""
    operation = OURS["paths"].get(path, {}).get("post")
    if operation is None or "requestBody" not in operation:
        return {}
    (media,) = operation["requestBody"]["content"].values()
    name = media["schema"]["$ref"].rsplit("/", 1)[-1]
    return OURS["components"]["schemas"][name]["properties"]


def valid_int(value: object, prop: dict[str, Any]) -> bool:
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    return (
        prop.get("minimum", value) <= value <= prop.get("maximum", value)
        and value % prop.get("multipleOf", 1) == 0
    )


def valid_text(value: object, prop: dict[str, Any]) -> bool:
    return isinstance(value, str) and prop.get("minLength", 0) <= len(value) <= prop.get(
        "maxLength", len(value)
    )


def is_positive(case: Any) -> bool:
    return case.meta is None or case.meta.generation.mode.is_positive


def bound_work(case: Any) -> None:
    """Lower what `case` asks of a batch route's model to the least (see above), in place."""
    if case.path not in batch_paths() or not isinstance(case.body, dict):
        return
    # Asked first: schemathesis judges a case again once its body has changed, and calls any
    # body with a file in it invalid.
    positive = is_positive(case)
    props = our_properties(case.path)
    for name, smallest in SMALLEST.items():
        if name not in props:
            continue
        value = case.body.get(name, smallest)  # absent: the default, the largest work yet
        if valid_int(value, props[name]) and value >= smallest:
            case.body[name] = smallest
    for name, longest in SHORTEST.items():
        value = case.body.get(name)
        if name in props and valid_text(value, props[name]) and value[:longest].strip():
            case.body[name] = value[:longest]
    if not positive:
        return
    for name, content in (FILES | SMALL_FILES.get(case.path, {})).items():
        if name in case.body:
            case.body[name] = content
    if case.path == "/llm":
        case.body["stream"] = next(_stream)


def batch_paths() -> set[str]:
    return {route.operation.path for route in batch.ROUTES}


class SentBefore:
    """Batch requests already sent. Once bounded, many generated requests are alike (every
    valid width is 64 then), and a model's answer to one of them was checked already: sending
    it again costs model time and tests nothing new."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, case: Any) -> bool:
        """Whether a request like `case` was sent before (and note it as sent)."""
        if case.path not in batch_paths():
            return False
        parts = (case.method, case.path, case.media_type, case.headers, case.query, case.body)
        key = json.dumps(parts, sort_keys=True, default=repr)  # bytes and the like by repr
        if key in self._seen:
            return True
        self._seen.add(key)
        return False


# -- Streamed answers -------------------------------------------------------------------------


def event_stream_conformance(document: dict[str, Any]) -> Callable[..., None]:
    """A schemathesis check for streamed answers (/llm with `stream`), which neither document
    lists: their 200 is JSON only, so response_schema_conformance passes a text/event-stream
    answer unread. Every event is to be a `data:` line holding the 200's JSON answer as
    `document` describes it (one per token, as the runner streams), and the last `data: [DONE]`;
    an `{"error": ...}` event, a failure after the stream started, fails the check."""
    validators: dict[tuple[str, str], Any] = {}

    def validator(method: str, path: str) -> Any:
        import jsonschema_rs  # schemathesis' own validator, there wherever schemathesis is

        if (method, path) not in validators:
            answer = document["paths"][path][method.lower()]["responses"]["200"]
            schema = answer["content"]["application/json"]["schema"]
            validators[method, path] = jsonschema_rs.validator_for(
                {**schema, "components": document["components"]}
            )
        return validators[method, path]

    def event_stream_conformance(ctx: Any, response: Any, case: Any) -> None:
        content_type = response.headers.get("content-type", [""])[0]
        if response.status_code != 200 or not content_type.startswith("text/event-stream"):
            return
        events = [event for event in response.content.decode().split("\n\n") if event]
        check = validator(case.method, case.path)
        if getattr(response, "stream_cut_short", False):
            # Schemathesis read only its `max-stream-events` (a long `max_tokens`): what was
            # read is checked, and the end, never read, is not.
            events.append("data: [DONE]")
        assert events and events[-1] == "data: [DONE]", f"no [DONE] at the end: {events[-1:]}"
        for event in events[:-1]:
            assert event.startswith("data: ") and "\n" not in event, f"not one data line: {event}"
            errors = [str(error) for error in check.iter_errors(json.loads(event[6:]))]
            assert not errors, f"an event breaks the document: {event}: {errors}"

    return event_stream_conformance


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


@contextmanager
def running_service(settings: Settings) -> Iterator[ServiceThread]:
    """The service started with `settings`, its warm models loaded; closed after."""
    service = ServiceThread(settings)
    try:
        service.run(wait_loaded(service.url))
        yield service
    finally:
        service.close()


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as tests/conftest.py's `one_torch_thread` fixture gives a test, here
    for a module's service (a module-scoped fixture cannot use a test's): the tiny models gain
    nothing from more, and while other processes load the two CPUs, two threads ran each
    generation 200 times slower (6 s instead of 0.03 s)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
