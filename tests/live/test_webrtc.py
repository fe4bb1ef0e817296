"""WHIP in and WHEP out with real aiortc peers on 127.0.0.1, through real sessions."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator
from fractions import Fraction

import aiohttp
import av
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from multidict import CIMultiDict

from live.keys import SESSIONS
from protocol.clips import make_clip, numbered_frame, read_index
from protocol.trickle import TrickleSubscriber
from tests.live.streams import WAIT_S, Viewer, publish_clip, start_session
from tests.waiting import wait_until

SIZE = 192


class NumberedTrack(VideoStreamTrack):
    """A camera at 30 fps whose frames carry their index in pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(numbered_frame(self.sent, SIZE, SIZE), format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame


def peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def negotiate(pc: RTCPeerConnection, url: str, headers: dict | None = None):
    await pc.setLocalDescription(await pc.createOffer())
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", **(headers or {})},
        ) as response:
            body = await response.text()
            assert response.status == 201, body
            location = response.headers["Location"]
            links = response.headers.getall("Link", [])
    await pc.setRemoteDescription(RTCSessionDescription(body, "answer"))
    return location, links


async def post_sdp(url: str, sdp: str) -> tuple[int, str, CIMultiDict[str]]:
    """POST an SDP offer as it is; the status, body and headers (any case, as HTTP's are)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url, data=sdp, headers={"Content-Type": "application/sdp"}
        ) as response:
            return response.status, await response.text(), response.headers.copy()


async def offer_only(pc: RTCPeerConnection, url: str) -> tuple[int, str, CIMultiDict[str]]:
    """POST `pc`'s offer; the status, body and headers, without completing the connection."""
    await pc.setLocalDescription(await pc.createOffer())
    return await post_sdp(url, pc.localDescription.sdp)


