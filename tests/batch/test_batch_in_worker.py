"""Batch routes with `--worker-process`: models load and jobs run in the device's supervised
worker process, and a client sees what it sees in process.

The same request with the same seed answers the same in both; a job's refusal keeps its
status and words; a worker killed under a job answers 503 with Retry-After and the next
request succeeds in the fresh worker.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from batch import hosted, remote
from batch.remote import RemoteModel
from batch.route import BATCH
from live.app import create_app
from live.keys import RUNTIME
from live.settings import Settings
from protocol import errors
from runtime import worker_protocol as wp
from runtime.models import folder_size, resolve_model
from runtime.tiny_llm import LLAMA_31_8B_INSTRUCT
from runtime.worker_errors import WorkerError
from runtime.worker_process import ProcessWorker
from tests.batch.audio_clips import WAV, tone
from tests.batch.conftest import png
from tests.batch.test_audio_routes import audio_form
from tests.batch.test_image_routes import api, form, pixels
from tests.batch.test_llm import GREEDY
from tests.waiting import wait_until

ENDINGS = {wp.RESULT: "result", wp.ERROR: "error", wp.SKIPPED: "skipped"}


def worker_of(client) -> ProcessWorker:  # type: ignore[no-untyped-def]
    app = client if isinstance(client, web.Application) else client.app
    (worker,) = app[RUNTIME].process_workers()
    return worker


def remote_models(client) -> list[RemoteModel]:  # type: ignore[no-untyped-def]
    device = client.app[RUNTIME].device()
    leases = [device.models.ready(info.key) for info in device.models.models()]
    values = [lease.value for lease in leases if lease is not None]
    for lease in leases:
        if lease is not None:
            lease.release()
    return [value for value in values if isinstance(value, RemoteModel)]


async def test_jobs_in_the_worker_answer_as_in_process(batch_service) -> None:
    request = {"prompt": "a red cat", "width": 64, "height": 64, "seed": 7}
    answers = {}
    for in_worker in (False, True):
        client = await batch_service(warm=("text-to-image", "llm"), worker_process=in_worker)
        service = api(client)
        (image,) = (await service.text_to_image(**request)).images
        text = (await service.llm(**GREEDY, max_tokens=8)).choices[0].message
        chunks = [chunk async for chunk in service.llm_stream(**GREEDY, max_tokens=8)]
        streamed = "".join(chunk.choices[0].delta.content for chunk in chunks)  # type: ignore[union-attr]
        answers[in_worker] = (pixels(image.url), text.content, streamed)  # type: ignore[union-attr]
        held = remote_models(client)
        if in_worker:
            # Both models live in the worker process; the service holds references.
            assert len(held) == 2
            assert worker_of(client).status().state == "ready"
        else:
            assert held == []
    (image, text, streamed), (image_w, text_w, streamed_w) = answers[False], answers[True]
    # The same weights and seed: the same picture, up to the rounding of another process's
    # thread count.
    assert image.shape == image_w.shape
    assert np.abs(image.astype(int) - image_w.astype(int)).max() <= 2
    assert text == text_w == streamed == streamed_w


async def test_llm_refusals_and_clients_that_leave_as_in_process(batch_service) -> None:
    client = await batch_service(warm=("llm",), worker_process=True)
    worker = worker_of(client)
    # A refusal keeps its status and words.
    long = [{"role": "user", "content": "lighthouse " * 400}]
    for stream in (False, True):
        response = await client.post(
            "/llm", json={"messages": long, "max_tokens": 256, "stream": stream}
        )
        assert response.status == 400
        message = (await response.json())["detail"]["msg"]
        assert "passes the model's context of 1024 tokens" in message

    # A stream whose client leaves stops in the worker, which serves the next request.
    response = await client.post("/llm", json={**GREEDY, "max_tokens": 900, "stream": True})
    assert response.status == 200
    assert (await response.content.readline()).startswith(b"data: ")
    response.close()
    await wait_until(lambda: worker.status().in_flight == 0, "the worker to stop the stream")
    answer = await api(client).llm(**GREEDY, max_tokens=3)
    assert answer.usage.completion_tokens <= 3
    assert worker.status().restarts == 0


async def test_a_job_in_a_killed_worker_is_a_503_to_retry_and_then_succeeds(
    batch_service,
) -> None:
    client = await batch_service(warm=("text-to-image",), worker_process=True)
    worker = worker_of(client)
    slow = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 100}
    pending = asyncio.ensure_future(client.post("/text-to-image", json=slow))
    try:
        await wait_until(lambda: worker.status().running >= 1, "the job to run in the worker")
        pid = worker.status().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        response = await pending
    finally:
        pending.cancel()
    assert response.status == 503
    assert float(response.headers["Retry-After"]) > 0
    detail = (await response.json())["detail"]["msg"]
    assert "worker process stopped" in detail

    # The fresh worker loads the model again for the next request, which succeeds.
    await wait_until(lambda: worker.status().state == "ready", "the worker to restart")
    assert worker.status().pid != pid
    assert remote_models(client) == []  # the old worker's model is forgotten
    (image,) = (await api(client).text_to_image(prompt="a cat", width=64, height=64)).images
    assert pixels(image.url).shape == (64, 64, 3)
    (model,) = remote_models(client)
    assert model.worker_generation == worker.status().generation


@pytest.fixture
async def own_worker_server(tiny_models_dir: Path) -> AsyncIterator[web.AppRunner]:
    """The service with `--worker-process`, text-to-image warm, on a port of its own with
    aiohttp's `handler_cancellation` (as the CLI serves): a client that leaves cancels its
    request's handler."""
    app = create_app(
        Settings(models_dir=tiny_models_dir, warm="text-to-image", worker_process=True)
    )
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield runner
    finally:
        await runner.cleanup()


