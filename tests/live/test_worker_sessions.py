"""Live sessions with `--worker-process`: pipelines in the device's supervised worker process.

Two sessions share the CPU's worker. When the worker ends (killed from outside, an abort in a
pipeline, a hang), both reload in the fresh worker with a `restart` event and go on; a hung
session ends as it does in process; repeated crashes end in ERROR on /health. Nothing is left
behind: processes, shared-memory segments, threads, file descriptors.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from multiprocessing import resource_tracker
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.pipelines.effects import CartoonPipeline
from live.pipelines.passthrough import NoopPipeline
from live.settings import Settings
from protocol.clips import make_clip, read_index
from runtime.worker_process import start_fork_server
from tests.live.conftest import PIPELINES
from tests.live.streams import (
    EventLog,
    Viewer,
    free_port,
    publish_clip,
    start_session,
    wait_gone,
    watch,
)
from tests.live.test_service import STARTUP_S
from tests.runtime.test_worker_process import new_since, pid_gone, segments, snapshot
from tests.waiting import poll_until, wait_until

ABORT_FLAG = "LIVE_V2V_TEST_ABORT_FLAG"
"""A file whose presence makes `AbortingPipeline` abort the worker once (it deletes it first):
a worker process's state does not outlive it, a file does."""


class AbortingPipeline(NoopPipeline):
    name = "aborting"

    def process(self, image: np.ndarray) -> np.ndarray:
        flag = os.environ.get(ABORT_FLAG)
        index = read_index(image)
        if flag and index is not None and index >= 20 and os.path.exists(flag):
            os.remove(flag)
            os.abort()
        return image


LOAD_GATE = "LIVE_V2V_TEST_LOAD_GATE"
"""A file `HeldLoading`'s load waits for (it creates `<file>.started` when it begins)."""


class HeldLoading(CartoonPipeline):
    """Loads as a model with real weights does, for as long as the test wants: until the file
    named by LOAD_GATE exists; then warms up through the main thread, as diffusion does."""

    name = "held-loading"

    def load(self) -> None:
        from runtime.worker_child import on_main

        gate = os.environ.get(LOAD_GATE)
        if gate:
            Path(f"{gate}.started").touch()
            while not os.path.exists(gate):
                time.sleep(0.01)  # reading weights from a slow disk
        super().load()
        on_main(lambda: self.process(np.zeros((16, 16, 3), np.uint8)))


class HangingPipeline(NoopPipeline):
    name = "hanging"

    def process(self, image: np.ndarray) -> np.ndarray:
        index = read_index(image)
        if index is not None and index >= 20:
            time.sleep(3600)  # a model stuck in a kernel: nothing wakes it
        return image


class OutOfMemoryFirst(NoopPipeline):
    """Runs out of memory on the first frame of its first load in a worker process."""

    name = "oom-first"
    loads = 0

    def load(self) -> None:
        type(self).loads += 1
        self.first = type(self).loads == 1

    def process(self, image: np.ndarray) -> np.ndarray:
        if self.first:
            self.first = False
            raise MemoryError("CUDA out of memory (simulated)")
        return image


TEST_PIPELINES = {
    **PIPELINES,
    **{cls.name: cls for cls in (AbortingPipeline, HangingPipeline, OutOfMemoryFirst, HeldLoading)},
}


@pytest.fixture
async def nothing_left_behind() -> AsyncIterator[None]:
    resource_tracker.ensure_running()
    # As the tracker: one per process, what the workers are forked from.
    await asyncio.to_thread(start_fork_server)
    before = snapshot()
    yield
    if not await poll_until(lambda: not new_since(before)):
        pytest.fail(f"left behind: {new_since(before)}")


@pytest.fixture
async def service(aiohttp_client, nothing_left_behind):
    clients = []

    async def start(**overrides):
        settings = Settings(status_interval_s=0.5, worker_process=True, device="cpu", **overrides)
        client = await aiohttp_client(create_app(settings, TEST_PIPELINES))
        clients.append(client)
        return client

    yield start
    for client in clients:  # before the leak check: the service's close ends its workers
        await client.close()


class Stream:
    def __init__(self, info: dict, frames: int = 100_000) -> None:
        self.info = info
        self.viewer, self.events, self.tasks = watch(info)
        clip = make_clip(min(frames, 900))
        self.tasks.append(asyncio.create_task(publish_clip(info["publish_url"], clip)))

    async def processed(self, count: int, after: int = 0) -> None:
        """Until the pipeline serves (a status event from position `after` on says so; frames
        before it are loading frames), then `count` more frames."""
        await self.events.wait_event(
            lambda e: e["type"] == "status" and e["state"] not in ("LOADING", "ERROR", "OFFLINE"),
            after,
        )
        await self.viewer.wait_frames(len(self.viewer.frames) + count)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def worker_pid(client) -> int:
    body = await (await client.get("/health")).json()
    (worker,) = body["workers"]
    assert worker["state"] == "ready", worker
    return worker["pid"]


