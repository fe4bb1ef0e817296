"""Media: our MPEG-TS muxer and demuxer, the decoder and encoder, on real PyAV encodes/decodes.

FFmpeg's own demuxer is the referee for what we write; clips from `protocol.clips` (and FFmpeg's
muxer, for codecs we refuse) are what we read.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable
from fractions import Fraction

import av
import numpy as np
import pytest

from protocol.clips import (
    Clip,
    audio_only_clip,
    foreign_clip,
    make_clip,
    numbered_frame,
    read_index,
    tone,
)
from protocol.media import (
    CLOCK,
    TIME_BASE,
    AudioPacket,
    EncoderSettings,
    MediaError,
    SegmentEncoder,
    StreamDecoder,
    Timeline,
    VideoFrame,
)
from protocol.mpegts import (
    PTS_WRAP,
    TS_PACKET,
    TSDemuxer,
    TSMuxer,
    opus_control_header,
    opus_samples,
    split_opus,
)

FRAME = CLOCK // 30


class Sink:
    """A SegmentSink keeping each segment's bytes."""

    def __init__(self) -> None:
        self.segments: list[bytearray] = []
        self.open = False

    def start(self) -> None:
        assert not self.open
        self.open = True
        self.segments.append(bytearray())

    def write(self, data: bytes) -> None:
        assert self.open
        self.segments[-1] += data

    def end(self) -> None:
        self.open = False


def decode(
    segments: list[bytes], chunk: int = 1316, decoder: StreamDecoder | None = None
) -> tuple[list[VideoFrame], list[AudioPacket], list[str], StreamDecoder]:
    """Everything a StreamDecoder gives for `segments` fed in `chunk`-byte pieces."""
    decoder = decoder or StreamDecoder()
    frames: list[VideoFrame] = []
    audio: list[AudioPacket] = []
    errors = []
    for segment in segments:
        decoder.begin_segment()
        items = []
        for i in range(0, len(segment), chunk):
            items += decoder.feed(segment[i : i + chunk])
        items += decoder.end_segment()
        for item in items:
            if isinstance(item, VideoFrame):
                frames.append(item)
            else:
                audio.append(item)
        errors.append(decoder.take_error())
    return frames, audio, errors, decoder


def ffmpeg_decode(segment: bytes, kind: str) -> list[av.VideoFrame] | list[av.AudioFrame]:
    with av.open(io.BytesIO(segment), format="mpegts") as container:
        return list(container.decode(**{kind: 0}))


def ts_packets(data: bytes) -> list[bytes]:
    assert len(data) % TS_PACKET == 0
    return [data[i : i + TS_PACKET] for i in range(0, len(data), TS_PACKET)]


def pid_of(packet: bytes) -> int:
    return ((packet[1] & 0x1F) << 8) | packet[2]


# --- video round trips ---------------------------------------------------------------------------


def test_video_round_trip_through_our_decoder() -> None:
    clip = make_clip(60)
    frames, audio, errors, decoder = decode(clip.segment_bytes())
    assert [read_index(f.image) for f in frames] == list(range(60))
    assert [f.pts for f in frames] == clip.pts
    assert [f.index for f in frames] == list(range(60))
    assert all(f.time_base == TIME_BASE for f in frames)
    assert audio == [] and errors == ["", ""] and decoder.errors == 0
    assert decoder.video_problem is None


def test_each_frame_decodes_as_soon_as_its_bytes_arrive() -> None:
    # The PES length is filled in, so a frame is complete without waiting for the next one.
    clip = make_clip(30)
    decoder = StreamDecoder()
    decoder.begin_segment()
    for i, data in enumerate(clip.segments[0]):
        items = decoder.feed(data)
        assert [read_index(item.image) for item in items] == [i]


def test_ffmpeg_demuxes_and_decodes_our_segments() -> None:
    clip = make_clip(60)
    first = 0
    for segment in clip.segment_bytes():
        packets = ts_packets(segment)
        assert [pid_of(p) for p in packets[:2]] == [0, 0x1000]  # PAT, PMT open each segment
        frames = ffmpeg_decode(segment, "video")
        count = len(frames)
        assert [f.pts for f in frames] == clip.pts[first : first + count]
        assert [read_index(f.to_ndarray(format="rgb24")) for f in frames] == list(
            range(first, first + count)
        )
        first += count
    assert first == 60


