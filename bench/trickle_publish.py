"""Trickle upload path: CPU per MB of POST bodies taken into segments, against a raw baseline.

    .venv/bin/python -m bench.trickle_publish [--mib 256] [--segment-mib 1] [--chunk-kib 16]

In one process: an aiohttp server with the trickle sub-app on 127.0.0.1, and a publisher on a
bare socket (asyncio streams) that POSTs `--segment-mib` segments with chunked bodies of
`--chunk-kib` chunks, one connection per segment, each answer read before the next segment (as
ffmpeg's segment muxer does). Nobody subscribes, so only the upload path is measured. The raw
baseline is an aiohttp handler that reads the same bodies with `readany()` and drops them, in
the same process and run. CPU is this process's (server and client together; the client only
writes pre-built bytes). Runs alternate trickle/raw `--repeat` times; the best of each is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from protocol.trickle import TrickleConfig, TrickleServer, create_trickle_app

HOST = "127.0.0.1"
MB = 1_000_000
MIB = 1024 * 1024


async def _raw_sink(request: web.Request) -> web.Response:
    while await request.content.readany():
        pass
    return web.Response()


def _body(segment: int, chunk: int) -> bytes:
    piece = b"\x47" * chunk
    whole, rest = divmod(segment, chunk)
    out = [b"%x\r\n%s\r\n" % (chunk, piece)] * whole
    if rest:
        out.append(b"%x\r\n%s\r\n" % (rest, piece[:rest]))
    return b"".join(out) + b"0\r\n\r\n"


_next_seq = [0]


async def _publish(port: int, path: str, segments: int, body: bytes) -> None:
    # Fresh seqs every run: a seq written before is not written again.
    first = _next_seq[0]
    _next_seq[0] += segments
    for seq in range(first, first + segments):
        reader, writer = await asyncio.open_connection(HOST, port)
        head = (
            f"POST {path}/{seq} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Content-Type: video/MP2T\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        status = await reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"segment {seq}: {status!r}")
        writer.close()
        await writer.wait_closed()


async def _measure(port: int, path: str, segments: int, body: bytes) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    await _publish(port, path, segments, body)
    return time.perf_counter() - wall, time.process_time() - cpu


async def main(args: argparse.Namespace) -> None:
    segment = int(args.segment_mib * MIB)
    segments = max(1, int(args.mib / args.segment_mib))
    body = _body(segment, args.chunk_kib * 1024)
    server = TrickleServer(TrickleConfig(max_segment_bytes=segment + 1, idle_timeout_s=3600))
    server.create_channel("bench")
    app = web.Application()
    app.add_subapp("/trickle/", create_trickle_app(server))
    app.router.add_post("/raw/{seq}", _raw_sink)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    mb = segments * segment / MB
    best: dict[str, tuple[float, float]] = {}
    try:
        await _publish(port, "/trickle/bench", 3, body)  # warm-up
        for _ in range(args.repeat):
            for name, path in (("trickle", "/trickle/bench"), ("raw", "/raw")):
                wall, cpu = await _measure(port, path, segments, body)
                if name not in best or cpu < best[name][1]:
                    best[name] = (wall, cpu)
    finally:
        await runner.cleanup()
    print(
        f"upload: {segments} segments of {args.segment_mib:g} MiB in {args.chunk_kib} KiB "
        f"chunks, best of {args.repeat}; MB = 10^6 B"
    )
    for name, (wall, cpu) in best.items():
        print(f"  {name:8s} {mb / wall:8.1f} MB/s  cpu {cpu * 1000 / mb:6.3f} ms/MB")
    ratio = best["trickle"][1] / best["raw"][1]
    print(f"  trickle/raw cpu per MB: {ratio:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.trickle_publish")
    parser.add_argument("--mib", type=float, default=256, help="MiB uploaded per run")
    parser.add_argument("--segment-mib", type=float, default=1.0, help="segment size")
    parser.add_argument("--chunk-kib", type=int, default=16, help="chunked-body chunk size")
    parser.add_argument("--repeat", type=int, default=3, help="alternating runs, best kept")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