async def test_a_job_whose_client_leaves_stops_in_the_worker_and_keeps_its_model_till_then(
    own_worker_server: web.AppRunner, tmp_path: Path
) -> None:
    """A job that does not stream stops at its next step in the worker when its client goes
    away; its model stays leased (never evicted) until the worker is out of the job."""
    runner = own_worker_server
    app = runner.app
    host, port = runner.addresses[0][:2]
    device = app[RUNTIME].device()
    jobs = app[BATCH].jobs
    # How each job call ended in the worker, as the service heard it.
    endings: list[tuple[str, str]] = []

    def recording(gen, message):  # type: ignore[no-untyped-def]
        call = gen.calls.get(message[1]) if len(message) > 1 else None
        if call is not None and call.what.endswith(".run") and message[0] in ENDINGS:
            endings.append((ENDINGS[message[0]], message[2] if message[0] == wp.ERROR else ""))
        dispatch(gen, message)

    def leased() -> int:
        return sum(info.users for info in device.models.models())

    async with aiohttp.ClientSession(f"http://{host}:{port}") as session:

        async def loaded() -> bool:
            async with session.get("/health") as response:
                return (await response.json())["status"] != "LOADING"

        await wait_until(loaded, "the model to load", within=120)
        worker = worker_of(app)
        dispatch = worker._dispatch
        worker._dispatch = recording  # type: ignore[method-assign]
        slow = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 200}
        request = asyncio.ensure_future(session.post("/text-to-image", json=slow))
        hold = tmp_path / "hold"
        held = None
        try:
            await wait_until(lambda: worker.status().running == 1, "the job to run")
            # A live call that holds the worker inside one of the job's steps until the test
            # lets it go: the job is certainly still running when its client leaves.
            held = worker.submit("tests.runtime.worker_test_ops:wait_for_file", str(hold))
            await wait_until(lambda: worker.status().running == 2, "a step to let it in")
            request.cancel()  # the client goes away
            await wait_until(lambda: jobs.active == 0, "the service to drop the request")
            assert worker.status().running == 2  # the job is still in the worker's step
            assert leased() == 1  # so its model stays leased
        finally:
            hold.touch()
            request.cancel()
        assert await held == "released"
        await wait_until(lambda: worker.status().in_flight == 0, "the job to stop")
        # It stopped at its next step, rather than running its 200 steps to a result.
        assert endings == [("error", "JobCancelled")]
        await wait_until(lambda: leased() == 0, "the model's lease to be released")
        async with session.post("/text-to-image", json={**slow, "num_inference_steps": 2}) as r:
            assert r.status == 200
        assert endings[-1] == ("result", "")
        assert worker.status().restarts == 0


