"""WebRTC under hostile clients: viewer cap under concurrency, a used-up UDP port range,
negotiations abandoned half-way, and what a WHIP capability reveals (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from live.keys import SESSIONS
from tests.live.streams import start_session
from tests.live.test_webrtc import NumberedTrack, Watcher, negotiate, peer
from tests.waiting import WAIT_S, wait_until

SDP = {"Content-Type": "application/sdp"}


@pytest.fixture
async def rtc_service(aiohttp_client):
    """The service as `live-v2v serve` runs it: a request whose client left is cancelled."""
    from live.app import create_app
    from live.settings import Settings
    from tests.live.conftest import PIPELINES

    async def start(prepare=lambda app: None, **overrides):  # type: ignore[no-untyped-def]
        settings = Settings(
            **{"status_interval_s": 0.5, "ice_host_addresses": "127.0.0.1", **overrides}
        )
        app = create_app(settings, PIPELINES)
        prepare(app)
        return await aiohttp_client(app, server_kwargs={"handler_cancellation": True})

    return start


async def an_offer() -> tuple[str, Watcher]:
    """A real viewer's offer (recvonly video); the watcher is kept so its sockets stay put."""
    watcher = Watcher()
    await watcher.pc.setLocalDescription(await watcher.pc.createOffer())
    return watcher.pc.localDescription.sdp, watcher


async def post(url: str, offer: str) -> Answer:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=offer, headers=SDP) as response:
            return response.status, await response.text(), response.headers.copy()


def request_head(path: str, length: int) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/sdp\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


Answer = tuple[int, str, CIMultiDict[str]]


async def read_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Answer:
    """Status, body and headers of the answer on a raw connection; then it is closed."""
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode().strip().split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        body = await reader.readexactly(int(headers["Content-Length"]))
    writer.close()
    return int(status_line.split()[1]), body.decode(), headers


