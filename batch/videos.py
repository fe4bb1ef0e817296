"""The videos of gateway-shaped image-to-video answers. Livepeer's gateway answers with the URL
of an MP4 rather than the runner's frames; here the frames are encoded into an MP4 (H.264,
PyAV) and kept in memory for a while, each at its own unguessable URL, a capability for that
one video that needs no token (as a gateway's object-store URL).

The store is bounded twice: the bytes of every video together (`--video-store-mb`, the oldest
dropped to make room) and each video's lifetime (`--video-ttl-s`). Expired videos are dropped
whenever the store is used, so it needs no task of its own."""

from __future__ import annotations

import io
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from protocol.errors import NotFound, Unavailable
from protocol.openapi import Operation

if TYPE_CHECKING:
    from PIL import Image

VIDEO_PATH = "/videos/{name}"
MP4 = "video/mp4"
SUFFIX = ".mp4"


@dataclass(frozen=True)
class _Video:
    data: bytes
    expires: float


class VideoStore:
    def __init__(
        self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._videos: OrderedDict[str, _Video] = OrderedDict()  # oldest first
        self.bytes = 0

    def put(self, data: bytes) -> str:
        """Keep `data`; its name (the last segment of its URL). Raises Unavailable when the
        video alone is larger than the store."""
        if len(data) > self.max_bytes:
            raise Unavailable(
                f"the video is {len(data) / 2**20:.1f} MiB, more than the "
                f"{self.max_bytes / 2**20:.0f} MiB the service keeps for videos "
                "(--video-store-mb); ask for fewer or smaller frames"
            )
        self._expire()
        while self.bytes + len(data) > self.max_bytes:
            _, oldest = self._videos.popitem(last=False)
            self.bytes -= len(oldest.data)
        name = secrets.token_urlsafe(32) + SUFFIX
        self._videos[name] = _Video(data, self._clock() + self.ttl_s)
        self.bytes += len(data)
        return name

    def get(self, name: str) -> bytes | None:
        self._expire()
        video = self._videos.get(name)
        return None if video is None else video.data

    def __len__(self) -> int:
        return len(self._videos)

    def _expire(self) -> None:
        now = self._clock()
        # Insertion order is expiry order: every video lives the same time.
        while self._videos:
            name, video = next(iter(self._videos.items()))
            if video.expires > now:
                return
            del self._videos[name]
            self.bytes -= len(video.data)


VIDEOS = web.AppKey("videos", VideoStore)


def video_url(request: web.Request, public_url: str | None, name: str) -> str:
    origin = public_url.rstrip("/") if public_url else f"{request.scheme}://{request.host}"
    return origin + VIDEO_PATH.format(name=name)


async def get_video(request: web.Request) -> web.Response:
    data = request.app[VIDEOS].get(request.match_info["name"])
    if data is None:
        raise NotFound("no such video: it expired, was dropped to make room, or never existed")
    return web.Response(body=data, content_type=MP4)


VIDEO_OPERATION = Operation(
    method="GET",
    path=VIDEO_PATH,
    operation_id="getVideo",
    summary="Video",
    description="A video of a gateway-shaped image-to-video answer (its `images[0].url`), "
    "kept for --video-ttl-s; the URL is the capability, no token.",
    response_type=MP4,
    errors=(404,),
    path_params=(("name", "The video's name, as its URL has it."),),
    auth=False,
    tags=("gateway",),
)


def encode_mp4(frames: list[Image.Image], fps: int) -> bytes:
    """`frames` as an H.264 MP4 at `fps`. Odd sizes lose their last row or column: 4:2:0
    video has even sides."""
    import av

    if not frames:
        raise ValueError("no frames to encode")
    width, height = frames[0].size
    width, height = max(2, width - width % 2), max(2, height - height % 2)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18"}
        for image in frames:
            if image.size != (width, height):
                image = image.crop((0, 0, width, height))
            frame = av.VideoFrame.from_image(image.convert("RGB"))
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()
