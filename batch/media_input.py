"""Opening a client's bytes with FFmpeg (PyAV): real media containers only, and nothing but the
bytes themselves.

FFmpeg probes what it is given and picks the demuxer that fits best. Some demuxers are not
file formats but scripts that name other inputs: `concat` (ffconcat playlists), `hls` and `dash`
(playlists), `image2` (numbered file sequences), `tee`, `sdp`/`rtp`/`rtsp`, `lavfi`, and
devices. Probed freely, an upload of a few bytes of text makes the service open and read files
relative to its working folder. So the demuxer must be on `DEMUXERS` (containers that hold
their media inside themselves), and no protocol at all may be opened: the upload is read from
memory through PyAV's own I/O, so an empty protocol allowlist refuses every nested open
(`file:`, `http:`, `pipe:` ...) of any demuxer that would try one (defence in depth).
"""

from __future__ import annotations

import io
from typing import Any

DEMUXERS = (
    "wav",
    "w64",
    "flac",
    "mp3",
    "ogg",
    "mov",  # mov,mp4,m4a,3gp,3g2,mj2: FFmpeg matches any name of the demuxer's list
    "matroska",  # matroska,webm
    "aac",
    "ac3",
    "eac3",
    "aiff",
    "caf",
    "au",
    "amr",
    "asf",
    "avi",
    "mpegts",
    "mpeg",
    "flv",
    "wv",
    "ape",
    "tta",
    "mpc",
    "mpc8",
    "oma",
    "dts",
    "loas",
    "nut",
)
"""FFmpeg demuxers an upload may be read with: audio and video containers whose media lies
inside the file."""

OPTIONS = {
    "format_whitelist": ",".join(DEMUXERS),
    # Empty: no protocol may be opened. The upload itself needs none (read from memory).
    "protocol_whitelist": "",
    # mov's external data references: off by default in FFmpeg; kept off whatever it becomes.
    "enable_drefs": "0",
}


def open_upload(data: bytes) -> Any:
    """A PyAV input container over `data`, under the demuxer and protocol allowlists. Raises
    what `av.open` raises: a format not on the list is `av.ArgumentError` (EINVAL), before any
    of its content is acted on."""
    import av

    return av.open(io.BytesIO(data), mode="r", options=dict(OPTIONS))
