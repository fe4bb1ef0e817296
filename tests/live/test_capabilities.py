"""A URL handed to a client grants one thing (issue 9): channel names that cannot be derived,
channels that refuse outside writes or reads, limits that fit their content."""

from __future__ import annotations

import asyncio
import os
from urllib.parse import urlsplit

import aiohttp

from live.keys import TRICKLE
from protocol.clips import make_clip
from tests.live.streams import run_stream, start_session
from tests.waiting import wait_until


def channel_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def test_each_url_names_its_own_unguessable_channel(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    names = [
        channel_of(info[k]) for k in ("publish_url", "subscribe_url", "control_url", "events_url")
    ]
    assert len(set(names)) == 4
    for name in names:
        assert len(name) >= 32  # 128 random bits in hex
        assert info["session_id"] not in name and not any(
            other in name for other in names if other != name
        )
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_a_viewer_cannot_write_delete_or_reach_other_channels(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    out = channel_of(info["subscribe_url"])
    events = channel_of(info["events_url"])
    base = "/trickle/"
    # Writes and deletes on what the service writes are refused ...
    for path in (f"{out}/0", f"{out}/-1", f"{events}/5"):
        response = await client.post(base + path, data=b"injected")
        assert response.status == 403, path
    assert (await client.delete(base + out)).status == 403
    assert (await client.delete(f"{base}{out}/0")).status == 403
    # ... and so are reads of what only the service reads.
    assert (await client.get(base + channel_of(info["publish_url"]) + "/0")).status == 403
    assert (await client.get(base + channel_of(info["control_url"]) + "/-1")).status == 403
    # The derived names of the old scheme do not exist.
    for suffix in ("", "-out", "-control", "-events"):
        assert (await client.post(f"{base}{info['session_id']}{suffix}/0", data=b"x")).status == 404
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_an_outside_write_attempt_does_not_disturb_output_or_events(service) -> None:
    client = await service()

    async def attack(info, viewer, events) -> None:
        await viewer.wait_frames(10)
        async with aiohttp.ClientSession() as http:
            for url in (info["subscribe_url"], info["events_url"]):
                async with http.post(url + "/-1", data=b"{}") as response:
                    assert response.status == 403

    _, viewer, events = await run_stream(
        client, make_clip(60), body={"model_id": "noop"}, during=attack
    )
    assert viewer.indices == list(range(60))
    final = events.of_type("status")[-1]
    assert final["end_reason"] == "input ended" and final["frames_out"] == 60


async def test_control_and_events_segments_are_refused_past_one_mib(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    big = b"{" + b" " * (1024 * 1024) + b"}"
    response = await client.post(f"/trickle/{channel_of(info['control_url'])}/-1", data=big)
    assert response.status == 413
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_trickle_seqs_are_ascii_int64(service) -> None:
    client = await service()
    trickle = client.app[TRICKLE]
    trickle.create_channel("c")
    for seq in ("99999999999999999999", "1_0", "\u0663", "+1", " 1"):
        response = await client.post(f"/trickle/c/{seq}", data=b"x")
        assert response.status == 400, seq
    assert (await client.get("/trickle/c/next")).headers["Lp-Trickle-Latest"] == "0"


async def test_the_channel_limit_refuses_a_session_with_429_and_leaves_nothing(service) -> None:
    client = await service(trickle_max_channels=6, trickle_linger_s=0.05)
    first = await start_session(client, model_id="noop")
    response = await client.post("/live-video-to-video", json={"model_id": "noop"})
    assert response.status == 429
    assert "channels" in (await response.json())["detail"]["msg"]
    assert len(client.app[TRICKLE].channels) == 4
    await client.delete(f"/live-video-to-video/{first['session_id']}")
    # Its output and events channels linger a moment (readers a request behind), then go.
    await wait_until(lambda: not client.app[TRICKLE].channels, "the channels to be deleted")


async def test_publishing_and_watching_with_the_handed_out_urls_still_works(service) -> None:
    client = await service()
    _, viewer, _ = await run_stream(client, make_clip(30), body={"model_id": "noop"})
    assert viewer.indices == list(range(30))


async def announce(url: str, length: int) -> int:
    """POST headers announcing `length` bytes and a first chunk, as a client streaming a big
    file would; the status the server answers (a raw socket: an in-process aiohttp client
    would itself buffer the whole body, which is not what is measured here)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
            + bytes(64 * 1024)
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 30)
        return int(status_line.split()[1])
    finally:
        writer.close()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_oversized_posts_to_a_session_do_not_take_memory(service) -> None:
    """Five 60 MiB POSTs to each of a session's JSON channels and its output once took the
    service from 584 MB to 1,120 MB. Now they are refused before the body is kept: the
    process grows by less than 16 MiB (the bound asserted here)."""
    client = await service(trickle_linger_s=0.05)
    info = await start_session(client, model_id="noop")
    big = bytes(60 * 1024 * 1024)  # allocated before measuring: the test's own memory
    view = memoryview(big)

    async def chunked():
        for start in range(0, len(big), 1024 * 1024):
            yield view[start : start + 1024 * 1024]

    before = rss_bytes()
    statuses = []
    async with aiohttp.ClientSession() as http:
        for key in ("control_url", "events_url", "subscribe_url"):
            for attempt in range(5):
                if attempt % 2:
                    statuses.append((key, await announce(info[key] + "/-1", len(big))))
                    continue
                try:
                    async with http.post(info[key] + "/-1", data=chunked()) as response:
                        statuses.append((key, response.status))
                except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                    statuses.append((key, "disconnected"))  # refused mid-body, connection closed
    grown = rss_bytes() - before
    assert grown < 16 * 1024 * 1024, grown
    assert all(s in (413, "disconnected") for k, s in statuses if k == "control_url")
    assert all(s in (403, "disconnected") for k, s in statuses if k != "control_url")
    assert any(s == 413 for _, s in statuses) and any(s == 403 for _, s in statuses)
    trickle = client.app[TRICKLE]
    for key in ("control_url", "events_url", "subscribe_url"):
        channel = trickle.get(channel_of(info[key]))
        assert channel is not None
        assert all(s is None or s.size <= 1024 * 1024 * 2 for s in channel.ring)
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    # And what the session had is gone with it, once its readable channels' linger is over.
    await wait_until(lambda: not trickle.channels, "the channels to be deleted")
