"""Trickle server as an aiohttp sub-application (go-livepeer trickle/trickle_server.go).

Mount it under any base path: `app.add_subapp("/trickle", create_trickle_app(server))`. Answers
follow go-livepeer route by route (protocol/trickle.md §1.14); where go-livepeer is undefined
(other negative seqs, unbounded sizes and channel counts) this server answers a clear 4xx instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol

from aiohttp import HttpVersion11, web
from pydantic import BaseModel, ConfigDict, Field

from . import headers as h
from .channel import Channel, Segment
from .errors import SegmentDropped

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
INTERIM_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
MAX_GATHERED_CHUNKS = 256
"""Chunks in one gathered write: three buffers each, well under the usual IOV_MAX of 1024."""
DISCONNECT_POLL_S = 5.0
PARKED_RELEASE_S = 1.0
"""How long a channel DELETE waits for the requests it released to be answered."""


class TrickleConfig(BaseModel):
    """Limits and timings of one trickle server; defaults are go-livepeer's where it has one."""

    model_config = ConfigDict(extra="forbid")

    base_path: str = Field("/trickle/", description="where the server is mounted")
    autocreate: bool = Field(False, description="allow `POST {channel}` to create channels")
    max_channels: int = Field(1024, ge=1, description="channels open at once")
    max_channel_name_length: int = Field(128, ge=1, description="characters in a channel name")
    max_segment_bytes: int = Field(64 * 1024 * 1024, ge=1, description="bytes in one segment")
    max_channel_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="bytes one channel's ring of segments may hold; the oldest segments are "
        "dropped beyond, and a segment larger than this is refused (413)",
    )
    idle_timeout_s: float = Field(300.0, gt=0, description="channel removed after this idle time")
    sweep_interval_s: float = Field(60.0, gt=0, description="how often idle channels are swept")
    keepalive_interval_s: float = Field(
        10.0, gt=0, description="interim 100 Continue interval while a POST awaits its first byte"
    )
    write_timeout_s: float = Field(
        30.0, gt=0, description="a subscriber that accepts no bytes this long is disconnected"
    )
    reader_grace_s: float = Field(
        1.0,
        ge=0,
        description="an HTTP publisher a whole ring ahead of a subscriber reading in order "
        "waits for it, at most this long after the subscriber's last request or the last "
        "byte of the segment it is in, whichever came later",
    )
    linger_s: float = Field(
        5.0,
        ge=0,
        description="an ended session's output and events channels stay readable this long "
        "(segments written, end of stream for the next), so a reader between two requests "
        "still gets the last ones; then they are deleted",
    )


class ChannelRefused(ValueError):
    """A channel cannot be created: bad name or too many channels."""

    def __init__(self, msg: str, status: int) -> None:
        super().__init__(msg)
        self.status = status


