"""Issue 18, finding 22: the events a session has yet to publish are bounded. A runner-mode
session whose events URL never answers, and whose control channel is flooded with bad
messages (each an error event), holds at most EVENTS_BACKLOG events and counts the rest."""

from __future__ import annotations

import asyncio

from aiohttp import web

from live.keys import SESSIONS
from live.session import EVENTS_BACKLOG
from protocol.trickle import TricklePublisher
from tests.live.streams import start_session
from tests.waiting import wait_until

FLOOD = EVENTS_BACKLOG + 200


async def test_a_stalled_events_channel_holds_a_bounded_backlog(
    service, trickle_factory, aiohttp_server
) -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.Response:
        await release.wait()  # an events host that takes the connection and never answers
        return web.Response()

    stalled = web.Application()
    stalled.router.add_route("*", "/{tail:.*}", stall)
    events_host = await aiohttp_server(stalled)
    client = await service(runner_hosts="127.0.0.1")
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    for suffix in ("", "-out", "-control"):
        orchestrator.server.create_channel("gw" + suffix)
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=orchestrator.url("gw"),
        publish_url=orchestrator.url("gw-out"),
        control_url=orchestrator.url("gw-control"),
        events_url=str(events_host.make_url("/ai/trickle/gw-events")),
    )
    session = client.app[SESSIONS].get(info["session_id"])
    try:
        async with TricklePublisher(orchestrator.url("gw-control"), "application/json") as control:
            for _ in range(FLOOD):
                await control.write(b"[1, 2, 3]")  # not an object: one error event each
        await wait_until(
            lambda: session.events_dropped >= FLOOD - EVENTS_BACKLOG,
            "the flood's error events to be dropped past the backlog",
        )
        assert session._events.qsize() <= EVENTS_BACKLOG
    finally:
        release.set()
        assert (await client.delete(f"/live-video-to-video/{info['session_id']}")).status == 200
