"""Trickle benchmark: fan-out throughput, first-byte latency, raw aiohttp baseline, local clients.

    .venv/bin/python -m bench.trickle [--seconds 3] [--segment-mib 1] [--subscribers 1,8] [--json]

1. Fan-out over HTTP on 127.0.0.1: the service (`python -m live serve --trickle-autocreate`) runs
   in its own process; one TricklePublisher and N TrickleSubscribers (start -1) run here, so
   client cost is not on the server's event loop. The publisher writes one random segment
   (generated once) back to back, held at most `--window` segments ahead of the slowest
   subscriber so that nobody falls out of the ring (delivery is lossless; `skipped` says if not).
   A raw baseline, an aiohttp server in another process streaming one in-memory payload to N
   GET loops, is measured in the same run with the same client library, and trickle/raw printed.
2. First-byte latency: one subscriber parked on the next seq, the publisher writes a small
   segment; time from the start of `publisher.write` to the subscriber's first chunk.
3. The same fan-out through LocalPublisher/LocalSubscriber (no HTTP), for reference.
4. With `--compare-url URL [--compare-pid PID]`: our server (the service as above, or
   `--trickle-url`/`--server-pid`) against another trickle server, e.g. go-livepeer's, in
   interleaved rounds (ours, other, ours, other, ...; a shared machine drifts). The same clients
   for both, in this process: one TricklePublisher and N lean raw-socket subscribers
   (bench/trickle_raw.py) that count bytes without keeping them, so that on 2 cores the server,
   not the client, is measured. Printed: median MB/s and server CPU ms per MB delivered (= s per
   GB) for N = 1 and 8, the ratios ours/other (median of the per-round ratios), how long each
   server was runnable but waiting for a CPU, the machine's load average before and after, and
   the segments delivered whole of those sent back to back by one publisher (`--burst-segments`
   of `--burst-kib`, preconnected POSTs, and POSTs that close right after their last byte).

MB is 10^6 bytes. CPU is the share of one core a process used over the measured window (the
server's from /proc, the clients' from this process), which says which side is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from bench.trickle_raw import RawSubscriber, post_and_close
from protocol.trickle import (
    LocalPublisher,
    LocalSubscriber,
    TricklePublisher,
    TrickleServer,
    TrickleSubscriber,
)
from protocol.trickle import headers as h

HOST = "127.0.0.1"
MB = 1_000_000
MIB = 1024 * 1024
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process `pid` (Linux /proc), None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def sched_wait_seconds(pid: int) -> float | None:
    """Seconds the threads of process `pid` were runnable but waiting for a CPU (Linux
    schedstat): how much a busy machine held the server back."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return None


def wait_listening(port: int, alive: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def live_service(port: int) -> Iterator[subprocess.Popen[bytes]]:
    """The service, as deployed: `python -m live serve` with channel creation over HTTP."""
    cmd = [sys.executable, "-m", "live", "serve", "--host", HOST, "--port", str(port)]
    cmd += ["--trickle-autocreate", "--log-level", "WARNING"]
    # Its log (start-up warnings about models, say) is kept aside and shown only on failure.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        ok = False
        try:
            wait_listening(port, lambda: proc.poll() is None, "trickle service")
            yield proc
            ok = True
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if not ok:
                log.seek(0)
                sys.stderr.write(log.read().decode(errors="replace")[-4000:])


def _raw_server_main(port: int, size: int) -> None:
    """Child process: GET /blob streams one in-memory payload (chunked, like a trickle GET)."""
    payload, small = os.urandom(size), os.urandom(1024)

    async def stream(request: web.Request, body: bytes) -> web.StreamResponse:
        response = web.StreamResponse()
        with contextlib.suppress(ConnectionError):  # clients are cancelled mid-body at the end
            await response.prepare(request)
            await response.write(body)
            await response.write_eof()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/blob", lambda request: stream(request, payload))
        app.router.add_get("/small", lambda request: stream(request, small))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, HOST, port).start()
        await asyncio.Event().wait()

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt, SystemExit):
        asyncio.run(main())


