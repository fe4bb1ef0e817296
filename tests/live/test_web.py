"""The browser page, served by the real service on 127.0.0.1 and driven in a real browser.

The browser is Debian's Chromium (`apt-get install chromium`; `.ci/run` installs it), driven by
Playwright's Python API through `executable_path`: Playwright never downloads a browser here.
It runs headless with a fake camera and microphone, loopback ICE candidates allowed, and flags
that keep it off the network (every host name but localhost resolves to nothing).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from live.app import create_app
from live.keys import SESSIONS
from live.settings import Settings
from tests.live.conftest import PIPELINES
from tests.live.streams import WAIT_S, wait_gone
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
# The page's live path needs the service's WHIP/WHEP endpoints.
WEBRTC = (ROOT / "live" / "webrtc.py").exists()
ARTIFACTS = Path(os.environ.get("LIVE_V2V_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
BROWSER_WAIT_MS = WAIT_S * 1000

CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--allow-loopback-in-peer-connection",
    # Real host addresses in ICE candidates instead of mDNS names, which aiortc cannot resolve.
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater",
    # Off the network: no host name resolves but localhost (and loopback's address, which the
    # rule would map too: the cross-origin test serves its page there), no proxy, no background
    # traffic.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-client-side-phishing-detection",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
    "--no-first-run",
    "--no-default-browser-check",
    # Containers often have a small /dev/shm.
    "--disable-dev-shm-usage",
]


@pytest.fixture
async def live_service(aiohttp_client: Callable[..., Any]) -> TestClient:
    """The real service; WebRTC host candidates on 127.0.0.1, where the browser is."""
    settings = Settings(status_interval_s=0.5, ice_host_addresses="127.0.0.1")
    return await aiohttp_client(create_app(settings, PIPELINES))


@pytest.fixture
async def browser_page() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        # Not a skip: CI must run this test, and a missing browser is a setup error there.
        pytest.fail(
            f"the browser test needs Debian's Chromium at {CHROMIUM}: "
            "apt-get install -y --no-install-recommends chromium (.ci/run does)"
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 860})
            page = await context.new_page()
            page.set_default_timeout(BROWSER_WAIT_MS)
            page.problems = []  # uncaught exceptions and console errors, for the assertions
            page.on("pageerror", lambda error: page.problems.append(f"pageerror: {error}"))
            page.on(
                "console",
                lambda message: (
                    page.problems.append(f"console: {message.text}")
                    if message.type == "error"
                    else None
                ),
            )
            page.on(
                "response",
                lambda response: (
                    page.problems.append(
                        f"{response.request.method} {response.url}: {response.status}"
                    )
                    if response.status >= 400
                    else None
                ),
            )
            yield page
            await context.close()
        finally:
            await browser.close()


def page_url(client: TestClient) -> str:
    # localhost, as a person opens it: browsers give the camera to http:// only there.
    return f"http://localhost:{client.port}/"


async def status_of(client: TestClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/live-video-to-video/{session_id}")
    assert response.status == 200, await response.text()
    return await response.json()


async def wait_status(client: TestClient, session_id: str, check: Callable[[dict], bool]) -> dict:
    """Poll the session's status until `check` accepts it (the condition, not a set time)."""
    status: dict[str, Any] = {}

    async def accepted() -> bool:
        nonlocal status
        status = await status_of(client, session_id)
        return check(status)

    await wait_until(accepted, "the session's status", within=WAIT_S, poll=0.1)
    return status


async def wait_js(page: Any, expression: str) -> None:
    """Until `expression` is true in the page. Playwright's wait_for_function evaluates its
    predicate with eval(), which the page's Content-Security-Policy rightly refuses; evaluate()
    is not subject to it."""

    async def holds() -> bool:
        return bool(await page.evaluate(expression))

    await wait_until(holds, expression, within=WAIT_S, poll=0.1)


DARK_SHARE = """([id, threshold]) => {
    const video = document.getElementById(id);
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const context = canvas.getContext("2d");
    context.drawImage(video, 0, 0);
    const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let dark = 0;
    for (let i = 0; i < data.length; i += 4) {
        if (data[i] + data[i + 1] + data[i + 2] < threshold) dark++;
    }
    return dark / (data.length / 4);
}"""


