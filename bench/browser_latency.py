"""Browser benchmark: glass-to-glass delay of a page through a `noop` session, against the
browser's own floor.

    python -m bench.browser_latency [--runs 3] [--seconds 10] [--size 512] [--codec vp8|h264]
        [--jitter-target MS] [--baseline-tree PATH] [--json]

Headless Chromium (Debian's, the flags of tests/live/test_web.py) opens a page that this script
serves on its own origin (http://localhost:PORT; the service is http://127.0.0.1:PORT2, so every
call is cross-origin, as in tests/live/test_cross_origin.py). The page paints a clock into a
SIZE x SIZE canvas 30 times a second: the time of the paint in ms (mod 2^20), as 20 black or white
blocks of SIZE/8 pixels plus a 4-bit check, which survive lossy coding. Each painted frame is
handed to the canvas's capture track at once (`captureStream(0)` + `requestFrame()`). The
receiving side reads the clock back from every frame the video element presents
(`requestVideoFrameCallback`, `drawImage` into a canvas, block centres thresholded); the delay is
the callback's time minus the painted time, on the page's one clock. Two cases, alternated
(floor, noop, floor, noop, ...) so that load from elsewhere on the machine weighs on both alike:

- floor: the canvas track sent from one RTCPeerConnection to another inside the page, no server:
  one encode, RTP over loopback, the receiver's jitter buffer, one decode, and the painting and
  reading that both cases share. What a browser cannot go below.
- noop: the page publishes the track over WHIP to `POST /live-video-to-video/whip?model_id=noop`
  (a fresh session per run, `python -m live serve` in its own process) and watches the session's
  WHEP URL: two hops (the service decodes, runs the frame loop, encodes again).

- base (with `--baseline-tree PATH`): the noop case again against the service of another
  checkout (run from PATH), interleaved with the others: before/after under the same load.

Each run drops its first WARMUP_S seconds after the first frame read (keyframes, the bitrate
ramp) and measures `--seconds`. Printed per case over all its runs: p50, p90, max, received fps,
the frames read and those whose clock did not check out, the size the receiver got (Chromium
scales its encoder down under CPU load), and the service's CPU share during the noop runs.
Beside the delay to the frame callback, two from the callback's metadata: to the arrival of
the frame's last packet at the viewer (`receiveTime`: no jitter buffer, decode or wait for the
page's next animation frame, so less noisy) and to its hand-off to the compositor. The
service's own figures come from its status: per stage, from the WHIP frame's last RTP packet
in to the WHEP frame's last RTP packet out (`whep_delay`), the median of each run's p50.
`--jitter-target` sets `jitterBufferTarget` on every receiver (floor and viewer alike).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.frame_loop import Process, _cpu_seconds, _free_port, pct

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "bench"
WARMUP_S = 2.0
RUN_TIMEOUT_S = 120.0

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>browser glass-to-glass</title>
<link rel="icon" href="data:,">
<canvas id="clock"></canvas>
<script>
const FPS = 30;
const BITS = 20, CHECK_BITS = 4, COLS = 8;
const MOD = 2 ** BITS;
let SIZE = 512, BLOCK = 64, track = null, painter = null;

function check(value) {
  let ones = 0;
  for (let v = value; v; v >>= 1) ones += v & 1;
  return (ones * 7 + 5) % (2 ** CHECK_BITS);
}

function paint(context) {
  const now = Math.round(performance.now()) % MOD;
  const word = now | (check(now) << BITS);
  context.fillStyle = "#808080";
  context.fillRect(0, 0, SIZE, SIZE);
  for (let bit = 0; bit < BITS + CHECK_BITS; bit++) {
    context.fillStyle = (word >> bit) & 1 ? "#ffffff" : "#000000";
    context.fillRect((bit % COLS) * BLOCK, Math.floor(bit / COLS) * BLOCK, BLOCK, BLOCK);
  }
  track.requestFrame();
}

window.startClock = (size) => {
  SIZE = size;
  BLOCK = size / COLS;
  const canvas = document.getElementById("clock");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d");
  track = canvas.captureStream(0).getVideoTracks()[0];
  painter = setInterval(() => paint(context), 1000 / FPS);
};

function reader(video, size) {
  const canvas = new OffscreenCanvas(size, size);
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const block = size / COLS;
  return () => {
    context.drawImage(video, 0, 0, size, size);
    const pixels = context.getImageData(0, 0, size, size).data;
    let word = 0;
    for (let bit = 0; bit < BITS + CHECK_BITS; bit++) {
      const x = Math.floor((bit % COLS) * block + block / 2);
      const y = Math.floor(Math.floor(bit / COLS) * block + block / 2);
      const i = (y * size + x) * 4;
      if (pixels[i] + pixels[i + 1] + pixels[i + 2] > 3 * 128) word |= 1 << bit;
    }
    const value = word & (MOD - 1);
    return (word >>> BITS) === check(value) ? value : null;
  };
}

// Reads the clock from every presented frame; resolves once `seconds` are measured after
// `warmup` seconds from the first frame.
function measure(video, size, seconds, warmup) {
  return new Promise((resolve, reject) => {
    const read = reader(video, size);
    const delays = [], arrivals = [], presented = [];
    let start = null, bad = 0, frames = 0;
    const timeout = setTimeout(() => reject(new Error("no frame played")), 30000);
    const since = (t, painted) => ((Math.round(t) - painted) % MOD + MOD) % MOD;
    const onFrame = (now, meta) => {
      const received = performance.now();
      const painted = read();
      if (start === null) {
        start = received;
        clearTimeout(timeout);
      }
      const t = received - start;
      if (t >= warmup) {
        frames++;
        if (painted === null) bad++;
        else {
          delays.push(since(received, painted));
          // When the frame's last packet reached the viewer, and when it was handed to the
          // compositor: the same path without the viewer's buffering, and without the wait
          // for the page's next animation frame.
          if (meta.receiveTime) arrivals.push(since(meta.receiveTime, painted));
          if (meta.presentationTime) presented.push(since(meta.presentationTime, painted));
        }
      }
      if (t >= warmup + seconds) {
        resolve({ delays, arrivals, presented, frames, bad, seconds: t - warmup,
                  width: video.videoWidth, height: video.videoHeight });
        return;
      }
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
  });
}

// The browser's side of where delay goes: what its receiver got, dropped, buffered and decoded,
// and what its sender encoded.
function per(total, count) {
  return count ? (1000 * total) / count : 0;  // seconds in total -> ms each
}

async function rtcStats(sender, receiver) {
  const out = {};
  for (const report of (await receiver.getStats()).values()) {
    if (report.type !== "inbound-rtp" || report.kind !== "video") continue;
    Object.assign(out, {
      received: report.framesReceived, decoded: report.framesDecoded,
      dropped: report.framesDropped, lost: report.packetsLost, nacks: report.nackCount,
      freezes: report.freezeCount,
      jitter_buffer_ms: per(report.jitterBufferDelay, report.jitterBufferEmittedCount),
      target_delay_ms: per(report.jitterBufferTargetDelay, report.jitterBufferEmittedCount),
      decode_ms: per(report.totalDecodeTime, report.framesDecoded),
      assembly_ms: per(report.totalAssemblyTime, report.framesAssembledFromMultiplePackets),
    });
  }
  for (const report of (await sender.getStats()).values()) {
    if (report.type !== "outbound-rtp" || report.kind !== "video") continue;
    Object.assign(out, {
      encoded: report.framesEncoded,
      encode_ms: per(report.totalEncodeTime, report.framesEncoded),
      limited_by: report.qualityLimitationReason,
    });
  }
  return out;
}

function player(stream) {
  const video = document.createElement("video");
  video.muted = true;
  video.autoplay = true;
  video.playsInline = true;
  video.srcObject = stream;
  document.body.append(video);
  return video;
}

function prefer(transceiver, codec) {
  const wanted = `video/${codec}`.toLowerCase();
  const codecs = RTCRtpReceiver.getCapabilities("video").codecs.filter(
    (c) => c.mimeType.toLowerCase() === wanted || c.mimeType.toLowerCase() === "video/rtx");
  transceiver.setCodecPreferences(codecs);
}

function gathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
  });
}

function hint(receiver, target) {
  if (target !== null && target !== undefined) receiver.jitterBufferTarget = target;
}

window.runFloor = async (codec, seconds, warmup, target) => {
  const sender = new RTCPeerConnection(), receiver = new RTCPeerConnection();
  sender.onicecandidate = (e) => e.candidate && receiver.addIceCandidate(e.candidate);
  receiver.onicecandidate = (e) => e.candidate && sender.addIceCandidate(e.candidate);
  prefer(sender.addTransceiver(track, { direction: "sendonly" }), codec);
  const arrived = new Promise((resolve) => {
    receiver.ontrack = (e) => { hint(e.receiver, target); resolve(e.track); };
  });
  await sender.setLocalDescription(await sender.createOffer());
  await receiver.setRemoteDescription(sender.localDescription);
  await receiver.setLocalDescription(await receiver.createAnswer());
  await sender.setRemoteDescription(receiver.localDescription);
  const video = player(new MediaStream([await arrived]));
  try {
    const measured = await measure(video, SIZE, seconds, warmup);
    return { rtc: await rtcStats(sender, receiver), ...measured };
  } finally {
    video.remove();
    sender.close();
    receiver.close();
  }
};

async function exchange(pc, url, token) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${token}` },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    throw new Error(`${url}: ${response.status} ${await response.text()}`);
  }
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  return response;
}

window.runNoop = async (service, token, codec, seconds, warmup, target) => {
  const publisher = new RTCPeerConnection(), viewer = new RTCPeerConnection();
  const leave = [];
  let video = null, session = null;
  try {
    prefer(publisher.addTransceiver(track, { direction: "sendonly" }), codec);
    const published = await exchange(
      publisher, `${service}/live-video-to-video/whip?model_id=noop`, token);
    leave.push(new URL(published.headers.get("Location"), service).href);
    session = published.headers.get("X-Session-Id");
    const whep = /<([^>]+)>;\\s*rel="urn:ietf:params:whep"/.exec(published.headers.get("Link"))[1];
    const watching = viewer.addTransceiver("video", { direction: "recvonly" });
    prefer(watching, codec);
    hint(watching.receiver, target);
    const arrived = new Promise((resolve) => { viewer.ontrack = (e) => resolve(e.track); });
    const watched = await exchange(viewer, whep, token);
    leave.push(new URL(watched.headers.get("Location"), service).href);
    video = player(new MediaStream([await arrived]));
    const measured = await measure(video, SIZE, seconds, warmup);
    const rtc = await rtcStats(publisher, viewer);
    // The session's own view (fps in and out, frames dropped, time per stage): where delay goes.
    const status = await (await fetch(`${service}/live-video-to-video/${session}`, {
      headers: { Authorization: `Bearer ${token}` } })).json();
    return { session, status, rtc, ...measured };
  } finally {
    if (video) video.remove();
    for (const url of leave.reverse()) {
      await fetch(url, { method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
    }
    viewer.close();
    publisher.close();
    if (session) {
      await fetch(`${service}/live-video-to-video/${session}`, {
        method: "DELETE", headers: { Authorization: `Bearer ${token}` } });
    }
  }
};
</script>
"""


