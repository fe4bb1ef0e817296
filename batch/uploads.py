"""Reading multipart bodies: text fields as text, file fields as bytes, the whole body within
the upload limit (413 as soon as it is passed, never read whole first)."""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from protocol.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType, in_words
from protocol.requests import read_body, too_large

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
TEXT_FIELD_LIMIT = 1024 * 1024


async def read_form(request: web.Request, limit: int) -> dict[str, str | bytes]:
    """The fields of a multipart/form-data body. A part sent as a file (with a filename)
    comes back as bytes, any other as text; a repeated field keeps its last value."""
    if request.content_type == URLENCODED:
        # A form without files (HTML forms and many clients send one so): its fields are
        # read the same way, and the missing file is then named by validation.
        body = await read_body(request, limit)
        try:
            return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"the form body is not valid UTF-8: {in_words(exc)}") from exc
    if request.content_type != MULTIPART:
        raise UnsupportedMediaType(
            f"send the body as {MULTIPART}, with the image or audio as a file field"
        )
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large(limit))
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequest(f"the multipart body cannot be read: {in_words(exc)}") from exc
    fields: dict[str, str | bytes] = {}
    total = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
            # HttpProcessingError: a part whose headers do not parse.
            raise InvalidRequest(f"the multipart body cannot be read: {in_words(exc)}") from exc
        if part is None:
            return fields
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted")
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(too_large(limit))
            data.extend(chunk)
        if not part.name:
            continue  # a part without a field name: nothing can refer to it
        if part.filename is not None:
            fields[part.name] = bytes(data)
            continue
        if len(data) > TEXT_FIELD_LIMIT:
            raise PayloadTooLarge(f"the field {part.name!r} is over 1 MiB of text")
        try:
            fields[part.name] = data.decode(part.get_charset("utf-8"))
        except (UnicodeDecodeError, LookupError) as exc:
            msg = f"the field {part.name!r} is not valid text: {in_words(exc)}"
            raise InvalidRequest(msg) from exc
