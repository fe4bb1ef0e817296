"""WebRTC as a source/sink pair: WHIP ingest (`WhipSource`) and WHEP playback (`WhepSink`), and
the peer connections behind them (`Peers`, owned by the app, closed on shutdown).

A WHIP publisher's decoded frames enter the session's frame loop exactly as trickle input does;
each WHEP viewer is one more sink on it, with its own newest-frame slot, so a slow viewer drops
frames without slowing the others. aiortc does the RTP, SRTP, ICE and codecs (H.264, VP8, Opus).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.mediastreams import MediaStreamError

from protocol.media import CLOCK, TIME_BASE, AudioPacket, VideoFrame, to_rgb

from .edges import FrameSink, FrameSource, MediaContext, MediaItem, OutputClosed, OutputFrame
from .ice import IceSettings
from .slot import LatestSlot
from .threads import run_in

logger = logging.getLogger(__name__)

RTP_WRAP = 1 << 32


def configuration(ice: IceSettings) -> RTCConfiguration:
    # An empty list, not None: aiortc's default would contact a public STUN server.
    servers = [
        RTCIceServer(
            urls=url,
            username=ice.username if url.startswith("turn") else None,
            credential=ice.credential if url.startswith("turn") else None,
        )
        for url in ice.servers
    ]
    return RTCConfiguration(iceServers=servers)


def restrict_host_addresses(addresses: list[str]) -> None:
    """Gather host candidates on `addresses` only. aioice offers every interface but never
    loopback and has no per-connection setting, so this replaces its module-level lookup for
    the whole process (one service per process)."""
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(addresses)


class _RtpClock:
    """RTP timestamps (32 bits, random start, restart with each publisher) onto one increasing
    90 kHz timeline."""

    def __init__(self) -> None:
        self._previous: int | None = None  # the last RTP timestamp of the current publisher
        self._since_first = 0  # unwrapped ticks since that publisher's first frame
        self._offset = 0
        self._last: int | None = None

    def new_publisher(self) -> None:
        if self._last is not None:
            self._offset = self._last + CLOCK // 30
        self._previous = None
        self._since_first = 0

    def map(self, rtp: int) -> int:
        if self._previous is not None:
            # Unwrap: a step back of more than half the range is a wrap forward.
            step = (rtp - self._previous) % RTP_WRAP
            if step > RTP_WRAP // 2:
                step -= RTP_WRAP
            self._since_first += step
        self._previous = rtp
        out = self._offset + self._since_first
        self._last = out if self._last is None else max(self._last, out)
        return out


class WhipSource(FrameSource):
    """Frames of whoever publishes over WHIP, one publisher at a time; a publisher that comes
    back continues the same session (the frame loop's input timeout ends it otherwise)."""

    name = "whip"

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self._tracks: asyncio.Queue[MediaStreamTrack] = asyncio.Queue()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="decode-whip")
        self._clock = _RtpClock()
        self.closed = False
        self.publishing = 0
        self._drains: set[asyncio.Task[None]] = set()

    def attach(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._tracks.put_nowait(track)
        else:
            # Audio from WHIP is not carried yet: drain it so aiortc does not queue it forever.
            task = asyncio.ensure_future(_drain(track))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        index = 0
        while True:
            track = await self._tracks.get()
            self._clock.new_publisher()
            self.publishing += 1
            try:
                while True:
                    frame = await track.recv()
                    image = await run_in(self._thread, to_rgb, frame, self.size)
                    pts = self._clock.map(_to_clock(frame))
                    yield VideoFrame(image, pts, time.monotonic(), index)
                    index += 1
            except MediaStreamError:
                context.log.info("WHIP publisher left; waiting for it to come back")
            finally:
                self.publishing -= 1

    async def close(self) -> None:
        self.closed = True
        for task in list(self._drains):
            task.cancel()
        await asyncio.gather(*self._drains, return_exceptions=True)
        self._thread.shutdown(wait=False)


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError):
        while True:
            await track.recv()