def test_ts_packets_are_well_formed() -> None:
    clip = make_clip(30, audio=True)
    segment = clip.segment_bytes()[0]
    counters: dict[int, int] = {}
    keyframe_starts = 0
    for packet in ts_packets(segment):
        assert packet[0] == 0x47
        pid = pid_of(packet)
        cc = packet[3] & 0x0F
        if pid in counters:
            assert cc == (counters[pid] + 1) & 0x0F, f"continuity broken on pid {pid:#x}"
        counters[pid] = cc
        has_af = packet[3] & 0x20
        if pid == 0x100 and packet[1] & 0x40 and has_af and packet[4]:
            flags = packet[5]
            assert flags & 0x10, "PCR on every video access unit"
            keyframe_starts += bool(flags & 0x40)
    assert set(counters) == {0, 0x1000, 0x100, 0x101}
    assert keyframe_starts == 1  # one GOP per segment: only its first frame is random access


def test_bframes_decode_every_frame_in_order() -> None:
    clip = make_clip(60, bframes=2)
    demuxer = TSDemuxer()
    units = demuxer.feed(clip.segment_bytes()[0]) + demuxer.flush()
    decode_order = [unit.pts for unit in units]
    assert decode_order != sorted(decode_order), "the clip should have reordered B-frames"
    assert any(unit.dts != unit.pts for unit in units)
    frames, _, errors, _ = decode(clip.segment_bytes())
    assert [read_index(f.image) for f in frames] == list(range(60))
    assert [f.pts for f in frames] == clip.pts
    assert errors == ["", ""]
    ffmpeg = ffmpeg_decode(clip.segment_bytes()[0], "video")
    assert [f.pts for f in ffmpeg] == clip.pts[: len(ffmpeg)]


def test_pts_wrap_keeps_timestamps_increasing() -> None:
    first_pts = PTS_WRAP - 30 * FRAME  # wraps one second in, mid-segment
    clip = make_clip(90, first_pts=first_pts, audio=True)
    frames, audio, errors, _ = decode(clip.segment_bytes())
    assert [read_index(f.image) for f in frames] == list(range(90))
    assert [f.pts - first_pts for f in frames] == [i * FRAME for i in range(90)]
    assert [a.pts for a in audio] == clip.audio_pts  # unwrapped as well
    assert all(b.pts > a.pts for a, b in itertools.pairwise(audio))
    assert errors == ["", "", ""]


def test_timeline_unwraps_both_ways_and_is_idempotent() -> None:
    timeline = Timeline()
    assert timeline.unwrap(PTS_WRAP - 10) == PTS_WRAP - 10
    assert timeline.unwrap(5) == PTS_WRAP + 5  # forward across the wrap
    assert timeline.unwrap(PTS_WRAP - 20) == PTS_WRAP - 20  # a late packet from before it
    assert timeline.unwrap(PTS_WRAP + 30) == PTS_WRAP + 30  # already unwrapped: unchanged


def test_restart_after_segment_is_still_rebased() -> None:
    first = make_clip(30, first_pts=5 * CLOCK)
    second = make_clip(30)  # a new encoder starting again from 0
    frames, _, _, _ = decode(first.segment_bytes() + second.segment_bytes())
    pts = [f.pts for f in frames]
    assert len(pts) == 60 and all(b > a for a, b in itertools.pairwise(pts))


# --- audio ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["aac", "opus"])
def test_audio_passthrough_round_trip(codec: str) -> None:
    clip = make_clip(60, audio=codec)
    frames, audio, errors, _ = decode(clip.segment_bytes())
    assert len(frames) == 60 and errors == ["", ""]
    assert {a.codec for a in audio} == {codec}
    assert [a.pts for a in audio] == clip.audio_pts
    video_s = 60 / 30
    # FFmpeg decodes our segments' audio; together they last as long as the video.
    samples = 0
    for segment in clip.segment_bytes():
        decoded = ffmpeg_decode(segment, "audio")
        assert decoded and all(f.sample_rate == 48_000 for f in decoded)
        samples += sum(f.samples for f in decoded)
    assert abs(samples / 48_000 - video_s) <= 1 / 30
    if codec == "opus":
        # What our decoder hands on is raw Opus: a bare Opus decoder takes it as is.
        ctx = av.CodecContext.create("opus", "r")
        ctx.sample_rate = 48_000
        ctx.layout = "stereo"
        decoded = [f for a in audio for f in ctx.decode(av.Packet(a.data))]
        assert len(decoded) == len(audio) and all(f.samples == 960 for f in decoded)
        assert abs(len(audio) * 960 / 48_000 - video_s) <= 1 / 30


