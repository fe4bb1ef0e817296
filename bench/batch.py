"""Batch routes: throughput, latency, the HTTP layer's cost, and live frames beside a job.

    python -m bench.batch [--requests 24] [--size 64] [--steps 4] [--live-steps 40]

The service runs in this process on 127.0.0.1 with tiny random models of the real
architectures (built into a temp dir), text-to-image on the SDXL-shaped one. Printed:
- requests per second and p50/p95 latency at concurrency 1 and 8 over real HTTP;
- the same generation called in process (the route's own `generate` and PNG encoding, no
  HTTP, no queue) and the HTTP layer's overhead against it (goal: under 5 %);
- the wait of live frames (a tiny streamdiffusion session's frames, 30 per second, on the same
  inference worker) behind a text-to-image job of `--live-steps` steps: p50/p99/max, against the
  job's step time (the bound preemption promises: about one step).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from batch import text_to_image
from batch.images import png_data_url
from batch.jobs import StepGate
from live.app import create_app
from live.keys import RUNTIME
from live.pipelines.base import PipelineContext
from live.pipelines.diffusion import StreamDiffusionParams, StreamDiffusionPipeline
from live.settings import Settings
from protocol.batch_api import TextToImageParams
from runtime.tiny import build_tiny_sd, build_tiny_sdxl, build_tiny_taesd

SDXL = "SG161222/RealVisXL_V4.0_Lightning"


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def summary(latencies: Sequence[float]) -> str:
    return f"p50 {pct(latencies, 0.5) * 1000:7.1f} ms  p95 {pct(latencies, 0.95) * 1000:7.1f} ms"


async def load_run(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], requests: int, concurrency: int
) -> tuple[float, list[float]]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            async with session.post(url, json={**body, "seed": i}) as response:
                assert response.status == 200, await response.text()
                await response.read()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(requests)))
    return requests / (time.perf_counter() - started), latencies


def in_process(pipe: Any, body: dict[str, Any], requests: int) -> list[float]:
    params = TextToImageParams.model_validate(body)
    gate = StepGate(lambda: 0)
    latencies = []
    for i in range(requests):
        started = time.perf_counter()
        images = text_to_image.generate(pipe, params, i, gate)
        [png_data_url(image) for image in images]
        latencies.append(time.perf_counter() - started)
    return latencies


async def live_beside_batch(app: web.Application, url: str, models: Path, steps: int) -> None:
    """A live stream's frames on the worker while one long batch job runs."""
    runtime = app[RUNTIME]
    worker = runtime.worker()
    context = PipelineContext(runtime)
    params = StreamDiffusionParams(width=64, height=64, t_index_list=[20], prompt="a cat")
    live = StreamDiffusionPipeline(params, context)
    await asyncio.to_thread(live.load)
    frame = np.zeros((64, 64, 3), np.uint8)
    loop = asyncio.get_running_loop()
    body = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": steps, "seed": 1}

    async def frames(stop: asyncio.Event) -> int:
        sent = 0
        while not stop.is_set():
            await loop.run_in_executor(worker, live.process, frame)  # live priority
            sent += 1
            await asyncio.sleep(1 / 30)
        return sent

    async with aiohttp.ClientSession() as session:
        # The stream alone, then with the job.
        stop = asyncio.Event()
        stream = asyncio.create_task(frames(stop))
        await asyncio.sleep(2)
        stop.set()
        alone_frames = await stream
        alone = list(worker.live_waits)[-alone_frames:]
        stop = asyncio.Event()
        stream = asyncio.create_task(frames(stop))
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        async with session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
        job_s = time.perf_counter() - started
        stop.set()
        beside_frames = await stream
        beside = list(worker.live_waits)[-beside_frames:]
    live.unload()
    step = job_s / steps
    print(
        f"live frame wait, alone:       p50 {pct(alone, 0.5) * 1000:6.1f} ms  "
        f"p99 {pct(alone, 0.99) * 1000:6.1f} ms  ({alone_frames} frames in 2 s)"
    )
    print(
        f"live frame wait, beside job:  p50 {pct(beside, 0.5) * 1000:6.1f} ms  "
        f"p99 {pct(beside, 0.99) * 1000:6.1f} ms  max {max(beside) * 1000:6.1f} ms  "
        f"({beside_frames} frames during {job_s:.1f} s; job step {step * 1000:.1f} ms, "
        f"max/step {max(beside) / step:.2f}; most steps waited {worker.max_live_wait_steps})"
    )
    print(
        f"live frame rate: alone {alone_frames / 2:.1f} fps, beside the job "
        f"{beside_frames / (job_s + 0.5):.1f} fps"
    )