class Watcher:
    """A WHEP viewer: keeps the painted index of every frame it receives."""

    def __init__(self, codec: str | None = None) -> None:
        self.pc = peer()
        video = self.pc.addTransceiver("video", direction="recvonly")
        if codec is not None:
            video.setCodecPreferences(
                [c for c in RTCRtpReceiver.getCapabilities("video").codecs if c.mimeType == codec]
            )
        self.indices: list[int | None] = []
        self.changed = asyncio.Condition()
        self.tasks: list[asyncio.Task[None]] = []
        self.pc.on("track", lambda track: self.tasks.append(asyncio.create_task(self._read(track))))
        self.connected = asyncio.Event()

        @self.pc.on("connectionstatechange")
        def changed() -> None:
            if self.pc.connectionState == "connected":
                self.connected.set()

    async def _read(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                self.indices.append(read_index(frame.to_ndarray(format="rgb24")))
                async with self.changed:
                    self.changed.notify_all()

    async def wait_frames(self, count: int) -> None:
        async with asyncio.timeout(WAIT_S), self.changed:
            await self.changed.wait_for(lambda: len(self.indices) >= count)

    async def close(self) -> None:
        await self.pc.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def rtc_service(service):
    async def start(**overrides):
        return await service(ice_host_addresses="127.0.0.1", **overrides)

    return start


def absolute(client, path: str) -> str:
    return str(client.make_url(path))


async def test_whip_in_whep_out_through_a_session(rtc_service) -> None:
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    publisher = peer()
    camera = NumberedTrack()
    publisher.addTrack(camera)
    location, links = await negotiate(publisher, info["whip_url"])
    assert location.startswith("/webrtc/")
    assert not any("whep" in link for link in links)  # a publish URL does not reveal the output
    # Three viewers at once: two share one VP8 encoder, one gets H.264 from another.
    watchers = [Watcher("video/VP8"), Watcher("video/VP8"), Watcher("video/H264")]
    try:
        for watcher in watchers:
            await negotiate(watcher.pc, info["whep_url"])
        for watcher in watchers:
            await watcher.wait_frames(30)
        encoders = {
            name: sink.sent
            for name, sink in client.app[SESSIONS].get(info["session_id"]).stats.sinks.items()
            if name in ("whep-vp8", "whep-h264")
        }
        assert set(encoders) == {"whep-vp8", "whep-h264"} and min(encoders.values()) >= 30
        for watcher in watchers:
            seen = [i for i in watcher.indices if i is not None]
            assert len(seen) >= 25 and seen == sorted(seen)
            assert seen[-1] - seen[0] >= 20  # it follows the live stream
        # A session fed by WHIP is also read over trickle.
        viewer = Viewer(info["subscribe_url"])
        reading = asyncio.create_task(viewer.run())
        await viewer.wait_frames(10)
        assert [i for i in viewer.indices if i is not None]
        # The publisher leaves with DELETE: its peer connection is freed.
        async with aiohttp.ClientSession() as http:
            async with http.delete(absolute(client, location)) as response:
                assert response.status == 200
            async with http.delete(absolute(client, location)) as response:
                assert response.status == 404
        assert client.app[SESSIONS].peers.count(info["session_id"], "whip") == 0
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(reading, WAIT_S)
    finally:
        for watcher in watchers:
            await watcher.close()
        await publisher.close()


async def test_a_trickle_fed_session_is_watched_over_whep(rtc_service) -> None:
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    watcher = Watcher()
    try:
        await negotiate(watcher.pc, info["whep_url"])
        publishing = asyncio.create_task(
            publish_clip(info["publish_url"], make_clip(150, width=SIZE, height=SIZE))
        )
        await watcher.wait_frames(30)
        seen = [i for i in watcher.indices if i is not None]
        assert seen == sorted(seen) and len(seen) >= 25
        # WHIP into it now is refused: it is fed over trickle.
        publisher = peer()
        publisher.addTrack(NumberedTrack())
        status, _, _ = await offer_only(publisher, info["whip_url"])
        assert status == 409
        await publisher.close()
        await asyncio.wait_for(publishing, WAIT_S)
    finally:
        await watcher.close()


async def test_whep_viewers_beyond_the_cap_get_429(rtc_service) -> None:
    client = await rtc_service(max_viewers=1)
    info = await start_session(client, model_id="noop")
    first, second = Watcher(), Watcher()
    try:
        await negotiate(first.pc, info["whep_url"])
        # Closed only once connected: aioice leaves its consent checks running on a
        # connection closed while it was still connecting.
        await asyncio.wait_for(first.connected.wait(), WAIT_S)
        status, _, headers = await offer_only(second.pc, info["whep_url"])
        assert status == 429 and headers["Retry-After"]
    finally:
        await first.close()
        await second.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_whip_errors_are_clear_4xx(rtc_service) -> None:
    client = await rtc_service(auth_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    offer = "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
    sdp = {"Content-Type": "application/sdp"}
    response = await client.post("/whip/" + "0" * 32, data=offer, headers=sdp)
    assert response.status == 404
    response = await client.post("/live-video-to-video/nope/whip", data=offer, headers=sdp)
    assert response.status == 401  # the API route takes the token
    response = await client.post(
        "/live-video-to-video/nope/whip", data=offer, headers={**sdp, **auth}
    )
    assert response.status == 404
    response = await client.post("/live-video-to-video", json={"model_id": "noop"}, headers=auth)
    info = await response.json()
    whip = "/whip/" + info["whip_url"].rsplit("/", 1)[1]
    response = await client.post(whip, data=b"{}", headers={"Content-Type": "application/json"})
    assert response.status == 415
    response = await client.post(whip, data=b"hello", headers=sdp)
    assert response.status == 400
    response = await client.options(whip)
    assert response.status == 204 and response.headers["Accept-Post"] == "application/sdp"
    await client.delete(f"/live-video-to-video/{info['session_id']}", headers=auth)


async def test_one_url_whip_starts_a_session(rtc_service) -> None:
    client = await rtc_service(auth_token="s3cret")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    try:
        url = absolute(client, "/live-video-to-video/whip?model_id=noop")
        location, links = await negotiate(publisher, url, {"Authorization": "Bearer s3cret"})
        sessions = client.app[SESSIONS].sessions
        assert len(sessions) == 1
        session = next(iter(sessions.values()))
        watcher = Watcher()
        whep = next(link for link in links if "whep" in link).split(">")[0].lstrip("<")
        await negotiate(watcher.pc, whep)
        await watcher.wait_frames(20)
        await watcher.close()
        await client.delete(
            f"/live-video-to-video/{session.id}", headers={"Authorization": "Bearer s3cret"}
        )
    finally:
        await publisher.close()


async def test_a_vanished_publisher_frees_its_peer(rtc_service) -> None:
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    location, _ = await negotiate(publisher, info["whip_url"])
    peers = client.app[SESSIONS].peers
    server_peer = peers.peers[location.rsplit("/", 1)[1]]
    viewer = Viewer(info["subscribe_url"])
    reading = asyncio.create_task(viewer.run())
    await viewer.wait_frames(5)
    await publisher.close()  # no DELETE: the client is simply gone
    await asyncio.wait_for(server_peer.closed.wait(), WAIT_S)
    assert peers.count(info["session_id"], "whip") == 0
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await asyncio.wait_for(reading, WAIT_S)


def test_rtp_clock_unwraps_and_continues_across_publishers() -> None:
    from live.webrtc import RTP_WRAP, _RtpClock

    clock = _RtpClock()
    start = RTP_WRAP - 3000
    first = [clock.map((start + i * 3000) % RTP_WRAP) for i in range(3)]
    assert first == [0, 3000, 6000]  # across the 32-bit wrap
    clock.new_publisher()
    again = [clock.map(12345 + i * 3000) for i in range(2)]
    assert again[0] > first[-1] and again[1] - again[0] == 3000


class ToneTrack(MediaStreamTrack):
    """A microphone: 20 ms of a 440 Hz tone at 48 kHz per frame, at its real pace."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.samples = 0
        self.start: float | None = None

    async def recv(self) -> av.AudioFrame:
        loop = asyncio.get_running_loop()
        if self.start is None:
            self.start = loop.time()
        due = self.start + self.samples / 48_000
        await asyncio.sleep(max(0.0, due - loop.time()))  # a microphone's pace
        t = (np.arange(self.samples, self.samples + 960) / 48_000).astype(np.float32)
        wave = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(
            np.repeat(wave, 2)[None, :], format="s16", layout="stereo"
        )
        frame.sample_rate = 48_000
        frame.pts = self.samples
        frame.time_base = Fraction(1, 48_000)
        self.samples += 960
        return frame


async def test_whip_audio_comes_out_as_opus_over_trickle_and_whep(rtc_service) -> None:
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    publisher.addTrack(ToneTrack())
    listener = Watcher()
    listener.pc.addTransceiver("audio", direction="recvonly")
    heard: list[int] = []
    got_sound = asyncio.Event()

    async def listen(track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                heard.append(frame.samples)
                if sum(heard) >= 48_000 // 2:
                    got_sound.set()

    listener.pc.on(
        "track",
        lambda track: (
            listener.tasks.append(asyncio.create_task(listen(track)))
            if track.kind == "audio"
            else None
        ),
    )
    viewer = Viewer(info["subscribe_url"])
    reading = asyncio.create_task(viewer.run())
    try:
        await negotiate(publisher, info["whip_url"])
        await negotiate(listener.pc, info["whep_url"])
        await viewer.wait_frames(45)
        await asyncio.wait_for(got_sound.wait(), WAIT_S)  # half a second of sound over WHEP
        opus = [p for p in viewer.audio if p.codec == "opus"]
        assert len(opus) >= 25  # half a second of 20 ms packets over trickle
        pts = [p.pts for p in opus]
        assert pts == sorted(pts)
        video = [f.pts for f in viewer.frames]
        assert abs(pts[-1] - video[-1]) < 90_000 // 2  # on the video's timeline
    finally:
        await listener.close()
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(reading, WAIT_S)


def _rtp(seq: int, timestamp: int, marker: int, data: bytes):
    from aiortc.rtp import RtpPacket

    packet = RtpPacket(sequence_number=seq, timestamp=timestamp, marker=marker)
    packet._data = data  # what the receiver's depayloader leaves on each packet
    return packet


def _jitter_buffer(receiver: RTCRtpReceiver):
    return receiver._RTCRtpReceiver__jitter_buffer  # aiortc's own, made with the receiver


def test_received_frames_complete_on_their_marker_bit() -> None:
    from live.rtc_receive import end_frames_on_marker

    receiver = peer().addTransceiver("video", direction="recvonly").receiver
    assert end_frames_on_marker(receiver) is not None
    buffer = _jitter_buffer(receiver)
    assert buffer.add(_rtp(1, 3000, 0, b"ab"))[1] is None
    done = buffer.add(_rtp(2, 3000, 1, b"cd"))[1]  # the last packet: out at once
    assert done is not None and done.data == b"abcd" and done.timestamp == 3000
    assert done.first_at <= done.last_at  # when its first and last packets came
    # A frame whose marker packet was lost still comes out when the next one starts.
    assert buffer.add(_rtp(3, 6000, 0, b"ef"))[1] is None
    late = buffer.add(_rtp(5, 9000, 0, b"gh"))[1]
    assert late is None  # a gap (4 missing): nothing complete yet
    filled = buffer.add(_rtp(4, 6000, 0, b"ij"))[1]
    assert filled is not None and filled.data == b"efij" and filled.timestamp == 6000


async def test_only_the_services_receivers_end_frames_on_the_marker_bit(rtc_service) -> None:
    """The service's WHIP receiver hands a frame on at its marker bit (it reports when each
    frame's packets came: the `receive` stage); another peer connection in the same process,
    made after the service started, keeps aiortc's own rule (a frame ends when the next one
    starts), as an application embedding the service would expect."""
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    watcher = Watcher("video/VP8")
    try:
        await negotiate(publisher, info["whip_url"])
        await negotiate(watcher.pc, info["whep_url"])
        await watcher.wait_frames(10)
        status = await (await client.get(f"/live-video-to-video/{info['session_id']}")).json()
        stages = status["stages"]
        assert stages["receive"]["frames"] >= 10 and stages["decode"]["frames"] >= 10
        assert stages["whep_delay"]["frames"] >= 5  # the service's share of the round trip
        plain = peer()
        try:
            buffer = _jitter_buffer(plain.addTransceiver("video").receiver)
            assert buffer.add(_rtp(1, 3000, 0, b"ab"))[1] is None
            assert buffer.add(_rtp(2, 3000, 1, b"cd"))[1] is None  # aiortc waits...
            done = buffer.add(_rtp(3, 6000, 0, b"ef"))[1]  # ...for the next frame
            assert done is not None and done.data == b"abcd"
        finally:
            await plain.close()
    finally:
        await watcher.close()
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_ice_binds_within_the_configured_udp_ports(rtc_service) -> None:
    client = await rtc_service(webrtc_udp_ports="41000-41019")
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    try:
        status, answer, _ = await offer_only(publisher, info["whip_url"])
        assert status == 201
        ports = [
            int(line.split()[5])
            for line in answer.splitlines()
            if line.startswith("a=candidate:") and " typ host" in line
        ]
        assert ports and all(41000 <= port <= 41019 for port in ports), ports
    finally:
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")


def test_a_bad_udp_port_range_is_refused() -> None:
    from live.app import create_app
    from live.settings import Settings

    with pytest.raises(ValueError, match="webrtc-udp-ports"):
        create_app(Settings(webrtc_udp_ports="9000-8000"))


@contextlib.asynccontextmanager
async def camera_session(client) -> AsyncIterator[tuple[dict, RTCPeerConnection, Viewer]]:
    """A noop session, a publisher peer with a numbered camera (the test connects it) and a
    trickle viewer reading the output; on exit the publisher closes, the session is stopped
    and the viewer reads to the end."""
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    viewer = Viewer(info["subscribe_url"])
    reading = asyncio.create_task(viewer.run())
    try:
        yield info, publisher, viewer
    finally:
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(reading, WAIT_S)


def setup_of(sdp: str) -> set[str]:
    return {line.split(":", 1)[1] for line in sdp.splitlines() if line.startswith("a=setup:")}


@pytest.mark.parametrize(("offered", "answered"), [("actpass", "passive"), ("passive", "active")])
async def test_the_service_is_the_dtls_server_unless_the_client_insists(
    rtc_service, offered: str, answered: str
) -> None:
    # A client that leaves the role open (browsers, GStreamer, OBS) gets `passive`: the
    # service is the DTLS server. One that must be the server itself is answered `active`.
    client = await rtc_service()
    async with camera_session(client) as (info, publisher, viewer):
        await publisher.setLocalDescription(await publisher.createOffer())
        offer = publisher.localDescription.sdp.replace("a=setup:actpass", f"a=setup:{offered}")
        status, answer, _ = await post_sdp(info["whip_url"], offer)
        assert status == 201, answer
        assert setup_of(answer) == {answered}
        await publisher.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await viewer.wait_frames(10)  # DTLS completed with those roles: media flows


TRICKLE = "application/trickle-ice-sdpfrag"


def without_candidates(sdp: str) -> str:
    return "".join(
        line + "\r\n"
        for line in sdp.splitlines()
        if not line.startswith(("a=candidate:", "a=end-of-candidates"))
    )


def trickle_fragment(offer: str) -> str:
    """RFC 8840's fragment for the candidates of `offer`'s first m-section (max-bundle)."""
    lines = offer.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("m="))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("m=")), len(lines))
    section = lines[start:end]
    keep = [line for line in section if line.startswith(("a=ice-ufrag:", "a=ice-pwd:", "a=mid:"))]
    candidates = [line for line in section if line.startswith("a=candidate:")]
    return "\r\n".join([section[0], *keep, *candidates, "a=end-of-candidates", ""])


async def patch(url: str, body: str, headers: dict[str, str]) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as http:
        async with http.patch(url, data=body, headers=headers) as response:
            return response.status, await response.text(), dict(response.headers)


async def test_a_whip_publisher_connects_through_trickled_candidates(rtc_service) -> None:
    client = await rtc_service()
    async with camera_session(client) as (info, publisher, viewer):
        await publisher.setLocalDescription(await publisher.createOffer())
        offer = publisher.localDescription.sdp
        # The offer goes before any candidate.
        status, answer, headers = await post_sdp(info["whip_url"], without_candidates(offer))
        assert status == 201, answer
        etag = headers["ETag"]
        assert headers["Accept-Patch"] == TRICKLE
        resource = absolute(client, headers["Location"])
        # Without the service's candidates the publisher cannot start checks itself: the
        # connection comes up only if the service checks the candidates trickled to it.
        await publisher.setRemoteDescription(
            RTCSessionDescription(without_candidates(answer), "answer")
        )
        status, body, headers = await patch(
            resource, trickle_fragment(offer), {"Content-Type": TRICKLE, "If-Match": etag}
        )
        assert status == 204 and body == "" and "ETag" not in headers
        await viewer.wait_frames(10)
        server_peer = client.app[SESSIONS].peers.peers[resource.rsplit("/", 1)[1]]
        assert server_peer.trickled >= 1


async def test_patch_refusals_follow_rfc_9725(rtc_service) -> None:
    client = await rtc_service(webrtc_max_candidates=2)
    info = await start_session(client, model_id="noop")
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    watcher = Watcher()
    try:
        await negotiate(publisher, info["whip_url"])
        await watcher.pc.setLocalDescription(await watcher.pc.createOffer())
        offer = watcher.pc.localDescription.sdp
        status, answer, headers = await post_sdp(info["whep_url"], offer)
        assert status == 201, answer
        etag = headers["ETag"]
        assert etag.startswith('"') and headers["Accept-Patch"] == TRICKLE
        resource = absolute(client, headers["Location"])
        await watcher.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        await watcher.wait_frames(5)
        fragment = trickle_fragment(offer)
        frag = {"Content-Type": TRICKLE}

        async def refused(status: int, body: str, headers: dict[str, str], words: str) -> None:
            got, text, _ = await patch(resource, body, headers)
            assert got == status, text
            detail = json.loads(text)["detail"]
            assert words in (detail[0] if status == 422 else detail)["msg"]

        await refused(428, fragment, frag, "If-Match")
        await refused(412, fragment, {**frag, "If-Match": '"not-this-one"'}, "ETag")
        await refused(412, fragment, {**frag, "If-Match": f"W/{etag}"}, "ETag")
        await refused(415, fragment, {"Content-Type": "application/sdp", "If-Match": etag}, TRICKLE)
        ok = {**frag, "If-Match": etag}
        await refused(400, "hello", ok, "line 1")
        await refused(400, "a=candidate:1 1 udp x 127.0.0.1 9 typ host\r\n", ok, "candidate")
        await refused(400, "a=ice-options:trickle\r\n", ok, "no ICE candidate")
        await refused(400, "a=x:" + "y" * 70_000, ok, "bytes")
        many = "".join(
            f"a=candidate:{n} 1 udp 2122260223 127.0.0.1 {40000 + n} typ host\r\n" for n in range(3)
        )
        await refused(400, many, ok, "--webrtc-max-candidates")
        # An ICE restart (new credentials, If-Match: *) is refused; the connection goes on.
        restart = "\r\n".join(
            [
                "a=ice-ufrag:newU",
                "a=ice-pwd:" + "p" * 24,
                "m=video 9 UDP/TLS/RTP/SAVPF 96",
                "a=mid:0",
                "",
            ]
        )
        await refused(422, restart, {**frag, "If-Match": "*"}, "ICE restarts are not supported")
        before = len(watcher.indices)
        await watcher.wait_frames(before + 10)
        # Candidates it already has, trickled again, are taken (and counted against the bound).
        status, _, _ = await patch(resource, fragment, ok)
        assert status == 204
        status, _, _ = await patch(resource + "0", fragment, ok)
        assert status == 404
        async with aiohttp.ClientSession() as http:
            async with http.options(resource) as response:
                assert response.status == 204
                assert response.headers["Accept-Patch"] == TRICKLE
                assert "PATCH" in response.headers["Allow"]
    finally:
        await watcher.close()
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")


def test_a_trickle_fragment_is_read_per_m_section() -> None:
    from live.sdpfrag import parse_fragment

    fragment = parse_fragment(
        "a=ice-ufrag:EsAw\r\na=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
        "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 ufrag EsAw\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\n"
        "a=candidate:2 1 udp 1686052607 198.51.100.2 61765 typ srflx raddr 192.0.2.1 rport 9\r\n"
        "a=end-of-candidates\r\n"
    )
    assert (fragment.ufrag, fragment.pwd) == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1")
    assert [(c.mid, c.mline_index) for c in fragment.candidates] == [("0", 0), ("1", 1)]
    assert fragment.candidates[1].line.endswith("rport 9") and fragment.end_of_candidates
    # Without m= lines the candidates belong to the first m-section (the bundle's).
    bare = parse_fragment("a=candidate:1 1 udp 1 127.0.0.1 9 typ host\n")
    assert [(c.mid, c.mline_index) for c in bare.candidates] == [(None, 0)]
    with pytest.raises(ValueError, match=r"line 1 .* not an ICE candidate"):
        parse_fragment("a=candidate:1 1 udp 1 127.0.0.1 9 typ srflx raddr 1.2.3.4 rport x\n")


def first_frames(segment: bytes) -> tuple[bool, int, list[int | None]]:
    """Of one MPEG-TS segment: whether its first video packet is a keyframe, how many video
    packets it has, and the index painted in each frame a fresh decoder gets from it."""
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        packets = [p for p in container.demux(video=0) if p.size]
        decoder = av.CodecContext.create("h264", "r")
        frames = [f for p in [*packets, None] for f in decoder.decode(p)]
    indices = [read_index(f.to_ndarray(format="rgb24")) for f in frames]
    return bool(packets) and packets[0].is_keyframe, len(packets), indices


async def test_the_trickle_output_is_encoded_only_while_someone_reads_it(rtc_service) -> None:
    client = await rtc_service()
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].get(info["session_id"])
    channel = client.app[SESSIONS].trickle.get(info["subscribe_url"].rsplit("/", 1)[1])
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    watcher = Watcher("video/VP8")
    try:
        await negotiate(publisher, info["whip_url"])
        await negotiate(watcher.pc, info["whep_url"])
        await watcher.wait_frames(45)
        # Watched over WHEP only: no H.264 is encoded for the trickle output, and the frames
        # the viewer was sent are the session's output.
        response = await client.get(f"/live-video-to-video/{info['session_id']}")
        status = await response.json()
        sinks = {sink["name"]: sink for sink in status["sinks"]}
        assert sinks["trickle"]["sent"] == 0 and "encode" not in status["stages"]
        assert status["frames_out"] >= 30
        # A reader joining at the live edge gets segments that start at a keyframe with the
        # frames of now, not of the start, each one decodable.
        async with TrickleSubscriber(info["subscribe_url"]) as subscriber:
            segment = await subscriber.next()
            assert segment is not None
            keyframe, packets, indices = first_frames(await segment.read())
        assert keyframe and len(indices) == packets >= 10
        assert None not in indices and indices[0] >= 30 and indices == sorted(indices)
        assert session.stats.sinks["trickle"].sent >= packets
        # Its reader gone, the output pauses; a reader joining later waits for the next
        # segment (a keyframe, the frames of then) instead of getting the last one written.
        await wait_until(lambda: channel.paused, "the output to pause once nobody reads it")
        next_seq = channel.next_write
        async with TrickleSubscriber(info["subscribe_url"]) as subscriber:
            segment = await subscriber.next()
            assert segment is not None and segment.seq == next_seq
            keyframe, packets, later = first_frames(await segment.read())
        assert keyframe and len(later) == packets >= 10 and None not in later
        assert later[0] > indices[-1]
    finally:
        await watcher.close()
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