def test_opus_pes_with_several_packets_is_split() -> None:
    packets = [p.data for p in tone(0.1, codec="opus")][:3]
    muxer = TSMuxer("h264", "opus")
    segment = muxer.tables() + muxer.audio(packets, 9000)
    _, audio, errors, _ = decode([segment])
    assert [a.data for a in audio] == packets
    assert [a.pts for a in audio] == [9000, 9000 + 1800, 9000 + 3600]  # 20 ms on 90 kHz
    assert errors == [""]


def test_split_opus_reads_long_sizes_and_trim_fields() -> None:
    long_packet = bytes([0xFC]) + bytes(599)  # TOC code 0: one 20 ms CELT frame
    short = bytes([0x08, 1, 2])
    trimmed = b"\x7f\xf8" + bytes([len(short)]) + b"\x00\x10\x00\x20" + short
    data = opus_control_header(len(long_packet)) + long_packet + trimmed
    assert opus_control_header(600) == b"\x7f\xe0\xff\xff\x5a"
    assert split_opus(data) == [long_packet, short]
    assert opus_samples(long_packet) == 960
    assert opus_samples(bytes([0xFF, 0x03])) == 3 * 960  # code 3: frame count in byte 1


def test_audio_codec_change_starts_a_segment() -> None:
    sink = Sink()
    encoder = SegmentEncoder(sink, EncoderSettings(segment_s=10))
    aac = tone(0.2)
    opus = tone(0.2, first_pts=6 * FRAME, codec="opus")
    for i in range(12):
        batch = [a for a in aac + opus if i * FRAME <= a.pts < (i + 1) * FRAME]
        assert encoder.encode(numbered_frame(i), i * FRAME, batch)
    encoder.close()
    assert encoder.segments == 2
    frames, audio, errors, _ = decode([bytes(s) for s in sink.segments])
    assert len(frames) == 12 and errors == ["", ""]
    assert [a.codec for a in audio] == ["aac"] * len([a for a in aac if a.pts < 6 * FRAME]) + [
        "opus"
    ] * len([a for a in opus if a.pts < 12 * FRAME])


# --- inputs we refuse ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (
            lambda: foreign_clip("mpeg2video"),
            "MPEG-2 video in MPEG-TS is not supported: send H.264 or HEVC",
        ),
        (lambda: foreign_clip("vp9"), "VP9 in MPEG-TS is not supported: send H.264 or HEVC"),
        (
            audio_only_clip,
            "the input has no video stream (audio only): send H.264 or HEVC video",
        ),
    ],
    ids=["mpeg2", "vp9", "audio-only"],
)
def test_unsupported_input_is_reported_once_per_segment(
    segment: Callable[[], bytes], message: str
) -> None:
    data = segment()
    frames, _, errors, decoder = decode([data, data], chunk=188)
    assert frames == []
    assert errors == [message, message]
    assert decoder.errors == 2
    assert decoder.video_problem == message
    # Good video afterwards clears it.
    decode(make_clip(5).segment_bytes(), decoder=decoder)
    assert decoder.video_problem is None


# --- the encoder's limits -----------------------------------------------------------------------


def test_odd_size_is_cropped_to_even() -> None:
    sink = Sink()
    encoder = SegmentEncoder(sink)
    image = np.zeros((241, 321, 3), np.uint8)
    image[:, 320] = 255  # the column that goes
    assert encoder.encode(image, 0)
    encoder.close()
    frames, _, errors, _ = decode([bytes(sink.segments[0])])
    assert frames[0].image.shape == (240, 320, 3) and errors == [""]
    assert frames[0].image.max() < 40


@pytest.mark.parametrize(
    ("size", "words"),
    [((17, 17), "odd frame size 17x17: width and height must be even"), ((8, 8), "too small")],
)
def test_frames_the_encoder_cannot_take_raise_media_error(
    size: tuple[int, int], words: str
) -> None:
    encoder = SegmentEncoder(Sink())
    with pytest.raises(MediaError, match=words) as caught:
        encoder.encode(np.zeros((*size, 3), np.uint8), 0)
    assert isinstance(caught.value, ValueError)


def test_encode_reports_a_dropped_duplicate() -> None:
    sink = Sink()
    encoder = SegmentEncoder(sink)
    assert encoder.encode(numbered_frame(0), 0)
    size = len(sink.segments[0])
    assert not encoder.encode(numbered_frame(1), 0)  # same pts: dropped, nothing written
    assert not encoder.encode(numbered_frame(1), -FRAME)
    assert len(sink.segments[0]) == size
    assert encoder.encode(numbered_frame(1), FRAME)
    encoder.close()
    frames, _, _, _ = decode([bytes(sink.segments[0])])
    assert [read_index(f.image) for f in frames] == [0, 1]


