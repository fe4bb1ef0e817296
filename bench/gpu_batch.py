"""The GPU acceptance run's batch sections: a live session's frame wait beside text-to-image
jobs, and every batch route once at its default size, over HTTP against the service in this
process. See bench/gpu.py."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.gpu_live import State, ensure_sessions, frames, gradient
from bench.gpu_report import Figures, latency_ms, one_line, pct

LIVE_FPS = 30.0
PROMPT = "a lighthouse on a cliff at dusk, oil painting"


def write_tiny_route_models(models_dir: Path) -> list[str]:
    """The tiny models of the routes with no full-size random variant, under their real ids,
    marked as random weights."""
    from runtime.random_full import mark_random
    from runtime.tiny_audio import MMS_TTS, WHISPER, build_tiny_vits, build_tiny_whisper
    from runtime.tiny_llm import LLAMA_31_8B_INSTRUCT, build_tiny_llama3
    from runtime.tiny_vision import BLIP_LARGE, SAM2_LARGE, build_tiny_blip, build_tiny_sam2

    builders: dict[str, Callable[[Path], Path]] = {
        LLAMA_31_8B_INSTRUCT: build_tiny_llama3,
        WHISPER: build_tiny_whisper,
        MMS_TTS: build_tiny_vits,
        BLIP_LARGE: build_tiny_blip,
        SAM2_LARGE: build_tiny_sam2,
    }
    for model_id, build in builders.items():
        mark_random(build(models_dir / model_id), f"tiny {model_id}")
    return list(builders)


async def put_in_cache(state: State, spec: Any) -> float:
    """Build `spec`'s pipeline on the device and put it in the runtime's model cache under
    its route and id, where the route finds it as if it had loaded it; seconds it took."""
    from runtime.random_batch import build_pipeline

    runtime = state.runtime
    key = runtime.key(spec.route, spec.model_id)
    if runtime.models.ready(key) is not None:
        return 0.0

    def build() -> Any:
        device = runtime.spec
        return build_pipeline(spec, device.device, device.dtype, dry=state.plan.dry)

    started = time.monotonic()
    lease = await asyncio.to_thread(runtime.models.acquire, key, build)
    lease.release()  # stays cached, idle, until evicted for room
    return time.monotonic() - started


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(gradient(3, width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def wav(seconds: float) -> bytes:
    from batch.audio import wav_bytes

    t = np.arange(round(seconds * 16_000)) / 16_000
    return wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t), 16_000)


@dataclass(frozen=True)
class Call:
    """One request to a batch route: a JSON body or a form (field -> text, or
    (file name, bytes, content type))."""

    route: str
    model: str
    """What it runs on, in words (random full-size, or tiny)."""
    json: dict[str, Any] | None = None
    form: dict[str, Any] | None = None
    spec: Any = None
    """The full-size random pipeline to put in the cache first, if any."""


def calls(state: State) -> list[Call]:
    """Every batch route once: defaults everywhere on the real run (the request names only
    what it must: a prompt, an input); toy sizes and 2 steps on the dry run."""
    from runtime.random_batch import PIX2PIX, SDXL_LIGHTNING, SVD_XT, X4_UPSCALER

    dry = state.plan.dry
    small = {"width": 64, "height": 64, "num_inference_steps": 2} if dry else {}
    steps = {"num_inference_steps": 2} if dry else {}

    def full(spec: Any) -> str:
        size = "its layout at toy size" if dry else "full size"
        return f"{spec.model_id} ({size}, random weights)"

    def image(width: int, height: int) -> tuple[str, bytes, str]:
        return ("input.png", png(width, height), "image/png")

    side = 64 if dry else 512
    return [
        Call(
            "text-to-image",
            full(SDXL_LIGHTNING),
            json={"prompt": PROMPT, "model_id": SDXL_LIGHTNING.model_id, **small},
            spec=SDXL_LIGHTNING,
        ),
        Call(
            "image-to-image",
            full(PIX2PIX) + f", {side}x{side} input",
            form={
                "prompt": "make it snow",
                "model_id": PIX2PIX.model_id,
                "image": image(side, side),
                **steps,
            },
            spec=PIX2PIX,
        ),
        Call(
            "upscale",
            full(X4_UPSCALER) + (", 16x16 input" if dry else ", 256x256 input to 1024x1024"),
            form={
                "prompt": "a sharp photo",
                "model_id": X4_UPSCALER.model_id,
                "image": image(16, 16) if dry else image(256, 256),
                **steps,
            },
            spec=X4_UPSCALER,
        ),
        Call(
            "llm",
            "tiny Llama 3.1 shape (the 8B model has no random variant here)",
            json={
                "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
                **({"max_tokens": 8} if dry else {}),
            },
        ),
        Call(
            "audio-to-text",
            "tiny Whisper shape, 10 s of audio" if not dry else "tiny Whisper shape, 2 s",
            form={"audio": ("clip.wav", wav(2 if dry else 10), "audio/wav")},
        ),
        Call("text-to-speech", "tiny MMS-TTS shape", json={"text": "Hello from the GPU run."}),
        Call("image-to-text", "tiny BLIP shape", form={"image": image(side, side)}),
        Call(
            "segment-anything-2",
            "tiny SAM 2 shape",
            form={
                "image": image(side, side),
                "point_coords": f"[[{side // 2}, {side // 2}]]",
                "point_labels": "[1]",
            },
        ),
        # Last: the longest job (25 frames of 1024x576, 25 steps); cut at the deadline.
        Call(
            "image-to-video",
            full(SVD_XT) + (", 64x64" if dry else ", 1024x576, 25 frames"),
            form={
                "model_id": SVD_XT.model_id,
                "image": image(64, 64) if dry else image(1024, 576),
                **{k: str(v) for k, v in small.items()},
            },
            spec=SVD_XT,
        ),
    ]


def summary(body: Any) -> str:
    """What came back, in a few words."""
    if not isinstance(body, dict):
        return type(body).__name__
    parts = []
    for key, value in body.items():
        if isinstance(value, list):
            inner = f"x{len(value[0])}" if value and isinstance(value[0], list) else ""
            parts.append(f"{key}: {len(value)}{inner}")
        elif isinstance(value, str):
            parts.append(f"{key}: {len(value)} chars")
        elif isinstance(value, dict) and key == "usage":
            parts.append(f"tokens: {value.get('completion_tokens')}")
    return ", ".join(parts)


def model_gib(state: State, route: str) -> float | None:
    """Size of the weights the route's model holds in the runtime's cache."""
    sizes = [m.size_bytes for m in state.runtime.models.models() if m.key.kind == route]
    return round(max(sizes) / 2**30, 3) if sizes else None


async def post(client: aiohttp.ClientSession, base: str, call: Call) -> tuple[int, Any]:
    url = f"{base}/{call.route}"
    if call.json is not None:
        request = client.post(url, json=call.json)
    else:
        form = aiohttp.FormData()
        for name, value in (call.form or {}).items():
            if isinstance(value, tuple):
                form.add_field(name, value[1], filename=value[0], content_type=value[2])
            else:
                form.add_field(name, str(value))
        request = client.post(url, data=form)
    async with request as response:
        try:
            body = await response.json()
        except (aiohttp.ContentTypeError, ValueError):
            body = await response.text()
        return response.status, body


async def section_batch_routes(state: State, budget: float) -> Figures:
    state.need_service()
    deadline = time.monotonic() + budget
    routes: dict[str, Figures] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as client:
        for call in calls(state):
            left = deadline - time.monotonic()
            if left < 2:
                state.report.not_run(f"batch route {call.route}", "out of the section's time")
                continue
            entry: Figures = {"model": call.model}
            try:
                if call.spec is not None:
                    entry["build_s"] = round(await put_in_cache(state, call.spec), 2)
                started = time.monotonic()
                left = deadline - time.monotonic()
                status, body = await asyncio.wait_for(post(client, state.base, call), left)
                entry |= {"status": status, "seconds": round(time.monotonic() - started, 2)}
                entry["model_gib"] = model_gib(state, call.route)
                if status == 200:
                    entry["output"] = summary(body)
                else:
                    entry["detail"] = str(body)[:300]
                    state.report.not_run(f"batch route {call.route}", f"HTTP {status}: {body}")
            except TimeoutError:
                entry["status"] = "cut at the deadline"
                state.report.not_run(f"batch route {call.route}", "cut at the deadline")
            except Exception as exc:
                entry["status"] = f"failed: {one_line(exc)}"
                state.report.not_run(f"batch route {call.route}", one_line(exc))
            routes[call.route] = entry
            took = f"{entry['seconds']:7.2f} s" if "seconds" in entry else " " * 9
            built = f" (built in {entry['build_s']:.1f} s)" if entry.get("build_s") else ""
            if entry.get("model_gib") is not None:
                built += f" {entry['model_gib']:.2f} GiB"
            state.report.say(
                f"  {call.route:20s} {entry['status']!s:>4} {took}  {call.model}{built}"
                f"  {entry.get('output', '')}"
            )
    return {"routes": routes}


# -- live beside batch ------------------------------------------------------------------------


class StepClock:
    """The batch steps' durations, from the worker's safe points: a step is the time from
    leaving one safe point (the live frames it let through included) to reaching the next."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.steps: list[float] = []
        self._left: float | None = None
        self._yield = worker.yield_to_live

    def __enter__(self) -> StepClock:
        def timed() -> int:
            reached = time.perf_counter()
            if self._left is not None:
                self.steps.append(reached - self._left)
            ran = self._yield()
            self._left = time.perf_counter()
            return ran

        # An instance attribute: what each new job's gate takes (BatchJobs reads it per job).
        self.worker.yield_to_live = timed
        return self

    def new_job(self) -> None:
        self._left = None  # the first step of a job is timed from no safe point

    def __exit__(self, *exc: object) -> None:
        del self.worker.yield_to_live


