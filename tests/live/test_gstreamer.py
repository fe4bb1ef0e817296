"""A second WebRTC stack: GStreamer's webrtcbin (with libnice), driven by
examples/gstreamer_webrtc.py under Debian's python3, publishes over WHIP and watches over WHEP.

The service runs here on 127.0.0.1 with its candidates on loopback; the script's libnice agents
gather on 127.0.0.1 too (`--ice-address`). The publisher sends videotestsrc's `colors` pattern
(every hue and brightness, smooth) into a `cartoon` session; the frames the viewer decodes must
be cartoon's: colours snapped to its bands, edges inked black.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from live.keys import SESSIONS
from tests.live.streams import WAIT_S

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "gstreamer_webrtc.py"
PYTHON = "/usr/bin/python3"
SIZE = (320, 240)
FRAMES = 30
RUN_S = 120.0  # the scripts' own bound; the test ends them as soon as it has what it needs


def _gstreamer_ready() -> str | None:
    """Why GStreamer's WebRTC stack cannot run here, or None."""
    probe = (
        "import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstWebRTC', '1.0');"
        "from gi.repository import Gst; Gst.init(None);"
        "raise SystemExit(0 if Gst.ElementFactory.find('webrtcbin') else 3)"
    )
    try:
        done = subprocess.run([PYTHON, "-c", probe], capture_output=True, timeout=60)
    except FileNotFoundError:
        return f"{PYTHON} is missing"
    if done.returncode == 3:
        return "GStreamer's webrtcbin is missing (gstreamer1.0-plugins-bad, gstreamer1.0-nice)"
    if done.returncode != 0:
        return f"{PYTHON} has no PyGObject with GStreamer (python3-gi, gir1.2-gst-plugins-bad-1.0)"
    return None


NOT_READY = _gstreamer_ready()
pytestmark = pytest.mark.skipif(NOT_READY is not None, reason=NOT_READY or "")

PALETTE = np.array([0, 21, 64, 106, 149, 192, 234])  # black ink and cartoon's 6 band centres


def palette_share(image: np.ndarray) -> float:
    """Share of channel values within 8 of a band centre or ink (1/3 for a smooth image)."""
    distance = np.abs(image[..., None].astype(int) - PALETTE).min(axis=-1)
    return float((distance <= 8).mean())


def dark_share(image: np.ndarray) -> float:
    return float((image.max(axis=2) < 40).mean())


def read_ppm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header, _, pixels = data.partition(b"\n")
    _, width, height, _ = header.split()
    return np.frombuffer(pixels, np.uint8).reshape(int(height), int(width), 3)


def reference_frame(folder: Path) -> np.ndarray:
    """The pattern the publisher sends, straight from videotestsrc in the I420 it paints for
    the encoder (no codec, no session)."""
    path = folder / "reference.rgb"
    width, height = SIZE
    code = (
        "import gi, sys; gi.require_version('Gst', '1.0'); from gi.repository import Gst;"
        "Gst.init(None); p = Gst.parse_launch(sys.argv[1]); p.set_state(Gst.State.PLAYING);"
        "m = p.get_bus().timed_pop_filtered(Gst.CLOCK_TIME_NONE,"
        " Gst.MessageType.EOS | Gst.MessageType.ERROR); p.set_state(Gst.State.NULL);"
        "raise SystemExit(m.type != Gst.MessageType.EOS)"
    )
    pipeline = (
        f"videotestsrc num-buffers=1 pattern=colors ! "
        f"video/x-raw,format=I420,width={width},height={height} ! videoconvert ! "
        f"video/x-raw,format=RGB ! filesink location={path}"
    )
    subprocess.run([PYTHON, "-c", code, pipeline], check=True, timeout=60)
    return np.frombuffer(path.read_bytes(), np.uint8).reshape(height, width, 3)