class TrickleServer:
    """The channels of one server, shared by its HTTP routes and in-process clients."""

    def __init__(self, config: TrickleConfig | None = None) -> None:
        self.config = config or TrickleConfig()
        self.channels: dict[str, Channel] = {}
        self.bytes_in = 0
        """Segment bytes HTTP publishers wrote (in-process clients are not counted)."""
        self.bytes_out = 0
        """Segment bytes sent to HTTP subscribers."""
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        """The deletion timer of each lingering channel (`linger`)."""
        self._stopped = False

    def check_name(self, name: str) -> str | None:
        """Why `name` cannot be a channel name, or None when it can."""
        limit = self.config.max_channel_name_length
        if len(name) > limit:
            return f"Invalid channel name: longer than {limit} characters"
        if not NAME_PATTERN.fullmatch(name):
            return "Invalid channel name: use letters, digits, '.', '_' and '-'"
        return None

    def create_channel(
        self,
        name: str | None = None,
        mime: str = "video/MP2T",
        *,
        outside_writes: bool = True,
        outside_reads: bool = True,
        max_segment_bytes: int | None = None,
        single_reader: bool = False,
    ) -> Channel:
        """Create a channel (a random, unguessable name when none is given); an existing name
        returns the existing channel unchanged, as go-livepeer does. `outside_writes` and
        `outside_reads` False keep HTTP clients from writing or reading what only the service
        should (a channel URL then grants exactly one thing). `single_reader`: the service's
        own reader is its only one, so each chunk is freed once that reader has it (needs
        `outside_reads` False)."""
        if name is None:
            # 128 random bits: standalone channel names act as capabilities.
            name = secrets.token_hex(16)
        problem = self.check_name(name)
        if problem:
            raise ChannelRefused(problem, 400)
        existing = self.channels.get(name)
        if existing is not None:
            return existing
        if len(self.channels) >= self.config.max_channels:
            raise ChannelRefused(f"Too many channels: the limit is {self.config.max_channels}", 429)
        channel = self.channels[name] = Channel(
            name,
            mime,
            outside_writes=outside_writes,
            outside_reads=outside_reads,
            max_segment_bytes=max_segment_bytes,
            max_bytes=self.config.max_channel_bytes,
            single_reader=single_reader,
        )
        logger.debug("channel created channel=%s mime=%s", name, mime)
        return channel

    def get(self, name: str) -> Channel | None:
        return self.channels.get(name)

    def linger(self, name: str) -> bool:
        """End channel `name` now and delete it `linger_s` later. Meanwhile its segments are
        read as before, a read of a seq that will never be written is answered end of stream
        at once, and writes are refused as on a deleted channel: a reader a request behind
        the end still gets the last segment. Each lingering channel stays counted (channels,
        bytes) until deleted, so churn cannot hold more than the limits. On shutdown, deleted
        at once."""
        channel = self.channels.get(name)
        if channel is None:
            return False
        if self._stopped or self.config.linger_s <= 0:
            return self.delete_channel(name)
        if name in self._lingering:
            return True  # already ending: its deletion is not put off
        channel.end()
        loop = asyncio.get_running_loop()
        self._lingering[name] = loop.call_later(self.config.linger_s, self.delete_channel, name)
        logger.debug("channel ended, lingering channel=%s", name)
        return True

    @property
    def lingering(self) -> int:
        """Channels ended and waiting for deletion."""
        return len(self._lingering)

    def delete_channel(self, name: str) -> bool:
        timer = self._lingering.pop(name, None)
        if timer is not None:
            timer.cancel()
        channel = self.channels.pop(name, None)
        if channel is None:
            return False
        channel.close()
        logger.debug("channel closed channel=%s", name)
        return True

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove channels idle longer than the timeout; names starting with `_` are exempt."""
        now = time.monotonic() if now is None else now
        idle = [
            name
            for name, channel in self.channels.items()
            if not name.startswith("_") and now - channel.write_time > self.config.idle_timeout_s
        ]
        for name in idle:
            self.delete_channel(name)
        if idle:
            logger.info("idle channels swept count=%d", len(idle))
        return idle

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval_s)
            self.sweep()

    def close_all(self) -> None:
        """Delete every channel (lingering ones too, their timers cancelled); a channel ended
        after this is deleted at once (the service is stopping)."""
        self._stopped = True
        for name in list(self.channels):
            self.delete_channel(name)


TRICKLE_SERVER = web.AppKey("trickle_server", TrickleServer)


def create_trickle_app(server: TrickleServer) -> web.Application:
    """The sub-application serving `server`'s channels over HTTP."""
    app = web.Application()
    app[TRICKLE_SERVER] = server
    routes = _Routes(server)
    # `next` is registered before `{seq}`: aiohttp matches in order, and the seq is parsed in
    # the handler so that a non-integer gives go-livepeer's 400 rather than a route 404.
    app.router.add_post("/{channel}", routes.post_channel)
    app.router.add_delete("/{channel}", routes.delete_channel)
    app.router.add_get("/{channel}/next", routes.get_next)
    app.router.add_get("/{channel}/{seq}", routes.get_segment)
    app.router.add_post("/{channel}/{seq}", routes.post_segment)
    app.router.add_delete("/{channel}/{seq}", routes.delete_segment)
    app.cleanup_ctx.append(_sweeper_ctx)
    app.on_shutdown.append(_wake_all)
    return app


async def _sweeper_ctx(app: web.Application) -> AsyncIterator[None]:
    server = app[TRICKLE_SERVER]
    task = asyncio.create_task(server.run_sweeper(), name="trickle-sweeper")
    yield
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    server.close_all()


async def _wake_all(app: web.Application) -> None:
    # Runs before aiohttp waits for handlers: closing every channel releases blocked GETs
    # (end of stream) and preconnected POSTs, so shutdown does not wait on them.
    app[TRICKLE_SERVER].close_all()


def _forbidden(reason: str) -> web.Response:
    # Ours: go-livepeer has no per-channel access; a URL here grants one direction only.
    return _text(403, f"Forbidden: {reason}")


def _text(status: int, body: str, **extra: str) -> web.Response:
    # livepeer-compat: Go's http.Error bodies, text/plain with a trailing newline (§1.12).
    return web.Response(
        status=status, text=body + "\n", headers={"X-Content-Type-Options": "nosniff", **extra}
    )


def _not_found() -> web.Response:
    return _text(404, "Stream not found")


_SEQ = re.compile(r"-?[0-9]{1,19}")
_INT64 = range(-(2**63), 2**63)


