"""Public routes under a flood: `/health` latency alone, then while clients flood `/pipelines`
(issue 18, finding 17: it used to size a model folder on the event loop, ~20 ms a call).

    python -m bench.public_routes [--models-dir DIR] [--flooders 8] [--seconds 5]

Runs the real service in this process on 127.0.0.1 (aiohttp's runner), with `--models-dir`
(tiny models: `live-v2v models tiny DIR`; or an empty folder). Prints `/health` p50 and p90
alone (the baseline), then under the flood, their ratio, and the `/pipelines` answers per
second the flood got. Other users' work weighs on every figure: the load average is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from live.app import create_app
from live.settings import Settings


async def health_latencies(session: aiohttp.ClientSession, url: str, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        async with session.get(url + "/health") as response:
            await response.read()
        out.append(time.perf_counter() - started)
        await asyncio.sleep(0.01)  # a poller, not a flood
    return out


async def flood(session: aiohttp.ClientSession, url: str, stop: asyncio.Event) -> int:
    count = 0
    while not stop.is_set():
        async with session.get(url + "/pipelines") as response:
            await response.read()
        count += 1
    return count


def line(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"{name}: /health p50 {statistics.median(ms):.2f} ms, "
        f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms ({len(ms)} requests)"
    )


async def main(args: argparse.Namespace) -> None:
    app = create_app(Settings(models_dir=args.models_dir, device="cpu"))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await health_latencies(session, url, 1.0)  # warm-up
            alone = await health_latencies(session, url, args.seconds)
            stop = asyncio.Event()
            flooders = [
                asyncio.create_task(flood(session, url, stop)) for _ in range(args.flooders)
            ]
            flooded = await health_latencies(session, url, args.seconds)
            stop.set()
            answered = sum(await asyncio.gather(*flooders))
    finally:
        await runner.cleanup()
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs")
    print(line("alone", alone))
    print(line(f"{args.flooders} clients flooding /pipelines", flooded))
    ratio = statistics.median(flooded) / statistics.median(alone)
    print(f"p50 ratio flooded/alone: {ratio:.1f}x; /pipelines {answered / args.seconds:.0f}/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--flooders", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    asyncio.run(main(parser.parse_args()))