def test_video_pes_over_64k_has_length_zero() -> None:
    muxer = TSMuxer("h264")
    unit = b"\x00\x00\x00\x01\x09\xf0" + bytes(range(256)) * 300
    data = muxer.tables() + muxer.video(unit, 3000, keyframe=True)
    first_pes = next(p for p in ts_packets(data) if pid_of(p) == 0x100)
    start = 4 + 1 + first_pes[4]  # after the adaptation field
    assert (
        first_pes[start : start + 3] == b"\x00\x00\x01"
        and first_pes[start + 4 : start + 6] == b"\0\0"
    )
    demuxer = TSDemuxer()
    assert demuxer.feed(data) == []  # unbounded: complete only when the segment ends
    (pes,) = demuxer.flush()
    assert pes.data == unit and pes.pts == 3000 and pes.random_access


# --- bad data ------------------------------------------------------------------------------------


def test_garbage_is_counted_not_raised() -> None:
    rng = np.random.default_rng(1)
    garbage = rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes()
    frames, _, errors, decoder = decode([garbage])
    assert frames == [] and decoder.errors > 0 and errors[0].startswith("bad MPEG-TS data")


def test_truncated_segment_keeps_what_arrived_and_the_next_recovers() -> None:
    clip: Clip = make_clip(60)
    first, second = clip.segment_bytes()
    cut = first[: len(first) // 2 + 77]  # mid-packet
    frames, _, errors, _ = decode([cut, second])
    indices = [read_index(f.image) for f in frames]
    assert indices[:5] == [0, 1, 2, 3, 4] and indices[-30:] == list(range(30, 60))
    assert errors[0].startswith("bad MPEG-TS data") and errors[1] == ""


def test_dataclass_fields_keep_their_order() -> None:
    frame = VideoFrame(np.zeros((2, 2, 3), np.uint8), 1, 0.0, 0)
    packet = AudioPacket("aac", 1, b"")
    assert frame.time_base == packet.time_base == Fraction(1, 90_000)


def test_decoded_frames_are_encoded_as_they_are_without_rgb() -> None:
    # A pipeline that passes frames through needs no RGB: the decoder leaves it out, the
    # encoder takes its YUV frames, and the stream comes out the same.
    clip = make_clip(45)
    decoder = StreamDecoder()
    decoder.needs_rgb = False
    frames, _, _, _ = decode(clip.segment_bytes(), decoder=decoder)
    assert frames and all(f.rgb is None and f.decoded is not None for f in frames)
    assert frames[0].size == (128, 128)  # make_clip's size
    sink = Sink()
    encoder = SegmentEncoder(sink, EncoderSettings(segment_s=1.0))
    decoded = frames[0].decoded
    assert decoded is not None
    decoded_pts = decoded.pts
    for frame in frames:
        assert encoder.encode(frame.picture, frame.pts)
    encoder.close()
    # The decoded frame itself is left as it was: another encoder may be taking it too.
    assert decoded.pts == decoded_pts
    again, _, errors, _ = decode([bytes(s) for s in sink.segments])
    assert [read_index(f.image) for f in again] == list(range(45)) and set(errors) == {""}
    assert [f.pts for f in again] == [f.pts for f in frames]
    # `image` makes the RGB when something asks for it after all.
    assert read_index(frames[7].image) == 7 and frames[7].rgb is not None


def test_a_decoded_frame_the_encoder_cannot_take_as_it_is_goes_through_rgb() -> None:
    odd = av.VideoFrame.from_ndarray(numbered_frame(3, 129, 97), format="rgb24")
    sink = Sink()
    encoder = SegmentEncoder(sink, EncoderSettings())
    assert encoder.encode(odd, 0)  # RGB, odd sides: converted and cropped to 128x96
    assert encoder.encode(odd.reformat(format="yuv420p"), FRAME)
    encoder.close()
    (frame, second) = ffmpeg_decode(bytes(sink.segments[0]), "video")
    assert (frame.width, frame.height) == (128, 96) and read_index(
        second.to_ndarray(format="rgb24")
    ) == 3
    with pytest.raises(ValueError, match="RGB image or its decoded frame"):
        VideoFrame(None, 0, 0.0, 0)
