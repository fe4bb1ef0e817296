"""Media of the live channels: MPEG-TS segments in, RGB frames out, and back (the only av import).

`StreamDecoder` turns the bytes of consecutive trickle segments into one continuous stream of
frames: each segment may come from a different encoder and restart its timestamps, so timestamps
are mapped onto one monotonic 90 kHz timeline (33-bit wraps unwrapped). `SegmentEncoder` encodes
frames with libx264 and muxes them with our own `TSMuxer`, one GOP per segment, streaming each
frame's bytes to a sink as soon as they are muxed.

Both are plain synchronous classes: the session runs them on threads of their own (PyAV releases
the GIL inside FFmpeg calls).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

import av
import av.error
import numpy as np

from .mpegts import (
    MUX_AUDIO,
    PES,
    PTS_WRAP,
    TSDemuxer,
    TSMuxer,
    opus_samples,
    opus_to_90k,
    split_opus,
)

logger = logging.getLogger(__name__)

CLOCK = 90_000
TIME_BASE = Fraction(1, CLOCK)
MAX_GAP = 10 * CLOCK  # a jump ahead larger than this between segments is a timestamp restart
MAX_BACKSTEP = CLOCK // 2  # a segment starting further back than this restarted its clock
AUDIO_LEAD = CLOCK // 25  # audio passed along with a video frame may run this far ahead of it
MIN_SIZE = 16  # the smallest frame libx264 is asked to encode
MIN_CROP = 32  # odd sizes from here up lose one edge row/column; below, that is too much of it


class MediaError(ValueError):
    """A frame or stream the encoder cannot handle; the message says why in plain words."""


Picture = np.ndarray | av.VideoFrame
"""What an encoder takes: H x W x 3 uint8 RGB, or a decoder's frame (YUV 4:2:0 as it is)."""


class HasPicture:
    """A frame held as RGB (`rgb`), as its decoder's YUV frame (`decoded`), or both.

    The RGB image is for pipelines; encoders take the YUV frame as it is (`picture`). A frame
    that a pipeline passes through unchanged (`passes_through`, `noop`) never needs the RGB, so
    a source may leave it out (`MediaContext.needs_rgb`): converting costs about a millisecond
    a frame at 512x512, and converting back for the encoder more. `image` makes it on first
    use, on the caller's thread: the event loop's per-frame paths read `picture` and `size`.
    """

    __slots__ = ()
    rgb: np.ndarray | None
    decoded: av.VideoFrame | None

    @property
    def image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB (made from `decoded` now if it was left out)."""
        if self.rgb is None:
            assert self.decoded is not None
            self.rgb = to_rgb(self.decoded)
        return self.rgb

    @property
    def picture(self) -> Picture:
        """The decoder's frame where there is one (no conversion), else the RGB image."""
        return self.decoded if self.decoded is not None else self.image

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        if self.rgb is not None:
            return self.rgb.shape[1], self.rgb.shape[0]
        assert self.decoded is not None
        return self.decoded.width, self.decoded.height


@dataclass(slots=True)
class VideoFrame(HasPicture):
    """A decoded frame on the session's timeline (see `HasPicture` for `rgb` and `decoded`)."""

    rgb: np.ndarray | None  # H x W x 3, uint8 RGB; None: left out, `decoded` has the picture
    pts: int  # 90 kHz, monotonic over the whole stream
    arrived: float  # time.monotonic() when its last byte arrived
    index: int  # position in the stream, counting from 0
    time_base: Fraction = TIME_BASE  # of pts; always the 90 kHz clock
    # The decoder's frame, YUV 4:2:0 at the size of `rgb`, where a source has it: a sink encodes
    # a frame that a pipeline passed through unchanged without converting it at all.
    decoded: av.VideoFrame | None = None

    def __post_init__(self) -> None:
        if self.rgb is None and self.decoded is None:
            raise ValueError("a video frame needs its RGB image or its decoded frame")


