"""Uploads as an attacker sends them, over real HTTP (raw sockets where a client library would
refuse): playlists that make FFmpeg open local files, compressed bodies that inflate a
thousandfold, and forms of many parts with long names and nothing in them."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import FormData

from batch.uploads import MAX_NAME, MAX_PARTS
from tests.protocol.test_trickle_conformance import RawHTTP

from .audio_clips import WAV, tone

BOUNDARY = "x7e3b0d9a4c"


def audio_form(data: bytes, filename: str) -> FormData:
    form = FormData()
    form.add_field("audio", data, filename=filename, content_type="application/octet-stream")
    return form


async def refusal(client, data: bytes, filename: str) -> str:  # type: ignore[no-untyped-def]
    response = await client.post("/audio-to-text", data=audio_form(data, filename))
    assert response.status == 400, await response.text()
    return (await response.json())["detail"]["msg"]


# --- FFmpeg opens nothing but the upload ----------------------------------------------------


async def test_an_ffconcat_playlist_does_not_read_files_beside_the_service(
    batch_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service's working folder holds a real recording, a folder and a text file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meeting.wav").write_bytes(tone(WAV, 3.0, 16_000))
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not audio")
    client = await batch_service(warm=())
    messages = set()
    for target in ("meeting.wav", "missing.wav", "folder", "notes.txt", str(tmp_path / "x.wav")):
        playlist = f"ffconcat version 1.0\nfile {target}\n".encode()
        message = await refusal(client, playlist, "list.ffconcat")
        assert "not audio this service can read" in message
        assert target not in message
        messages.add(message)
    # One answer whatever the playlist names: nothing tells files on the host apart.
    assert len(messages) == 1, messages


async def test_an_hls_playlist_naming_a_local_file_is_400(
    batch_service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "meeting.wav").write_bytes(tone(WAV, 3.0, 16_000))
    client = await batch_service(warm=())
    playlist = (
        b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:3\n#EXT-X-MEDIA-SEQUENCE:0\n"
        b"#EXTINF:3.0,\nmeeting.wav\n#EXT-X-ENDLIST\n"
    )
    for name in ("list.m3u8", "list.hls"):
        message = await refusal(client, playlist, name)
        assert "not audio this service can read" in message and "meeting" not in message


# --- the upload limit counts what comes off the wire ------------------------------------------


def flood_parts(count: int, name_size: int, padding: int = 0) -> Iterator[bytes]:
    """`count` empty text parts, each named by `name_size` characters (distinct names), with
    `padding` extra header lines of 8,000 characters."""
    pad = "".join(f"X-Pad-{line}: {'p' * 8_000}\r\n" for line in range(padding))
    for index in range(count):
        name = f"{index:08d}".ljust(name_size, "n")
        disposition = f'Content-Disposition: form-data; name="{name}"\r\n'
        yield f"--{BOUNDARY}\r\n{disposition}{pad}\r\n\r\n".encode()
    yield f"--{BOUNDARY}--\r\n".encode()


async def post_raw(  # type: ignore[no-untyped-def]
    client, head: dict[str, str], chunks: list[bytes], *, chunked: bool = False
) -> tuple[int, dict]:
    """POST /audio-to-text by hand: the body's chunks are written while the answer is awaited
    (the service may answer before the body ends). `chunked`: without a Content-Length, so
    that only what is read can be counted."""
    raw = await RawHTTP.connect(str(client.make_url("/audio-to-text")))
    if chunked:
        raw.send_head("POST", "/audio-to-text", {**head, "Transfer-Encoding": "chunked"})
    else:
        size = sum(len(chunk) for chunk in chunks)
        raw.send_head("POST", "/audio-to-text", {**head, "Content-Length": str(size)})

    async def send() -> None:
        for chunk in chunks:
            if chunked:
                raw.send_chunk(chunk)
            else:
                raw.writer.write(chunk)
            await raw.writer.drain()
        if chunked:
            raw.end_chunks()

    sending = asyncio.create_task(send())
    try:
        status_line, headers = await raw.read_head()
        body = await raw.read_body(headers)
    finally:
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        raw.writer.close()
    return int(status_line.split()[1]), json.loads(body)


def traced_peak_mib() -> float:
    return tracemalloc.get_traced_memory()[1] / 2**20


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    tracemalloc.reset_peak()
    yield
    tracemalloc.stop()


async def test_part_headers_count_against_the_upload_limit(batch_service, traced: None) -> None:
    client = await batch_service(warm=(), max_upload_mb=1)
    # 12 MiB of part headers (each part 100 lines of 8,000 characters, no content) against
    # 1 MiB, sent chunked (no Content-Length to refuse it by).
    chunks = list(flood_parts(16, 10, padding=100))
    base = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.reset_peak()
    status, body = await post_raw(
        client, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, chunks, chunked=True
    )
    assert status == 413, body
    assert "over the limit of 1 MiB" in body["detail"]["msg"]
    # The service read about the limit's worth and held none of it (the body's own 12 MiB is
    # counted in `base`, held by this test to send).
    assert traced_peak_mib() - base < 6


async def test_a_form_of_many_parts_or_long_names_is_400(batch_service) -> None:
    client = await batch_service(warm=())
    content_type = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    status, body = await post_raw(client, content_type, list(flood_parts(MAX_PARTS + 1, 10)))
    assert status == 400 and f"more than {MAX_PARTS} fields" in body["detail"]["msg"]
    status, body = await post_raw(client, content_type, list(flood_parts(1, MAX_NAME + 1)))
    assert status == 400 and f"over {MAX_NAME} characters" in body["detail"]["msg"]
    # The same bounds for a urlencoded form.
    urlencoded = {"Content-Type": "application/x-www-form-urlencoded"}
    many = "&".join(f"f{i}=1" for i in range(MAX_PARTS + 1)).encode()
    status, body = await post_raw(client, urlencoded, [many])
    assert status == 400 and f"more than {MAX_PARTS} fields" in body["detail"]["msg"]
    status, body = await post_raw(client, urlencoded, [b"n" * (MAX_NAME + 1) + b"=1"])
    assert status == 400 and f"over {MAX_NAME} characters" in body["detail"]["msg"]


def gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip-encoded multipart body of part headers that inflates to `inflated_mib` MiB."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = []
    parts = inflated_mib * 2**20 // 8_100
    for chunk in flood_parts(parts, 8_000):  # under the old code, each name was kept
        out.append(packer.compress(chunk))
    out.append(packer.flush())
    return b"".join(out)


async def test_a_gzip_bomb_is_415_and_never_inflated(batch_service, traced: None) -> None:
    client = await batch_service(warm=())
    bomb = gzip_bomb(64)
    assert len(bomb) < 2**20  # under 1 MiB on the wire, 64 MiB inflated
    chunks = [bomb[start : start + 65536] for start in range(0, len(bomb), 65536)]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0] / 2**20
    head = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Encoding": "gzip",
    }
    status, body = await post_raw(client, head, chunks, chunked=True)
    assert status == 415, body
    assert "uncompressed" in body["detail"]["msg"]
    assert traced_peak_mib() - base < 6
    # JSON routes refuse a compressed body the same way.
    response = await client.post(
        "/text-to-image",
        data=zlib.compress(b'{"prompt": "a cat"}'),
        headers={"Content-Type": "application/json", "Content-Encoding": "deflate"},
    )
    assert response.status == 415
