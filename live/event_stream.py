"""Server-sent events: `GET /events/{channel}` relays a live session's events to a browser.

`{channel}` is the name of the session's events trickle channel (the last path segment of the
start response's `events_url`), so this stream is the same capability as `events_url`: whoever
may read the events channel may read this, and nobody else can guess it (128 random bits).
That is also why it takes no bearer token: a browser's `EventSource` cannot send one, and the
trickle channel it mirrors does not ask for one either.

The stream carries, each as `data: <json>\\n\\n`:

1. the session's current status, wrapped as the events channel wraps it
   (`{"event": {...}, "queue_event_type": "ai_stream_events"}`), so a page that connects late
   sees the state at once;
2. every event from then on, exactly as the events channel carries it;
3. a comment line every 15 s while nothing else is sent, so proxies and browsers keep the
   connection open;

and ends after the session's final status (the one with `end_reason`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from protocol.errors import NotFound

from .keys import SESSIONS
from .session import LiveSession
from .sessions import SessionManager

KEEPALIVE_S = 15.0
# A client that accepts no bytes for this long is dropped: while it is stalled the session's
# watcher queue drops its oldest events, so all it holds is one socket buffer, and only this long.
WRITE_TIMEOUT_S = 30.0
# After the session has ended, how long the events already queued for this stream may take to
# come through before the stream ends anyway (they are in memory: this is only a bound).
DRAIN_S = 2.0

STREAM_PATH = "/events/{channel}"


def channel_of(events_url: str) -> str:
    """The events channel name in an `events_url`: its last path segment."""
    return urlsplit(events_url).path.rstrip("/").rsplit("/", 1)[-1]


def find_session(manager: SessionManager, channel: str) -> LiveSession | None:
    if not channel:
        return None
    # Runner-mode sessions publish their events to another server: they have no channel here.
    for session in manager.sessions.values():
        if session.events_channel == channel:
            return session
    return None


def _status_message(session: LiveSession) -> dict[str, Any]:
    # The same envelope as encode_event() gives a status event on the events channel.
    return {
        "event": session.status().model_dump(mode="json"),
        "queue_event_type": "ai_stream_events",
    }


def _is_final(message: dict[str, Any]) -> bool:
    event = message.get("event") or {}
    return event.get("type") == "status" and bool(event.get("end_reason"))


def _sse(message: dict[str, Any]) -> bytes:
    # Compact JSON has no newlines, so one `data:` line carries the whole message.
    return b"data: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"


async def _relay(session: LiveSession) -> AsyncIterator[bytes]:
    """The stream's chunks: the status now, the session's events, keepalives, until the end."""
    events = session.watch_events()
    # Watching starts (on the loop's next turn) in the same turn as the status snapshot below,
    # so the stream misses as little as possible between the two.
    next_event: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(anext(events))
    ended: asyncio.Future[None] = asyncio.ensure_future(session.wait())
    final_seen = False
    try:
        yield _sse(_status_message(session))
        while True:
            draining = ended.done()
            waiting = {next_event} if draining else {next_event, ended}
            done, _ = await asyncio.wait(
                waiting,
                timeout=DRAIN_S if draining else KEEPALIVE_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if next_event in done:
                try:
                    message = next_event.result()
                except StopAsyncIteration:
                    break  # the session published its last event
                final_seen = final_seen or _is_final(message)
                yield _sse(message)
                next_event = asyncio.ensure_future(anext(events))
            elif draining:
                break  # nothing more came after the end: we joined after the last event
            elif ended not in done:
                yield b": keepalive\n\n"
        if not final_seen:
            # Joined too late for the final status event, or a slow reader lost it: the
            # status now is the final one, end_reason included.
            yield _sse(_status_message(session))
    finally:
        for pending in (next_event, ended):
            pending.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await next_event
        await events.aclose()


async def get_event_stream(request: web.Request) -> web.StreamResponse:
    session = find_session(request.app[SESSIONS], request.match_info["channel"])
    if session is None:
        raise NotFound("no live session has this events channel")
    chunks = _relay(session)
    # Taken before the response is prepared, which may yield to the loop (see _relay).
    first = await anext(chunks)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            # Reverse proxies (nginx) otherwise buffer the stream and the page sees nothing.
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        await _write(response, first)
        async for chunk in chunks:
            await _write(response, chunk)
    except TimeoutError:
        # A client that stopped reading: cut the connection, so that neither this handler nor
        # aiohttp's end of response waits on it any longer.
        if request.transport is not None:
            request.transport.abort()
    except ConnectionError:
        pass  # the client left; the session goes on without it
    finally:
        await chunks.aclose()
    return response


async def _write(response: web.StreamResponse, chunk: bytes) -> None:
    # aiohttp's write waits while the socket buffer is full: a client that does not read
    # stalls here, and only for so long.
    async with asyncio.timeout(WRITE_TIMEOUT_S):
        await response.write(chunk)


def add_event_stream_routes(app: web.Application) -> None:
    app.router.add_get(STREAM_PATH, get_event_stream)