class Script:
    """examples/gstreamer_webrtc.py as a subprocess, its JSON lines read as they come."""

    def __init__(self, *args: str) -> None:
        self.args = [PYTHON, str(SCRIPT), *args, "--ice-address", "127.0.0.1"]
        self.events: list[dict] = []
        self.process: asyncio.subprocess.Process | None = None
        self.stderr = b""

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *self.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )

    async def next_event(self, name: str) -> dict:
        """The next line whose event is `name`; fails on an error line or an early exit."""
        assert self.process is not None and self.process.stdout is not None
        async with asyncio.timeout(WAIT_S * 2):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    await self.finish()
                    pytest.fail(f"{self.args[2]} ended before {name!r}: {self.log()}")
                event = json.loads(line)
                self.events.append(event)
                if event["event"] == "error":
                    pytest.fail(f"{self.args[2]}: {event['detail']}")
                if event["event"] == name:
                    return event

    async def finish(self) -> int:
        assert self.process is not None
        async with asyncio.timeout(WAIT_S * 2):
            out, self.stderr = await self.process.communicate()
        self.events += [json.loads(line) for line in out.splitlines() if line.strip()]
        return self.process.returncode

    async def stop(self) -> None:
        """Ctrl-C: the script leaves with DELETE and exits."""
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
            with contextlib.suppress(TimeoutError):
                await self.finish()
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()

    def log(self) -> str:
        return f"events {self.events}, stderr {self.stderr.decode(errors='replace')[-2000:]}"


@pytest.mark.parametrize("codec", ["vp8", "h264"])
async def test_gstreamer_publishes_over_whip_and_watches_cartoon_over_whep(
    service, tmp_path: Path, codec: str
) -> None:
    client = await service(ice_host_addresses="127.0.0.1", auth_token="s3cret")
    reference = reference_frame(tmp_path)
    assert palette_share(reference) < 0.5 and dark_share(reference) < 0.05  # smooth, little ink
    whip = str(client.make_url("/live-video-to-video/whip?model_id=cartoon"))
    # One URL and the bearer token, as OBS is set up; candidates trickled by PATCH.
    publisher = Script(
        "publish", whip, "--token", "s3cret", "--codec", codec, "--trickle",
        "--seconds", str(RUN_S), "--size", f"{SIZE[0]}x{SIZE[1]}",
    )  # fmt: skip
    viewer: Script | None = None
    try:
        await publisher.start()
        created = await publisher.next_event("created")
        assert created["setup"] == ["passive"]  # the service is the DTLS server
        assert created["etag"] and created["accept_patch"] == "application/trickle-ice-sdpfrag"
        patched = await publisher.next_event("patched")
        assert patched["status"] == 204, patched
        await publisher.next_event("connected")
        whep = next(link for link in created["links"] if "urn:ietf:params:whep" in link)
        saved = tmp_path / "frames"
        viewer = Script(
            "watch", whep.split(">")[0].lstrip("<"), "--codec", codec,
            "--frames", str(FRAMES), "--save", str(saved), "--seconds", str(RUN_S),
        )  # fmt: skip
        await viewer.start()
        await viewer.next_event("connected")
        done = await viewer.next_event("done")
        assert await viewer.finish() == 0, viewer.log()
        assert done["frames"] >= FRAMES
        frames = [read_ppm(path) for path in sorted(saved.glob("frame-*.ppm"))]
        assert len(frames) == FRAMES
        for image in frames[-10:]:  # past the first keyframes
            assert image.shape == reference.shape
            # Restyled, not passed through: far from the pattern sent (two codec passes
            # through a `noop` session move it by about 6 levels, cartoon by over 30), edges
            # inked (a `noop` session keeps the pattern's 3 % of dark pixels, cartoon has
            # 15 %), colours snapped to cartoon's bands (48 % near one through `noop`, 62 %).
            assert np.abs(image.astype(int) - reference).mean() > 15
            assert dark_share(image) > dark_share(reference) + 0.06, dark_share(image)
            assert palette_share(image) > palette_share(reference) + 0.08, palette_share(image)
    finally:
        if viewer is not None:
            await viewer.stop()
        await publisher.stop()
    # Ctrl-C made the publisher leave with DELETE: its peer connection is gone.
    assert any(e["event"] == "done" for e in publisher.events), publisher.log()
    assert client.app[SESSIONS].peers.count(created["session"], "whip") == 0
