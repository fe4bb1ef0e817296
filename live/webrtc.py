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
import random
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction

import av
import av.error
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc import sdp as aiortc_sdp
from aiortc.exceptions import InvalidStateError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import candidate_from_sdp
from av.video.frame import PictureType

from protocol.media import (
    CLOCK,
    TIME_BASE,
    AudioPacket,
    Picture,
    VideoFrame,
    own_yuv,
    to_rgb,
    usable_as_decoded,
)

from .edges import FrameSink, FrameSource, MediaContext, MediaItem, OutputClosed, OutputFrame
from .frame_loop import StreamEnded
from .ice import IceSettings
from .rtc_receive import FreshDecodeQueue, bound_decode_wait, end_frames_on_marker
from .sdpfrag import Fragment
from .slot import LatestSlot, put_dropping_oldest
from .threads import run_in

logger = logging.getLogger(__name__)

RTP_WRAP = 1 << 32
OPUS_RATE = 48_000
WHIP_BACKLOG = 120  # items waiting for the frame loop (it takes them at once; bounded anyway)
AUDIO_BACKLOG_FRAMES = 50  # decoded audio frames a WHEP viewer may trail by (1 s)


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


def bound_udp_ports(loop: asyncio.AbstractEventLoop, low: int, high: int) -> Callable[[], None]:
    """Bind the UDP sockets that ICE opens on "any port" within `low`..`high` (a firewall
    rule can then name them). aioice has no setting for it and binds port 0, so the loop's
    `create_datagram_endpoint` is wrapped for the app's loop; in this service only ICE opens
    UDP sockets on port 0. Returns the function that puts the loop back as it was."""
    original = loop.create_datagram_endpoint
    used_up = False  # warned already: once per time the range fills, not once per peer

    async def create(protocol_factory, local_addr=None, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal used_up
        if local_addr is None or local_addr[1] != 0:
            return await original(protocol_factory, local_addr=local_addr, **kwargs)
        ports = list(range(low, high + 1))
        random.shuffle(ports)  # peers spread over the range rather than racing for its start
        for port in ports:
            try:
                bound = await original(protocol_factory, local_addr=(local_addr[0], port), **kwargs)
            except OSError:
                continue
            used_up = False
            return bound
        if not used_up:
            used_up = True
            logger.warning(
                "every UDP port in %d-%d (--webrtc-udp-ports) is in use: WebRTC connections "
                "are refused (503) until one leaves; widen the range for more",
                low,
                high,
            )
        raise OSError(f"no free UDP port in {low}-{high} (--webrtc-udp-ports)")

    loop.create_datagram_endpoint = create  # type: ignore[method-assign]

    def restore() -> None:
        loop.create_datagram_endpoint = original  # type: ignore[method-assign]

    return restore


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
    """Frames and sound of whoever publishes over WHIP, one publisher at a time; a publisher
    that comes back continues the same session (the frame loop's input timeout ends it
    otherwise). Audio arrives decoded from aiortc and is encoded to Opus again, so it travels
    like any other input's audio (to trickle as Opus in MPEG-TS, to WHEP viewers)."""

    name = "whip"
    arrives_live = True

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self._items: asyncio.Queue[MediaItem] = asyncio.Queue(maxsize=WHIP_BACKLOG)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="decode-whip")
        self._video_clock = _RtpClock()
        self._readers: set[asyncio.Task[None]] = set()
        self._index = 0
        self._anchor: tuple[int, float] | None = None  # (video pts, when it arrived)
        self._stale = 0  # frames dropped before conversion (decoded, or by a past decoder)
        self._counted = 0  # of those and the current decoder's drops, already in the stats
        self._decode_queue: FreshDecodeQueue | None = None
        self._context: MediaContext | None = None
        self.closed = False

    def attach(self, track: MediaStreamTrack, pc: RTCPeerConnection | None = None) -> None:
        """A track of a new publisher (aiortc's `track` event, before any packet) on its peer
        connection: its receiver ends frames on their marker bit, as browsers do, and its
        decoder's backlog is bounded (live/rtc_receive.py)."""
        if track.kind == "video" and pc is not None:
            for transceiver in pc.getTransceivers():
                if transceiver.receiver.track is track:
                    end_frames_on_marker(transceiver.receiver)
                    self._watch_decoder(bound_decode_wait(transceiver.receiver))
        reader = self._read_video(track) if track.kind == "video" else self._read_audio(track)
        task = asyncio.ensure_future(reader)
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    def _watch_decoder(self, queue: FreshDecodeQueue | None) -> None:
        if self._decode_queue is not None:  # the previous publisher's: keep its count
            self._stale += self._decode_queue.dropped
        self._decode_queue = queue

    def _put(self, item: MediaItem) -> None:
        put_dropping_oldest(self._items, item)  # the loop is behind: the oldest goes

    async def _read_video(self, track: MediaStreamTrack) -> None:
        self._video_clock.new_publisher()
        newest: LatestSlot[tuple[av.VideoFrame, float]] = LatestSlot()
        receiving = asyncio.ensure_future(self._receive_newest(track, newest))
        try:
            while (taken := await newest.get()) is not None:
                frame, arrived = taken
                kept = usable_as_decoded(frame, self.size)
                needs_rgb = self._context is None or self._context.needs_rgb
                image = None
                if needs_rgb or not kept:
                    image = await run_in(self._thread, to_rgb, frame, self.size)
                pts = self._video_clock.map(_to_clock(frame))
                now = time.monotonic()
                self._anchor = (pts, now)
                if self._context is not None:
                    self._context.stats.stage("decode", now - arrived)
                decoded = frame if kept else None
                self._put(VideoFrame(image, pts, arrived, self._index, decoded=decoded))
                self._index += 1
            logger.info("WHIP publisher left; waiting for it to come back")
        finally:
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving

    async def _receive_newest(
        self, track: MediaStreamTrack, newest: LatestSlot[tuple[av.VideoFrame, float]]
    ) -> None:
        """Take every decoded frame from aiortc as it comes and keep only the newest, with
        when its last packet arrived (when it was taken, where the receiver does not say).

        aiortc queues decoded frames without bound until `recv` takes them; when the RGB
        conversion (or the machine) is slower than the camera, that queue is where frames
        waited, seconds under CPU starvation. Taking them here, on the event loop, leaves at
        most one frame waiting, and the conversion always starts on the newest."""
        decoder = self._decode_queue
        try:
            while True:
                frame = await track.recv()
                arrival = decoder.arrival(frame.pts) if decoder is not None else None
                arrived = time.monotonic() if arrival is None else arrival[1]
                if arrival is not None and self._context is not None:
                    self._context.stats.stage("receive", arrival[1] - arrival[0])
                if newest.put((frame, arrived)):
                    self._stale += 1
        except MediaStreamError:
            pass
        finally:
            newest.close()

    async def _read_audio(self, track: MediaStreamTrack) -> None:
        # RTP gives each track a clock of its own: the publisher's first audio packet is
        # placed by its arrival against the newest video frame, the rest by sample count.
        encoder = _OpusEncoder()
        zero: int | None = None
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                for data, samples in await run_in(self._thread, encoder.encode, frame):
                    if zero is None:
                        zero = self._video_now()
                    self._put(AudioPacket("opus", zero + samples * CLOCK // OPUS_RATE, data))

    def _video_now(self) -> int:
        if self._anchor is None:
            return 0
        pts, at = self._anchor
        return pts + int((time.monotonic() - at) * CLOCK)

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        self._context = context
        while True:
            item = await self._items.get()
            stale = self._stale + (self._decode_queue.dropped if self._decode_queue else 0)
            if stale > self._counted:
                # Counted with the loop's own drops, as frames_dropped.
                context.stats.input_dropped += stale - self._counted
                self._counted = stale
            yield item

    async def close(self) -> None:
        self.closed = True
        for task in list(self._readers):
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._thread.shutdown(wait=False)


class _OpusEncoder:
    """PCM from aiortc to 20 ms Opus packets at 48 kHz (on the source's thread)."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "w")
        self._codec.sample_rate = OPUS_RATE
        self._codec.layout = "stereo"
        self._codec.format = "s16"
        self._codec.time_base = Fraction(1, OPUS_RATE)
        self._codec.options = {"frame_duration": "20", "application": "lowdelay"}
        self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE)
        self._samples = 0

    def encode(self, frame: av.AudioFrame) -> list[tuple[bytes, int]]:
        """(packet, its first sample counted from the publisher's first) for each packet."""
        out = []
        for pcm in self._resampler.resample(frame):
            pcm.pts = self._samples
            self._samples += pcm.samples
            for packet in self._codec.encode(pcm):
                if packet.pts is not None and packet.pts >= 0:
                    out.append((bytes(packet), int(packet.pts)))
        return out


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
        picture = frame.picture
        if isinstance(picture, av.VideoFrame):
            out = own_yuv(picture)  # aiortc's encoder takes YUV 4:2:0 as it is
        else:
            out = av.VideoFrame.from_ndarray(picture, format="rgb24")
        out.pts = frame.pts
        out.time_base = TIME_BASE
        self.taken.set()
        return out


class _OutputAudioTrack(MediaStreamTrack):
    """The sound a WHEP viewer receives: the session's audio, decoded for aiortc's encoder."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.frames: asyncio.Queue[av.AudioFrame | None] = asyncio.Queue(
            maxsize=AUDIO_BACKLOG_FRAMES
        )
        self._decoders: dict[str, av.CodecContext] = {}
        # aiortc's Opus encoder takes 48 kHz stereo s16 only.
        self._resampler = av.AudioResampler(format="s16", layout="stereo", rate=OPUS_RATE)
        self._samples = 0

    def feed(self, packets: Sequence[AudioPacket]) -> None:
        for packet in packets:
            decoder = self._decoders.get(packet.codec)
            if decoder is None:
                decoder = self._decoders[packet.codec] = av.CodecContext.create(packet.codec, "r")
            try:
                decoded = decoder.decode(av.Packet(packet.data))
            except av.error.FFmpegError:
                continue  # one bad packet is a click, not a reason to stop the sound
            for frame in (out for d in decoded for out in self._resampler.resample(d)):
                frame.pts = self._samples
                frame.time_base = Fraction(1, OPUS_RATE)
                self._samples += frame.samples
                put_dropping_oldest(self.frames, frame)  # a viewer behind loses old sound

    async def recv(self) -> av.AudioFrame:
        frame = await self.frames.get()
        if frame is None:
            raise MediaStreamError
        return frame

    def end(self) -> None:
        put_dropping_oldest(self.frames, None)


class WhepSink(FrameSink):
    """One WHEP viewer. `send` returns once aiortc took the frame to encode it, so the frame
    loop's slot for this viewer is the only place its frames wait (and are dropped)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.primary = False
        self.track = _OutputTrack()
        self.audio = _OutputAudioTrack()
        self.gone = asyncio.Event()
        self.shared: tuple[SharedVideoSink, _PacketTrack] | None = None
        """Set when this viewer's video comes from the session's shared encoder."""

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if self.gone.is_set():
            raise OutputClosed(f"viewer {self.name} left")
        if audio:
            self.audio.feed(audio)
        if self.shared is not None:
            return True  # the video goes out through the shared encoder's sink
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
        self.audio.end()
        self.audio.stop()
        if self.shared is not None:
            encoder, track = self.shared
            encoder.remove_viewer(track)


KEYFRAME_EVERY_S = 2.0  # with one encoder for all viewers, a lost picture heals by the next
VIEWER_BACKLOG = 30  # encoded frames a viewer may trail by before it resyncs on a keyframe
SHARED_CODECS = {"video/VP8": "libvpx", "video/H264": "libx264"}


class _PacketTrack(MediaStreamTrack):
    """A viewer's video when one encoder serves every viewer: already encoded frames, from a
    keyframe on. A viewer that falls behind skips to the next keyframe."""

    kind = "video"

    def __init__(
        self,
        on_resync: Callable[[], None],
        on_sent: Callable[[float, float], None] = lambda encoded, arrived: None,
    ) -> None:
        super().__init__()
        self.packets: asyncio.Queue[av.Packet | None] = asyncio.Queue(maxsize=VIEWER_BACKLOG)
        self.waiting_for_key = True
        self._on_resync = on_resync
        self._on_sent = on_sent
        self._times: dict[int, tuple[float, float]] = {}  # id(packet) -> (encoded, arrived)
        self._sending: tuple[float, float] | None = None

    def offer(
        self, packets: Sequence[av.Packet], encoded: float = 0.0, arrived: float = 0.0
    ) -> None:
        for packet in packets:
            if self.waiting_for_key and not packet.is_keyframe:
                continue
            if self.packets.full():
                # Behind by a whole backlog: drop it all and start again at a keyframe.
                while not self.packets.empty():
                    self.packets.get_nowait()
                self._times.clear()
                self.waiting_for_key = True
                self._on_resync()
                continue
            self.waiting_for_key = False
            self.packets.put_nowait(packet)
            if packet is packets[-1]:  # timed once its frame's last packet is sent
                self._times[id(packet)] = (encoded, arrived)

    async def recv(self) -> av.Packet:
        # aiortc's sender asks for the next packet right after the RTP packets of the one
        # before went to the socket: now is when the last frame left.
        if self._sending is not None:
            self._on_sent(*self._sending)
            self._sending = None
        packet = await self.packets.get()
        if packet is None:
            raise MediaStreamError
        self._sending = self._times.pop(id(packet), None)
        return packet

    def end(self) -> None:
        put_dropping_oldest(self.packets, None)


class _SharedEncoder:
    """One encoder (on its own thread) for every viewer of a session that speaks `mime`."""

    def __init__(self, mime: str) -> None:
        self.mime = mime
        self._codec: av.CodecContext | None = None
        self._size = (0, 0)
        self._last_key = -1.0
        self.want_key = True

    def encode(self, picture: Picture, pts: int) -> list[av.Packet]:
        """`picture`: RGB, or a decoded YUV 4:2:0 frame (an input passed through unchanged),
        encoded as it is: no conversion to RGB and back."""
        if isinstance(picture, av.VideoFrame):
            width, height = picture.width, picture.height
        else:
            height, width = picture.shape[:2]
        if self._codec is None or (width, height) != self._size:
            self._codec = self._open(width - width % 2, height - height % 2)
            self._size = (width, height)
        codec = self._codec
        if isinstance(picture, av.VideoFrame) and (width, height) == (codec.width, codec.height):
            # A copy of its own: another sink may be encoding the same decoded frame on its
            # thread now (a viewer of the other codec, a recording), and sets its pts and type.
            yuv = own_yuv(picture)
        else:
            if isinstance(picture, av.VideoFrame):
                picture = picture.to_ndarray(format="rgb24")
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            yuv = frame.reformat(codec.width, codec.height, format="yuv420p")
        yuv.pts = pts
        yuv.time_base = TIME_BASE
        now = time.monotonic()
        if self.want_key or now - self._last_key >= KEYFRAME_EVERY_S:
            yuv.pict_type = PictureType.I
            self.want_key = False
            self._last_key = now
        packets = list(codec.encode(yuv))
        for packet in packets:
            packet.time_base = TIME_BASE
        return packets

    def _open(self, width: int, height: int) -> av.CodecContext:
        codec = av.CodecContext.create(SHARED_CODECS[self.mime], "w")
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = TIME_BASE
        codec.framerate = 30
        codec.bit_rate = 1_000_000
        if self.mime == "video/H264":
            # What aiortc's own H.264 sender offers: constrained baseline, no B-frames.
            codec.options = {"profile": "baseline", "tune": "zerolatency", "preset": "superfast"}
        else:
            codec.options = {"deadline": "realtime", "cpu-used": "16", "lag-in-frames": "0"}
            # One thread. libvpx's own workers wait for one another by spinning, so on a busy
            # machine a frame cost 37-51 ms of CPU and up to 190 ms wall at 640x480 with its
            # default threads, 2-3 ms and under 12 ms with one (bench/starvation.py).
            codec.thread_count = 1
        return codec


class SharedVideoSink(FrameSink):
    """Encodes the session's output once for all WHEP viewers of one codec; each viewer's
    track gets the packets. It leaves the frame loop when its last viewer has gone."""

    def __init__(self, mime: str) -> None:
        self.name = f"whep-{mime.split('/')[1].lower()}"
        self.primary = False
        self.realtime = True
        self.encoder = _SharedEncoder(mime)
        self.viewers: set[_PacketTrack] = set()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="encode-whep")
        self._context: MediaContext | None = None
        self.closed = False

    async def open(self, context: MediaContext) -> None:
        self._context = context

    def add_viewer(self) -> _PacketTrack:
        track = _PacketTrack(self._want_key, self._sent)
        self.viewers.add(track)
        self._want_key()  # a new viewer starts at a keyframe, made for it now
        return track

    def remove_viewer(self, track: _PacketTrack) -> None:
        self.viewers.discard(track)
        track.end()

    def _want_key(self) -> None:
        self.encoder.want_key = True

    def _sent(self, encoded: float, arrived: float) -> None:
        if self._context is not None:
            now = time.monotonic()
            self._context.stats.stage("whep_send", now - encoded)
            self._context.stats.stage("whep_delay", now - arrived)

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        if not self.viewers:
            raise OutputClosed("no viewer left")
        started = time.monotonic()
        packets = await run_in(self._thread, self.encoder.encode, frame.picture, frame.pts)
        encoded = time.monotonic()
        if self._context is not None:
            self._context.stats.stage("whep_encode", encoded - started)
        for viewer in list(self.viewers):
            viewer.offer(packets, encoded, frame.arrived)
        return True

    async def close(self) -> None:
        self.closed = True
        for track in list(self.viewers):
            self.remove_viewer(track)
        self._thread.shutdown(wait=False)


def take_dtls_server_role(pc: RTCPeerConnection, offer: aiortc_sdp.SessionDescription) -> None:
    """Answer `a=setup:passive` to an offer that leaves the DTLS role to us (`actpass`), and
    really be the DTLS server, as WHIP endpoints commonly are.

    aiortc answers `active` (it is the DTLS client) unless its transport already has a role,
    and as a client it offers only ECDHE-ECDSA ciphers: a client whose DTLS server holds an
    RSA certificate (GStreamer's webrtcbin) finds "no shared cipher". As the server aiortc
    presents its own ECDSA certificate, which every WebRTC stack accepts. The role is set on
    this connection's transports between the offer and the answer, the one window where
    aiortc keeps a role that is already set (createAnswer writes it into the answer and
    setLocalDescription applies it): no aiortc code is replaced. An offer that says `active`
    already made aiortc the server; one that says `passive` keeps aiortc the client.
    """
    if any(media.dtls is not None and media.dtls.role == "server" for media in offer.media):
        return  # the client insists on being the DTLS server: stay the client
    transports = {id(t.receiver.transport): t.receiver.transport for t in pc.getTransceivers()}
    if pc.sctp is not None:
        transports[id(pc.sctp.transport)] = pc.sctp.transport
    for transport in transports.values():
        if transport.state == "new":
            transport._set_role("server")  # aiortc's own setter, used by setRemoteDescription


class ClosedWhileAnswering(RuntimeError):
    """The connection was closed (its session ended) while its offer was being answered."""


class NoCandidates(RuntimeError):
    """No ICE candidate could be gathered for an answer: no UDP port could be bound (a used-up
    --webrtc-udp-ports range) or no address to bind on. Such an answer cannot connect."""


class Reservation:
    """A place counted against a limit from before the first await of a request until its
    peer connection exists (or the request fails): `release` is idempotent."""

    def __init__(self, counts: Counter[tuple[str, str]], key: tuple[str, str]) -> None:
        self._counts = counts
        self._key = key
        self._held = True
        counts[key] += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counts[self._key] -= 1
            if self._counts[self._key] <= 0:
                del self._counts[self._key]  # no key left behind per session that ever had one


@dataclass
class Peer:
    id: str
    kind: str  # "whip" or "whep"
    session_id: str
    pc: RTCPeerConnection
    sink: WhepSink | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    etag: str = field(default_factory=lambda: f'"{secrets.token_hex(8)}"')
    """The strong entity-tag of the ICE session (RFC 9725 §4.3.1): PATCHes must name it."""
    remote_ice: tuple[str, str] = ("", "")
    """The client's ICE ufrag and password from its offer; others in a PATCH are a restart."""
    trickled: int = 0
    """Remote candidates received by PATCH so far (bounded by --webrtc-max-candidates)."""
    deadline: asyncio.TimerHandle | None = None
    """Closes the connection unless it connects in time (--webrtc-connect-timeout-s)."""
    answered: bool = False
    """Its answer is made (before that, its request is still negotiating)."""


class Peers:
    """Every peer connection of the app, by the unguessable id in its resource URL."""

    def __init__(self, ice: IceSettings, connect_timeout_s: float = 20.0) -> None:
        self.ice = ice
        self.connect_timeout_s = connect_timeout_s
        self.peers: dict[str, Peer] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._shared: dict[tuple[str, str], SharedVideoSink] = {}
        self._reserved: Counter[tuple[str, str]] = Counter()

    def count(self, session_id: str, kind: str) -> int:
        """Peers of `kind` on the session, with the requests reserved for and not yet done."""
        return self._reserved[(session_id, kind)] + sum(
            1 for p in self.peers.values() if p.session_id == session_id and p.kind == kind
        )

    def reserve(self, session_id: str, kind: str, limit: int) -> Reservation | None:
        """A place for one more peer of `kind` if fewer than `limit` are there or coming;
        taken with the check, in one step, so requests that arrive together cannot all pass."""
        if self.count(session_id, kind) >= limit:
            return None
        return Reservation(self._reserved, (session_id, kind))

    async def publish(self, session_id: str, source: WhipSource, offer: str) -> tuple[Peer, str]:
        """A WHIP publisher: its tracks feed `source`; returns the peer and the SDP answer."""
        pc = RTCPeerConnection(configuration(self.ice))
        peer = self._add("whip", session_id, pc)
        pc.on("track", lambda track: source.attach(track, pc))
        return peer, await self._answer(peer, offer)

    async def play(
        self,
        session_id: str,
        offer: str,
        add_sink: Callable[[FrameSink], None],
        reservation: Reservation | None = None,
    ) -> tuple[Peer, str]:
        """A WHEP viewer: its sinks go on the session through `add_sink`; returns the peer
        and the answer. Viewers whose codec is VP8 or H.264 share one encoder per codec.
        The peer takes the place of `reservation` (in the same step: counted once)."""
        pc = RTCPeerConnection(configuration(self.ice))
        peer = self._add("whep", session_id, pc)
        if reservation is not None:
            reservation.release()
        peer.sink = sink = WhepSink(f"whep-{peer.id[:8]}")

        def add_tracks() -> None:
            # Only the kinds the viewer asked for: a track its offer has no m-line for
            # would have nowhere to go. The codec is known once the offer is set.
            for transceiver in pc.getTransceivers():
                if transceiver.kind == "audio":
                    pc.addTrack(sink.audio)
                    continue
                codecs = transceiver._codecs  # aiortc: the negotiated codecs, chosen first
                mime = codecs[0].mimeType if codecs else ""
                if mime in SHARED_CODECS:
                    encoder = self._shared_sink(session_id, mime, add_sink)
                    track = encoder.add_viewer()
                    sink.shared = (encoder, track)
                    pc.addTrack(track)
                else:
                    pc.addTrack(sink.track)

        try:
            answer = await self._answer(peer, offer, add_tracks)
            add_sink(sink)
        except StreamEnded as exc:  # the session stopped while this viewer negotiated
            await self.close(peer.id)
            await sink.close()
            raise ClosedWhileAnswering("the session ended during this answer") from exc
        return peer, answer

    def _shared_sink(
        self, session_id: str, mime: str, add_sink: Callable[[FrameSink], None]
    ) -> SharedVideoSink:
        found = self._shared.get((session_id, mime))
        if found is None or found.closed:
            found = SharedVideoSink(mime)
            add_sink(found)  # first: a stream that has ended refuses it (`StreamEnded`)
            self._shared[(session_id, mime)] = found
        return found

    def _add(self, kind: str, session_id: str, pc: RTCPeerConnection) -> Peer:
        peer = Peer(secrets.token_hex(16), kind, session_id, pc)
        self.peers[peer.id] = peer

        @pc.on("connectionstatechange")
        def changed() -> None:
            if pc.connectionState == "connected" and peer.deadline is not None:
                peer.deadline.cancel()
            if pc.connectionState in ("failed", "closed"):
                self._schedule_close(peer.id)

        return peer

    def _not_connected(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is not None and peer.pc.connectionState != "connected":
            # A client that took the answer and never did ICE (or left mid-way): its
            # sockets and its place under --max-viewers go back.
            logger.info(
                "peer not connected within %s s (--webrtc-connect-timeout-s), closing "
                "kind=%s peer=%s session=%s",
                self.connect_timeout_s,
                peer.kind,
                peer_id,
                peer.session_id,
            )
            self._schedule_close(peer_id)

    async def _answer(
        self, peer: Peer, offer: str, before_answer: Callable[[], None] = lambda: None
    ) -> str:
        try:
            description = aiortc_sdp.SessionDescription.parse(offer)
            await peer.pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
            take_dtls_server_role(peer.pc, description)
            ice = next((m.ice for m in description.media if m.ice is not None), None)
            if ice is not None:
                peer.remote_ice = (ice.usernameFragment or "", ice.password or "")
            before_answer()
            # aiortc gathers every candidate before it returns: the answer is complete
            # (the client may still trickle its own candidates: `trickle`).
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
            answer = peer.pc.localDescription.sdp
            if "a=candidate:" not in answer:
                raise NoCandidates("no ICE candidate could be gathered for the answer")
        except InvalidStateError as exc:
            if peer.id in self.peers:
                await self.close(peer.id)
                raise
            raise ClosedWhileAnswering("the connection was closed during its answer") from exc
        except BaseException:  # a client that left cancels the request: its peer goes too
            await self.close(peer.id)
            raise
        peer.answered = True
        peer.deadline = asyncio.get_running_loop().call_later(
            self.connect_timeout_s, self._not_connected, peer.id
        )
        return answer

    async def trickle(self, peer: Peer, fragment: Fragment) -> None:
        """Add a client's trickled candidates (and its end-of-candidates) to its connection.
        Candidates aiortc cannot use (TCP, another transport's, after end-of-candidates) are
        dropped silently, as RFC 9725 §4.3.2 asks."""
        mids = [t.mid for t in peer.pc.getTransceivers()]
        for item in fragment.candidates:
            candidate = candidate_from_sdp(item.line)
            candidate.sdpMid = item.mid
            candidate.sdpMLineIndex = item.mline_index
            if item.mid is None and item.mline_index < len(mids):
                candidate.sdpMid = mids[item.mline_index]
            if candidate.protocol.lower() != "udp":
                continue
            with contextlib.suppress(ValueError):  # aioice: after end-of-candidates
                await peer.pc.addIceCandidate(candidate)
        if fragment.end_of_candidates:
            with contextlib.suppress(ValueError):
                await peer.pc.addIceCandidate(None)

    def _schedule_close(self, peer_id: str) -> None:
        task = asyncio.ensure_future(self.close(peer_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, peer_id: str) -> bool:
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return False
        if peer.deadline is not None:
            peer.deadline.cancel()
        if peer.sink is not None:
            peer.sink.gone.set()
            if peer.sink.shared is not None:
                encoder, track = peer.sink.shared
                encoder.remove_viewer(track)
        await peer.pc.close()
        peer.closed.set()
        logger.info("peer closed kind=%s peer=%s session=%s", peer.kind, peer_id, peer.session_id)
        return True

    async def close_session(self, session_id: str) -> None:
        for peer_id in [p.id for p in self.peers.values() if p.session_id == session_id]:
            await self.close(peer_id)
        for key in [k for k in self._shared if k[0] == session_id]:
            del self._shared[key]

    async def close_all(self) -> None:
        for peer_id in list(self.peers):
            await self.close(peer_id)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