def udp_sockets() -> int:
    """UDP sockets this process holds: its socket descriptors whose inode is in the kernel's
    UDP tables (those list every socket of the network namespace, not just ours)."""
    inodes: set[str] = set()
    for table in ("/proc/self/net/udp", "/proc/self/net/udp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as lines:
            inodes.update(line.split()[9] for line in list(lines)[1:])
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            held += target.startswith("socket:[") and target[8:-1] in inodes
    return held


def count_posts(app: web.Application, prefix: str, entered: list[int]) -> None:
    """Counts in `entered[0]` the POSTs under `prefix` whose handler has begun (an observer)."""

    @web.middleware
    async def observe(request: web.Request, handler):  # type: ignore[no-untyped-def]
        if request.method == "POST" and request.path.startswith(prefix):
            entered[0] += 1
        return await handler(request)

    app.middlewares.append(observe)


async def offers_together(url: URL, offer: str, count: int, entered: list[int]) -> list[Answer]:
    """`count` clients whose offers are on the way together: each offer follows its headers
    once all the requests are in their handlers."""

    async def send_headers() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(request_head(url.path, len(offer.encode())))
        await writer.drain()
        return reader, writer

    connections = await asyncio.gather(*(send_headers() for _ in range(count)))
    await wait_until(lambda: entered[0] == count, f"{count} offers in flight")
    for _, writer in connections:
        writer.write(offer.encode())
    return await asyncio.gather(*(read_response(r, w) for r, w in connections))


async def test_the_viewer_cap_holds_for_offers_sent_together(rtc_service) -> None:
    offer, watcher = await an_offer()
    entered = [0]
    client = await rtc_service(
        max_viewers=4, prepare=lambda app: count_posts(app, "/whep/", entered)
    )
    info = await start_session(client, model_id="noop")
    peers = client.app[SESSIONS].peers
    before = udp_sockets()
    try:
        results = await offers_together(URL(info["whep_url"]), offer, 40, entered)
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [201] * 4 + [429] * 36, statuses
        for status, text, headers in results:
            if status == 429:
                assert headers["Retry-After"]
                assert "maximum of 4 WHEP viewers" in json.loads(text)["detail"]["msg"]
        assert len([p for p in peers.peers.values() if p.kind == "whep"]) == 4
        # Sockets held for the 4 viewers only (one per ICE transport each, at most a pair).
        assert udp_sockets() - before <= 4 * 2
    finally:
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await watcher.close()
    assert not peers.peers


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def candidates(answer: str) -> list[str]:
    return [line for line in answer.splitlines() if line.startswith("a=candidate:")]


async def test_a_used_up_udp_port_range_is_refused_with_503(rtc_service, caplog) -> None:
    # The offer is made before the service starts: client and service share this event loop,
    # and the service's port range applies to every ICE socket the loop opens from then on.
    offer, watcher = await an_offer()
    port = free_udp_port()
    client = await rtc_service(webrtc_udp_ports=f"{port}-{port}")
    info = await start_session(client, model_id="noop")
    peers = client.app[SESSIONS].peers
    try:
        status, answer, _ = await post(info["whep_url"], offer)
        assert status == 201 and candidates(answer), answer  # the one port is taken now
        caplog.clear()
        for _ in range(2):
            status, body, headers = await post(info["whep_url"], offer)
            assert status == 503, body
            assert headers["Retry-After"]
            msg = json.loads(body)["detail"]["msg"]
            assert f"{port}-{port}" in msg and "--webrtc-udp-ports" in msg and "used up" in msg
        assert peers.count(info["session_id"], "whep") == 1  # the refused peers are gone
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "UDP" in r.msg]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # logged once, not per try
        # A publisher is refused the same way (its own session, the same range).
        publisher = peer()
        publisher.addTrack(NumberedTrack())
        try:
            await publisher.setLocalDescription(await publisher.createOffer())
            status, body, _ = await post(info["whip_url"], publisher.localDescription.sdp)
            assert status == 503 and "--webrtc-udp-ports" in body
        finally:
            await publisher.close()
        # The service goes on: a viewer leaves, and the port serves the next one.
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        other = await start_session(client, model_id="noop")
        status, answer, _ = await post(other["whep_url"], offer)
        assert status == 201 and candidates(answer) and f" {port} typ host" in answer
        await client.delete(f"/live-video-to-video/{other['session_id']}")
    finally:
        await watcher.close()


