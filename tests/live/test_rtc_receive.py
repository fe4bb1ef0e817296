"""The bound on how long a received frame waits for aiortc's decoder: real VP8 and H.264 frames,
a real decoder reading the queue, a fake clock (no waiting)."""

from __future__ import annotations

import threading
from fractions import Fraction

import av
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av.video.frame import PictureType

from live.rtc_receive import ASK_AGAIN_S, FreshDecodeQueue, is_keyframe
from protocol.clips import numbered_frame, read_index

SIZE = 96
VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
STEP_S = 1 / 30


def encoded(codec_name: str, count: int, keys: set[int]) -> list[bytes]:
    """`count` frames of a numbered clip, keyframes at `keys`, as the publisher sends them."""
    codec = av.CodecContext.create(codec_name, "w")
    codec.width = codec.height = SIZE
    codec.pix_fmt = "yuv420p"
    codec.time_base = Fraction(1, 30)
    codec.framerate = 30
    if codec_name == "libx264":
        codec.options = {"tune": "zerolatency", "bf": "0", "keyint": "1000"}
    else:
        codec.options = {"deadline": "realtime", "lag-in-frames": "0", "kf-max-dist": "1000"}
    out = []
    for i in range(count):
        frame = av.VideoFrame.from_ndarray(numbered_frame(i, SIZE, SIZE), format="rgb24")
        frame = frame.reformat(format="yuv420p")
        frame.pts = i
        if i in keys:
            frame.pict_type = PictureType.I
        out.append(b"".join(bytes(p) for p in codec.encode(frame)))
    return out


def test_keyframes_are_told_apart_in_vp8_and_h264() -> None:
    for name, mime in (("libvpx", "video/VP8"), ("libx264", "video/H264")):
        frames = encoded(name, 6, {0, 4})
        assert [is_keyframe(mime, f) for f in frames] == [True, False, False, False, True, False]
    assert is_keyframe("video/AV1", b"\x00") is None


def test_a_backlog_older_than_the_bound_gives_way_to_the_next_keyframe() -> None:
    frames = encoded("libvpx", 40, {0, 20})
    now = [0.0]
    asked: list[float] = []
    fresh = FreshDecodeQueue(0.2, lambda: asked.append(now[0]), clock=lambda: now[0])
    decoder = av.CodecContext.create("libvpx", "r")

    def put(i: int) -> None:
        now[0] = max(now[0], i * STEP_S)
        fresh.put((VP8, JitterFrame(data=frames[i], timestamp=i * 3000)))

    def decode_next() -> int | None:
        _, frame = fresh.get_nowait()
        (image,) = decoder.decode(av.Packet(frame.data))
        return read_index(image.to_ndarray(format="rgb24"))

    # A decoder that keeps up: every frame is decoded, nothing is dropped.
    for i in range(3):
        put(i)
        assert decode_next() == i
    # The decoder stalls: frames wait until the oldest is older than 0.2 s (at frame 10, 7
    # frames after frame 3), then all of them go and a keyframe is asked for once.
    for i in range(3, 10):
        put(i)
    assert fresh.qsize() == 7 and asked == []
    put(10)
    assert fresh.qsize() == 0 and fresh.dropped == 8 and asked == [10 * STEP_S]
    # Inter frames cannot be decoded without those: they are dropped until the keyframe, and
    # asked for again once if it is slow to come.
    for i in range(11, 20):
        put(i)
    assert fresh.qsize() == 0 and fresh.dropped == 17 and len(asked) == 1
    now[0] = 10 * STEP_S + ASK_AGAIN_S + 0.1
    fresh.put((VP8, JitterFrame(data=frames[19], timestamp=0)))
    assert fresh.dropped == 18 and len(asked) == 2
    put(20)  # the keyframe: decoding resumes with it, the picture is whole
    put(21)
    assert decode_next() == 20 and decode_next() == 21
    assert fresh.dropped == 18 and not fresh.waiting_for_key


def test_a_keyframe_arriving_behind_a_stale_backlog_goes_first_and_a_stop_is_kept() -> None:
    frames = encoded("libvpx", 12, {0, 11})
    now = [0.0]
    asked: list[float] = []
    fresh = FreshDecodeQueue(0.2, lambda: asked.append(now[0]), clock=lambda: now[0])
    for i in range(6):
        now[0] = i * STEP_S
        fresh.put((VP8, JitterFrame(data=frames[i], timestamp=i)))
    fresh.put(None)  # the receiver stops
    now[0] = 11 * STEP_S
    fresh.put((VP8, JitterFrame(data=frames[11], timestamp=11)))
    assert asked == []  # the keyframe needs no request
    assert fresh.get_nowait() is None
    assert fresh.get_nowait()[1].timestamp == 11
    assert fresh.dropped == 6


def test_the_decoder_thread_reads_it_as_aiortc_does() -> None:
    # aiortc's decoder thread blocks in get() until a frame or None comes.
    fresh = FreshDecodeQueue(0.2, lambda: None)
    got: list[object] = []

    def worker() -> None:
        while (item := fresh.get()) is not None:
            got.append(item[1].timestamp)

    thread = threading.Thread(target=worker)
    thread.start()
    frames = encoded("libvpx", 3, {0})
    for i, data in enumerate(frames):
        fresh.put((VP8, JitterFrame(data=data, timestamp=i)))
    fresh.put(None)
    thread.join(10)
    assert not thread.is_alive() and got == [0, 1, 2]