def restarts(events: EventLog) -> list[dict]:
    return events.of_type("restart")


async def both_go_on_after_a_restart(client, streams: list[Stream]) -> None:
    for stream in streams:
        await stream.events.wait_event(lambda e: e["type"] == "restart")
    for stream in streams:
        # Frames through the pipeline again, reloaded in the fresh worker.
        after = next(
            i for i, e in enumerate(stream.events.events) if e["event"]["type"] == "restart"
        )
        await stream.processed(15, after)
    for stream in streams:
        await client.delete(f"/live-video-to-video/{stream.info['session_id']}")
        await wait_gone(client, stream.info["session_id"])
        await stream.close()


async def test_a_worker_killed_from_outside_restarts_and_both_sessions_go_on(service) -> None:
    client = await service()
    # identity, not noop: a pass-through pipeline stays in the service's process.
    streams = [Stream(await start_session(client, model_id=m)) for m in ("identity", "cartoon")]
    noop = Stream(await start_session(client, model_id="noop"))  # no worker: never notices
    for stream in (*streams, noop):
        await stream.processed(10)
    pid = await worker_pid(client)
    os.kill(pid, signal.SIGKILL)
    await both_go_on_after_a_restart(client, streams)
    await noop.viewer.wait_frames(len(noop.viewer.frames) + 10)
    assert not restarts(noop.events) and not noop.events.of_type("error")
    await client.delete(f"/live-video-to-video/{noop.info['session_id']}")
    await wait_gone(client, noop.info["session_id"])
    await noop.close()
    for stream in streams:
        (event,) = restarts(stream.events)
        assert "SIGKILL" in event["restart_logs"][0], event
    assert await worker_pid(client) != pid and pid_gone(pid)
    body = await (await client.get("/health")).json()
    assert body["workers"][0]["restarts"] == 1 and body["status"] != "ERROR"


async def test_an_abort_in_one_pipeline_restarts_both_sessions(service, tmp_path, monkeypatch):
    flag = tmp_path / "abort-once"
    flag.touch()
    monkeypatch.setenv(ABORT_FLAG, str(flag))  # before the worker starts: it inherits it
    client = await service()
    streams = [Stream(await start_session(client, model_id=m)) for m in ("identity", "aborting")]
    await both_go_on_after_a_restart(client, streams)
    assert not flag.exists()
    assert "SIGABRT" in restarts(streams[1].events)[0]["restart_logs"][0]


async def test_a_hung_session_ends_and_the_other_goes_on_in_a_fresh_worker(service) -> None:
    client = await service(frame_timeout_s=1.0)
    other = Stream(await start_session(client, model_id="identity"))
    await other.processed(5)
    pid = await worker_pid(client)
    hung = Stream(await start_session(client, model_id="hanging"))
    status = await hung.events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])
    assert status["end_reason"] == "pipeline hung" and status["state"] == "ERROR"
    assert await poll_until(lambda: pid_gone(pid))
    await hung.close()
    await both_go_on_after_a_restart(client, [other])


async def test_repeated_crashes_end_in_error_on_health_and_the_session_ends(service) -> None:
    client = await service()
    stream = Stream(await start_session(client, model_id="identity"))
    await stream.processed(5)
    device = client.app[SESSIONS].runtime.device()
    worker = device.started_process_worker()
    assert worker is not None
    # Fewer and quicker than the defaults (5 within 300 s, from 0.5 s apart): the same path.
    worker.config = replace(worker.config, backoff_base_s=0.01, max_failures=2)
    for _ in range(worker.config.max_failures):
        await wait_until(lambda: worker.status().state == "ready", "the worker serving")
        os.kill(worker.status().pid, signal.SIGKILL)
        await wait_until(lambda: worker.status().state != "ready", "the worker lost")
    await wait_until(lambda: worker.status().state == "failed", "the worker failed")
    body = await (await client.get("/health")).json()
    assert body["status"] == "ERROR"
    assert "failed 2 times" in body["error"] and "SIGKILL" in body["error"]
    final = await stream.events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])
    assert final["end_reason"].startswith("worker failed: "), final
    await wait_gone(client, stream.info["session_id"])
    await stream.close()


async def health_of(http: aiohttp.ClientSession, base: str) -> dict | None:
    """/health of a service started as its own process; None while it does not answer."""
    try:
        async with http.get(f"{base}/health") as response:
            return await response.json()  # type: ignore[no-any-return]
    except aiohttp.ClientConnectionError:
        return None