async def test_an_abandoned_negotiation_gives_its_viewer_slot_back(rtc_service) -> None:
    # Short, yet long enough that the 429 below comes first even on a loaded machine.
    client = await rtc_service(max_viewers=1, webrtc_connect_timeout_s=2)
    info = await start_session(client, model_id="noop")
    peers = client.app[SESSIONS].peers
    whep = info["whep_url"]
    offer, spare = await an_offer()

    def free() -> bool:
        return peers.count(info["session_id"], "whep") == 0

    try:
        # A viewer that takes the answer and never does ICE: closed when the setting says.
        quitter = Watcher()
        await quitter.pc.setLocalDescription(await quitter.pc.createOffer())
        status, _, _ = await post(whep, quitter.pc.localDescription.sdp)
        assert status == 201
        await quitter.close()
        status, _, _ = await post(whep, offer)
        assert status == 429  # its slot is still held while it may yet connect
        await wait_until(free, "the unconnected viewer's slot to come back")

        # A client that leaves in the middle of sending its offer.
        host, port = client.server.host, client.server.port
        path = "/whep/" + whep.rsplit("/", 1)[1]
        reader, writer = await asyncio.open_connection(host, port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/sdp\r\n"
            f"Content-Length: {len(offer.encode())}\r\n\r\n"
        )
        writer.write(head.encode() + offer[: len(offer) // 2].encode())
        await writer.drain()
        await wait_until(lambda: not free(), "the half-sent offer to hold a slot")
        writer.close()
        await writer.wait_closed()
        await wait_until(free, "the half-sent offer's slot to come back")

        # A client that sends its whole offer and leaves before the answer.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head.encode() + offer.encode())
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        await wait_until(free, "the departed client's slot to come back")

        # The slot serves a real viewer, who gets frames.
        watcher = Watcher()
        try:
            await negotiate(watcher.pc, whep)
            await asyncio.wait_for(watcher.connected.wait(), 10)
        finally:
            await watcher.close()
    finally:
        await spare.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
    assert not peers.peers


async def test_a_whip_capability_does_not_reveal_the_output(rtc_service) -> None:
    client = await rtc_service(auth_token="s3cret")
    auth = {"Authorization": "Bearer s3cret"}
    response = await client.post("/live-video-to-video", json={"model_id": "noop"}, headers=auth)
    info = await response.json()
    output = info["subscribe_url"].rsplit("/", 1)[1]
    assert info["whep_url"].endswith("/whep/" + output)
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    try:
        await publisher.setLocalDescription(await publisher.createOffer())
        status, answer, headers = await post(info["whip_url"], publisher.localDescription.sdp)
        assert status == 201, answer
        # Nothing in the answer names the output channel or any WHEP URL.
        assert output not in answer and all(output not in v for v in headers.values())
        assert not [link for link in headers.getall("Link", []) if "whep" in link]
        # The token holder's WHIP (its own session) still gets the session's WHEP URL.
        publisher2 = peer()
        publisher2.addTrack(NumberedTrack())
        try:
            url = str(client.make_url(f"/live-video-to-video/{info['session_id']}/whip"))
            _, links = await negotiate(publisher2, url, auth)
            assert any(info["whep_url"] in link for link in links)
        finally:
            await publisher2.close()
    finally:
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}", headers=auth)


async def test_publishers_sent_together_leave_one(rtc_service) -> None:
    publisher = peer()
    publisher.addTrack(NumberedTrack())
    await publisher.setLocalDescription(await publisher.createOffer())
    entered = [0]
    client = await rtc_service(prepare=lambda app: count_posts(app, "/whip/", entered))
    info = await start_session(client, model_id="noop")
    peers = client.app[SESSIONS].peers
    try:
        results = await offers_together(
            URL(info["whip_url"]), publisher.localDescription.sdp, 8, entered
        )
        assert [status for status, _, _ in results] == [201] * 8
        # A new publisher replaces the one before: of eight answered together, one stays.
        await wait_until(
            lambda: peers.count(info["session_id"], "whip") == 1, "one publisher to remain"
        )
    finally:
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_an_answer_without_candidates_is_refused_with_503(rtc_service) -> None:
    import aioice.ice

    offer, watcher = await an_offer()
    lookup = aioice.ice.get_host_addresses
    # 192.0.2.1 (TEST-NET-1) is on no interface here: no UDP socket can be bound for ICE.
    client = await rtc_service(ice_host_addresses="192.0.2.1")
    try:
        info = await start_session(client, model_id="noop")
        status, body, headers = await post(info["whep_url"], offer)
        assert status == 503 and headers["Retry-After"], body
        assert "no ICE candidate" in json.loads(body)["detail"]["msg"]
        assert client.app[SESSIONS].peers.count(info["session_id"], "whep") == 0
        await client.delete(f"/live-video-to-video/{info['session_id']}")
    finally:
        aioice.ice.get_host_addresses = lookup  # process-wide: the next tests' addresses
        await watcher.close()


async def test_an_offer_to_a_session_that_ends_meanwhile_gets_404(rtc_service) -> None:
    offer, watcher = await an_offer()
    entered = [0]
    client = await rtc_service(prepare=lambda app: count_posts(app, "/whep/", entered))
    peers = client.app[SESSIONS].peers
    try:
        info = await start_session(client, model_id="noop")
        url = URL(info["whep_url"])
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(request_head(url.path, len(offer.encode())))
        await writer.drain()
        await wait_until(lambda: entered[0] == 1, "the offer's request in its handler")
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        writer.write(offer.encode())  # the rest of the offer, once the session has ended
        status, body, _ = await read_response(reader, writer)
        assert status == 404 and "ended" in json.loads(body)["detail"]["msg"], body
        assert not peers.peers  # no peer left over for a session that is gone
    finally:
        await watcher.close()