@dataclass(slots=True)
class AudioPacket:
    """Compressed audio carried from input to output unchanged (it bypasses the model)."""

    codec: str  # "aac" (ADTS frames) or "opus" (one raw Opus packet); others are not carried
    pts: int
    data: bytes
    time_base: Fraction = TIME_BASE  # of pts; always the 90 kHz clock


class Timeline:
    """Maps each segment's timestamps onto one increasing timeline.

    The first timestamp of a segment decides its offset: kept when it continues the previous
    segment, re-based right after the last output timestamp when it went back more than
    MAX_BACKSTEP or jumped ahead more than MAX_GAP (a new encoder or a restarted publisher).

    MPEG-TS timestamps are 33-bit and wrap after 26.5 hours: `unwrap` takes each one to the
    value nearest the previous one, so a jump back by about 2**33 is a wrap, not a restart.
    """

    def __init__(self) -> None:
        self.offset = 0
        self.last: int | None = None
        self.step = CLOCK // 30
        self._fresh = True
        self._raw: int | None = None  # the last unwrapped input timestamp

    def unwrap(self, pts: int) -> int:
        """`pts` plus the multiple of 2**33 that puts it nearest the previous timestamp.

        Idempotent on values already unwrapped, so a timestamp may pass through it twice (the
        decoder's packet pts, then the decoded frame's pts).
        """
        if self._raw is not None:
            pts += (self._raw - pts + PTS_WRAP // 2) // PTS_WRAP * PTS_WRAP
        self._raw = pts
        return pts

    def new_segment(self) -> None:
        self._fresh = True

    def map(self, pts: int) -> int:
        pts = self.unwrap(pts)
        if self._fresh:
            self._fresh = False
            if self.last is not None:
                mapped = pts + self.offset
                # A little backwards is normal (audio interleaved behind video); a lot
                # backwards, or a big jump ahead, is a new encoder or a restart.
                if mapped < self.last - MAX_BACKSTEP or mapped > self.last + MAX_GAP:
                    self.offset = self.last + self.step - pts
        out = pts + self.offset
        if self.last is not None and out > self.last:
            self.step = min(out - self.last, CLOCK)
        self.last = out if self.last is None else max(self.last, out)
        return out


class StreamDecoder:
    """Decodes consecutive MPEG-TS segments (H.264 or HEVC video; AAC and Opus passed through).

    `size` (width, height) scales each frame to cover it and crops the centre, as ai-runner
    does; None keeps the input size. Bad data is counted in `errors`, never raised: the next
    good segment recovers. An input without decodable video (another codec, or audio only) is
    reported once per segment through `take_error()`, and `video_problem` says so meanwhile.
    """

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self.needs_rgb = True
        """False: frames that need no scaling carry only the decoded frame (`HasPicture`)."""
        self.timeline = Timeline()
        self.errors = 0
        self.frames = 0
        self._demuxer = TSDemuxer()
        self._codec: av.CodecContext | None = None
        self._codec_name = ""
        self._last_error = ""
        self._video_problem: str | None = None
        self._reported = False  # the video problem was reported in this segment

    @property
    def video_problem(self) -> str | None:
        """Why the input has no video we can decode (None when it has, or before any PMT)."""
        return self._video_problem

    def begin_segment(self) -> None:
        # A fresh demuxer and decoder per segment: segments start with a keyframe and may come
        # from another encoder, so no state from the previous one may leak into this one.
        self._demuxer = TSDemuxer()
        self._codec = None
        self._reported = False
        self.timeline.new_segment()

    def feed(self, data: bytes) -> list[VideoFrame | AudioPacket]:
        out = self._decode(self._demuxer.feed(data))
        self._check_video()
        return out

    def end_segment(self) -> list[VideoFrame | AudioPacket]:
        out = self._decode(self._demuxer.flush())
        self._check_video()
        if self._codec is not None:
            out.extend(self._decode_packet(None, 0, 0))
        bad = self._demuxer.bad_packets + (1 if self._demuxer.skipped_bytes else 0)
        if bad:
            self.errors += bad
            self._add_error(
                f"bad MPEG-TS data: {self._demuxer.skipped_bytes} bytes skipped, "
                f"{self._demuxer.bad_packets} bad packets"
            )
        return out

    def take_error(self) -> str:
        """The errors since the previous call, joined by '; ' ('' if none)."""
        error, self._last_error = self._last_error, ""
        return error

    def _add_error(self, message: str) -> None:
        if message not in self._last_error.split("; "):
            self._last_error = f"{self._last_error}; {message}" if self._last_error else message

    def _check_video(self) -> None:
        if not self._demuxer.pmt_seen:
            return
        self._video_problem = self._demuxer.problem
        if self._video_problem is not None and not self._reported:
            # Once per segment: every packet of an unsupported stream would say the same.
            self._reported = True
            self.errors += 1
            self._add_error(self._video_problem)

    def _decode(self, packets: list[PES]) -> list[VideoFrame | AudioPacket]:
        out: list[VideoFrame | AudioPacket] = []
        for pes in packets:
            if pes.pts is None:
                continue
            if pes.kind == "audio":
                out.extend(self._audio(pes.codec, pes.pts, pes.data))
            elif pes.kind == "video":
                if self._codec is None or self._codec_name != pes.codec:
                    self._codec = _video_decoder(pes.codec)
                    self._codec_name = pes.codec
                pts = self.timeline.unwrap(pes.pts)
                dts = self.timeline.unwrap(pes.dts) if pes.dts is not None else pts
                out.extend(self._decode_packet(pes.data, pts, dts))
        return out

    def _audio(self, codec: str, pts: int, data: bytes) -> list[AudioPacket]:
        if codec != "opus":
            return [AudioPacket(codec, self.timeline.map(pts), data)]
        # One PES may carry several Opus access units: each becomes a packet of its own, its
        # pts advanced by the duration of those before it (read from each packet's TOC).
        out = []
        samples = 0
        for packet in split_opus(data):
            out.append(AudioPacket("opus", self.timeline.map(pts + opus_to_90k(samples)), packet))
            samples += opus_samples(packet)
        return out

    def _decode_packet(self, data: bytes | None, pts: int, dts: int) -> list[VideoFrame]:
        assert self._codec is not None
        packet = None
        if data is not None:
            packet = av.Packet(data)
            # The DTS too: with B-frames the decoder needs both to put frames back in order.
            packet.pts = pts
            packet.dts = dts
            packet.time_base = TIME_BASE
        try:
            decoded = self._codec.decode(packet)
        except av.error.FFmpegError as exc:
            self.errors += 1
            self._add_error(f"video decode failed: {exc}")
            return []
        now = time.monotonic()
        frames = []
        for frame in decoded:
            if frame.pts is None:
                continue
            kept = usable_as_decoded(frame, self.size)
            rgb = None if kept and not self.needs_rgb else to_rgb(frame, self.size)
            pts = self.timeline.map(frame.pts)
            frames.append(VideoFrame(rgb, pts, now, self.frames, decoded=frame if kept else None))
            self.frames += 1
        return frames


def usable_as_decoded(frame: av.VideoFrame, size: tuple[int, int] | None) -> bool:
    """Whether `frame` is the picture as it is, at the size asked for (`to_rgb`'s `size`)."""
    same = size is None or (frame.width, frame.height) == size
    return same and frame.format.name == "yuv420p"


def own_yuv(frame: av.VideoFrame) -> av.VideoFrame:
    """A copy of a decoded YUV 4:2:0 frame (0.07 ms at 512x512) that an encoder may set the
    pts and picture type of: the same decoded frame may be encoding on another sink's thread
    at the same moment, and a keyframe asked for there must not be undone here."""
    return av.VideoFrame.from_numpy_buffer(frame.to_ndarray(), format="yuv420p")


def to_rgb(frame: av.VideoFrame, size: tuple[int, int] | None = None) -> np.ndarray:
    """A decoded frame as H x W x 3 RGB; with `size` (width, height), scaled to cover it and
    centre-cropped, as ai-runner does (any transport's decoded frames go through here)."""
    if size is None or (frame.width, frame.height) == size:
        return frame.to_ndarray(format="rgb24")
    width, height = size
    scale = max(width / frame.width, height / frame.height)
    scaled_w = max(width, round(frame.width * scale))
    scaled_h = max(height, round(frame.height * scale))
    image = frame.reformat(scaled_w, scaled_h, format="rgb24").to_ndarray()
    top = (scaled_h - height) // 2
    left = (scaled_w - width) // 2
    return np.ascontiguousarray(image[top : top + height, left : left + width])


def _video_decoder(codec: str) -> av.CodecContext:
    ctx = av.CodecContext.create(codec, "r")
    # Slice threads decode a frame in parallel without holding frames back; frame threads
    # would add one frame of delay per thread.
    ctx.thread_type = "SLICE"
    ctx.thread_count = 2
    return ctx


class SegmentSink(Protocol):
    """Where encoded segments go; called on the encoder's thread."""

    def start(self) -> None: ...

    def write(self, data: bytes) -> None: ...

    def end(self) -> None: ...


@dataclass
class EncoderSettings:
    segment_s: float = 1.0  # one GOP per segment; a keyframe starts each one
    preset: str = "superfast"
    crf: int = 23
    threads: int = 2


def even_image(image: np.ndarray) -> np.ndarray:
    """`image` as the encoder can take it: H x W x 3 uint8 with even sides.

    yuv420p halves the chroma planes, so libx264 refuses odd sizes: an odd width or height loses
    its last column or row (321x241 is encoded as 320x240). Frames under MIN_SIZE, or odd ones
    under MIN_CROP where one row is a sizeable part of the picture, raise MediaError.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise MediaError(
            f"frame of shape {image.shape} and type {image.dtype}: expected HxWx3 uint8 RGB"
        )
    height, width = image.shape[:2]
    if width < MIN_SIZE or height < MIN_SIZE:
        raise MediaError(
            f"frame size {width}x{height} is too small: at least {MIN_SIZE}x{MIN_SIZE} is needed"
        )
    if width % 2 or height % 2:
        if width < MIN_CROP or height < MIN_CROP:
            raise MediaError(f"odd frame size {width}x{height}: width and height must be even")
        image = image[: height - height % 2, : width - width % 2]
    return image


def h264_encoder(
    width: int, height: int, settings: EncoderSettings, bframes: int = 0
) -> av.VideoCodecContext:
    """An open libx264 encoder writing Annex B (SPS/PPS repeated before every IDR frame).

    A bare codec context, not a container stream: without a container asking for global
    headers, libx264 writes Annex B with in-band parameter sets, which MPEG-TS wants.
    """
    ctx = av.CodecContext.create("libx264", "w")
    assert isinstance(ctx, av.VideoCodecContext)
    ctx.width = width
    ctx.height = height
    ctx.pix_fmt = "yuv420p"
    ctx.time_base = TIME_BASE
    ctx.framerate = Fraction(30)  # only a hint to rate control: timestamps come with frames
    ctx.thread_count = settings.threads
    options = {"preset": settings.preset, "crf": str(settings.crf), "forced-idr": "1"}
    if bframes:
        # zerolatency would turn B-frames off; b-adapt=0 keeps a fixed pattern, so a stream
        # asked to have B-frames (a test clip) really has them.
        options.update({"bf": str(bframes), "x264-params": "b-adapt=0"})
    else:
        options.update({"tune": "zerolatency", "bf": "0"})
    ctx.options = options
    try:
        ctx.open()
    except av.error.FFmpegError as exc:
        raise MediaError(f"the H.264 encoder would not open for {width}x{height}: {exc}") from exc
    return ctx


class SegmentEncoder:
    """Encodes frames (RGB, or decoded YUV as it is) to MPEG-TS segments (H.264, libx264
    zerolatency, no B-frames).

    A segment ends when `segment_s` of input time has passed, the frame size changes, or the
    audio codec changes; each segment is a fresh encoder and muxer, so it starts with PAT/PMT
    and an IDR frame. Each frame's bytes, with the audio passed along with it, reach the sink
    as one write as soon as they are muxed: our muxer holds nothing back. `on_frame(pts)` is
    called once a frame's bytes have been handed to the sink.
    """

    def __init__(
        self,
        sink: SegmentSink,
        settings: EncoderSettings | None = None,
        on_frame: Callable[[int], None] | None = None,
    ) -> None:
        self.sink = sink
        self.settings = settings or EncoderSettings()
        self.on_frame = on_frame
        self.segments = 0
        self._codec: av.VideoCodecContext | None = None
        self._muxer: TSMuxer | None = None
        self._segment_start = 0
        self._last_pts: int | None = None
        self._size = (0, 0)
        self._carry_audio: str | None = None  # once audio came, later segments keep carrying it
        self._fresh = False  # the segment's PAT and PMT are still to be written

    def encode(self, picture: Picture, pts: int, audio: Sequence[AudioPacket] = ()) -> bool:
        """Encode one frame, then mux the passthrough `audio` packets that go with it.

        `picture`: RGB, or a decoded frame, encoded as it is when it is YUV 4:2:0 with even
        sides (else converted to RGB first). Returns True when the frame was encoded and its
        bytes handed to the sink, False when it was dropped (a pts not after the previous one).
        Raises MediaError for a frame the encoder cannot take (see `even_image`).
        """
        if self._last_pts is not None and pts <= self._last_pts:
            return False  # timestamps must increase; a late duplicate is dropped
        image: np.ndarray | None = None
        if isinstance(picture, av.VideoFrame):
            width, height = picture.width, picture.height
            if (
                picture.format.name != "yuv420p"
                or width % 2
                or height % 2
                or min(width, height) < MIN_SIZE
            ):
                image = even_image(picture.to_ndarray(format="rgb24"))
        else:
            image = even_image(picture)
        if image is not None:
            height, width = image.shape[:2]
        carried = [packet for packet in audio if packet.codec in MUX_AUDIO]
        if len(carried) < len(audio):
            logger.debug("audio packets dropped: codec not carried")
        codec = carried[-1].codec if carried else self._carry_audio
        if (
            self._muxer is None
            or (width, height) != self._size
            or pts - self._segment_start >= self.settings.segment_s * CLOCK
            or codec != self._muxer.audio_codec
        ):
            self._close_segment()
            self._open_segment(width, height, pts, codec)
        assert self._codec is not None and self._muxer is not None
        muxer = self._muxer
        if image is None:
            assert isinstance(picture, av.VideoFrame)
            frame = own_yuv(picture)
        else:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts = pts
        frame.time_base = TIME_BASE
        try:
            packets = self._codec.encode(frame)
        except av.error.FFmpegError as exc:
            raise MediaError(f"H.264 encoding failed at pts {pts}: {exc}") from exc
        data = bytearray(muxer.tables() if self._fresh else b"")
        self._fresh = False
        for packet in packets:
            data += muxer.video(bytes(packet), packet.pts, packet.dts, packet.is_keyframe)
        for item in carried:
            if item.codec == muxer.audio_codec:  # a mid-batch codec switch loses those packets
                data += muxer.audio(item.data, item.pts)
        self.sink.write(bytes(data))
        self._last_pts = pts
        if self.on_frame is not None:
            self.on_frame(pts)
        return True

    def close(self) -> None:
        self._close_segment()

    def _open_segment(self, width: int, height: int, pts: int, audio: str | None) -> None:
        codec = h264_encoder(width, height, self.settings)
        self.sink.start()
        self._carry_audio = audio
        self._codec = codec
        self._muxer = TSMuxer("h264", audio)
        self._fresh = True  # PAT and PMT go out with the first frame
        self._segment_start = pts
        self._size = (width, height)
        self.segments += 1

    def _close_segment(self) -> None:
        if self._muxer is None:
            return
        codec, muxer = self._codec, self._muxer
        self._codec = self._muxer = None
        try:
            assert codec is not None
            # zerolatency holds no frames back, so this is normally empty.
            data = b"".join(
                muxer.video(bytes(p), p.pts, p.dts, p.is_keyframe) for p in codec.encode(None)
            )
            if data:
                self.sink.write(data)
        finally:
            self.sink.end()
