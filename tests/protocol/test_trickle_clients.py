"""Our trickle clients against the real server: streaming fan-out, end of stream, falling behind,
errors, and the in-process clients with the same shape."""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import aiohttp
import pytest

from protocol.trickle import (
    EndOfStream,
    LocalPublisher,
    LocalSubscriber,
    SegmentExists,
    StreamNotFound,
    TrickleHTTPError,
    TricklePublisher,
    TrickleSubscriber,
)
from tests.waiting import wait_until


async def collect(subscriber, count: int) -> list[tuple[int, bytes]]:
    got = []
    async for segment in subscriber:
        got.append((segment.seq, await segment.read()))
        if len(got) == count:
            break
    return got


async def test_publisher_to_several_subscribers(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    async with (
        TrickleSubscriber(url, start_seq=0) as first,
        TrickleSubscriber(url, start_seq=0) as second,
    ):
        readers = [asyncio.create_task(collect(s, 5)) for s in (first, second)]
        async with TricklePublisher(url) as publisher:
            seqs = [await publisher.write(f"segment {i}".encode()) for i in range(5)]
            results = await asyncio.wait_for(asyncio.gather(*readers), 5)
    assert seqs == [0, 1, 2, 3, 4]
    expected = [(i, f"segment {i}".encode()) for i in range(5)]
    assert results == [expected, expected]


async def test_bytes_arrive_while_the_post_is_still_open(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    async with TricklePublisher(url) as publisher, TrickleSubscriber(url, start_seq=0) as sub:
        async with publisher.segment() as writer:
            await writer.write(b"first half ")
            segment = await asyncio.wait_for(sub.next(), 2)
            chunks = aiter(segment)
            assert await asyncio.wait_for(anext(chunks), 2) == b"first half "
            await writer.write(b"second half")
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"second half"


async def test_late_subscriber_gets_the_segment_from_byte_zero(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    async with TricklePublisher(url) as publisher, TrickleSubscriber(url) as late:
        async with publisher.segment() as writer:
            await writer.write(b"A" * 1000)
            channel = trickle.server.get("c")
            await wait_until(
                lambda: (seg := channel.segment(0)) is not None and seg.size == 1000,
                "the first bytes of segment 0 on the server",
            )
            segment = await asyncio.wait_for(late.next(), 2)  # -2: the segment in progress
            reading = asyncio.create_task(segment.read())
            await writer.write(b"B" * 1000)
        data = await asyncio.wait_for(reading, 2)
    assert segment.seq == 0
    assert data == b"A" * 1000 + b"B" * 1000


async def test_five_mib_segments_round_trip_exactly(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    payloads = [os.urandom(5 * 1024 * 1024) for _ in range(2)]
    async with TrickleSubscriber(url, start_seq=0) as sub, TricklePublisher(url) as publisher:
        reader = asyncio.create_task(collect(sub, 2))
        for payload in payloads:
            await publisher.write(payload)
        got = await asyncio.wait_for(reader, 20)
    assert [data for _, data in got] == payloads


async def test_slow_subscriber_does_not_slow_the_others(trickle) -> None:
    """A reader that never reads stalls only itself: the publisher and a fast reader go on."""
    trickle.server.create_channel("c")
    url = trickle.url("c")
    port = trickle.http.port
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(b"GET /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
    payload = os.urandom(1024 * 1024)
    try:
        async with TrickleSubscriber(url, start_seq=0) as fast, TricklePublisher(url) as pub:
            reader = asyncio.create_task(collect(fast, 8))
            for _ in range(8):
                await asyncio.wait_for(pub.write(payload), 5)
            got = await asyncio.wait_for(reader, 10)
    finally:
        stalled.close()
    assert [seq for seq, _ in got] == list(range(8))
    assert all(data == payload for _, data in got)


async def test_end_of_stream_and_missing_channel(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    publisher = TricklePublisher(url)
    async with TrickleSubscriber(url, start_seq=0) as waiting:
        for i in range(3):
            assert await publisher.write(b"x%d" % i) == i
        assert [seq for seq, _ in await collect(waiting, 3)] == [0, 1, 2]
        # The preconnected POST for seq 3 is open on the server.
        channel = trickle.server.get("c")
        await wait_until(lambda: channel.segment(3) is not None, "the preconnect for seq 3")
        assert channel.segment(3) is not None
        parked = asyncio.create_task(waiting.next())
        # Both the preconnected POST and the subscriber's GET wait on seq 3.
        await wait_until(lambda: channel.parked_count == 2, "the GET for seq 3 to park")
        await publisher.close()
        assert await asyncio.wait_for(parked, 2) is None
        assert waiting.ended == "closed"
    async with TrickleSubscriber(url) as newcomer:
        assert await newcomer.next() is None
        assert newcomer.ended == "not found"


async def test_subscriber_behind_the_ring_jumps_to_the_live_edge(trickle) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    async with TricklePublisher(url) as publisher:
        for i in range(10):
            await publisher.write(b"old %d" % i)
        async with TrickleSubscriber(url, start_seq=1) as behind:
            parked = asyncio.create_task(behind.next())
            # Answered 470, it parks on seq 10 beside the publisher's preconnected POST.
            channel = trickle.server.get("c")
            await wait_until(
                lambda: behind.skipped == 1 and channel.parked_count == 2,
                "the subscriber to jump to the live edge and park there",
            )
            await publisher.write(b"fresh")
            segment = await asyncio.wait_for(parked, 2)
            assert (segment.seq, await segment.read()) == (10, b"fresh")
            assert behind.skipped == 1


async def test_publisher_to_a_missing_channel_raises_stream_not_found(trickle) -> None:
    async with TricklePublisher(trickle.url("missing")) as publisher:
        with pytest.raises(StreamNotFound):
            await publisher.write(b"data")


async def test_publisher_sees_end_of_stream_when_the_channel_closes(trickle) -> None:
    trickle.server.create_channel("c")
    async with TricklePublisher(trickle.url("c")) as publisher:
        await publisher.write(b"one")
        channel = trickle.server.get("c")
        await wait_until(lambda: channel.parked_count == 1, "the preconnect for seq 1 to park")
        trickle.server.delete_channel("c")
        with pytest.raises((EndOfStream, StreamNotFound)):
            await publisher.write(b"two")


async def test_oversized_segment_is_refused_and_the_channel_goes_on(trickle_factory) -> None:
    host = await trickle_factory(max_segment_bytes=1000)
    host.server.create_channel("c")
    async with TricklePublisher(host.url("c")) as publisher:
        with pytest.raises(TrickleHTTPError) as refused:
            await publisher.write(b"x" * 5000)
        assert refused.value.status == 413
        assert "1000" in refused.value.body
        seq = await publisher.write(b"small")
        async with aiohttp.ClientSession() as session:
            async with session.get(host.url(f"c/{seq}")) as response:
                assert await response.read() == b"small"


async def test_publisher_retries_when_the_server_is_not_there_yet() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    publisher = TricklePublisher(
        f"http://127.0.0.1:{port}/trickle/c", retries=2, retry_delay_s=0.01
    )
    with pytest.raises(aiohttp.ClientConnectionError):
        await publisher.write(b"data")
    assert publisher.seq == 3  # three attempts, each on its own seq
    await publisher.close(delete=False)


async def test_server_keeps_serving_after_bad_requests(trickle) -> None:
    trickle.server.create_channel("good")
    trickle.server.create_channel("victim")
    port = trickle.http.port
    async with aiohttp.ClientSession() as session:
        for method, path, status in [
            ("GET", "good/abc", 400),
            ("GET", "good/-3", 400),
            ("POST", "good/-2", 400),
            ("DELETE", "good/-1", 400),
            ("GET", "nope/0", 404),
            ("GET", "bad!name/0", 400),
            ("GET", "x" * 200 + "/0", 400),
            ("PUT", "good/0", 405),
            ("PATCH", "good", 405),
        ]:
            async with session.request(method, trickle.url(path)) as response:
                assert response.status == status, (method, path)
                assert (await response.text()).strip()
        # A publisher that vanishes mid-segment.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /trickle/victim/0 HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel"
        )
        await writer.drain()
        # A reset discards bytes the server has not read yet: wait until it holds all three.
        victim = trickle.server.get("victim")
        await wait_until(
            lambda: (seg := victim.segment(0)) is not None and seg.size == 3,
            "the server to read the first bytes of victim/0",
        )
        writer.transport.abort()
        async with TricklePublisher(trickle.url("good")) as publisher:
            await publisher.write(b"still fine")
            async with session.get(trickle.url("good/0")) as response:
                assert await response.read() == b"still fine"
        # The half-written segment is released by a segment DELETE, as the Go publisher does.
        async with session.delete(trickle.url("victim/0")) as response:
            assert response.status == 200
        async with session.get(trickle.url("victim/0")) as response:
            assert await response.read() == b"hel"


async def test_subscriber_never_reading_is_cut_off(trickle_factory, caplog) -> None:
    caplog.set_level(logging.INFO, logger="protocol.trickle.server")
    host = await trickle_factory(write_timeout_s=0.3)
    host.server.create_channel("c")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", host.http.port))
    stalled.sendall(b"GET /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        async with TricklePublisher(host.url("c")) as publisher:
            await publisher.write(os.urandom(4 * 1024 * 1024))
            await wait_until(
                lambda: "slow subscriber dropped" in caplog.text,
                "the server to drop the subscriber that never reads",
            )
        stalled.setblocking(False)
        received = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(stalled, 65536), 2)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
    finally:
        stalled.close()
    assert received < 4 * 1024 * 1024  # dropped before the whole segment was delivered


async def test_local_clients_round_trip_and_end() -> None:
    from protocol.trickle import TrickleServer

    server = TrickleServer()
    server.create_channel("c")
    async with LocalSubscriber(server, "c", start_seq=0) as sub:
        reader = asyncio.create_task(collect(sub, 3))
        publisher = LocalPublisher(server, "c")
        for i in range(3):
            assert await publisher.write(b"local %d" % i) == i
        assert await asyncio.wait_for(reader, 2) == [(i, b"local %d" % i) for i in range(3)]
        parked = asyncio.create_task(sub.next())
        # The publisher pre-created seq 3; the subscriber parks on it (no other waiter can).
        segment = server.get("c").segment(3)
        await wait_until(lambda: segment._changed is not None, "the subscriber to park on seq 3")
        await publisher.close()
        assert await asyncio.wait_for(parked, 1) is None
    with pytest.raises(StreamNotFound):
        await publisher.write(b"after close")


async def test_local_publisher_refuses_a_seq_with_data_and_subscriber_jumps() -> None:
    from protocol.trickle import TrickleServer

    server = TrickleServer()
    server.create_channel("c")
    publisher = LocalPublisher(server, "c")
    for i in range(8):
        await publisher.write(b"%d" % i)
    with pytest.raises(SegmentExists):
        await LocalPublisher(server, "c", start_seq=7).write(b"again")
    sub = LocalSubscriber(server, "c", start_seq=0)
    parked = asyncio.create_task(sub.next())
    # Out of the ring, it jumps to the live edge (seq 8) and parks there.
    await wait_until(lambda: sub.skipped == 1 and sub.seq == 8, "the jump to the live edge")
    await publisher.write(b"live")
    segment = await asyncio.wait_for(parked, 1)
    assert (segment.seq, await segment.read(), sub.skipped) == (8, b"live", 1)


async def test_random_channel_names_are_unguessable() -> None:
    from protocol.trickle import TrickleServer

    server = TrickleServer()
    names = {server.create_channel().name for _ in range(50)}
    assert len(names) == 50
    assert all(len(name) >= 32 for name in names)


async def test_deleting_a_channel_answers_an_upload_in_progress(trickle) -> None:
    """The upload is answered with end of stream at once, not read to its end: on shutdown
    aiohttp stops reading bodies, and an upload left waiting held shutdown up for 60 s."""
    channel = trickle.server.create_channel("up")
    publisher = TricklePublisher(trickle.url("up"))
    with pytest.raises(EndOfStream):
        async with publisher.segment() as writer:
            await writer.write(b"x" * 100)
            await asyncio.wait_for(channel.get_for_write(0).wait_started(), 10)
            trickle.server.delete_channel("up")
            async with asyncio.timeout(10):
                while True:  # a live encoder keeps writing; it must be told the channel is gone
                    await writer.write(b"y" * 100)
    await publisher.close()
