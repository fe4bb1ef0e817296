"""The GPU acceptance run's live sections: streamdiffusion sessions as the service runs them
(weights from the runtime's model cache, frames on the device's one inference worker), cold,
alone, several at once, and compiled in a child process. See bench/gpu.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu_report import Figures, Report, latency_ms

RANDOM_SD = ("random/sd-turbo-full", "random/taesd-full")
DRY_SD = ("random/sd-turbo-dry", "random/taesd-dry")
PROMPT = "a watercolor painting of a lighthouse"


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one run: the real one on CUDA, or the dry one on a CPU."""

    dry: bool
    device: str
    size: int
    t_index_list: tuple[int, ...]
    single_frames: int
    session_frames: int
    """Frames each session sends at every concurrency level."""
    concurrency: tuple[int, ...]
    alone_s: float
    beside_s: float
    compile_warmup_frames: int
    budgets: dict[str, float] = field(default_factory=dict)
    """Most seconds per section (each also gets at most what is left of the run's budget)."""


REAL = Plan(
    dry=False,
    device="cuda",
    size=512,
    t_index_list=(20,),
    single_frames=150,
    session_frames=40,
    concurrency=(2, 4, 8),
    alone_s=3.0,
    beside_s=8.0,
    compile_warmup_frames=3,
    budgets={
        "models": 90,
        "cold_start": 60,
        "single": 25,
        "concurrent": 50,
        "live_beside_batch": 45,
        "compiled": 150,
        "batch_routes": 120,
        "hardware": 10,
    },
)
DRY = Plan(
    dry=True,
    device="cpu",
    size=64,
    t_index_list=(20,),
    single_frames=4,
    session_frames=1,
    concurrency=(2, 4, 8),
    alone_s=0.2,
    beside_s=0.3,
    compile_warmup_frames=1,
    budgets={
        "models": 60,
        "cold_start": 30,
        "single": 20,
        "concurrent": 30,
        "live_beside_batch": 30,
        "compiled": 60,
        "batch_routes": 60,
        "hardware": 10,
    },
)
COMPILE_RESERVE_S = 60.0
"""Seconds the compile section leaves for the batch routes after it."""


def gib(count: float | None) -> float | None:
    return None if count is None else round(count / 2**30, 3)


# -- CUDA helpers (no-ops on the CPU) ---------------------------------------------------------


def cuda(plan: Plan) -> bool:
    return plan.device.startswith("cuda")


def reset_peak(plan: Plan) -> None:
    if cuda(plan):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def memory(plan: Plan) -> Figures:
    """GPU memory now and at its peak since the last `reset_peak`, in GiB (None on a CPU)."""
    if not cuda(plan):
        return {"allocated_gib": None, "peak_gib": None}
    import torch

    torch.cuda.synchronize()
    return {
        "allocated_gib": gib(torch.cuda.memory_allocated()),
        "peak_gib": gib(torch.cuda.max_memory_allocated()),
    }


# -- live sessions ----------------------------------------------------------------------------


def live_params(plan: Plan, ids: tuple[str, str], compiled: bool = False) -> Any:
    from live.pipelines.diffusion import StreamDiffusionParams

    return StreamDiffusionParams(
        model_id=ids[0],
        vae_id=ids[1],
        width=plan.size,
        height=plan.size,
        t_index_list=list(plan.t_index_list),
        prompt=PROMPT,
        acceleration="compile" if compiled else "none",
    )