async def test_an_evicted_model_is_freed_in_the_worker_before_the_next_one_loads(
    batch_service, tiny_models_dir: Path, tmp_path: Path
) -> None:
    """The budget holds in the worker process too: a model evicted to make room for another
    gives its weights back there before the other loads, even while a job holds the worker's
    main thread, and the worker keeps nothing of it afterwards."""
    first, second = "test/other-sd", "stabilityai/sd-turbo"
    size = max(folder_size(resolve_model(m, tiny_models_dir)) for m in (first, second))
    client = await batch_service(
        warm=(), worker_process=True, model_memory_gb=1.5 * size / 2**30, load_wait_s=120
    )
    device = client.app[RUNTIME].device()
    request = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1}
    (image,) = (await api(client).text_to_image(**request, model_id=first)).images
    worker = worker_of(client)
    kept = "tests.runtime.worker_test_ops:kept_objects"
    assert await worker.call(kept) == (1, 1)

    hold = tmp_path / "hold"
    # A batch job on the worker's main thread until the test lets it go: it reads what
    # arrives between its steps (the load goes to the loader lane) and lets live calls in.
    held = worker.submit_batch("tests.runtime.worker_test_ops:steps_until_file", str(hold))
    await wait_until(lambda: worker.status().running == 1, "the job to run")
    pending = asyncio.ensure_future(
        client.post("/text-to-image", json={**request, "model_id": second})
    )
    try:
        await wait_until(
            lambda: (
                [info.key.model_id for info in device.models.models()] == [second]
                and device.models.models()[0].state == "ready"
            ),
            "the second model to load in place of the first",
            within=120,
        )
        assert device.models.evictions == 1
        # Asked on the loader lane, after the load: the first model's weights were let go
        # before it, though the main thread is still in the job.
        assert (await worker.call(kept, loader=True))[1] == 1
    finally:
        hold.touch()
        if not pending.done():
            await asyncio.wait([pending], timeout=60)
    await held
    response = await pending
    assert response.status == 200
    # And nothing of the first model is kept in the worker any more.
    assert await worker.call(kept) == (1, 1)


async def test_a_model_that_fails_to_load_in_the_worker_answers_as_in_process(
    batch_service,
) -> None:
    """The loader's own failure is the model's, named in words: not a worker to retry."""
    answers = []
    for in_worker in (False, True):
        client = await batch_service(warm=(), worker_process=in_worker, load_wait_s=60)
        body = {"text": "hello", "model_id": LLAMA_31_8B_INSTRUCT}  # a chat model, not a voice
        response = await client.post("/text-to-speech", json=body)
        answers.append((response.status, "Retry-After" in response.headers, await response.json()))
    assert answers[0] == answers[1]
    status, retry, detail = answers[1]
    assert (status, retry) == (503, False)
    assert "failed to load (Meta-Llama-3.1-8B-Instruct is a llama model" in detail["detail"]["msg"]


def every_service_error() -> list[errors.ServiceError]:
    """One of each `ServiceError` a job may raise (they all live in protocol.errors)."""
    made: list[errors.ServiceError] = [
        errors.ServiceError("plain"),
        errors.InvalidFields([{"loc": ["body", "prompt"], "msg": "too long", "type": "x"}]),
        errors.Unavailable("busy", retry_after_s=7),
        errors.Unavailable("gone"),
        errors.Unauthorized("no token"),
    ]
    for kind in vars(errors).values():
        if (
            isinstance(kind, type)
            and issubclass(kind, errors.ServiceError)
            and kind not in {type(e) for e in made}
        ):
            made.append(kind(f"refused by {kind.__name__}"))
    return made


@pytest.mark.parametrize("error", every_service_error(), ids=lambda e: type(e).__name__)
def test_a_refusal_in_the_worker_is_the_same_error_in_the_service(
    error: errors.ServiceError,
) -> None:
    """What a job refuses with crosses the pipe pickled and comes back whole: its kind, so
    its status, its words, headers and every attribute (a 503's `retry_after_s` included)."""
    refusal = pickle.loads(pickle.dumps(hosted._refusal(error)))
    back = remote.refused(refusal)
    assert type(back) is type(error)
    assert (back.status, back.msg, back.headers) == (error.status, error.msg, error.headers)
    assert vars(back) == vars(error)