def _int64(raw: str) -> int | None:
    """ASCII digits within int64, as Go's strconv.Atoi takes them (`int()` would also take
    `1_0` and other scripts' digits)."""
    if not _SEQ.fullmatch(raw):
        return None
    value = int(raw)
    return value if value in _INT64 else None


def _parse_seq(raw: str, lowest: int) -> int | None:
    seq = _int64(raw)
    return seq if seq is not None and seq >= lowest else None


class _Released(Exception):
    """A POST waiting for its first byte was let go: its segment closed with no writer."""


class _ChannelClosed(Exception):
    """The channel of an upload was closed (deleted, or the server is stopping)."""


class _Upload:
    """The body of one POST, read straight from aiohttp's stream: no task per chunk.

    What must interrupt a read (the channel closing, a preconnect being released) cancels the
    handler's own task, which wakes the pending read at once; `read` turns that cancellation
    back into an ordinary exception. A body that arrived whole is whole even when its
    connection is gone by the time it is read: clients such as ffmpeg's send the last chunk,
    try one read and close.
    """

    __slots__ = ("_interrupted", "_task", "content", "request")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.content = request.content
        self._task = asyncio.current_task()
        self._interrupted: Exception | None = None

    @property
    def complete(self) -> bool:
        """The body's end (chunked terminator or Content-Length) has arrived."""
        return self.content.is_eof()

    async def read(self) -> bytes:
        """The next chunk, b"" at the body's end."""
        try:
            return await self.content.readany()
        except asyncio.CancelledError:
            interrupted = self._interrupted
            if interrupted is not None and self._task is not None and not self._task.uncancel():
                self._interrupted = None
                raise interrupted from None
            raise
        except Exception:
            if self.complete:
                return self.rest()
            raise

    def rest(self) -> bytes:
        """What is buffered of a body that arrived whole. aiohttp raises a lost connection
        ahead of the bytes it already holds, and has no public call that returns them once
        it has; the body is complete, so they are the segment's last bytes."""
        return self.content._read_nowait(-1)

    def _interrupt(self, reason: Exception) -> None:
        if self._interrupted is None and self._task is not None:
            self._interrupted = reason
            self._task.cancel()

    def channel_closed(self) -> None:
        self._interrupt(_ChannelClosed())

    def segment_closed(self, channel: Channel, segment: Segment) -> Callable[[], None]:
        """The callback that releases this POST, waiting for its first byte, when `segment`
        closes: unless another publisher wrote it (then this body goes to the live edge once
        it comes, Channel.claim) and the channel is still open."""

        def closed() -> None:
            if segment.writer is None or channel.closed:
                self._interrupt(_Released())

        return closed