@contextlib.asynccontextmanager
async def page_server() -> AsyncIterator[str]:
    """The page on its own origin: localhost (where Chromium allows media), its own port."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://localhost:{port}"
    finally:
        await runner.cleanup()


def service_process(page_origin: str, tree: str | None = None) -> Process:
    """`python -m live serve` of this checkout, or of the one at `tree` (run from there)."""
    port = _free_port()
    command = [sys.executable, "-m", "live", "serve", "--port", str(port)]
    command += ["--ice-host-addresses", "127.0.0.1", "--log-level", "ERROR"]
    command += ["--auth-token", TOKEN, "--cors-origins", page_origin]
    if tree is not None:
        command = ["/bin/sh", "-c", 'cd "$0" && exec "$@"', tree, *command]
    return Process(command, port)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    delays = [d for run in runs for d in run["delays"]]
    frames = sum(run["frames"] for run in runs)
    seconds = sum(run["seconds"] for run in runs) / 1000
    return {
        "p50_ms": pct(delays, 0.5),
        "p90_ms": pct(delays, 0.9),
        "max_ms": max(delays) if delays else float("nan"),
        "fps": round(frames / seconds, 1) if seconds else 0.0,
        "frames": frames,
        "unreadable": sum(run["bad"] for run in runs),
        "arrival_p50_ms": pct([d for run in runs for d in run.get("arrivals", [])], 0.5),
        "presented_p50_ms": pct([d for run in runs for d in run.get("presented", [])], 0.5),
        "run_p50_ms": [pct(run["delays"], 0.5) for run in runs],
        "run_arrival_p50_ms": [pct(run.get("arrivals", []), 0.5) for run in runs],
        "sizes": sorted({f"{run['width']}x{run['height']}" for run in runs}),
    }


def _p50s(run: dict[str, Any]) -> str:
    return (
        f"{pct(run['delays'], 0.5):.1f} ms (at its last packet {pct(run['arrivals'], 0.5):.1f}, "
        f"presented {pct(run['presented'], 0.5):.1f})"
    )


def _rtc(rtc: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in rtc.items())


def _session(status: dict[str, Any]) -> str:
    stages = " ".join(
        f"{name} {p.get('p50_ms', 0):.1f}" for name, p in (status.get("stages") or {}).items()
    )
    return (
        f"session fps in {status['input_status']['fps']:.1f} out "
        f"{status['inference_status']['fps']:.1f}, in->out p50 "
        f"{status['latency'].get('p50_ms') or 0:.1f} ms, frames in {status['frames_in']} out "
        f"{status['frames_out']} dropped {status['frames_dropped']}, stage p50 ms: {stages}"
    )


def _line(case: str, s: dict[str, Any], extra: str = "") -> str:
    runs = " ".join(f"{p:.0f}" for p in s["run_p50_ms"])
    return (
        f"{case:6s} p50 {s['p50_ms']:6.1f} ms  p90 {s['p90_ms']:6.1f}  max {s['max_ms']:6.1f}  "
        f"fps {s['fps']:5.1f}  frames {s['frames']} (unreadable {s['unreadable']})  "
        f"size {','.join(s['sizes'])}  run p50s [{runs}]{extra}"
    )


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _stage_medians(runs: list[dict[str, Any]]) -> str:
    """The median over runs of each in-service stage's p50 (per frame, so less sensitive to
    load than the page's figures)."""
    names: dict[str, list[float]] = {}
    for run in runs:
        for name, p in (run["status"].get("stages") or {}).items():
            if p.get("p50_ms") is not None:
                names.setdefault(name, []).append(p["p50_ms"])
    return " ".join(f"{n} {sorted(v)[len(v) // 2]:.1f}" for n, v in names.items())


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    from tests.live.test_web import CHROMIUM_ARGS

    print(
        f"# browser_latency python={platform.python_version()} cpus={os.cpu_count()} "
        f"load={_load()} size={args.size} fps=30 codec={args.codec} "
        f"runs={args.runs}x{args.seconds:g}s warmup={WARMUP_S:g}s "
        f"jitter_target={args.jitter_target}"
        + (f" baseline={args.baseline_tree}" if args.baseline_tree else ""),
        flush=True,
    )
    cases = ["floor", "noop"] + (["base"] if args.baseline_tree else [])
    results: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    cpu_share: dict[str, list[float]] = {"noop": [], "base": []}
    timing = [args.codec, args.seconds * 1000, WARMUP_S * 1000, args.jitter_target]
    async with contextlib.AsyncExitStack() as stack:
        origin = await stack.enter_async_context(page_server())
        services = {"noop": await stack.enter_async_context(service_process(origin))}
        if args.baseline_tree:
            services["base"] = await stack.enter_async_context(
                service_process(origin, args.baseline_tree)
            )
        playwright = await stack.enter_async_context(async_playwright())
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        stack.push_async_callback(browser.close)
        page = await browser.new_page()
        await page.goto(origin + "/")
        await page.evaluate("(size) => window.startClock(size)", args.size)
        for _ in range(args.runs):
            lines = []
            for case in cases:
                if case == "floor":
                    run = await asyncio.wait_for(
                        page.evaluate("(a) => window.runFloor(...a)", timing), RUN_TIMEOUT_S
                    )
                    lines.append(f"  floor p50 {_p50s(run)}; {_rtc(run['rtc'])}")
                else:
                    service = services[case]
                    cpu = _cpu_seconds(service.pid)
                    wall = asyncio.get_running_loop().time()
                    run = await asyncio.wait_for(
                        page.evaluate(
                            "(a) => window.runNoop(...a)", [service.base, TOKEN, *timing]
                        ),
                        RUN_TIMEOUT_S,
                    )
                    wall = asyncio.get_running_loop().time() - wall
                    cpu_share[case].append((_cpu_seconds(service.pid) - cpu) / wall)
                    lines.append(
                        f"  {case:5s} p50 {_p50s(run)}; {_rtc(run['rtc'])}\n"
                        f"        {_session(run['status'])}"
                    )
                results[case].append(run)
            print("\n".join(lines) + f"\n        load {_load()}", flush=True)
    sums = {case: summary(runs) for case, runs in results.items()}
    outcome: dict[str, Any] = dict(sums)
    print(_line("floor", sums["floor"]), flush=True)
    for case in cases[1:]:
        s, floor_s = sums[case], sums["floor"]
        share = sum(cpu_share[case]) / len(cpu_share[case])
        print(_line(case, s, f"  service cpu {share:.2f} core"), flush=True)
        added = s["p50_ms"] - floor_s["p50_ms"]
        pairs = [n - f for n, f in zip(s["run_p50_ms"], floor_s["run_p50_ms"], strict=True)]
        at_arrival = s["arrival_p50_ms"] - floor_s["arrival_p50_ms"]
        presented = s["presented_p50_ms"] - floor_s["presented_p50_ms"]
        print(
            f"{case} - floor: p50 {added:+.1f} ms "
            f"(goal <= 5 ms: {'met' if added <= 5 else 'not met'}), "
            f"p90 {s['p90_ms'] - floor_s['p90_ms']:+.1f} ms; per run pair "
            f"[{' '.join(f'{p:+.0f}' for p in pairs)}]; presented p50 {presented:+.1f} ms; at the "
            f"viewer's last packet p50 {at_arrival:+.1f} ms; in-service stage p50s (median of "
            f"runs): {_stage_medians(results[case])}",
            flush=True,
        )
        outcome[f"{case}_added_p50_ms"] = added
        outcome[f"{case}_added_at_arrival_p50_ms"] = at_arrival
        outcome[f"{case}_added_presented_p50_ms"] = presented
        outcome[f"{case}_service_cpu"] = share
    print(f"load after {_load()}", flush=True)
    if args.json:
        print(json.dumps(outcome))
    return outcome


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each case, alternated")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per run")
    parser.add_argument("--size", type=int, default=512, help="canvas width and height")
    parser.add_argument("--codec", choices=("vp8", "h264"), default="vp8")
    parser.add_argument(
        "--jitter-target",
        type=float,
        default=None,
        help="set jitterBufferTarget (ms) on every receiver, floor and viewer alike",
    )
    parser.add_argument(
        "--baseline-tree",
        default=None,
        help="another checkout of this repository: its service runs as a third case, `base`, "
        "interleaved with the others (before/after figures under the same load)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    if args.size % 8:
        parser.error("--size must be a multiple of 8 (the clock's blocks)")
    if not CHROMIUM.exists():
        parser.error(f"needs Debian's Chromium at {CHROMIUM} (apt-get install chromium)")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