async def service_up(http: aiohttp.ClientSession, base: str) -> None:
    """Until a service started as its own process answers /health."""
    await wait_until(
        lambda: health_of(http, base), "the service to start", within=STARTUP_S, poll=0.1
    )


async def test_sigterm_ends_the_cli_within_10_s_with_a_hung_worker() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "live", "serve", "--worker-process", "--device", "cpu", "--port", str(port)),
        stderr=subprocess.PIPE,
        env={**os.environ, "LIVE_V2V_LOG_LEVEL": "INFO"},
    )
    publishing = None
    try:
        async with aiohttp.ClientSession() as http:
            await service_up(http, base)
            # cartoon: its frames go to the worker (noop's pass through without it).
            body = {"model_id": "cartoon"}
            async with http.post(f"{base}/live-video-to-video", json=body) as r:
                info = await r.json()
            publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(900)))
            viewer = Viewer(info["subscribe_url"])
            viewing = asyncio.create_task(viewer.run())
            await viewer.wait_frames(5)

            async def worker() -> dict | None:
                body = await health_of(http, base)
                workers = (body or {}).get("workers") or [{}]
                return workers[0] if workers[0].get("state") == "ready" else None

            await wait_until(worker, "the worker process serving", within=STARTUP_S)
            pid = (await worker())["pid"]  # type: ignore[index]
            # Hung: it takes no call and answers none, as a process stuck in a driver would.
            os.kill(pid, signal.SIGSTOP)

            async def frame_held() -> bool:
                body = await health_of(http, base)
                return bool(body and body["workers"][0]["in_flight"])

            await wait_until(frame_held, "a frame held by the hung worker")
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
            viewing.cancel()
            await asyncio.gather(viewing, return_exceptions=True)
    finally:
        if publishing is not None:
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()  # and its stderr pipe closed with it
    assert proc.returncode == 0, stderr.decode()
    assert await poll_until(lambda: pid_gone(pid)), "the hung worker outlived the service"
    assert not segments(proc.pid), "shared-memory segments outlived the service"
    log = stderr.decode()
    assert "Traceback" not in log
    assert "cannot run" not in log, "a shutdown was reported as the pipeline's failure"


def test_the_service_process_does_not_import_diffusers(tiny_models_dir) -> None:
    # A fresh interpreter: this one has imported the model libraries for other tests.
    done = subprocess.run(
        [sys.executable, "-m", "tests.live.worker_imports", str(tiny_models_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["online"] and result["frames"] > 10, result
    assert result["batch"] == [200, 200], result
    assert "diffusers" not in result["imported"], result
    assert "transformers" not in result["imported"], result


async def test_a_pipelines_own_errors_stay_its_sessions_problem(service) -> None:
    client = await service()
    names = ("identity", "oom-first")
    streams = [Stream(await start_session(client, model_id=m)) for m in names]
    noop, oom = streams
    # Out of memory in the worker comes back as such: that pipeline restarts (unloaded, then
    # loaded again there), at once; the worker and the other session never notice.
    event = await oom.events.wait_event(lambda e: e["type"] == "restart")
    assert event["restart_logs"][0].startswith("out of memory"), event
    after = next(i for i, e in enumerate(oom.events.events) if e["event"]["type"] == "restart")
    await oom.processed(10, after)
    await noop.processed(10)
    assert not restarts(noop.events)
    body = await (await client.get("/health")).json()
    assert body["workers"][0]["restarts"] == 0 and body["status"] == "OK"
    for stream in streams:
        await client.delete(f"/live-video-to-video/{stream.info['session_id']}")
        await wait_gone(client, stream.info["session_id"])
        await stream.close()


async def test_a_session_loading_its_pipeline_holds_up_no_other_sessions_frames(
    service, tmp_path, monkeypatch
) -> None:
    gate = tmp_path / "load-gate"
    monkeypatch.setenv(LOAD_GATE, str(gate))  # before the worker starts: it inherits it
    client = await service()
    other = Stream(await start_session(client, model_id="cartoon"))  # its frames go to the worker
    await other.processed(5)
    loading = Stream(await start_session(client, model_id="held-loading"))
    started = Path(f"{gate}.started")
    await wait_until(started.exists, "the load under way in the worker")
    # A second of frames through the other session's pipeline, all while the load is held:
    # on the worker's one thread they would wait behind it.
    await other.viewer.wait_frames(len(other.viewer.frames) + 30)
    states = [e["state"] for e in loading.events.of_type("status")]
    assert "ONLINE" not in states and not gate.exists(), states
    gate.touch()
    await loading.processed(10)
    await other.processed(10)
    body = await (await client.get("/health")).json()
    assert body["workers"][0]["restarts"] == 0
    for stream in (other, loading):
        await client.delete(f"/live-video-to-video/{stream.info['session_id']}")
        await wait_gone(client, stream.info["session_id"])
        await stream.close()