class _Routes:
    """The HTTP handlers; each resolves channel and seq, then acts on the channel."""

    def __init__(self, server: TrickleServer) -> None:
        self.server = server
        self.config = server.config

    def _channel(
        self, request: web.Request, access: str = "read"
    ) -> tuple[Channel | None, web.Response | None]:
        name = request.match_info["channel"]
        problem = self.server.check_name(name)
        if problem:
            return None, _text(400, problem)
        channel = self.server.get(name)
        if channel is None or (channel.closed and access == "write"):
            # A lingering channel (TrickleServer.linger) is written as a deleted one.
            return None, _not_found()
        if access == "write" and not channel.outside_writes:
            return None, _forbidden("this channel is written by the service only")
        if access == "read" and not channel.outside_reads:
            return None, _forbidden("this channel is read by the service only")
        if access == "read or write" and not (channel.outside_reads or channel.outside_writes):
            return None, _forbidden("this channel is read and written by the service only")
        return channel, None

    def _seq(self, request: web.Request, lowest: int) -> tuple[int | None, web.Response | None]:
        raw = request.match_info["seq"]
        seq = _parse_seq(raw, lowest)
        if seq is not None:
            return seq, None
        if _int64(raw) is None:
            return None, _text(400, "Invalid idx")
        # go-livepeer panics on these (§7.1); we refuse them plainly.
        allowed = {0: "no negative seq", -1: "only -1", -2: "only -1 and -2"}[lowest]
        return None, _text(400, f"Invalid idx: {allowed} is allowed here")

    # -- POST {channel}, DELETE {channel}, GET {channel}/next ----------------------------------

    async def post_channel(self, request: web.Request) -> web.Response:
        name = request.match_info["channel"]
        problem = self.server.check_name(name)
        if problem:
            return _text(400, problem)
        if await self._has_body(request):
            # Ours: go-livepeer reads nothing here and answers 200, so a client that publishes
            # to the channel URL itself (`ffmpeg -method POST $URL`) loses every byte silently.
            segment_url = request.url.with_path(request.path.rstrip("/") + "/-1")
            logger.info("body posted to the create route refused channel=%s", name)
            response = web.json_response(
                {
                    "detail": f"POST {request.path} creates the channel and takes no body; "
                    f"publish a segment to {segment_url} (the next seq) or to "
                    f"{request.url}/<seq>"
                },
                status=400,
            )
            response.force_close()
            return response
        if self.server.get(name) is not None:
            return web.Response(status=200)
        if not self.config.autocreate:
            return _not_found()
        mime = request.headers.get(h.EXPECT_CONTENT, "application/octet-stream")
        try:
            self.server.create_channel(name, mime)
        except ChannelRefused as exc:
            return _text(exc.status, str(exc))
        return web.Response(status=200)

    async def _has_body(self, request: web.Request) -> bool:
        """Whether a POST to the create route carries bytes: a Content-Length above 0, or a
        chunked body whose first chunk is not its end (waited for no longer than a keepalive
        interval; a chunked body that stays silent that long counts as one)."""
        if request.content_length is not None:
            return request.content_length > 0
        if "chunked" not in request.headers.get("Transfer-Encoding", "").lower():
            return False
        try:
            async with asyncio.timeout(self.config.keepalive_interval_s):
                return bool(await request.content.readany())
        except TimeoutError:
            return True

    async def delete_channel(self, request: web.Request) -> web.Response:
        name = request.match_info["channel"]
        problem = self.server.check_name(name)
        if problem:
            return _text(400, problem)
        channel = self.server.get(name)
        if channel is not None and channel.closed:
            channel = None  # lingering (TrickleServer.linger): deleted as far as writers go
        elif channel is not None and not channel.outside_writes:
            return _forbidden("this channel is written by the service only")
        if channel is None or not self.server.delete_channel(name):
            # livepeer-compat: a missing channel is 400 here, not 404 (§1.3.5).
            return _text(400, "Invalid stream")
        assert channel is not None
        # Answer only once every request parked on the channel has its end-of-stream response
        # written. go-livepeer releases them within microseconds of its 200; answering first
        # lets a publisher that closes its HTTP session right after the DELETE (ai-runner's
        # TricklePublisher.close()) tear down its own preconnected POST before that POST's
        # answer arrives, which it logs as an error. Bounded, so a stuck handler cannot hold
        # the DELETE.
        if channel.parked_count:
            try:
                async with asyncio.timeout(PARKED_RELEASE_S):
                    await channel.wait_unparked()
            except TimeoutError:
                logger.info(
                    "channel deleted with requests still parked channel=%s count=%d",
                    name,
                    channel.parked_count,
                )
        return web.Response(status=200)

    async def get_next(self, request: web.Request) -> web.Response:
        # The publisher's question as much as the subscriber's: Livepeer's gateway SDK asks it
        # before its first POST, so it is answered to whoever may read or write the channel.
        channel, error = self._channel(request, "read or write")
        if channel is None:
            return error  # type: ignore[return-value]
        extra = {h.LATEST: str(channel.next_write)}
        if channel.closed:
            extra[h.CLOSED] = h.CLOSED_VALUE
        return web.Response(text=str(channel.next_write), headers=extra)

    # -- POST {channel}/{seq} ------------------------------------------------------------------

    async def post_segment(self, request: web.Request) -> web.StreamResponse:
        channel, error = self._channel(request, "write")
        if channel is None:
            # livepeer-compat: answered at once, before the body, with Connection: close so a
            # preconnected publisher is released (§1.3.2 step 1).
            assert error is not None
            if error.status in (403, 404):
                error.force_close()
            return error
        limit = min(
            channel.max_segment_bytes or self.config.max_segment_bytes,
            channel.max_bytes or self.config.max_channel_bytes,
        )
        if (request.content_length or 0) > limit:
            # Refused at the header: nothing of the body is read or kept.
            response = _text(413, f"Segment too large: the limit is {limit} bytes")
            response.force_close()
            return response
        raw_seq, error = self._seq(request, lowest=-1)
        if raw_seq is None:
            return error  # type: ignore[return-value]
        seq = channel.resolve_write_seq(raw_seq)
        # A publisher bursting segments back to back would push them out of the ring before
        # a subscriber reading in order asks for them: it waits (its body unread, so TCP holds
        # it) while such a subscriber keeps asking. In-process writers (a session's output)
        # never wait: a slow viewer must not hold a session.
        try:
            await channel.wait_for_readers(seq, self.config.reader_grace_s)
        except asyncio.CancelledError:
            # The publisher sent its whole body and closed (ffmpeg's way) while this POST
            # waited: the segment is still filed, after the same bounded wait, with nobody
            # left to answer.
            task = asyncio.current_task()
            if not request.content.is_eof() or task is None or task.uncancel():
                raise
            await channel.wait_for_readers(seq, self.config.reader_grace_s)
            if not channel.closed:
                segment = channel.get_for_write(seq)
                if request.headers.get(h.RESET):
                    channel.reset_below(seq)
                upload = _Upload(request)
                self._keep_whole(channel, segment, upload, upload.rest(), limit)
            raise
        if channel.closed:
            # Closed meanwhile: answered as a preconnect released by that close.
            return await _send_now(request, self._empty_write(channel, seq, None))
        segment = channel.get_for_write(seq)
        if request.headers.get(h.RESET):
            channel.reset_below(seq)

        upload = _Upload(request)
        with channel.parked(segment):
            try:
                with channel.on_close(upload.channel_closed):
                    first = await self._first_chunk(upload, channel, segment)
            except asyncio.CancelledError:
                # aiohttp cancels the handler when the connection goes; a body that had fully
                # arrived by then is still a segment.
                if upload.complete:
                    self._keep_whole(channel, segment, upload, upload.rest(), limit)
                raise
            except Exception as exc:  # the publisher went away before its first byte
                logger.info("publish aborted channel=%s seq=%d error=%r", channel.name, seq, exc)
                return _text(500, "Server error")
            if not first:
                # Written while still counted as parked: a channel DELETE that released this
                # POST answers after it (delete_channel).
                return await _send_now(request, self._empty_write(channel, seq, segment))
        segment = channel.claim(segment, upload)
        with channel.on_close(upload.channel_closed):
            return await self._receive(upload, channel, segment, first, limit)

    async def _receive(
        self, upload: _Upload, channel: Channel, segment: Segment, chunk: bytes, limit: int
    ) -> web.StreamResponse:
        """Append the body to `segment` from its first chunk on, then close the segment."""
        seq = segment.seq
        try:
            while chunk:
                if segment.size + len(chunk) > limit:
                    return self._too_large(segment, limit)
                segment.append(chunk)
                self.server.bytes_in += len(chunk)
                chunk = await upload.read()
        except _ChannelClosed:
            # The channel was deleted (or the server is shutting down) mid-upload: answer now
            # rather than read a body nobody will see; on shutdown aiohttp stops reading, so
            # waiting for the body's end would stall until timeout.
            response = web.Response(status=200, headers={h.SEQ: str(seq), h.CLOSED: h.CLOSED_VALUE})
            response.force_close()
            return response
        except asyncio.CancelledError:
            if upload.complete:
                self._keep_whole(channel, segment, upload, upload.rest(), limit)
            else:
                self._aborted(channel, segment)
            raise
        except Exception as exc:
            self._aborted(channel, segment)
            logger.info(
                "publish aborted channel=%s seq=%d bytes=%d error=%r",
                channel.name,
                seq,
                segment.size,
                exc,
            )
            return _text(500, "Server error")
        segment.close()
        return web.Response(status=200, headers={h.SEQ: str(seq)})

    def _keep_whole(
        self, channel: Channel, segment: Segment, upload: _Upload, rest: bytes, limit: int
    ) -> None:
        """Complete `segment` with the last bytes of a body that arrived whole before its
        connection went (the handler is being cancelled, so nothing is answered)."""
        if rest:
            segment = channel.claim(segment, upload)
            if segment.size + len(rest) > limit:
                self._too_large(segment, limit)
                return
            segment.append(rest)
            self.server.bytes_in += len(rest)
        elif segment.writer is not upload:
            # An empty body: as an empty write, it still advances the edge.
            channel.mark_written(segment.seq)
            if segment.writer is not None:
                return
        segment.close()

    @staticmethod
    def _too_large(segment: Segment, limit: int) -> web.Response:
        segment.close()
        response = _text(413, f"Segment too large: the limit is {limit} bytes")
        response.force_close()
        return response

    @staticmethod
    def _aborted(channel: Channel, segment: Segment) -> None:
        # livepeer-compat: an aborted upload leaves the segment open; readers stay blocked
        # until it is deleted, reset or evicted (§1.3.2 step 9, check 32), and a publisher
        # retrying the seq appends to it. Ours: on a channel only the service reads (a
        # session's input), that rule protects no outside reader, and keeping the segment open
        # would freeze the session's input until the segment leaves the ring (about 5 s): end
        # it at once.
        segment.writer = None
        if not channel.outside_reads:
            segment.close()

    async def _first_chunk(self, upload: _Upload, channel: Channel, segment: Segment) -> bytes:
        """The first chunk of the body, or b"" when the body is empty or the POST was released
        before any byte arrived (its segment closed while no other publisher wrote it, or the
        channel closed). Sends interim 100 Continue keepalives while waiting."""
        if segment.closed and (segment.writer is None or channel.closed):
            return b""
        with segment.on_close(upload.segment_closed(channel, segment)):
            while True:
                try:
                    async with asyncio.timeout(self.config.keepalive_interval_s):
                        return await upload.read()
                except TimeoutError:
                    transport = upload.request.transport
                    if transport is not None and not transport.is_closing():
                        transport.write(INTERIM_CONTINUE)
                except (_Released, _ChannelClosed):
                    return b""

    def _empty_write(self, channel: Channel, seq: int, segment: Segment | None) -> web.Response:
        # livepeer-compat: a zero-byte write still advances next_write so that readers waiting
        # on the next seq are not stranded (§1.3.2 step 8). A segment another publisher is
        # writing is left to it.
        channel.mark_written(seq)
        if segment is not None and segment.writer is None:
            segment.close()
        extra = {h.SEQ: str(seq)}
        if channel.closed:
            extra[h.CLOSED] = h.CLOSED_VALUE
        response = web.Response(status=200, headers=extra)
        response.force_close()
        return response

    # -- GET {channel}/{seq} -------------------------------------------------------------------

    async def get_segment(self, request: web.Request) -> web.StreamResponse:
        channel, error = self._channel(request)
        if channel is None:
            return error  # type: ignore[return-value]
        raw_seq, error = self._seq(request, lowest=-2)
        if raw_seq is None:
            return error  # type: ignore[return-value]
        seq = channel.resolve_read_seq(raw_seq)
        latest_at_request = channel.next_write
        segment = channel.get_for_read(seq)
        if segment is None:
            extra = {h.SEQ: str(seq), h.LATEST: str(channel.next_write)}
            if channel.closed and seq >= channel.next_write:
                # Never to be written (the channel lingers after its end): end of stream now,
                # answered as a deleted channel is (404), so every reader stops here, `curl -f`
                # loops included, and with the closed header. A seq that left the ring is a 470
                # as ever, so a reader behind moves on to the last segment.
                extra[h.CLOSED] = h.CLOSED_VALUE
                return _text(404, "Stream not found", **extra)
            if channel.closed:
                # Behind on an ended channel: its last segment is the one to move on to.
                extra[h.LATEST] = str(max(channel.next_write - 1, 0))
            return web.Response(
                status=470, reason="Entry Not Found", text="Entry not found", headers=extra
            )

        with channel.parked(segment):
            if not await self._wait_started(request, segment):
                return web.Response(status=499, reason="Client Closed Request")
            if not segment.has_data:
                extra = {h.SEQ: str(seq), h.LATEST: str(channel.next_write)}
                if channel.closed:
                    extra[h.CLOSED] = h.CLOSED_VALUE
                # Written while still counted as parked, so a channel DELETE answers after
                # this end-of-stream response (delete_channel).
                return await _send_now(request, web.Response(status=200, headers=extra))

        extra = {h.SEQ: str(seq), "Content-Type": channel.mime}
        if seq != latest_at_request:
            extra[h.LATEST] = str(latest_at_request)
        if request.method == "HEAD":
            # aiohttp routes HEAD here too, and its writer would send the body regardless; Go's
            # answers the head alone, and so do we.
            return web.Response(status=200, headers=extra)
        transport = request.transport
        sock = _plain_socket(transport) if request.version >= HttpVersion11 else None
        response: web.StreamResponse
        try:
            if sock is not None and transport is not None:
                response = framed = _FramedResponse(status=200, headers=extra)
                await self._send_gathered(request, framed, segment, transport, sock)
            else:
                response = web.StreamResponse(status=200, headers=extra)
                await self._send_chunks(request, response, segment)
        except TimeoutError:
            # A reader that accepts nothing for this long is cut off: the server holds at most
            # one segment and one socket buffer for it, never an unbounded backlog.
            logger.info("slow subscriber dropped channel=%s seq=%d", channel.name, seq)
            _abort(request)
        except SegmentDropped:
            # Dropped for the channel's budget while this reader was in it: cut the
            # connection, so the reader sees a broken segment, not a short whole one.
            logger.info("segment dropped under a reader channel=%s seq=%d", channel.name, seq)
            _abort(request)
        except ConnectionError:
            pass  # the subscriber left; nothing to clean up but the handler itself
        return response

    async def _send_gathered(
        self,
        request: web.Request,
        response: _FramedResponse,
        segment: Segment,
        transport: asyncio.Transport,
        sock: _Socket,
    ) -> None:
        """The segment as HTTP/1.1 chunks, one per published chunk, framed here.

        While the transport's buffer is empty (the socket took everything so far), the chunks
        that are ready go to the socket in one gathered write (`_Gathered.flush`): no copy, no
        await, no timer per chunk; a reader that is behind gets them all in one call, the head
        rides with the first bytes and the last one carries the end of the body. At the live
        edge the reader follows the segment (`Segment.follow`): one callback per event-loop turn
        writes the new chunks to every such reader, with no task switch per reader. Once a reader's
        socket is full, chunks go through aiohttp, which waits for the buffer to drain, bounded
        by the write timeout; so a slow reader holds at most about one chunk and a socket
        buffer."""
        timeout = self.config.write_timeout_s
        await response.prepare(request)
        out = _Gathered(self.server, segment, transport, sock.fileno(), response.take_head())
        chunks = segment.chunks
        while not out.ended:
            if transport.is_closing():
                raise ConnectionResetError("subscriber left")
            if out.sent < len(chunks):
                if not transport.get_write_buffer_size():
                    out.flush()
                else:
                    chunk = chunks[out.sent]
                    async with asyncio.timeout(timeout):
                        await response.write(out.take_pending_head() + _framed(chunk))
                    self.server.bytes_out += len(chunk)
                    out.sent += 1
                continue
            if segment.closed:
                segment.check_whole(out.sent)
                break
            if not transport.get_write_buffer_size():
                await out.follow()
            else:
                await segment.wait_beyond(out.sent)
        if out.ended and not transport.get_write_buffer_size():
            await response.write_eof(b"")  # all sent: nothing to wait for, no timer
        else:
            async with asyncio.timeout(timeout):
                await response.write_eof(
                    out.take_pending_head() + (b"" if out.ended else LAST_CHUNK)
                )

    async def _send_chunks(
        self, request: web.Request, response: web.StreamResponse, segment: Segment
    ) -> None:
        """The segment through aiohttp's own writer (TLS, or an HTTP/1.0 reader)."""
        timeout = self.config.write_timeout_s
        await response.prepare(request)
        async for chunk in segment.iter_chunks():
            async with asyncio.timeout(timeout):
                await response.write(chunk)
            self.server.bytes_out += len(chunk)
        async with asyncio.timeout(timeout):
            await response.write_eof()

    async def _wait_started(self, request: web.Request, segment: Segment) -> bool:
        """Wait for the segment's first byte or close; False if the client left meanwhile."""
        if segment.has_data or segment.closed:
            return True  # a reader behind the live edge: no timer to set up
        while True:
            try:
                async with asyncio.timeout(DISCONNECT_POLL_S):
                    await segment.wait_started()
                return True
            except TimeoutError:
                # aiohttp does not cancel a handler whose client left, so a GET parked at the
                # live edge checks for itself (duplicate preconnects must not pile up).
                transport = request.transport
                if transport is None or transport.is_closing():
                    return False

    # -- DELETE {channel}/{seq} ----------------------------------------------------------------

    async def delete_segment(self, request: web.Request) -> web.Response:
        channel, error = self._channel(request, "write")
        if channel is None:
            return error  # type: ignore[return-value]
        seq, error = self._seq(request, lowest=0)
        if seq is None:
            return error  # type: ignore[return-value]
        segment = channel.segment(seq)
        if segment is None:
            return _text(400, "Nonexistent segment")
        segment.close()
        return web.Response(status=200)