def _to_clock(frame: av.VideoFrame) -> int:
    base = frame.time_base or TIME_BASE
    return int(frame.pts * Fraction(base) * CLOCK) if frame.pts is not None else 0


class _OutputTrack(MediaStreamTrack):
    """The video a WHEP viewer receives: the frame its sink was handed last."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.slot: LatestSlot[OutputFrame] = LatestSlot()
        self.taken = asyncio.Event()

    async def recv(self) -> av.VideoFrame:
        frame = await self.slot.get()
        if frame is None:
            raise MediaStreamError
        out = av.VideoFrame.from_ndarray(frame.image, format="rgb24")
        out.pts = frame.pts
        out.time_base = TIME_BASE
        self.taken.set()
        return out


class WhepSink(FrameSink):
    """One WHEP viewer. `send` returns once aiortc took the frame to encode it, so the frame
    loop's slot for this viewer is the only place its frames wait (and are dropped)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.primary = False
        self.track = _OutputTrack()
        self.gone = asyncio.Event()

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if self.gone.is_set():
            raise OutputClosed(f"viewer {self.name} left")
        self.track.taken.clear()
        self.track.slot.put(frame)
        taken = asyncio.ensure_future(self.track.taken.wait())
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait((taken, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            taken.cancel()
            gone.cancel()
        if not self.track.taken.is_set():
            raise OutputClosed(f"viewer {self.name} left")
        return True

    async def close(self) -> None:
        self.gone.set()
        self.track.slot.close()
        self.track.stop()


@dataclass
class Peer:
    id: str
    kind: str  # "whip" or "whep"
    session_id: str
    pc: RTCPeerConnection
    sink: WhepSink | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Peers:
    """Every peer connection of the app, by the unguessable id in its resource URL."""

    def __init__(self, ice: IceSettings) -> None:
        self.ice = ice
        self.peers: dict[str, Peer] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def count(self, session_id: str, kind: str) -> int:
        return sum(1 for p in self.peers.values() if p.session_id == session_id and p.kind == kind)

    async def publish(self, session_id: str, source: WhipSource, offer: str) -> tuple[Peer, str]:
        """A WHIP publisher: its tracks feed `source`; returns the peer and the SDP answer."""
        pc = RTCPeerConnection(configuration(self.ice))
        peer = self._add("whip", session_id, pc)
        pc.on("track", source.attach)
        return peer, await self._answer(peer, offer)

    async def play(self, session_id: str, offer: str) -> tuple[Peer, str]:
        """A WHEP viewer: returns the peer (its `sink` goes on the session) and the answer."""
        pc = RTCPeerConnection(configuration(self.ice))
        peer = self._add("whep", session_id, pc)
        peer.sink = WhepSink(f"whep-{peer.id[:8]}")
        pc.addTrack(peer.sink.track)
        return peer, await self._answer(peer, offer)

    def _add(self, kind: str, session_id: str, pc: RTCPeerConnection) -> Peer:
        peer = Peer(secrets.token_hex(16), kind, session_id, pc)
        self.peers[peer.id] = peer

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._schedule_close(peer.id)

        return peer

    async def _answer(self, peer: Peer, offer: str) -> str:
        try:
            await peer.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            # aiortc gathers every candidate before it returns: the answer is complete
            # (no trickle ICE needed from the client).
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        except Exception:
            await self.close(peer.id)
            raise
        return peer.pc.localDescription.sdp

    def _schedule_close(self, peer_id: str) -> None:
        task = asyncio.ensure_future(self.close(peer_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, peer_id: str) -> bool:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return False
        if peer.sink is not None:
            peer.sink.gone.set()
        await peer.pc.close()
        peer.closed.set()
        logger.info("peer closed kind=%s peer=%s session=%s", peer.kind, peer_id, peer.session_id)
        return True

    async def close_session(self, session_id: str) -> None:
        for peer_id in [p.id for p in self.peers.values() if p.session_id == session_id]:
            await self.close(peer_id)

    async def close_all(self) -> None:
        for peer_id in list(self.peers):
            await self.close(peer_id)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
