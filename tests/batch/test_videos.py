"""The store behind gateway-shaped image-to-video answers: bounded in bytes (oldest dropped
first), each video for a lifetime, a video larger than the whole store refused in words."""

from __future__ import annotations

import pytest

from batch.videos import SUFFIX, VideoStore
from protocol.errors import Unavailable


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_oldest_videos_go_to_make_room() -> None:
    store = VideoStore(max_bytes=100, ttl_s=60, clock=Clock())
    first, second = store.put(b"a" * 40), store.put(b"b" * 40)
    assert first.endswith(SUFFIX) and first != second
    third = store.put(b"c" * 40)  # 120 bytes would not fit: the first goes
    assert store.get(first) is None
    assert store.get(second) == b"b" * 40 and store.get(third) == b"c" * 40
    assert store.bytes == 80 and len(store) == 2


def test_videos_expire_after_their_lifetime() -> None:
    clock = Clock()
    store = VideoStore(max_bytes=100, ttl_s=60, clock=clock)
    early = store.put(b"a")
    clock.now = 30
    late = store.put(b"b")
    clock.now = 60
    assert store.get(early) is None  # its 60 s are over
    assert store.get(late) == b"b"
    clock.now = 90
    assert store.get(late) is None
    assert store.bytes == 0 and len(store) == 0


def test_a_video_larger_than_the_store_is_refused_in_words() -> None:
    store = VideoStore(max_bytes=2**20, ttl_s=60, clock=Clock())
    kept = store.put(b"x" * 100)
    with pytest.raises(Unavailable) as refused:
        store.put(b"x" * (3 * 2**20))
    assert refused.value.msg == (
        "the video is 3.0 MiB, more than the 1 MiB the service keeps for videos "
        "(--video-store-mb); ask for fewer or smaller frames"
    )
    assert "Retry-After" not in refused.value.headers  # it will not fit later either
    assert store.get(kept) == b"x" * 100  # nothing was dropped for it
