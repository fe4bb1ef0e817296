"""A channel that lingers after its end (TrickleServer.linger): what was written stays readable
for a while, a read beyond it is end of stream at once, writes are refused, then it goes."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from protocol.trickle import EndOfStream, LocalPublisher, TrickleSubscriber
from tests.waiting import WAIT_S, wait_until

LONG_LINGER_S = 600.0
"""Far longer than any wait here: an answer that came waited for nothing of the linger."""


async def ended_channel(trickle_factory, linger_s: float, segments: int = 7):
    host = await trickle_factory(linger_s=linger_s)
    host.server.create_channel("c", "application/json", outside_writes=False)
    publisher = LocalPublisher(host.server, "c")
    for i in range(segments):
        await publisher.write(b"s%d" % i)
    assert host.server.linger("c")
    return host, publisher


async def test_a_lingering_channel_serves_its_segments_and_ends_reads_beyond_at_once(
    trickle_factory,
) -> None:
    host, publisher = await ended_channel(trickle_factory, LONG_LINGER_S)
    url = host.url("c")
    async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT_S):
        for seq in ("6", "-2"):  # the last one, by its seq and as the latest
            async with http.get(f"{url}/{seq}") as response:
                assert response.status == 200
                assert response.headers["Lp-Trickle-Seq"] == "6"
                assert "Lp-Trickle-Closed" not in response.headers
                assert await response.read() == b"s6"
        for seq in ("7", "-1", "12"):  # never to be written: end of stream, not a wait
            async with http.get(f"{url}/{seq}") as response:
                # The next seq's segment, opened before the end, closes empty (200); one past
                # it is answered as a deleted channel is (404), so `curl -f` loops stop too.
                assert response.headers["Lp-Trickle-Closed"] == "terminated", seq
                body = await response.read()
                assert (response.status, body) in ((200, b""), (404, b"Stream not found\n")), seq
                assert response.status == 404 or seq != "12", seq
        # Behind the ring: a 470 pointing at the last segment, not past it.
        async with http.get(f"{url}/0") as response:
            assert response.status == 470
            assert response.headers["Lp-Trickle-Latest"] == "6"
        # Writes and deletes are refused as on a deleted channel.
        async with http.post(f"{url}/-1", data=b"late") as response:
            assert response.status == 404
        async with http.post(f"{url}/7", data=b"late") as response:
            assert response.status == 404
        async with http.delete(url) as response:
            assert response.status == 400
    with pytest.raises(EndOfStream):
        await publisher.write(b"late")
    # A subscriber far behind gets the last segment, then the end.
    async with TrickleSubscriber(url, start_seq=0) as behind:
        got = [(segment.seq, await segment.read()) async for segment in behind]
        assert got == [(6, b"s6")] and behind.ended == "closed"
    assert host.server.get("c") is not None and host.server.lingering == 1


async def test_a_reader_parked_at_the_end_gets_end_of_stream_at_once(trickle_factory) -> None:
    host = await trickle_factory(linger_s=LONG_LINGER_S)
    host.server.create_channel("c", "application/json", outside_writes=False)
    publisher = LocalPublisher(host.server, "c")
    await publisher.write(b"first")
    async with TrickleSubscriber(host.url("c"), start_seq=0) as reader:
        segment = await reader.next()
        assert segment is not None and await segment.read() == b"first"
        waiting = asyncio.create_task(reader.next())
        channel = host.server.get("c")
        await wait_until(lambda: channel.parked_count == 1, "the GET for seq 1 to park")
        await publisher.write(b"last")
        host.server.linger("c")
        last = await asyncio.wait_for(waiting, WAIT_S)
        assert last is not None and await last.read() == b"last"
        assert await asyncio.wait_for(reader.next(), WAIT_S) is None
        assert reader.ended == "closed"


async def test_a_lingering_channel_is_deleted_when_its_linger_ends(trickle_factory) -> None:
    host, _ = await ended_channel(trickle_factory, 0.05)
    assert host.server.get("c") is not None  # still there right after its end
    await wait_until(lambda: host.server.get("c") is None, "the linger to end")
    assert host.server.lingering == 0
    async with aiohttp.ClientSession() as http, http.get(host.url("c") + "/6") as response:
        assert response.status == 404


async def test_shutdown_deletes_lingering_channels_and_cancels_their_timers(
    trickle_factory,
) -> None:
    host, _ = await ended_channel(trickle_factory, LONG_LINGER_S)
    timer = host.server._lingering["c"]
    host.server.close_all()
    assert not host.server.channels and host.server.lingering == 0
    assert timer.cancelled()
    # Ended while the server stops: deleted at once, no timer left behind.
    host.server.create_channel("d", "application/json", outside_writes=False)
    host.server.linger("d")
    assert host.server.get("d") is None and host.server.lingering == 0
