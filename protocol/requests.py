"""What every API route does with a request before its own work: check the bearer token,
read a JSON body within a size limit.

Bodies are read as sent: one with a `Content-Encoding` (gzip, deflate, br, zstd) is refused
with 415 before any of it is read. A compressed body can inflate a thousandfold, so a limit
counted after inflating lets a small request cost a large one's memory and CPU, and one counted
before it bounds nothing that is held. No Livepeer client compresses its requests (ai-runner's
FastAPI does not inflate them either), and the media uploaded is compressed already."""

from __future__ import annotations

import secrets

from aiohttp import hdrs, web

from .bounded_json import JSON_LIMIT, JSONRefused, loads
from .errors import InvalidRequest, PayloadTooLarge, Unauthorized, UnsupportedMediaType

__all__ = ["JSON_LIMIT", "read_body", "read_json", "require_bearer", "too_large"]


def require_bearer(request: web.Request, token: str | None) -> None:
    """The bearer token check of every API route, as ai-runner does when AUTH_TOKEN is set."""
    if not token:
        return
    # aiohttp hands header bytes that are not UTF-8 over as lone surrogates, which a plain
    # encode() refused (a 500): surrogatepass encodes anything, and such a header never matches.
    given = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
    if not secrets.compare_digest(given, f"Bearer {token}".encode()):
        raise Unauthorized("missing or invalid bearer token")


def refuse_encoded(request: web.Request) -> None:
    """415 for a body sent with a Content-Encoding (see the module's docstring)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            "send the request body uncompressed, without a Content-Encoding header: "
            "compressed request bodies are not accepted"
        )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` (read in chunks, so an
    oversized upload is never held whole), and with 415 when it is compressed."""
    refuse_encoded(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large(limit))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> str:
    return f"the request body is over the limit of {limit / 2**20:.3g} MiB"


async def read_json(request: web.Request, limit: int = JSON_LIMIT) -> object:
    """The body as JSON, through the one bounded reader (size, nesting): 400 for anything else."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the body as application/json")
    body = await read_body(request, limit)
    try:
        return loads(body, limit=limit)
    except JSONRefused as exc:
        raise InvalidRequest(str(exc)) from None
