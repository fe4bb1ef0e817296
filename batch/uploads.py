"""Reading multipart bodies: text fields as text, file fields as bytes, the whole body within
the upload limit (413 as soon as it is passed, never read whole first).

The limit counts every byte of the body as it came (part headers and boundaries too, not only
the parts' contents), and the number of parts and the length of a field's name are bounded:
a body of many parts with long names and nothing in them must not cost more than its size."""

from __future__ import annotations

from urllib.parse import parse_qsl

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from protocol.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType, in_words
from protocol.requests import read_body, refuse_encoded, too_large

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
TEXT_FIELD_LIMIT = 1024 * 1024
MAX_PARTS = 64
"""Fields of one form; the widest route (segment-anything-2) has ten."""
MAX_NAME = 128
"""Characters of a field's name; the runner's longest is 25."""


async def read_form(request: web.Request, limit: int) -> dict[str, str | bytes]:
    """The fields of a multipart/form-data body. A part sent as a file (with a filename)
    comes back as bytes, any other as text; a repeated field keeps its last value."""
    if request.content_type == URLENCODED:
        # A form without files (HTML forms and many clients send one so): its fields are
        # read the same way, and the missing file is then named by validation.
        body = await read_body(request, limit)
        try:
            pairs = parse_qsl(
                body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_PARTS
            )
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"the form body is not valid UTF-8: {in_words(exc)}") from exc
        except ValueError as exc:  # over max_num_fields
            raise InvalidRequest(too_many_parts()) from exc
        for name, _ in pairs:
            check_name(name)
        return dict(pairs)
    if request.content_type != MULTIPART:
        raise UnsupportedMediaType(
            f"send the body as {MULTIPART}, with the image or audio as a file field"
        )
    refuse_encoded(request)
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(too_large(limit))
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as exc:
        raise InvalidRequest(f"the multipart body cannot be read: {in_words(exc)}") from exc
    fields: dict[str, str | bytes] = {}
    # Bytes taken off the connection for this body (part headers and boundaries included),
    # counted as they arrive, before the multipart reader makes anything of them.
    content = request.content
    parts = 0
    while True:
        try:
            part = await reader.next()
        except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
            # HttpProcessingError: a part whose headers do not parse.
            if content.total_bytes > limit:
                raise PayloadTooLarge(too_large(limit)) from exc
            raise InvalidRequest(f"the multipart body cannot be read: {in_words(exc)}") from exc
        if content.total_bytes > limit:
            raise PayloadTooLarge(too_large(limit))
        if part is None:
            return fields
        parts += 1
        if parts > MAX_PARTS:
            raise InvalidRequest(too_many_parts())
        if not isinstance(part, BodyPartReader):
            raise InvalidRequest("nested multipart bodies are not accepted")
        if part.name:
            check_name(part.name)
        data = bytearray()
        while chunk := await part.read_chunk(64 * 1024):
            if content.total_bytes > limit:
                raise PayloadTooLarge(too_large(limit))
            data.extend(chunk)
        if not part.name:
            continue  # a part without a field name: nothing can refer to it
        if part.filename is not None:
            fields[part.name] = bytes(data)
            continue
        if len(data) > TEXT_FIELD_LIMIT:
            raise PayloadTooLarge(f'the field "{part.name}" is over 1 MiB of text')
        try:
            fields[part.name] = data.decode(part.get_charset("utf-8"))
        except (UnicodeDecodeError, LookupError) as exc:
            msg = f'the field "{part.name}" is not valid text: {in_words(exc)}'
            raise InvalidRequest(msg) from exc


def check_name(name: str) -> None:
    if len(name) > MAX_NAME:
        raise InvalidRequest(
            f"a field name is over {MAX_NAME} characters; no field of this route is named so"
        )


def too_many_parts() -> str:
    return f"the form has more than {MAX_PARTS} fields; no route takes so many"