async def _send_now(request: web.Request, response: web.Response) -> web.Response:
    """Write `response` to the transport before the handler returns it (aiohttp then finds it
    sent and does nothing more), so the caller knows it is out."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left; nothing to deliver
    return response


class _Socket(Protocol):
    """What a transport's `get_extra_info("socket")` offers that the gathered path uses."""

    def fileno(self) -> int: ...


class _FramedResponse(web.StreamResponse):
    """A chunked response whose chunks the handler frames itself (`_send_gathered`): aiohttp
    builds the head (with what `on_response_prepare` hooks add) and passes body bytes through as
    given; the head is kept for the handler to send with the first body bytes, in one write."""

    # aiohttp's switch for a body it must neither frame nor count (its WebSocketResponse's).
    _length_check = False

    def __init__(self, *, status: int, headers: dict[str, str]) -> None:
        super().__init__(status=status, headers={**headers, "Transfer-Encoding": "chunked"})
        self._head = b""

    async def _write_headers(self) -> None:
        # aiohttp's own step hands the head to its writer, which sends it at once; here it is
        # kept instead (the writer then has nothing of its own to send).
        request = self._req
        assert request is not None
        version = request.version
        self._head = _serialize_head(
            f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}", self.headers
        )

    def take_head(self) -> bytes:
        head, self._head = self._head, b""
        return head