async def test_shutdown_during_a_load_in_the_worker_ends_the_load(
    batch_service, tmp_path: Path
) -> None:
    """The model cache's loader thread waits on the event loop for a load in the worker: the
    runtime's close ends that load (the worker goes first), and so never waits on it."""
    client = await batch_service(warm=(), worker_process=True, load_wait_s=0)
    runtime = client.app[RUNTIME]
    device = runtime.device()
    worker = await device.process_worker()
    # A load that never ends by itself on the worker's loader lane: the model's waits behind.
    holding = asyncio.ensure_future(
        worker.call(
            "tests.runtime.worker_test_ops:load_until_file",
            str(tmp_path / "never"),
            live=False,
            loader=True,
            timeout_s=600,
        )
    )
    request = {"prompt": "a cat", "width": 64, "height": 64}
    response = await client.post("/text-to-image", json=request)
    assert response.status == 503 and "still loading" in (await response.json())["detail"]["msg"]
    assert device.models.loading()
    await asyncio.wait_for(runtime.close(), 30)
    assert not device.models.loading()
    with pytest.raises(WorkerError, match="shut down"):
        await holding


def test_a_load_whose_event_loop_stopped_ends(tiny_models_dir: Path) -> None:
    """The cache's loader thread waits on the service's event loop for a load in a worker: a
    loop that stopped without closing the runtime ends the wait (rather than half an hour,
    with the thread joined at the interpreter's exit)."""
    from batch import text_to_image
    from runtime.runtime import Runtime

    runtime = Runtime(Settings(models_dir=tiny_models_dir, worker_process=True).runtime())
    loop = asyncio.new_event_loop()  # never run again: as a service's loop that stopped
    try:
        path = resolve_model(text_to_image.DEFAULT_MODEL, tiny_models_dir)
        load = remote.loader(runtime.device(), text_to_image.ROUTE.load, path, loop)
        outcome: list[BaseException] = []

        def attempt() -> None:
            try:
                load()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the load still waits on a stopped event loop"
        (error,) = outcome
        assert "stopped during the load" in str(error)
    finally:
        loop.close()


async def test_a_model_left_from_a_replaced_worker_is_loaded_again(batch_service) -> None:
    """A model whose worker process was replaced is gone with it: the restart forgets it, and
    one that escaped that (its load finished just as the worker was replaced) is forgotten and
    loaded again by the next request rather than refusing every request."""
    client = await batch_service(warm=("text-to-image",), worker_process=True, load_wait_s=120)
    worker = worker_of(client)
    (model,) = remote_models(client)
    # The restart hook, which forgets the old worker's models, misses this one: as for a load
    # that finished while the worker was being replaced.
    worker._on_restart = None
    pid = worker.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await wait_until(
        lambda: worker.status().state == "ready" and worker.status().generation == 2,
        "the worker to restart",
    )
    assert remote_models(client) == [model]  # still held, stale
    request = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 1}
    (image,) = (await api(client).text_to_image(**request)).images
    assert pixels(image.url).shape == (64, 64, 3)
    (fresh,) = remote_models(client)
    assert fresh.worker_generation == 2


async def test_every_route_runs_in_the_worker(batch_service) -> None:
    """Each route's arguments (images, audio samples, prompts, params) and results (images,
    frames, text, speech, masks) cross to the worker process and back."""
    client = await batch_service(warm=(), worker_process=True)
    steps = {"num_inference_steps": 2}
    requests = {
        "/text-to-image": {"json": {"prompt": "a cat", "width": 64, "height": 64, **steps}},
        "/image-to-image": {"data": form(png(64, 64), prompt="a cat", **steps)},
        "/image-to-video": {"data": form(png(80, 48), width=64, height=64, **steps)},
        "/upscale": {"data": form(png(24, 16), prompt="sharp", **steps)},
        "/audio-to-text": {"data": audio_form(tone(WAV, 3.0, 16_000))},
        "/text-to-speech": {"json": {"text": "hello there"}},
        "/image-to-text": {"data": form(png(16, 16))},
        "/segment-anything-2": {
            "data": form(png(96, 64), point_coords="[[30, 20]]", point_labels="[1]")
        },
    }
    answers = {}
    for path, body in requests.items():
        response = await client.post(path, **body)
        assert response.status == 200, (path, await response.text())
        answers[path] = await response.json()
    assert len(answers["/text-to-image"]["images"]) == 1
    assert answers["/image-to-video"]["frames"][0]
    assert answers["/audio-to-text"]["text"] is not None
    assert answers["/text-to-speech"]["audio"]["url"].startswith("data:audio/wav;base64,")
    assert answers["/segment-anything-2"]["masks"].startswith("[")
    # Every model lives in the worker, none in the service's process.
    held = remote_models(client)
    assert len(held) == len(requests)
    assert worker_of(client).status().restarts == 0
