"""A page on another origin publishes and watches over WHIP/WHEP in real Chromium.

The page is served by a second aiohttp app on its own port, at http://localhost:PORT; the service
is reached at http://127.0.0.1:PORT2, so every call the page makes is cross-origin and the
browser enforces CORS on it (token set: each request carries `Authorization`, so each is
preflighted). The page uses nothing but fetch and RTCPeerConnection, as any WHIP/WHEP client
library does: it reads an error's JSON detail, publishes the fake camera, watches the output,
reads `Location`, `Link` and `X-Session-Id`, and on leaving DELETEs both resources and the
session. With the page's origin left out of `--cors-origins`, the same page is refused.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from live.app import create_app
from live.keys import SESSIONS
from live.settings import Settings
from tests.live.conftest import PIPELINES
from tests.live.streams import WAIT_S
from tests.live.test_web import browser_page, wait_js  # noqa: F401 (a fixture)
from tests.waiting import wait_until

TOKEN = "s3cret"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>WHIP/WHEP from another origin</title>
<link rel="icon" href="data:,">
<video id="output" autoplay muted playsinline></video>
<script>
window.played = 0;
let live = null;

function auth(token) {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function gathered(pc) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === "complete") return resolve();
    pc.addEventListener("icegatheringstatechange", () => {
      if (pc.iceGatheringState === "complete") resolve();
    });
  });
}

// WHIP and WHEP are the same exchange: POST the offer, 201 with the answer and a Location.
async function exchange(pc, url, token) {
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc);
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...auth(token) },
    body: pc.localDescription.sdp,
  });
  if (response.status !== 201) {
    throw new Error(`${response.status}: ${(await response.json()).detail.msg}`);
  }
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  return response;
}

window.refusedDetail = async (service) => {
  const response = await fetch(`${service}/live-video-to-video/whip?model_id=noop`, {
    method: "POST",
    headers: { "Content-Type": "application/sdp", ...auth("not-the-token") },
    body: "v=0\\r\\n",
  });
  return { status: response.status, detail: (await response.json()).detail.msg };
};

window.goLive = async (service, token) => {
  const camera = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const publisher = new RTCPeerConnection();
  live = { publisher };
  for (const track of camera.getTracks()) {
    publisher.addTransceiver(track, { direction: "sendonly" });
  }
  const published = await exchange(
    publisher, `${service}/live-video-to-video/whip?model_id=noop`, token);
  live.whip = new URL(published.headers.get("Location"), service).href;
  live.session = published.headers.get("X-Session-Id");
  const link = published.headers.get("Link") || "";
  const whep = /<([^>]+)>;\\s*rel="urn:ietf:params:whep"/.exec(link)[1];

  const viewer = new RTCPeerConnection();
  live.viewer = viewer;
  viewer.addTransceiver("video", { direction: "recvonly" });
  const video = document.getElementById("output");
  viewer.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
  const count = () => { window.played++; video.requestVideoFrameCallback(count); };
  video.requestVideoFrameCallback(count);
  const watched = await exchange(viewer, whep, token);
  live.whep = new URL(watched.headers.get("Location"), service).href;
  return { whip: live.whip, whep: live.whep, session: live.session, link };
};

window.tryGoLive = async (service, token) => {
  try {
    await window.goLive(service, token);
    return "live";
  } catch (error) {
    return `${error.name}: ${error.message}`;
  }
};

window.leave = async (service, token) => {
  const statuses = [];
  for (const url of [live.whep, live.whip]) {
    statuses.push((await fetch(url, { method: "DELETE", headers: auth(token) })).status);
  }
  live.viewer.close();
  live.publisher.close();
  const stopped = await fetch(`${service}/live-video-to-video/${live.session}`, {
    method: "DELETE", headers: auth(token) });
  statuses.push(stopped.status);
  return statuses;
};
</script>
"""


async def serve_page(aiohttp_server: Callable[..., Any]) -> str:
    """The page's own origin: another app on another port, under another host name."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    server: TestServer = await aiohttp_server(app)
    # localhost, where the browser allows the camera; the service is on 127.0.0.1.
    return f"http://localhost:{server.port}/"


async def start_service(aiohttp_client: Callable[..., Any], **overrides: Any) -> TestClient:
    settings = Settings(
        status_interval_s=0.5, ice_host_addresses="127.0.0.1", auth_token=TOKEN, **overrides
    )
    return await aiohttp_client(create_app(settings, PIPELINES))


def service_origin(client: TestClient) -> str:
    return f"http://127.0.0.1:{client.port}"


async def test_a_page_on_another_origin_publishes_watches_and_leaves(
    aiohttp_client,
    aiohttp_server,
    browser_page,  # noqa: F811
) -> None:
    client = await start_service(aiohttp_client)
    page_url = await serve_page(aiohttp_server)
    service = service_origin(client)
    page = browser_page
    await page.goto(page_url)
    assert page_url.rstrip("/") != service

    # An error answer is readable across origins: its status and its JSON detail.
    refused = await page.evaluate("(s) => window.refusedDetail(s)", service)
    assert refused == {"status": 401, "detail": "missing or invalid bearer token"}

    live = await page.evaluate("([s, t]) => window.goLive(s, t)", [service, TOKEN])
    assert live["whip"].startswith(f"{service}/webrtc/")
    assert live["whep"].startswith(f"{service}/webrtc/")
    assert 'rel="urn:ietf:params:whep"' in live["link"]
    session = client.app[SESSIONS].sessions[live["session"]]
    assert session.pipeline_cls.name == "noop"

    # The output plays in the page: decoded frames presented by the video element.
    await wait_js(
        page,
        """(() => {
            const v = document.getElementById("output");
            return v.videoWidth > 0 && window.played >= 30
                && v.getVideoPlaybackQuality().totalVideoFrames >= 30;
        })()""",
    )
    peers = client.app[SESSIONS].peers
    assert peers.count(session.id, "whip") == 1 and peers.count(session.id, "whep") == 1
    assert session.stats.frames_out >= 30

    # Leaving: both resources deleted across origins, then the session.
    assert await page.evaluate("([s, t]) => window.leave(s, t)", [service, TOKEN]) == [
        200,
        200,
        200,
    ]
    await asyncio.wait_for(session.wait(), WAIT_S)
    assert peers.count(session.id, "whip") == 0 and peers.count(session.id, "whep") == 0
    gone = await client.get(
        f"/live-video-to-video/{session.id}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert gone.status == 404
    # Nothing failed but the request refused on purpose.
    problems = [p for p in page.problems if "401" not in p]
    assert not problems, "\n".join(problems)


async def test_a_page_whose_origin_is_not_allowed_is_refused_by_the_browser(
    aiohttp_client,
    aiohttp_server,
    browser_page,  # noqa: F811
) -> None:
    page_url = await serve_page(aiohttp_server)
    # Another port on the page's host: a different origin, so not this page.
    client = await start_service(aiohttp_client, cors_origins="http://localhost:1")
    service = service_origin(client)
    page = browser_page
    await page.goto(page_url)

    outcome = await page.evaluate("([s, t]) => window.tryGoLive(s, t)", [service, TOKEN])
    # fetch rejects without a status: the page learns nothing of the answer.
    assert outcome == "TypeError: Failed to fetch"
    await wait_until(
        lambda: any("blocked by CORS policy" in p for p in page.problems),
        "the browser's CORS error on the console",
        within=WAIT_S,
    )
    # The preflight stopped it: no session was started.
    assert client.app[SESSIONS].sessions == {}