def gradient(index: int, width: int, height: int) -> np.ndarray:
    """A moving colour gradient, frame `index` of it. Made here rather than with
    protocol.clips, which needs PyAV: the live sections run without the codecs."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [(x * 2 + index * 3) % 256, (y * 2 + index) % 256, (x + y + index * 5) % 256], axis=-1
    ).astype(np.uint8)


def frames(plan: Plan, count: int = 8) -> list[np.ndarray]:
    return [gradient(i, plan.size, plan.size) for i in range(count)]


async def load_session(
    plan: Plan, runtime: Any, ids: tuple[str, str], compiled: bool = False
) -> Any:
    """A streamdiffusion pipeline loaded as a service session loads it: through the runtime's
    model cache (weights shared with the other sessions), on a thread of its own."""
    from live.pipelines.base import PipelineContext
    from live.pipelines.diffusion import StreamDiffusionPipeline

    context = PipelineContext(runtime)  # its models_dir and device are the runtime's
    pipeline = StreamDiffusionPipeline(live_params(plan, ids, compiled), context)
    await asyncio.to_thread(pipeline.load)
    return pipeline


async def closed_loop(
    plan: Plan, worker: Any, sessions: list[Any], frames_each: int, deadline: float
) -> Figures:
    """Every session sends its next frame as soon as the last one is back, all on the device's
    one inference worker (live priority), as the service's sessions do. Latency: frame
    submitted -> restyled frame back (the pipeline returns it on the host: synchronised)."""
    loop = asyncio.get_running_loop()
    images = frames(plan)
    latencies: list[list[float]] = [[] for _ in sessions]

    async def one(index: int, session: Any) -> None:
        for k in range(frames_each):
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            out = await loop.run_in_executor(worker, session.process, images[k % len(images)])
            latencies[index].append(time.perf_counter() - started)
            if out.shape != (plan.size, plan.size, 3):
                raise RuntimeError(f"a restyled frame came back {out.shape}")

    reset_peak(plan)
    started = time.perf_counter()
    await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    wall = time.perf_counter() - started
    per_session = [round(len(done) / wall, 2) for done in latencies]
    flat = [x for done in latencies for x in done]
    if not flat:
        raise RuntimeError("no frame finished before the deadline")
    return {
        "sessions": len(sessions),
        "frames": len(flat),
        "fps_total": round(len(flat) / wall, 2),
        "fps_per_session": per_session,
        "fps_per_session_min": min(per_session),
        **latency_ms(flat),
        **memory(plan),
    }


def frame_line(label: str, f: Figures) -> str:
    mem = f"  peak {f['peak_gib']:.2f} GiB" if f.get("peak_gib") is not None else ""
    return (
        f"  {label}: {f['fps_total']:7.2f} fps total, {f['fps_per_session_min']:6.2f} per "
        f"session (slowest)  latency p50 {f['p50_ms']:7.1f} ms  p95 {f['p95_ms']:7.1f} ms"
        f"{mem}  ({f['frames']} frames)"
    )


@dataclass
class State:
    plan: Plan
    report: Report
    models_dir: Path
    ids: tuple[str, str]
    app: Any = None
    runner: Any = None
    base: str = ""
    runtime: Any = None
    sessions: list[Any] = field(default_factory=list)
    eager: Figures | None = None

    def need_service(self) -> None:
        if not self.base:
            raise RuntimeError("the service did not start (see the service entry)")


async def section_cold_start(state: State, budget: float) -> Figures:
    plan = state.plan
    runtime = state.runtime
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    await asyncio.to_thread(lambda: runtime.spec)  # the device (CUDA's context) comes up
    device_s = time.monotonic() - started
    reset_peak(plan)
    started = time.monotonic()
    session = await load_session(plan, runtime, state.ids)
    loaded_s = time.monotonic() - started
    weights = memory(plan)
    out = await loop.run_in_executor(runtime.worker(), session.process, frames(plan)[0])
    first_s = time.monotonic() - started
    if out.shape != (plan.size, plan.size, 3):
        raise RuntimeError(f"the first restyled frame came back {out.shape}")
    state.sessions.append(session)
    state.report.say(
        f"  cold start to the first restyled frame: {first_s:.2f} s (load from disk, to the "
        f"device, warm-up: {loaded_s:.2f} s; device start before it: {device_s:.2f} s); "
        f"weights {weights['allocated_gib']} GiB"
    )
    return {
        "cold_start_s": round(first_s, 3),
        "load_s": round(loaded_s, 3),
        "device_start_s": round(device_s, 3),
        "weights_gib": weights["allocated_gib"],
        "load_peak_gib": weights["peak_gib"],
        "spec": str(runtime.spec),
    }


async def ensure_sessions(state: State, count: int) -> float:
    """Sessions up to `count` (the cold start's first among them); seconds it took."""
    started = time.monotonic()
    while len(state.sessions) < count:
        state.sessions.append(await load_session(state.plan, state.runtime, state.ids))
    return time.monotonic() - started


async def section_single(state: State, budget: float) -> Figures:
    await ensure_sessions(state, 1)
    deadline = time.monotonic() + budget
    figures = await closed_loop(
        state.plan, state.runtime.worker(), state.sessions[:1], state.plan.single_frames, deadline
    )
    state.eager = figures
    state.report.say(frame_line("1 session, eager", figures))
    return figures


async def section_concurrent(state: State, budget: float) -> Figures:
    plan = state.plan
    deadline = time.monotonic() + budget
    levels: dict[str, Figures] = {}
    for count in plan.concurrency:
        if time.monotonic() > deadline - 1:
            state.report.not_run(f"concurrent {count} sessions", "out of the section's time")
            continue
        added_s = await ensure_sessions(state, count)
        figures = await closed_loop(
            plan, state.runtime.worker(), state.sessions[:count], plan.session_frames, deadline
        )
        figures["sessions_added_s"] = round(added_s, 2)
        levels[str(count)] = figures
        state.report.say(frame_line(f"{count} sessions", figures))
    # One session stays for the live-beside-batch section.
    for extra in state.sessions[1:]:
        await asyncio.to_thread(extra.unload)
    del state.sessions[1:]
    return {"levels": levels}


async def section_compiled(state: State, budget: float) -> Figures:
    """One session with torch.compile, in a child process: a compile that overruns is killed
    there, and its CUDA graphs and memory are its own."""
    plan = state.plan
    with tempfile.TemporaryDirectory(prefix="gpu-compiled-") as scratch:
        out = Path(scratch) / "compiled.json"
        log = Path(scratch) / "compiled.log"
        command = [
            sys.executable,
            "-m",
            "bench.gpu",
            "--child-compiled",
            str(state.models_dir),
            "--json",
            str(out),
            "--budget-s",
            str(max(1.0, budget - 5)),
            *(["--dry"] if plan.dry else []),
        ]
        started = time.monotonic()
        with log.open("wb") as sink:
            child = await asyncio.create_subprocess_exec(
                *command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = await asyncio.wait_for(child.wait(), budget)
            except (TimeoutError, asyncio.CancelledError):
                os.killpg(child.pid, signal.SIGKILL)
                await child.wait()
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(
                    f"torch.compile's session did not finish in {budget:.0f} s (killed); "
                    f"its last output: {' | '.join(tail) or 'none'}"
                ) from None
        if code != 0 or not out.exists():
            tail = log.read_text(errors="replace").strip().splitlines()[-4:]
            raise RuntimeError(f"the compiled session's process exited {code}: {' | '.join(tail)}")
        figures: Figures = json.loads(out.read_text())
    figures["process_s"] = round(time.monotonic() - started, 2)
    if state.eager:
        figures["fps_vs_eager"] = round(figures["fps_total"] / state.eager["fps_total"], 2)
    state.report.say(
        f"  compile and warm-up: {figures['compile_load_s']:.1f} s "
        f"(process {figures['process_s']:.1f} s)"
    )
    state.report.say(frame_line("1 session, torch.compile", figures))
    if "fps_vs_eager" in figures:
        state.report.say(f"  compiled / eager fps: {figures['fps_vs_eager']:.2f}x")
    return figures


async def child_compiled(args: argparse.Namespace, started_at: float) -> int:
    """The compile section's child: load with compile as a session does (on a loader thread),
    run frames on the inference worker's thread, write the figures as JSON."""
    from runtime.runtime import Runtime, RuntimeConfig

    plan = DRY if args.dry else REAL
    deadline = started_at + args.budget_s
    if plan.dry:
        _no_compile()
    models_dir = Path(args.child_compiled)
    ids = DRY_SD if plan.dry else RANDOM_SD
    runtime = Runtime(RuntimeConfig(models_dir=models_dir, device=plan.device))
    try:
        started = time.monotonic()
        await asyncio.to_thread(lambda: runtime.spec)
        reset_peak(plan)
        session = await load_session(plan, runtime, ids, compiled=True)
        compile_s = time.monotonic() - started
        loop = asyncio.get_running_loop()
        worker = runtime.worker()
        # The worker's thread is not the loader's: CUDA graphs are recorded again there.
        warm_started = time.monotonic()
        for image in frames(plan)[: plan.compile_warmup_frames]:
            await loop.run_in_executor(worker, session.process, image)
        figures = await closed_loop(plan, worker, [session], plan.single_frames, deadline)
        figures |= {
            "compile_load_s": round(compile_s, 2),
            "worker_warmup_s": round(time.monotonic() - warm_started, 2),
            "mode": "reduce-overhead",
            "backend": "none (dry run)" if plan.dry else "inductor",
        }
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(figures))
        await asyncio.to_thread(session.unload)
    finally:
        await runtime.close()
    return 0


def _no_compile() -> None:
    """Dry runs go through the compile path (the child process, the setting, the figures) but
    compile nothing: tracing the UNet alone takes half a minute on a CPU, code generation
    minutes. Only the real run compiles."""
    import torch

    def identity(model: Any, **options: Any) -> Any:
        return model

    torch.compile = identity  # type: ignore[assignment]
