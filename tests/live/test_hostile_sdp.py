"""Issue 18, finding 13: a malformed SDP offer at a WHIP or WHEP URL is a 400 naming what is wrong,
before any peer connection is made for it (it was a 500, or a 201 that failed in a background
task), and the endpoint goes on answering good offers."""

from __future__ import annotations

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from live.keys import SESSIONS
from live.sdp_offer import MAX_MEDIA_SECTIONS
from tests.live.streams import start_session

SDP = {"Content-Type": "application/sdp"}


async def make_offer(direction: str) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("video", direction=direction)
        pc.addTransceiver("audio", direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


def first_line(offer: str, prefix: str) -> str:
    return next(line for line in offer.splitlines() if line.startswith(prefix))


def without(offer: str, prefix: str) -> str:
    return "\r\n".join(line for line in offer.splitlines() if not line.startswith(prefix)) + "\r\n"


BROKEN = {
    "m-without-fields": (lambda o: o.replace(first_line(o, "m=audio"), "m="), "line"),
    "bad-candidate": (lambda o: o.replace(first_line(o, "a=candidate:"), "a=candidate:x"), "ICE"),
    "holdconn": (lambda o: o.replace("a=setup:actpass", "a=setup:holdconn"), "holdconn"),
    "no-fingerprint": (lambda o: without(o, "a=fingerprint:"), "fingerprint"),
    "no-ice-credentials": (lambda o: without(o, "a=ice-"), "ice-ufrag"),
    "bad-connection": (lambda o: o.replace(first_line(o, "c="), "c=IN"), "IN IP4"),
    "bad-payload-type": (
        lambda o: o.replace(first_line(o, "m=audio"), "m=audio 9 UDP/TLS/RTP/SAVPF 999"),
        "payload type",
    ),
    "too-many-sections": (
        lambda o: o + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n" * MAX_MEDIA_SECTIONS,
        f"at most {MAX_MEDIA_SECTIONS}",
    ),
}


@pytest.mark.parametrize("kind", ["whep", "whip"])
async def test_malformed_offers_are_400_before_any_peer(service, kind) -> None:
    client = await service(ice_host_addresses="127.0.0.1")
    info = await start_session(client, model_id="noop")
    url = "/" + info[f"{kind}_url"].split("/", 3)[3]
    peers = client.app[SESSIONS].peers
    good = await make_offer("recvonly" if kind == "whep" else "sendonly")
    for name, (spoil, words) in BROKEN.items():
        response = await client.post(url, data=spoil(good), headers=SDP)
        assert response.status == 400, (name, await response.text())
        msg = (await response.json())["detail"]["msg"]
        assert "SDP offer" in msg and words in msg, (name, msg)
        assert not peers.peers, name  # refused before a peer connection was made
    response = await client.post(url, data=good, headers=SDP)
    assert response.status == 201, await response.text()
    assert (await client.delete(response.headers["Location"])).status == 200
    await client.delete(f"/live-video-to-video/{info['session_id']}")
