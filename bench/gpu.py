"""The GPU acceptance run: the figures the product is judged by, on one GPU, in five minutes.

    python -m bench.gpu [--json PATH] [--budget-s 290] [--dry]

Needs nothing outside the machine: the models are written or built here with random weights at
their real sizes (`runtime/random_full.py`, `runtime/random_batch.py`), which cost exactly what
the real weights would, and the service runs in this process on 127.0.0.1. Sections, in order,
each within its share of one global deadline (`--budget-s`, start-up included), each failure
caught and reported, the JSON rewritten after every one:

1. environment: torch, the GPU, its memory;
2. models: sd-turbo (UNet, text encoder, VAE) and TAESD at full size with random weights,
   written as `random/sd-turbo-full` and `random/taesd-full` and dropped from the page cache;
   the language, speech and vision routes' tiny models;
3. cold start: a streamdiffusion session (512x512, 1 step, fp16, TAESD) loaded from disk
   through the service's runtime, to its first restyled frame;
4. one session, eager: fps, p50/p95 frame latency (frame submitted to the device's inference
   worker -> restyled frame back), GPU memory (weights, peak);
5. 2, 4 and 8 sessions on the GPU, sharing the weights and the inference worker as the
   service's sessions do: fps per session and in total, latency, peak memory;
6. live beside batch: a 30 fps live session's frame wait alone and beside text-to-image jobs
   (full-size random RealVisXL Lightning) over HTTP, against the job's step time: the
   preemption of batch steps by live frames;
7. one session with torch.compile (mode reduce-overhead: CUDA graphs), in a child process that
   is killed at its deadline: compile time, fps, latency, memory;
8. hardware: `/hardware/info` and `/hardware/stats` (NVML) as the service reports them;
9. every batch route once at its default size, over HTTP: the diffusion routes on full-size
   random models (SDXL Lightning, instruct-pix2pix, x4 upscaler, SVD-XT), the others on the
   tiny models (said so in the output); the longest, image-to-video, last.

Without CUDA, or with `--dry`, the same sections run on the CPU with toy-sized models of the
same layouts and tiny frames, and nothing is compiled (the compile section's child runs as
usual, uncompiled): a dry run, said so, whose figures mean nothing; it proves the code paths,
not the speed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

START = time.monotonic()

from bench.gpu_live import (  # noqa: E402 - after START: start-up counts against the budget
    COMPILE_RESERVE_S,
    DRY,
    DRY_SD,
    RANDOM_SD,
    REAL,
    Plan,
    State,
    child_compiled,
    cuda,
    gib,
    section_cold_start,
    section_compiled,
    section_concurrent,
    section_single,
)
from bench.gpu_report import Figures, Report, one_line  # noqa: E402


def version(package: str) -> str | None:
    """An installed package's version, None when it is missing (said, not fatal: the
    sections that need it fail one by one, saying why)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(plan: Plan, reason: str) -> Figures:
    import torch

    figures: Figures = {
        "dry": plan.dry,
        "why_dry": reason or None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        **{name: version(name) for name in ("diffusers", "transformers", "aiohttp", "av")},
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "device": plan.device,
        "gpu": None,
    }
    if cuda(plan):
        props = torch.cuda.get_device_properties(0)
        figures["gpu"] = {
            "name": props.name,
            "memory_gib": gib(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "count": torch.cuda.device_count(),
        }
    return figures


async def section_models(state: State, budget: float) -> Figures:
    from runtime.random_full import (
        SD_TURBO_DRY_SPEC,
        SD_TURBO_SPEC,
        drop_from_page_cache,
        write_random_sd,
    )

    from .gpu_batch import write_tiny_route_models

    plan = state.plan
    spec = SD_TURBO_DRY_SPEC if plan.dry else SD_TURBO_SPEC
    started = time.monotonic()
    folders = await asyncio.to_thread(write_random_sd, state.models_dir, spec, *state.ids)
    written_s = time.monotonic() - started
    size = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
    dropped = 0
    for folder in folders:
        dropped += await asyncio.to_thread(drop_from_page_cache, folder)
    started = time.monotonic()
    tiny = await asyncio.to_thread(write_tiny_route_models, state.models_dir)
    tiny_s = time.monotonic() - started
    state.report.say(
        f"  {state.ids[0]} + {state.ids[1]}: {size / 2**30:.2f} GiB written in {written_s:.1f} s, "
        f"{dropped / 2**30:.2f} GiB dropped from the page cache (the load reads the disk)"
    )
    state.report.say(f"  tiny models for {', '.join(tiny)} in {tiny_s:.1f} s (random weights)")
    return {
        "sd_turbo_id": state.ids[0],
        "taesd_id": state.ids[1],
        "written_gib": gib(size),
        "write_s": round(written_s, 2),
        "dropped_from_page_cache_gib": gib(dropped),
        "tiny_models": tiny,
        "tiny_s": round(tiny_s, 2),
    }


async def section_hardware(state: State, budget: float) -> Figures:
    import aiohttp

    state.need_service()
    async with aiohttp.ClientSession() as client:
        info = await (await client.get(state.base + "/hardware/info")).json()
        stats = await (await client.get(state.base + "/hardware/stats")).json()
    gpus = stats.get("gpu_stats", {})
    for index, gpu in gpus.items():
        state.report.say(
            f"  GPU {index} {gpu['name']}: {gpu['utilization_compute']} % compute, "
            f"{(gpu['memory_total'] - gpu['memory_free']) / 2**30:.1f} of "
            f"{gpu['memory_total'] / 2**30:.1f} GiB used"
        )
    if not gpus:
        state.report.say("  no GPU reported (a CPU run)")
    return {"info": info, "stats": stats}


async def start_service(state: State) -> None:
    from aiohttp import web

    from live.app import create_app
    from live.keys import RUNTIME
    from live.settings import Settings

    settings = Settings(
        models_dir=state.models_dir,
        device=state.plan.device,
        default_pipeline="noop",
        max_sessions=max(state.plan.concurrency) + 1,
        batch_queue=16,
    )
    state.app = create_app(settings)
    # Its start-up warning that the real sd-turbo is missing is true and beside the point:
    # this run brings its own models.
    app_log = logging.getLogger("live.app")
    level = app_log.level
    app_log.setLevel(logging.ERROR)
    # As `live-v2v serve` runs it: a request whose client left is cancelled (a batch job cut
    # at the deadline stops at its next step).
    runner = web.AppRunner(state.app, handler_cancellation=True, access_log=None)
    try:
        await runner.setup()
    finally:
        app_log.setLevel(level)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.base = f"http://{host}:{port}"
    state.runtime = state.app[RUNTIME]
    state.runner = runner


async def run(args: argparse.Namespace) -> int:
    import torch

    from .gpu_batch import section_batch_routes, section_live_beside_batch

    reason = ""
    if args.dry:
        reason = "--dry"
    elif not torch.cuda.is_available():
        reason = "torch sees no CUDA GPU"
    plan = DRY if reason else REAL
    budget_s = args.budget_s
    env = environment(plan, reason)
    report = Report(args.json, budget_s, START, env)
    if plan.dry:
        report.say(
            f"# DRY RUN ({reason}): every section on the CPU with toy-sized models and "
            f"{plan.size}x{plan.size} frames; the figures prove the code paths, not the speed"
        )
    gpu = env["gpu"]
    report.say(
        f"# GPU acceptance run: torch {env['torch']} (CUDA {env['torch_cuda']}), "
        f"device {plan.device}"
        + (f", {gpu['name']} {gpu['memory_gib']} GiB" if gpu else "")
        + f", budget {budget_s:.0f} s, start-up {time.monotonic() - START:.1f} s so far, "
        f"load average {env['load_average']} on {env['cpus']} CPUs"
    )
    report.data["sections"]["environment"] = {"status": "ok", **env}
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as scratch:
        state = State(plan, report, Path(scratch), DRY_SD if plan.dry else RANDOM_SD)
        try:
            await start_service(state)
        except Exception as exc:
            # The live sections need only the runtime: they still run, on one of their own.
            from runtime.runtime import Runtime, RuntimeConfig

            report.data["sections"]["service"] = {"status": "failed", "error": one_line(exc)}
            report.not_run("service (HTTP sections)", f"the service did not start: {one_line(exc)}")
            state.runtime = Runtime(RuntimeConfig(models_dir=state.models_dir, device=plan.device))
        try:
            sections = [
                ("models", section_models),
                ("cold_start", section_cold_start),
                ("single", section_single),
                ("concurrent", section_concurrent),
                ("live_beside_batch", section_live_beside_batch),
                ("compiled", section_compiled),
                # Cheap, and must not be crowded out by the batch routes' long last job.
                ("hardware", section_hardware),
                ("batch_routes", section_batch_routes),
            ]
            for name, section in sections:
                planned = plan.budgets[name]
                if name == "compiled":
                    planned = min(planned, report.left() - COMPILE_RESERVE_S)
                await report.section(
                    name, planned, lambda b, s=section: s(state, b), min_s=1.0 if plan.dry else 5
                )
        finally:
            for session in state.sessions:
                await asyncio.to_thread(session.unload)
            if state.runner is not None:
                await state.runner.cleanup()
            else:
                await state.runtime.close()
        report.finish()
    return 0


def quiet_libraries() -> None:
    """Errors only from diffusers and transformers: their notices (config keys ignored, casts
    to half) would bury the figures."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--budget-s", type=float, default=290.0, help="the whole run's deadline, start-up included"
    )
    parser.add_argument(
        "--dry", action="store_true", help="CPU, toy sizes: the code paths, not the speed"
    )
    parser.add_argument("--child-compiled", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Nothing here reaches a model hub: the models are made on this machine.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = parse_args(argv)
    try:
        quiet_libraries()
    except ImportError as exc:
        print(f"# {one_line(exc)}: the sections that need it will fail", flush=True)
    if args.child_compiled:
        return asyncio.run(child_compiled(args, START))
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