_FORBIDDEN_IN_HEADERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _serialize_head(status_line: str, headers: Mapping[str, str]) -> bytes:
    """The response head as bytes; a control character in a header (a CR or LF would let a
    value start a header of its own) is refused, as aiohttp's writer refuses it."""
    lines = [status_line]
    for name, value in headers.items():
        line = f"{name}: {value}"
        if _FORBIDDEN_IN_HEADERS.search(line):
            raise ValueError(f"control character in the response header {name}")
        lines.append(line)
    lines.append("\r\n")
    return "\r\n".join(lines).encode()


class _Gathered:
    """What one HTTP/1.1 reader of a segment has been sent, and the gathered writes that send
    the rest straight to its socket (`flush`), from its handler or, at the live edge, from the
    segment's writer (`follow`)."""

    __slots__ = ("_woken", "ended", "fd", "head", "segment", "sent", "server", "transport")

    def __init__(
        self,
        server: TrickleServer,
        segment: Segment,
        transport: asyncio.WriteTransport,
        fd: int,
        head: bytes,
    ) -> None:
        self.server = server
        self.segment = segment
        self.transport = transport
        self.fd = fd
        self.head = head
        """The response head until it is written, then b""."""
        self.sent = 0
        """Chunks written (or handed to the transport)."""
        self.ended = False
        """The body's end is written too."""
        self._woken: asyncio.Future[None] | None = None

    def take_pending_head(self) -> bytes:
        head, self.head = self.head, b""
        return head

    def flush(self) -> None:
        """Write the head if pending, the ready chunks, and the body's end once the segment is
        closed and all of it is out; the transport's buffer must be empty."""
        segment = self.segment
        chunks = segment.chunks
        start = self.sent
        end = min(len(chunks), start + MAX_GATHERED_CHUNKS)
        self.ended = end == len(chunks) and segment.closed and not segment.dropped
        _write_through(
            self.transport, self.fd, self.take_pending_head(), chunks, start, end, self.ended
        )
        self.server.bytes_out += sum(len(chunks[i]) for i in range(start, end))
        self.sent = end

    async def follow(self) -> None:
        """Follow the segment until there is something for the handler to do: the segment
        ended, was dropped, or the socket stopped taking bytes."""
        loop = asyncio.get_running_loop()
        self._woken = loop.create_future()
        self.segment.follow(self)
        try:
            await self._woken
        finally:
            self.segment.unfollow(self)
            self._woken = None

    def __call__(self) -> bool:
        """The segment changed: write what is new while the socket takes it; False (and the
        handler woken) once there is more to it than that."""
        segment = self.segment
        transport = self.transport
        if not (segment.dropped or transport.is_closing() or transport.get_write_buffer_size()):
            try:
                if self.sent < len(segment.chunks) or segment.closed:
                    self.flush()
            except ConnectionError:
                pass  # the transport is aborted; the handler finds it closing
            else:
                if not (
                    self.ended
                    or self.sent < len(segment.chunks)
                    or transport.get_write_buffer_size()
                ):
                    return True
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(None)
        return False


