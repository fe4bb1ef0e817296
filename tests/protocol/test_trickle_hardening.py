"""Trickle server behaviour found by attacking it (issue 9), over real HTTP on 127.0.0.1: a
channel DELETE answers after the requests it releases, a preconnect on a deleted channel ends
with end of stream, and a stray far-ahead seq cannot strand the channel's readers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp

from protocol.trickle import TrickleSubscriber
from protocol.trickle import server as server_module
from protocol.trickle.channel import Segment

from .test_trickle_conformance import (
    CLOSED,
    SEQ,
    WAIT_S,
    OpenPost,
    fetch,
    next_seq,
    publish,
    until,
)

ROUNDS = 20


async def preconnect(
    session: aiohttp.ClientSession, url: str, order: list[str], name: str
) -> tuple[int, dict[str, str]]:
    """A POST that sends its headers and then no byte (a publisher's preconnect); `name` goes
    into `order` the moment its response is complete."""

    async def body() -> AsyncIterator[bytes]:
        yield b""  # makes aiohttp send the request headers right away
        await asyncio.Event().wait()  # the data that never comes

    async with session.post(url, data=body()) as resp:
        await resp.content.read()
        order.append(name)
        return resp.status, dict(resp.headers)


async def wait_at_edge(
    session: aiohttp.ClientSession, url: str, order: list[str], name: str
) -> tuple[int, dict[str, str]]:
    async with session.get(url) as resp:
        await resp.read()
        order.append(name)
        return resp.status, dict(resp.headers)


async def test_channel_delete_answers_after_the_parked_requests(trickle) -> None:
    # ai-runner's TricklePublisher.close() pattern: a POST preconnected for the next seq, a
    # reader waiting at the live edge, then DELETE of the channel. Both parked requests must
    # have their whole answer before the DELETE's arrives, every time.
    async with aiohttp.ClientSession() as http:
        for round_ in range(ROUNDS):
            name = f"c{round_}"
            channel = trickle.server.create_channel(name, "video/MP2T")
            url = trickle.url(name)
            await publish(http, f"{url}/0", b"segment 0")
            order: list[str] = []
            post = asyncio.create_task(preconnect(http, f"{url}/1", order, "post"))
            get = asyncio.create_task(wait_at_edge(http, f"{url}/1", order, "get"))
            try:
                await until(lambda ch=channel: ch.parked_count == 2, "both requests parked")
                async with http.delete(url) as resp:
                    await resp.read()
                    order.append("delete")
                    assert resp.status == 200
                post_status, post_headers = await asyncio.wait_for(post, WAIT_S)
                get_status, get_headers = await asyncio.wait_for(get, WAIT_S)
            finally:
                for task in (post, get):
                    task.cancel()
                await asyncio.gather(post, get, return_exceptions=True)
            assert order[-1] == "delete", (round_, order)
            assert sorted(order) == ["delete", "get", "post"]
            assert post_status == 200
            assert post_headers[CLOSED] == "terminated"
            assert post_headers[SEQ] == "1"
            assert get_status == 200
            assert get_headers[CLOSED] == "terminated"
            assert get_headers[SEQ] == "1"


async def test_channel_delete_is_not_held_by_a_stuck_request(trickle, http, monkeypatch) -> None:
    # A parked request whose handler never finishes (simulated: counted as parked for the
    # whole test) holds the DELETE for the bound only.
    monkeypatch.setattr(server_module, "PARKED_RELEASE_S", 0.2)
    channel = trickle.server.create_channel("c", "video/MP2T")
    with channel.parked(Segment(7)):
        reply = await asyncio.wait_for(fetch(http, "DELETE", trickle.url("c")), WAIT_S)
        assert reply.status == 200


async def test_preconnect_on_a_deleted_channel_ends_with_end_of_stream(trickle, c, http) -> None:
    # go-livepeer (protocol/trickle.md §1.3.5, check 25): a POST parked before its first byte
    # is answered 200 + Lp-Trickle-Closed: terminated when the channel is deleted, not 404.
    channel = trickle.server.get("c")
    post = OpenPost(http, f"{c}/0")
    try:
        await until(lambda: channel.parked_count == 1, "the preconnect")
        assert (await fetch(http, "DELETE", c)).status == 200
        reply = await post.reply()
        assert reply.status == 200
        assert reply.headers[CLOSED] == "terminated"
        assert reply.headers[SEQ] == "0"
    finally:
        await post.close()
    # A POST that reaches the server after the DELETE finds no channel: 404, as in go-livepeer
    # (check 27).
    assert (await fetch(http, "POST", f"{c}/1", data=b"late")).status == 404


async def test_upload_cut_by_a_delete_ends_with_a_closed_header_go_clients_see(
    trickle, c, http
) -> None:
    # Go's IsEOS tests `Header.Get("Lp-Trickle-Closed") != ""`: an empty value is no EOS to it.
    channel = trickle.server.get("c")
    post = OpenPost(http, f"{c}/0")
    try:
        post.send(b"ab")
        await until(lambda: channel.next_write == 1, "the first byte")
        assert (await fetch(http, "DELETE", c)).status == 200
        reply = await post.reply()
        assert reply.status == 200
        assert reply.headers[CLOSED] == "terminated"
    finally:
        await post.close()


async def test_far_ahead_seq_does_not_strand_readers(trickle, c, http) -> None:
    channel = trickle.server.get("c")
    for seq in range(5):
        await publish(http, f"{c}/{seq}", b"segment %d" % seq)
    # A stray (or hostile) POST far ahead, a valid int64: today's edge jumps there.
    await publish(http, f"{c}/1000000000000", b"stray")
    assert await next_seq(http, c) == b"1000000000001"
    got: list[tuple[int, bytes]] = []

    async def follow() -> None:
        async with TrickleSubscriber(c, start_seq=-1, session=http) as subscriber:
            async for segment in subscriber:
                data = await segment.read()
                if data:
                    got.append((segment.seq, data))
                    return

    reader = asyncio.create_task(follow())
    try:
        await until(lambda: channel.parked_count == 1, "the reader to wait at the stray edge")
        assert channel.segment(1000000000001) is not None
        # The real publisher goes on at 5: the edge follows it and the stray reader moves on.
        await publish(http, f"{c}/5", b"segment 5")
        assert await next_seq(http, c) == b"6"
        await until(
            lambda: channel.segment(6) is not None and channel.parked_count == 1,
            "the reader to wait at seq 6",
        )
        await publish(http, f"{c}/6", b"segment 6")
        await asyncio.wait_for(reader, WAIT_S)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    assert got == [(6, b"segment 6")]


async def test_small_reordering_keeps_the_edge(c, http) -> None:
    # §7.2 stays: a segment arriving just behind a newer one does not move the edge back.
    for seq in (0, 1, 2, 4):
        await publish(http, f"{c}/{seq}", b"s")
    await publish(http, f"{c}/3", b"late")
    assert await next_seq(http, c) == b"5"


async def test_publisher_restarting_from_zero_moves_the_edge_back(c, http) -> None:
    for seq in range(20):
        await publish(http, f"{c}/{seq}", b"s")
    await publish(http, f"{c}/0", b"again")
    assert await next_seq(http, c) == b"1"
    assert (await fetch(http, "GET", f"{c}/0")).body == b"again"