async def llm_bench(base: str, models: Path, requests: int, tokens: int = 64) -> None:
    """Streamed `POST /llm` on the tiny Llama-3-shaped model: time to first token and tokens
    per second at concurrency 1 and 4 (the worker runs one job at a time, so at 4 the first
    token includes the wait behind the jobs ahead)."""
    from runtime.tiny_llm import LLAMA_31_8B_INSTRUCT, build_tiny_llama3

    await asyncio.to_thread(build_tiny_llama3, models / LLAMA_31_8B_INSTRUCT)
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    body = {"messages": messages, "max_tokens": tokens, "temperature": 0.7, "stream": True}

    async def stream(
        session: aiohttp.ClientSession, gate: asyncio.Semaphore
    ) -> tuple[float, float, int]:
        """(seconds to the first token, seconds from it to the end, tokens)"""
        async with gate:
            return await timed_stream(session)

    async def timed_stream(session: aiohttp.ClientSession) -> tuple[float, float, int]:
        started = time.perf_counter()
        first, count = 0.0, 0
        async with session.post(f"{base}/llm", json=body) as response:
            assert response.status == 200, await response.text()
            async for line in response.content:
                if line.startswith(b"data: {"):
                    first = first or time.perf_counter()
                    count = json.loads(line[6:])["usage"]["completion_tokens"]
        return first - started, time.perf_counter() - first, count

    async with aiohttp.ClientSession() as session:
        while True:  # the model loads on first use: 503 with Retry-After until it is in
            async with session.post(f"{base}/llm", json={**body, "stream": False}) as response:
                if response.status == 200:
                    break
                assert response.status == 503, await response.text()
            await asyncio.sleep(0.1)
        print(f"# llm, tiny Llama 3 (random weights), {tokens} tokens, {requests} streams")
        for concurrency in (1, 4):
            gate = asyncio.Semaphore(concurrency)
            started = time.perf_counter()
            results = await asyncio.gather(*(stream(session, gate) for _ in range(requests)))
            wall = time.perf_counter() - started
            first = [r[0] for r in results]
            per_stream = statistics.median(r[2] / r[1] for r in results if r[1] > 0)
            print(
                f"LLM concurrency {concurrency}: {sum(r[2] for r in results) / wall:7.1f} "
                f"tokens/s in all, {per_stream:7.1f} tokens/s per stream  time to first token "
                f"p50 {pct(first, 0.5) * 1000:6.1f} ms  p95 {pct(first, 0.95) * 1000:6.1f} ms"
            )


def wav_tone(seconds: float, rate: int = 16_000) -> bytes:
    """A sine at 440 Hz as 16-bit mono WAV, written as the text-to-speech route writes its."""
    from batch.audio import wav_bytes

    t = np.arange(round(seconds * rate)) / rate
    return wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t), rate)


async def audio_bench(base: str, models: Path, seconds: float = 60.0, runs: int = 3) -> None:
    """`POST /audio-to-text` of a `seconds` clip on the tiny Whisper-shaped model: the
    real-time factor (processing seconds per second of audio), decode and windows included."""
    from runtime.tiny_audio import WHISPER, build_tiny_whisper

    await asyncio.to_thread(build_tiny_whisper, models / WHISPER)
    clip = wav_tone(seconds)

    async def transcribe(session: aiohttp.ClientSession) -> tuple[int, float]:
        form = aiohttp.FormData()
        form.add_field("audio", clip, filename="clip.wav", content_type="audio/wav")
        started = time.perf_counter()
        async with session.post(f"{base}/audio-to-text", data=form) as response:
            await response.read()
            return response.status, time.perf_counter() - started

    async with aiohttp.ClientSession() as session:
        while (await transcribe(session))[0] == 503:  # the first request starts the load
            await asyncio.sleep(0.2)
        took = []
        for _ in range(runs):
            status, seconds_taken = await transcribe(session)
            assert status == 200, status
            took.append(seconds_taken)
    best = min(took)
    print(
        f"# audio-to-text, tiny Whisper, {seconds:.0f} s WAV: {best:.2f} s "
        f"(real-time factor {best / seconds:.4f}, {seconds / best:.0f}x real time; best of {runs})"
    )


def request_arguments(parser: argparse.ArgumentParser) -> None:
    """The text-to-image requests a batch bench sends: how many, their size and steps."""
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    request_arguments(parser)
    parser.add_argument("--live-steps", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        build_tiny_sdxl(models / SDXL)
        build_tiny_sd(models / "stabilityai/sd-turbo")
        build_tiny_taesd(models / "madebyollin/taesd")
        settings = Settings(models_dir=models, warm="text-to-image", device="cpu", batch_queue=64)
        app = create_app(settings)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/text-to-image"
        body = {
            "prompt": "a lighthouse",
            "width": args.size,
            "height": args.size,
            "num_inference_steps": args.steps,
        }
        try:
            async with aiohttp.ClientSession() as session:
                while (await (await session.get(f"{base}/health")).json())["status"] == "LOADING":
                    await asyncio.sleep(0.1)
                await load_run(session, url, body, 2, 1)  # warm-up
                print(
                    f"# text-to-image, tiny SDXL, {args.size}x{args.size}, {args.steps} steps, "
                    f"{args.requests} requests"
                )
                for concurrency in (1, 8):
                    rate, latencies = await load_run(session, url, body, args.requests, concurrency)
                    print(
                        f"HTTP concurrency {concurrency}: {rate:6.2f} req/s  {summary(latencies)}"
                    )
            # In process against over HTTP, alternated so that both see the same machine.
            runtime = app[RUNTIME]
            inner: list[float] = []
            outer: list[float] = []
            key = runtime.key("text-to-image", SDXL)
            async with aiohttp.ClientSession() as session:
                with runtime.models.acquire(key, lambda: None) as pipe:
                    for _ in range(args.requests):
                        inner += await asyncio.to_thread(in_process, pipe, body, 1)
                        outer += (await load_run(session, url, body, 1, 1))[1]
            a, b = statistics.median(inner), statistics.median(outer)
            print(f"in process (no HTTP):  {summary(inner)}")
            print(f"over HTTP, alternated: {summary(outer)}")
            print(
                f"HTTP layer overhead: {(b - a) * 1000:.1f} ms per request, "
                f"{(b / a - 1) * 100:.1f} % (goal < 5 %)"
            )
            await live_beside_batch(app, url, models, args.live_steps)
            await llm_bench(base, models, args.requests)
            await audio_bench(base, models)
        finally:
            await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