async def paced_stream(state: State, session: Any, stop: asyncio.Event) -> int:
    """A 30 fps live stream on the inference worker, one frame in flight as a session keeps
    it (a late frame is not made up for); how many frames it sent."""
    loop = asyncio.get_running_loop()
    worker = state.runtime.worker()
    images = frames(state.plan)
    started = time.monotonic()
    sent = 0
    while not stop.is_set():
        await loop.run_in_executor(worker, session.process, images[sent % len(images)])
        sent += 1
        due = started + sent / LIVE_FPS
        await asyncio.sleep(max(0.0, due - time.monotonic()))
    return sent


async def section_live_beside_batch(state: State, budget: float) -> Figures:
    from runtime.random_batch import SDXL_LIGHTNING

    state.need_service()
    deadline = time.monotonic() + budget
    plan = state.plan
    build_s = await put_in_cache(state, SDXL_LIGHTNING)
    await ensure_sessions(state, 1)
    session = state.sessions[0]
    worker = state.runtime.worker()
    small = {"width": 64, "height": 64, "num_inference_steps": 2} if plan.dry else {}
    job = Call(
        "text-to-image",
        SDXL_LIGHTNING.model_id,
        json={"prompt": PROMPT, "model_id": SDXL_LIGHTNING.model_id, **small},
    )
    jobs: list[float] = []
    async with aiohttp.ClientSession() as client:
        with StepClock(worker) as clock:
            # The job alone first: it warms the model up, and gives its step time.
            started = time.monotonic()
            status, body = await post(client, state.base, job)
            if status != 200:
                raise RuntimeError(f"text-to-image answered {status}: {body}")
            job_alone_s = time.monotonic() - started
            steps_alone = list(clock.steps)
            # The live stream alone.
            stop = asyncio.Event()
            stream = asyncio.create_task(paced_stream(state, session, stop))
            await asyncio.sleep(plan.alone_s)
            stop.set()
            alone_count = await stream
            alone = list(worker.live_waits)[-alone_count:]
            # The stream beside jobs run back to back.
            worst_steps_before = worker.max_live_wait_steps
            stop = asyncio.Event()
            stream = asyncio.create_task(paced_stream(state, session, stop))
            beside_started = time.monotonic()
            try:
                end = min(beside_started + plan.beside_s, deadline - job_alone_s - 1)
                while not jobs or time.monotonic() < end:
                    clock.new_job()
                    started = time.monotonic()
                    status, body = await post(client, state.base, job)
                    if status != 200:
                        raise RuntimeError(f"text-to-image answered {status}: {body}")
                    jobs.append(time.monotonic() - started)
            finally:
                stop.set()
                beside_count = await stream
            beside_s = time.monotonic() - beside_started
            beside = list(worker.live_waits)[-beside_count:]
            steps = clock.steps[len(steps_alone) :]
    step = pct(steps, 0.5) if steps else job_alone_s
    worst = max(beside)
    figures: Figures = {
        "model": SDXL_LIGHTNING.model_id + (" (toy size)" if plan.dry else " (full size)"),
        "model_gib": model_gib(state, "text-to-image"),
        "build_s": round(build_s, 2),
        "job_alone_s": round(job_alone_s, 3),
        "jobs_beside": len(jobs),
        "job_beside_p50_s": round(pct(jobs, 0.5), 3),
        "step_p50_ms": round(step * 1000, 2),
        "steps_timed": len(steps),
        "wait_alone": latency_ms(alone) | {"p99_ms": round(pct(alone, 0.99) * 1000, 2)},
        "wait_beside": latency_ms(beside) | {"p99_ms": round(pct(beside, 0.99) * 1000, 2)},
        "max_wait_over_step": round(worst / step, 2) if step else None,
        "most_steps_a_frame_waited": worker.max_live_wait_steps,
        "most_steps_before": worst_steps_before,
        "live_fps_alone": round(alone_count / plan.alone_s, 2),
        "live_fps_beside": round(beside_count / beside_s, 2),
    }
    a, b = figures["wait_alone"], figures["wait_beside"]
    state.report.say(
        f"  text-to-image job {job_alone_s:.2f} s alone, step p50 {step * 1000:.1f} ms "
        f"({len(steps)} steps timed); {len(jobs)} jobs beside the stream"
    )
    state.report.say(
        f"  live frame wait alone:  p50 {a['p50_ms']:7.1f} ms  p99 {a['p99_ms']:7.1f} ms  "
        f"max {a['max_ms']:7.1f} ms  ({figures['live_fps_alone']} fps)"
    )
    state.report.say(
        f"  live frame wait beside: p50 {b['p50_ms']:7.1f} ms  p99 {b['p99_ms']:7.1f} ms  "
        f"max {b['max_ms']:7.1f} ms  ({figures['live_fps_beside']} fps); max wait / step "
        f"{figures['max_wait_over_step']} (preemption bound: about 1), most steps a frame "
        f"waited: {worker.max_live_wait_steps}"
    )
    return figures