def _plain_socket(transport: asyncio.BaseTransport | None) -> _Socket | None:
    """The socket under a plain (not TLS) transport, where gathered writes may go straight to
    it; None where they may not."""
    if transport is None or not hasattr(os, "writev"):
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    sock = transport.get_extra_info("socket")
    return sock if sock is not None and sock.fileno() >= 0 else None


def _framed(chunk: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(chunk), chunk)


def _write_through(
    transport: asyncio.WriteTransport,
    fd: int,
    head: bytes,
    chunks: list[bytes],
    start: int,
    end: int,
    last: bool,
) -> None:
    """`head`, then `chunks[start:end]` as HTTP/1.1 chunks (and the body's end if `last`) in
    one `writev`, the transport's buffer being empty: the same bytes, in the same order, that
    `transport.write` would send for each in turn, without joining them (Python 3.11's
    `writelines` copies; 3.12 gathers the same way). What the socket does not take is handed
    to the transport, which sends it when it can."""
    pieces: list[bytes] = [head] if head else []
    for i in range(start, end):
        chunk = chunks[i]
        pieces += (b"%x\r\n" % len(chunk), chunk, CRLF)
    if last:
        pieces.append(LAST_CHUNK)
    if not pieces:
        return
    try:
        written = os.writev(fd, pieces)
    except (BlockingIOError, InterruptedError):
        written = 0
    except OSError as exc:
        transport.abort()
        raise ConnectionResetError(f"subscriber socket failed: {exc}") from exc
    for piece in pieces:
        if written >= len(piece):
            written -= len(piece)
            continue
        transport.write(memoryview(piece)[written:] if written else piece)
        written = 0


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