def save_artifact(name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The folder ignores itself, so screenshots never end up in a commit.
    (ARTIFACTS / ".gitignore").write_text("*\n")
    return ARTIFACTS / name


async def test_the_page_and_its_files_are_served_without_listing(live_service) -> None:
    client = live_service
    index = await client.get("/")
    assert index.status == 200
    assert index.content_type == "text/html"
    assert "default-src 'self'" in index.headers["Content-Security-Policy"]
    html = await index.text()
    # Nothing from elsewhere: every script and style comes from this service.
    assert "http://" not in html and "https://" not in html
    for path, kind in (("/web/app.js", "javascript"), ("/web/style.css", "text/css")):
        response = await client.get(path)
        assert response.status == 200 and kind in response.content_type, path
    for path in ("/web/", "/web", "/web/../pyproject.toml", "/web/%2e%2e/pyproject.toml"):
        assert (await client.get(path)).status in (403, 404), path


async def test_the_page_lists_pipelines_and_builds_controls_from_their_schema(
    live_service, browser_page
) -> None:
    page = browser_page
    await page.goto(page_url(live_service))
    await page.wait_for_selector(
        "#pipeline:not([disabled]) option[value='cartoon']", state="attached"
    )
    await page.select_option("#pipeline", "cartoon")
    # cartoon's live params, as sliders with the schema's bounds and defaults.
    strength = page.locator("#param-strength")
    assert await strength.get_attribute("type") == "range"
    assert (await strength.get_attribute("min"), await strength.get_attribute("max")) == ("0", "1")
    assert await strength.input_value() == "1"
    assert await page.locator("#param-edge_threshold").input_value() == "24"
    assert await page.locator("#param-levels").count() == 0  # reloads: not a live control
    await page.select_option("#pipeline", "noop")
    await page.wait_for_selector("text=This pipeline has no live parameters.")
    # Every control has a label.
    for control in await page.locator("input, select, textarea").all():
        control_id = await control.get_attribute("id")
        assert await page.locator(f"label[for='{control_id}']").count() == 1, control_id
    assert not page.problems, "\n".join(page.problems)


@pytest.mark.skipif(not WEBRTC, reason="needs the service's WHIP/WHEP (live/webrtc.py)")
async def test_the_page_goes_live_changes_params_and_stops(live_service, browser_page) -> None:
    client, page = live_service, browser_page
    await page.goto(page_url(client))
    await page.wait_for_selector(
        "#pipeline:not([disabled]) option[value='cartoon']", state="attached"
    )
    await page.select_option("#pipeline", "cartoon")
    await page.click("#start")

    await page.wait_for_selector("body[data-session-id]", state="attached")
    session_id = await page.get_attribute("body", "data-session-id")
    session = client.app[SESSIONS].sessions[session_id]
    assert session.pipeline_cls.name == "cartoon"

    # The camera goes out over WHIP, the restyled output comes back over WHEP and plays.
    await wait_js(
        page,
        """(() => {
            const v = document.getElementById("output");
            return v.videoWidth > 0 && v.currentTime > 0.5 && !v.paused;
        })()""",
    )
    started = await page.evaluate("document.getElementById('output').currentTime")
    await wait_js(page, f"document.getElementById('output').currentTime > {started} + 1")
    # What plays went through the pipeline: the session has processed and sent frames.
    status = await wait_status(client, session_id, lambda s: s["frames_out"] >= 30)
    assert status["pipeline"] == "cartoon"
    # The page shows it live, with numbers from the session's event stream.
    await page.wait_for_selector("body[data-state='online']", state="attached")
    await wait_js(
        page,
        """["fps-in", "fps-out", "latency"].every(
            (id) => Number(document.getElementById(id).textContent) > 0)""",
    )
    assert "cartoon is live" in await page.text_content("#state-detail")
    # And it shows: cartoon inks edges black, and Chromium's fake camera has no dark pixels
    # (about 0.7% of the output is ink, none of the input).
    assert await page.evaluate(DARK_SHARE, ["input", 90]) < 0.0005
    assert await page.evaluate(DARK_SHARE, ["output", 90]) > 0.002
    shot = save_artifact("web-live.png")
    await page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the live page: {shot}")

    # A parameter change reaches the session (debounced, then the full set).
    await page.fill("#param-strength", "0.3")
    await wait_status(
        client,
        session_id,
        lambda s: s["inference_status"]["last_params"]["strength"] == 0.3,
    )
    await page.wait_for_selector("text=Applied live.")

    # Stop ends the peer connections and the session.
    await page.click("#stop")
    await page.wait_for_selector("body[data-state='ended']", state="attached")
    assert await page.text_content("#state-detail") == "Stopped."
    await wait_gone(client, session_id)
    assert client.app[SESSIONS].peers.count(session_id, "whip") == 0
    assert client.app[SESSIONS].peers.count(session_id, "whep") == 0
    assert not page.problems, "\n".join(page.problems)


async def test_the_page_asks_for_the_token_and_keeps_it(aiohttp_client, browser_page) -> None:
    settings = Settings(status_interval_s=0.5, ice_host_addresses="127.0.0.1", auth_token="s3cret")
    client = await aiohttp_client(create_app(settings, PIPELINES))
    page = browser_page
    await page.goto(page_url(client))
    await page.wait_for_selector("#pipeline:not([disabled]) option[value='noop']", state="attached")
    await page.select_option("#pipeline", "noop")
    await page.click("#start")
    # Refused without the token, in plain words, and nothing is left running.
    await page.wait_for_selector("#error:has-text('needs an access token')")
    assert await page.locator("#token").is_visible()
    assert await page.is_enabled("#start")
    assert client.app[SESSIONS].sessions == {}

    await page.fill("#token", "s3cret")
    await page.click("#start")
    await page.wait_for_selector("body[data-session-id]", state="attached")
    session_id = await page.get_attribute("body", "data-session-id")
    assert session_id in client.app[SESSIONS].sessions
    # Kept in this browser for the next visit.
    assert await page.evaluate("localStorage.getItem('live-v2v.token')") == "s3cret"
    # Stopped once live: a Stop while WHIP/WHEP are still being set up would (rightly) see
    # their requests refused, which is not what this test is about.
    await page.wait_for_selector("body[data-state='online']", state="attached")
    await page.click("#stop")
    await page.wait_for_selector("body[data-state='ended']", state="attached")
    gone = await client.get(
        f"/live-video-to-video/{session_id}", headers={"Authorization": "Bearer s3cret"}
    )
    assert gone.status == 404
    # The refused start is the only failure (its console line may come at any time).
    problems = [p for p in page.problems if "401" not in p]
    assert not problems, "\n".join(problems)