@contextlib.contextmanager
def raw_server(port: int, size: int) -> Iterator[multiprocessing.process.BaseProcess]:
    proc = multiprocessing.get_context("spawn").Process(
        target=_raw_server_main, args=(port, size), name="raw-aiohttp", daemon=True
    )
    proc.start()
    try:
        wait_listening(port, proc.is_alive, "raw aiohttp server")
        yield proc
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(STOP_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- measurement -------------------------------------------------------------------------------


class Window:
    """Bytes and CPU between `start()` and `stop()`."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.t0 = self.t1 = 0.0
        self.b0 = self.b1 = 0
        self.c0 = self.c1 = 0.0
        self.s0: float | None = None
        self.s1: float | None = None
        self.w0: float | None = None
        self.w1: float | None = None

    def start(self, total_bytes: int) -> None:
        self.t0, self.b0, self.c0 = time.perf_counter(), total_bytes, time.process_time()
        self.s0 = cpu_seconds(self.server_pid) if self.server_pid else None
        self.w0 = sched_wait_seconds(self.server_pid) if self.server_pid else None

    def stop(self, total_bytes: int) -> None:
        self.t1, self.b1, self.c1 = time.perf_counter(), total_bytes, time.process_time()
        self.s1 = cpu_seconds(self.server_pid) if self.server_pid else None
        self.w1 = sched_wait_seconds(self.server_pid) if self.server_pid else None

    def result(self, n: int, **extra: Any) -> dict[str, Any]:
        elapsed = self.t1 - self.t0
        total = (self.b1 - self.b0) / elapsed / MB
        server_cpu = cost = None
        if self.s0 is not None and self.s1 is not None:
            server_cpu = round(100 * (self.s1 - self.s0) / elapsed)
            if self.b1 > self.b0:
                cost = round(1000 * (self.s1 - self.s0) / ((self.b1 - self.b0) / MB), 2)
        waited = None
        if self.w0 is not None and self.w1 is not None:
            waited = round(100 * (self.w1 - self.w0) / elapsed)
        return {
            "subscribers": n,
            "seconds": round(elapsed, 2),
            "server_cpu_wait_pct": waited,
            "total_mb_s": round(total, 1),
            "per_subscriber_mb_s": round(total / n, 1),
            "server_cpu_pct": server_cpu,
            "client_cpu_pct": round(100 * (self.c1 - self.c0) / elapsed),
            "server_cpu_ms_per_mb": cost,
            **extra,
        }


class _Subscriber(Protocol):
    skipped: int

    def __aiter__(self) -> Any: ...

    async def close(self) -> None: ...


class _Publisher(Protocol):
    seq: int

    async def write(self, data: bytes) -> int: ...

    async def close(self, delete: bool = True) -> None: ...


async def _publish_measured(
    publisher: _Publisher,
    data: bytes,
    args: argparse.Namespace,
    seconds: float,
    window: Window,
    progress: asyncio.Event,
    slowest: Callable[[], int],
    delivered: Callable[[], int],
) -> tuple[int, int]:
    """Write `data` back to back, within `args.window` segments of the slowest subscriber (its
    last whole segment, `slowest()`), and measure `delivered()` bytes over `seconds` once every
    subscriber is past the warm-up; the stalls and the segments written in the window."""
    stalls = segments = 0
    started = False
    deadline = 0.0
    while True:
        # Flow control: stay within `window` segments of the slowest subscriber.
        while slowest() < publisher.seq - args.window:
            progress.clear()
            try:
                async with asyncio.timeout(2.0):
                    await progress.wait()
            except TimeoutError:
                stalls += 1
                break
        if not started and slowest() >= args.warmup - 1:
            started = True
            window.start(delivered())
            deadline = window.t0 + seconds
        elif not started and publisher.seq > args.warmup + 20:
            raise RuntimeError(f"subscribers got no segment: slowest done {slowest()}")
        if started and (
            time.perf_counter() >= deadline or (args.segments and segments >= args.segments)
        ):
            window.stop(delivered())
            return stalls, segments
        await publisher.write(data)
        segments += started


async def fanout(
    make_publisher: Callable[[], _Publisher],
    make_subscriber: Callable[[], _Subscriber],
    n: int,
    data: bytes,
    args: argparse.Namespace,
    server_pid: int | None,
    seconds: float,
) -> dict[str, Any]:
    """One publisher writing `data` back to back to `n` subscribers; bytes delivered per second."""
    received = [0] * n
    done_seq = [-1] * n
    progress = asyncio.Event()
    subscribers = [make_subscriber() for _ in range(n)]

    async def read(i: int, subscriber: _Subscriber) -> None:
        async for segment in subscriber:
            async for chunk in segment:
                received[i] += len(chunk)
            done_seq[i] = segment.seq
            progress.set()

    readers = [asyncio.create_task(read(i, s)) for i, s in enumerate(subscribers)]
    await asyncio.sleep(0.3)  # let every GET park on seq 0 before the first byte
    publisher = make_publisher()
    window = Window(server_pid)
    try:
        stalls, segments = await _publish_measured(
            publisher,
            data,
            args,
            seconds,
            window,
            progress,
            slowest=lambda: min(done_seq),
            delivered=lambda: sum(received),
        )
    finally:
        await publisher.close()
        await _finish_readers(readers, [])
        for subscriber in subscribers:
            await subscriber.close()
    return window.result(
        n,
        segments=segments,
        skipped=sum(s.skipped for s in subscribers),
        stalls=stalls,
    )


async def fanout_raw(
    url: str, n: int, seconds: float, warmup_s: float, server_pid: int
) -> dict[str, Any]:
    """`n` clients each GETting the raw server's payload in a loop; bytes received per second."""
    received = [0] * n
    stop = False

    async def loop(i: int) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop:
                async with session.get(url) as response:
                    async for chunk in response.content.iter_any():
                        received[i] += len(chunk)

    tasks = [asyncio.create_task(loop(i)) for i in range(n)]
    window = Window(server_pid)
    try:
        await asyncio.sleep(warmup_s)
        window.start(sum(received))
        await asyncio.sleep(seconds)
        window.stop(sum(received))
    finally:
        stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return window.result(n)


async def first_byte(
    write: Callable[[bytes], Awaitable[int]],
    subscriber: _Subscriber,
    count: int,
    size: int,
    gap_s: float,
) -> dict[str, Any]:
    """Latency from the start of a small write to the parked subscriber's first chunk."""
    loop = asyncio.get_running_loop()
    arrived: asyncio.Future[float] = loop.create_future()

    async def read() -> None:
        async for segment in subscriber:
            first = True
            async for _chunk in segment:
                if first and not arrived.done():
                    arrived.set_result(time.perf_counter())
                first = False

    reader = asyncio.create_task(read())
    data = os.urandom(size)
    samples: list[float] = []
    warmup = 10
    try:
        for i in range(count + warmup):
            # The subscriber's GET for the next seq (and the publisher's preconnected POST)
            # are opened as the previous segment starts; give them time to park.
            await asyncio.sleep(gap_s)
            arrived = loop.create_future()
            t0 = time.perf_counter()
            await write(data)
            async with asyncio.timeout(5.0):
                t1 = await arrived
            if i >= warmup:
                samples.append((t1 - t0) * 1000)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return _percentiles(samples, segment_bytes=size)


# -- the runs ------------------------------------------------------------------------------------


async def create_channel(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url, headers={h.EXPECT_CONTENT: "video/MP2T"}) as response:
        if response.status != 200:
            raise RuntimeError(f"POST {url}: {response.status} {await response.text()}")


async def run_http(
    base: str, server_pid: int | None, data: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    results: dict[str, Any] = {"fanout": [], "first_byte": None}
    async with aiohttp.ClientSession() as session:
        for n in args.subscribers:
            runs = []
            for _ in range(args.repeat):
                url = f"{base}/bench-{n}-{secrets.token_hex(4)}"
                await create_channel(session, url)
                runs.append(
                    await fanout(
                        lambda url=url: TricklePublisher(url),
                        lambda url=url: TrickleSubscriber(url, start_seq=h.NEXT_SEQ),
                        n,
                        data,
                        args,
                        server_pid,
                        args.seconds,
                    )
                )
            results["fanout"].append(_best(runs))
        url = f"{base}/bench-latency-{secrets.token_hex(4)}"
        await create_channel(session, url)
    publisher = TricklePublisher(url)
    subscriber = TrickleSubscriber(url, start_seq=h.NEXT_SEQ)
    try:
        results["first_byte"] = await first_byte(
            publisher.write, subscriber, args.latency_segments, args.latency_bytes, args.gap
        )
    finally:
        await publisher.close()
        await subscriber.close()
    return results


async def round_trip(url: str, count: int) -> dict[str, Any]:
    """Latency from a small GET's start to its first body chunk, on one kept-alive connection:
    the raw counterpart of the trickle first byte (one hop up, one hop down)."""
    samples: list[float] = []
    async with aiohttp.ClientSession() as session:
        for i in range(count + 10):
            t0 = time.perf_counter()
            async with session.get(url) as response:
                await response.content.readany()
                t1 = time.perf_counter()
                await response.read()
            if i >= 10:
                samples.append((t1 - t0) * 1000)
    return _percentiles(samples, segment_bytes=1024)


def _percentiles(samples: list[float], **extra: Any) -> dict[str, Any]:
    samples = sorted(samples)
    return {
        "segments": len(samples),
        **extra,
        "p50_ms": round(statistics.median(samples), 3),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 3),
        "max_ms": round(samples[-1], 3),
    }


def _best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    best = max(runs, key=lambda r: r["total_mb_s"])
    if len(runs) > 1:
        best["runs_mb_s"] = [r["total_mb_s"] for r in runs]
    return best


async def run_raw(base: str, server_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    fanouts = []
    for n in args.subscribers:
        runs = [
            await fanout_raw(f"{base}/blob", n, args.seconds, 0.5, server_pid)
            for _ in range(args.repeat)
        ]
        fanouts.append(_best(runs))
    return {
        "fanout": fanouts,
        "first_byte": await round_trip(f"{base}/small", args.latency_segments),
    }


async def run_local(data: bytes, args: argparse.Namespace) -> dict[str, Any]:
    server = TrickleServer()
    results: dict[str, Any] = {"fanout": [], "first_byte": None}
    for n in args.subscribers:
        name = f"bench-{n}"
        server.create_channel(name)
        results["fanout"].append(
            await fanout(
                lambda name=name: LocalPublisher(server, name),
                lambda name=name: LocalSubscriber(server, name, start_seq=h.NEXT_SEQ),
                n,
                data,
                args,
                None,
                args.local_seconds,
            )
        )
    server.create_channel("bench-latency")
    publisher = LocalPublisher(server, "bench-latency")
    subscriber = LocalSubscriber(server, "bench-latency", start_seq=h.NEXT_SEQ)
    try:
        results["first_byte"] = await first_byte(
            publisher.write, subscriber, args.latency_segments, args.latency_bytes, 0.001
        )
    finally:
        await publisher.close()
        await subscriber.close()
    server.close_all()
    return results


# -- comparison against another trickle server (go-livepeer's) ------------------------------------


async def fanout_lean(
    url: str, n: int, data: bytes, args: argparse.Namespace, server_pid: int | None
) -> dict[str, Any]:
    """`fanout` with the lean raw-socket subscribers: the same clients for any server."""
    counter = [0]
    progress = asyncio.Event()
    subscribers = [RawSubscriber(url, counter) for _ in range(n)]
    for subscriber in subscribers:
        subscriber.progress = progress
    readers = [asyncio.create_task(s.run()) for s in subscribers]
    await asyncio.sleep(0.3)  # let every GET park on the live edge before the first byte
    publisher = TricklePublisher(url)
    window = Window(server_pid)
    try:
        stalls, segments = await _publish_measured(
            publisher,
            data,
            args,
            args.seconds,
            window,
            progress,
            slowest=lambda: min(s.done_seq for s in subscribers),
            delivered=lambda: counter[0],
        )
    finally:
        await publisher.close()
        await _finish_readers(readers, subscribers)
    failed = [t.exception() for t in readers if not t.cancelled() and t.exception()]
    return window.result(
        n,
        segments=segments,
        skipped=sum(s.skipped for s in subscribers),
        stalls=stalls,
        errors=len(failed),
    )


async def _finish_readers(readers: list[asyncio.Task[None]], subscribers: list[Any]) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(5.0):
            await asyncio.gather(*readers, return_exceptions=True)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for subscriber in subscribers:
        subscriber.close()


async def burst(
    url: str, n: int, count: int, data: bytes, style: str, gap_s: float
) -> dict[str, Any]:
    """One publisher sends `count` segments back to back, no pause and no flow control; `n`
    subscribers follow from the live edge. Counts the segments delivered whole, of n * count.

    style "preconnect": TricklePublisher (next POST opened ahead, answer read). style "close":
    each segment one Content-Length POST on its own socket, closed right after the last byte
    without reading the answer (ffmpeg's way), the next one opened `gap_s` later: with no gap
    at all the sockets race and the server sees the seqs out of order, which no real
    publisher does."""
    progress = asyncio.Event()
    subscribers = [RawSubscriber(url) for _ in range(n)]
    for subscriber in subscribers:
        subscriber.progress = progress
    readers = [asyncio.create_task(s.run()) for s in subscribers]
    await asyncio.sleep(0.3)
    t0 = time.perf_counter()
    if style == "close":
        for seq in range(count):
            if seq:
                await asyncio.sleep(gap_s)
            await post_and_close(url, seq, data)
        publisher = None
    else:
        publisher = TricklePublisher(url)
        for _ in range(count):
            await publisher.write(data)
    sent_s = time.perf_counter() - t0

    def whole() -> int:
        return sum(
            1
            for s in subscribers
            for seq, size in s.delivered.items()
            if seq < count and size == len(data)
        )

    # Delivered when every subscriber has every segment; given up after 3 s without progress.
    while whole() < n * count and not all(t.done() for t in readers):
        progress.clear()
        try:
            async with asyncio.timeout(3.0):
                await progress.wait()
        except TimeoutError:
            break
    delivered = whole()
    if publisher is not None:
        await publisher.close()
    else:
        async with aiohttp.ClientSession() as session, session.delete(url) as response:
            await response.read()
    await _finish_readers(readers, subscribers)
    return {
        "subscribers": n,
        "style": style,
        "delivered": delivered,
        "expected": n * count,
        "skipped": sum(s.skipped for s in subscribers),
        "publish_s": round(sent_s, 3),
    }


async def compare_round(
    base: str, pid: int | None, data: bytes, burst_data: bytes, args: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {"fanout": [], "burst": []}
    async with aiohttp.ClientSession() as session:
        for n in args.subscribers:
            url = f"{base}/cmp-{n}-{secrets.token_hex(4)}"
            await create_channel(session, url)
            out["fanout"].append(await fanout_lean(url, n, data, args, pid))
        if args.burst_segments:
            for style in ("preconnect", "close"):
                for n in args.subscribers:
                    url = f"{base}/burst-{n}-{secrets.token_hex(4)}"
                    await create_channel(session, url)
                    out["burst"].append(
                        await burst(
                            url, n, args.burst_segments, burst_data, style, args.burst_gap_ms / 1000
                        )
                    )
    return out


def run_compare(args: argparse.Namespace, data: bytes) -> dict[str, Any]:
    """Ours (A) and the other server (B) in rounds A B A B ..., the same clients for both."""
    burst_data = os.urandom(int(args.burst_kib * 1024))
    other = args.compare_url.rstrip("/")
    with contextlib.ExitStack() as stack:
        if args.trickle_url:
            ours, ours_pid = args.trickle_url.rstrip("/"), args.server_pid
        else:
            port = free_port()
            proc = stack.enter_context(live_service(port))
            ours, ours_pid = f"http://{HOST}:{port}/trickle", proc.pid
        rounds: list[dict[str, Any]] = []
        load_before = _load_average()
        for _ in range(args.rounds):
            a = asyncio.run(compare_round(ours, ours_pid, data, burst_data, args))
            b = asyncio.run(compare_round(other, args.compare_pid, data, burst_data, args))
            rounds.append({"ours": a, "other": b})
    return {
        "rounds": rounds,
        "summary": _compare_summary(rounds, args),
        "load_average": {"before": load_before, "after": _load_average()},
    }


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (how shared it was), None where unknown."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _compare_summary(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {"fanout": [], "burst": []}
    for i, n in enumerate(args.subscribers):
        row: dict[str, Any] = {"subscribers": n}
        for side in ("ours", "other"):
            runs = [r[side]["fanout"][i] for r in rounds]
            row[f"{side}_mb_s"] = _median([r["total_mb_s"] for r in runs])
            row[f"{side}_ms_per_mb"] = _median(
                [r["server_cpu_ms_per_mb"] for r in runs if r["server_cpu_ms_per_mb"] is not None]
            )
            row[f"{side}_runs_mb_s"] = [r["total_mb_s"] for r in runs]
            row[f"{side}_cpu_wait_pct"] = _median(
                [r["server_cpu_wait_pct"] for r in runs if r["server_cpu_wait_pct"] is not None]
            )
        # Ratios per round (adjacent runs share the machine's state), then their median.
        pairs = [(r["ours"]["fanout"][i], r["other"]["fanout"][i]) for r in rounds]
        row["throughput_ratio"] = _median(
            [a["total_mb_s"] / b["total_mb_s"] for a, b in pairs if b["total_mb_s"]]
        )
        row["cpu_per_gb_ratio"] = _median(
            [
                a["server_cpu_ms_per_mb"] / b["server_cpu_ms_per_mb"]
                for a, b in pairs
                if a["server_cpu_ms_per_mb"] and b["server_cpu_ms_per_mb"]
            ]
        )
        summary["fanout"].append(row)
    if rounds and rounds[0]["ours"]["burst"]:
        for j, first in enumerate(rounds[0]["ours"]["burst"]):
            row = {"subscribers": first["subscribers"], "style": first["style"]}
            for side in ("ours", "other"):
                runs = [r[side]["burst"][j] for r in rounds]
                row[f"{side}_delivered"] = sum(r["delivered"] for r in runs)
                row[f"{side}_expected"] = sum(r["expected"] for r in runs)
            summary["burst"].append(row)
    return summary


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data = os.urandom(int(args.segment_mib * MIB))
    cpus = os.cpu_count()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    out: dict[str, Any] = {
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "cpus": cpus,
        "cpus_usable": affinity,
        "segment_bytes": len(data),
        "window_segments": args.window,
    }
    if "http" in args.only:
        if args.trickle_url:
            base = args.trickle_url.rstrip("/")
            out["http"] = asyncio.run(run_http(base, args.server_pid, data, args))
        else:
            port = free_port()
            with live_service(port) as proc:
                base = f"http://{HOST}:{port}/trickle"
                out["http"] = asyncio.run(run_http(base, proc.pid, data, args))
    if "raw" in args.only:
        port = free_port()
        with raw_server(port, len(data)) as raw:
            assert raw.pid is not None
            out["raw"] = asyncio.run(run_raw(f"http://{HOST}:{port}", raw.pid, args))
    if "http" in out and "raw" in out:
        out["ratio"] = {
            str(t["subscribers"]): round(t["total_mb_s"] / r["total_mb_s"], 2)
            for t, r in zip(out["http"]["fanout"], out["raw"]["fanout"], strict=True)
            if r["total_mb_s"]
        }
    if "local" in args.only:
        out["local"] = asyncio.run(run_local(data, args))
    if "compare" in args.only:
        out["compare"] = run_compare(args, data)
    return out


# -- output --------------------------------------------------------------------------------------


def _pct(value: int | None) -> str:
    return " n/a" if value is None else f"{value:3d}%"


def _fanout_row(label: str, r: dict[str, Any]) -> str:
    row = (
        f"  {label:<8} N={r['subscribers']:<2} total {r['total_mb_s']:9.1f} MB/s"
        f"  per sub {r['per_subscriber_mb_s']:9.1f} MB/s"
        f"  cpu server {_pct(r['server_cpu_pct'])} client {_pct(r['client_cpu_pct'])}"
    )
    if r["server_cpu_ms_per_mb"] is not None:
        row += f"  server {r['server_cpu_ms_per_mb']:.2f} ms/MB"
    if "segments" in r:
        row += f"  {r['segments'] / r['seconds']:7.0f} seg/s"
        if r["skipped"] or r["stalls"]:
            row += f"  skipped {r['skipped']} stalls {r['stalls']}"
    return row


def _latency_row(label: str, r: dict[str, Any]) -> str:
    return (
        f"  {label:<8} p50 {r['p50_ms']:7.3f} ms  p90 {r['p90_ms']:7.3f} ms"
        f"  max {r['max_ms']:7.3f} ms  ({r['segments']} segments of {r['segment_bytes']} B)"
    )


def report(out: dict[str, Any]) -> str:
    lines = [
        f"trickle bench: python {out['python']}, aiohttp {out['aiohttp']}, "
        f"{out['cpus']} CPUs ({out['cpus_usable']} usable); segments of "
        f"{out['segment_bytes'] / MIB:g} MiB, publisher at most {out['window_segments']} ahead; "
        "MB = 10^6 B",
    ]
    http, raw, ratio = out.get("http"), out.get("raw"), out.get("ratio", {})
    if http or raw:
        lines.append("1. fan-out over HTTP (server process <- clients in this process)")
        by_n: dict[int, list[str]] = {}
        for r in http["fanout"] if http else []:
            by_n.setdefault(r["subscribers"], []).append(_fanout_row("trickle", r))
        for r in raw["fanout"] if raw else []:
            by_n.setdefault(r["subscribers"], []).append(_fanout_row("raw", r))
        for n, rows in by_n.items():
            lines += rows
            if str(n) in ratio:
                lines.append(f"  {'ratio':<8} N={n:<2} trickle/raw {ratio[str(n)]:.2f}")
    if http or raw:
        lines.append("2. first byte to an attached subscriber (HTTP)")
    if http:
        lines.append(_latency_row("trickle", http["first_byte"]))
    if raw:
        lines.append(_latency_row("raw GET", raw["first_byte"]) + ", request to first chunk")
    if "local" in out:
        lines.append("3. in-process LocalPublisher/LocalSubscriber (no HTTP)")
        lines += [_fanout_row("local", r) for r in out["local"]["fanout"]]
        lines.append(_latency_row("local", out["local"]["first_byte"]))
    if "compare" in out:
        lines += _compare_report(out["compare"])
    return "\n".join(lines)


def _compare_report(compare: dict[str, Any]) -> list[str]:
    summary = compare["summary"]
    lines = [
        f"4. ours vs other server, {len(compare['rounds'])} interleaved rounds, lean raw-socket "
        "subscribers; medians (MB/s total; server CPU ms per MB delivered = s per GB)"
    ]
    load = compare.get("load_average")
    if load and load["before"] and load["after"]:
        lines.append(
            f"  load average (1, 5, 15 min): {load['before']} before, {load['after']} after, "
            f"on {os.cpu_count()} CPUs"
        )
    for row in summary["fanout"]:
        lines.append(
            f"  N={row['subscribers']:<2} ours {row['ours_mb_s']:8.1f} MB/s "
            f"{row['ours_ms_per_mb'] or 0:5.2f} ms/MB   other {row['other_mb_s']:8.1f} MB/s "
            f"{row['other_ms_per_mb'] or 0:5.2f} ms/MB   ours/other: throughput "
            f"{row['throughput_ratio'] or 0:.2f}x, CPU per GB {row['cpu_per_gb_ratio'] or 0:.2f}x"
        )
        lines.append(
            f"        runs MB/s ours {row['ours_runs_mb_s']} other {row['other_runs_mb_s']}; "
            f"server runnable but waiting for a CPU: ours {row['ours_cpu_wait_pct']}% "
            f"other {row['other_cpu_wait_pct']}% of the time (threads summed)"
        )
    for row in summary["burst"]:
        lines.append(
            f"  back-to-back ({row['style']:<10}) N={row['subscribers']:<2} delivered whole: "
            f"ours {row['ours_delivered']}/{row['ours_expected']}, "
            f"other {row['other_delivered']}/{row['other_expected']}"
        )
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trickle", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per HTTP fan-out")
    parser.add_argument("--segment-mib", type=float, default=1.0, help="fan-out segment size")
    parser.add_argument(
        "--subscribers", default="1,8", help="comma-separated subscriber counts (default 1,8)"
    )
    parser.add_argument(
        "--segments", type=int, default=0, help="also stop a fan-out after this many segments"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per HTTP fan-out, best kept (noisy hosts)"
    )
    parser.add_argument("--window", type=int, default=3, help="segments the publisher may lead")
    parser.add_argument("--warmup", type=int, default=3, help="segments before measuring")
    parser.add_argument("--local-seconds", type=float, default=1.0, help="per local fan-out")
    parser.add_argument(
        "--latency-segments", type=int, default=200, help="first-byte samples (default 200)"
    )
    parser.add_argument(
        "--latency-bytes", type=int, default=1024, help="first-byte segment size (default 1024)"
    )
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between latency writes")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument(
        "--trickle-url",
        help="bench a trickle server already running at this base URL, with channel "
        "autocreation (e.g. http://127.0.0.1:8935/trickle), instead of starting the service",
    )
    parser.add_argument(
        "--only", default="http,raw,local", help="parts to run (default http,raw,local)"
    )
    parser.add_argument("--server-pid", type=int, help="its pid, for the CPU column")
    parser.add_argument(
        "--compare-url",
        help="also run the comparison (part 4) against another trickle server at this base URL "
        "with channel autocreation, e.g. go-livepeer's (http://127.0.0.1:8935/trickle)",
    )
    parser.add_argument("--compare-pid", type=int, help="that server's pid, for CPU per GB")
    parser.add_argument("--rounds", type=int, default=3, help="comparison rounds, A B A B ...")
    parser.add_argument(
        "--burst-segments",
        type=int,
        default=16,
        help="segments a publisher sends back to back in the comparison (0: none)",
    )
    parser.add_argument("--burst-kib", type=float, default=256, help="their size")
    parser.add_argument(
        "--burst-gap-ms", type=float, default=5.0, help="gap between close-style POSTs"
    )
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",")}
    if args.compare_url:
        args.only.add("compare")
    if not args.only <= {"http", "raw", "local", "compare"}:
        parser.error("--only takes http, raw, local and compare")
    if "compare" in args.only and not args.compare_url:
        parser.error("the comparison needs --compare-url")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.subscribers = [int(n) for n in args.subscribers.split(",") if n.strip()]
    if not args.subscribers or min(args.subscribers) < 1:
        parser.error("--subscribers needs positive counts")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.window < 1 or args.window > 4:
        parser.error("--window must be 1-4: the ring holds 5 segments")
    return args


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    out = measure(args)
    print(json.dumps(out, indent=2) if args.json else report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
