"""`GET /events/{channel}`: a session's events as server-sent events, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from live import event_stream
from live.app import create_app
from live.event_stream import channel_of
from live.keys import SESSIONS
from live.settings import Settings
from protocol.clips import make_clip
from protocol.trickle import EndOfStream
from tests.live.conftest import PIPELINES
from tests.live.streams import WAIT_S, publish_clip, start_session, wait_gone
from tests.waiting import wait_until


@dataclass
class EventStream:
    """Reads a server-sent event stream to its end: `data:` lines as JSON, comments apart."""

    response: aiohttp.ClientResponse
    messages: list[dict] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended: bool = False
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    async def run(self) -> None:
        try:
            data: list[str] = []
            async for raw in self.response.content:
                line = raw.decode().rstrip("\r\n")
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                elif line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                elif not line and data:
                    self.messages.append(json.loads("\n".join(data)))
                    data = []
                else:
                    continue
                async with self._changed:
                    self._changed.notify_all()
        finally:
            self.ended = True
            self.response.release()
            async with self._changed:
                self._changed.notify_all()

    def events(self) -> list[dict]:
        return [m["event"] for m in self.messages]

    async def wait_for(self, check) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: check(self) or self.ended)
        assert check(self), f"stream ended first: {self.events()}"

    async def wait_end(self) -> None:
        async with asyncio.timeout(WAIT_S), self._changed:
            await self._changed.wait_for(lambda: self.ended)


async def open_stream(client, info: dict) -> EventStream:
    # The start answer names the stream; it is the events channel's name under /events/.
    path = urlsplit(info["events_stream_url"]).path
    assert path == f"/events/{channel_of(info['events_url'])}"
    response = await client.get(path)
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return EventStream(response)


def serving(event: dict) -> bool:
    """A status of a session whose frames come in and go through the pipeline (the status
    sent the moment a pipeline loaded in a fresh worker process has input and no output yet)."""
    return (
        event["type"] == "status"
        and event["state"] == "ONLINE"
        and bool(event["input_status"]["fps"])
        and bool(event["inference_status"]["fps"])
    )


def online(stream: EventStream) -> bool:
    return any(serving(e) for e in stream.events())


async def test_events_arrive_while_the_session_runs_and_the_stream_ends_with_the_final_status(
    service,
) -> None:
    client = await service()
    info = await start_session(client, model_id="cartoon")
    stream = await open_stream(client, info)
    reading = asyncio.create_task(stream.run())
    # The status comes first, before the session has seen any input.
    await stream.wait_for(lambda s: len(s.messages) >= 1)
    first = stream.messages[0]
    assert first["queue_event_type"] == "ai_stream_events"
    assert first["event"]["type"] == "status"
    assert first["event"]["pipeline"] == "cartoon"
    assert first["event"]["end_reason"] is None

    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(90)))
    # Live events, as the events channel carries them: traces, and statuses with fps.
    await stream.wait_for(
        lambda s: "runner_send_first_processed_segment" in [e["type"] for e in s.events()]
    )
    await stream.wait_for(online)
    online_status = next(e for e in stream.events() if serving(e))
    assert online_status["inference_status"]["fps"] > 0
    assert "p50_ms" in online_status["latency"]

    await asyncio.wait_for(publishing, WAIT_S)
    await stream.wait_end()
    await reading
    final = stream.messages[-1]
    assert final["event"]["type"] == "status"
    assert final["event"]["state"] == "OFFLINE"
    assert final["event"]["end_reason"] == "input ended"
    # Exactly one final status: nothing is synthesised when the real one came through.
    assert sum(1 for e in stream.events() if e.get("end_reason")) == 1
    await wait_gone(client, info["session_id"])


async def test_a_stream_opened_late_starts_with_the_state_now(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(150)))
    session = client.app[SESSIONS].sessions[info["session_id"]]
    await asyncio.wait_for(session.wait_ready(), WAIT_S)
    early = await open_stream(client, info)
    early_reading = asyncio.create_task(early.run())
    await early.wait_for(online)
    # A page that connects now sees ONLINE in its very first message.
    late = await open_stream(client, info)
    late_reading = asyncio.create_task(late.run())
    await late.wait_for(lambda s: len(s.messages) >= 1)
    assert late.messages[0]["event"]["state"] == "ONLINE"
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    for stream in (early, late):
        await stream.wait_end()
        assert stream.messages[-1]["event"]["end_reason"] == "stopped"
    await asyncio.gather(early_reading, late_reading)
    # The publisher is told the input channel closed (unless it had already finished).
    with contextlib.suppress(EndOfStream):
        await asyncio.wait_for(publishing, WAIT_S)


async def quiet_service(aiohttp_client):
    """The service with a status period longer than any test: events come only when asked."""
    return await aiohttp_client(create_app(Settings(status_interval_s=600), PIPELINES))


async def test_a_quiet_stream_sends_keepalive_comments(aiohttp_client, monkeypatch) -> None:
    monkeypatch.setattr(event_stream, "KEEPALIVE_S", 0.05)
    # No input and a long status period: nothing but keepalives to send.
    client = await quiet_service(aiohttp_client)
    info = await start_session(client, model_id="noop")
    stream = await open_stream(client, info)
    reading = asyncio.create_task(stream.run())
    await stream.wait_for(lambda s: len(s.comments) >= 3)
    assert set(stream.comments) == {"keepalive"}
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await stream.wait_end()
    await reading
    assert stream.messages[-1]["event"]["end_reason"] == "stopped"


async def test_unknown_channel_is_404_with_a_json_detail(service) -> None:
    client = await service()
    response = await client.get("/events/" + "0" * 32)
    assert response.status == 404
    body = await response.json()
    assert "events channel" in body["detail"]["msg"]
    # A session id or another of the session's channels is not its events channel.
    info = await start_session(client, model_id="noop")
    for other in (info["session_id"], channel_of(info["publish_url"])):
        assert (await client.get(f"/events/{other}")).status == 404
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await wait_gone(client, info["session_id"])
    # Once the session is gone, its channel is unknown too.
    assert (await client.get(f"/events/{channel_of(info['events_url'])}")).status == 404


async def test_a_client_that_never_reads_is_dropped_and_holds_nothing(
    aiohttp_client, monkeypatch
) -> None:
    monkeypatch.setattr(event_stream, "WRITE_TIMEOUT_S", 0.5)
    client = await quiet_service(aiohttp_client)
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].sessions[info["session_id"]]
    # A raw socket that asks for the stream and never reads a byte of it.
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    path = f"/events/{channel_of(info['events_url'])}"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {client.host}\r\n\r\n".encode())
    await writer.drain()
    try:
        # The stream is open once it watches the session.
        await wait_until(
            lambda: bool(session._watchers), "the stream to watch the session", within=WAIT_S
        )

        def flooded_until_cut() -> bool:
            # Events far beyond what the socket buffers hold: the stalled stream is cut.
            session.error("x" * 60_000)
            return not session._watchers

        await wait_until(flooded_until_cut, "the stalled stream to be cut", within=WAIT_S)
        assert session.running  # the session itself is unaffected
    finally:
        writer.close()
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await wait_gone(client, info["session_id"])
