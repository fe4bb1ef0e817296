"""A typed async client of the service's HTTP API, for app backends.

One method per batch route (`text_to_image`, `image_to_image`, `image_to_video`, `upscale`,
`audio_to_text`, `text_to_speech`, `image_to_text`, `segment_anything_2`, `llm`, and
`llm_stream`, an async iterator of the streamed chunks), one to start a live session
(`start_live`) and the runner's probes (`health`, `version`, `hardware_info`, `hardware_stats`).
Requests are the models of `protocol.batch_api` and `protocol.api`, validated here before
anything is sent; answers come back as their response models, and errors as `APIError` and
its subclasses.

Usage::

    from protocol.client import Client, RetryPolicy, data_url_bytes

    async with Client("http://127.0.0.1:8000", token="secret") as client:
        result = await client.text_to_image(prompt="a lighthouse at dusk", width=512, height=512)
        mime, png = data_url_bytes(result.images[0].url)  # ("image/png", b"\\x89PNG...")

        with open("photo.jpg", "rb") as f:
            photo = f.read()
        edited = await client.image_to_image(
            prompt="make it snowy", image=photo, filename="photo.jpg", strength=0.6
        )

        live = await client.start_live(model_id="noop", params={"prompt": "watercolor"})
        print(live.publish_url, live.subscribe_url)

    # A request model works too, and no retries at all:
    from protocol.batch_api import TextToImageParams
    async with Client(url, retry=RetryPolicy(max_attempts=1)) as client:
        await client.text_to_image(TextToImageParams(prompt="x", num_inference_steps=4))

What is sent: only the fields the caller set (`model_fields_set`), so the server applies its own
defaults to the others. That matters: the server picks few-step defaults (steps, guidance) for
Lightning/turbo models only when the request leaves those fields out. JSON bodies carry the set
fields as they are (an explicit `seed=None` is sent as null); multipart bodies send `bytes`
fields as files and the others as text (`true`/`false` for booleans, JSON for lists and dicts),
leaving out the ones that are None (multipart has no null).

Retries (see `RetryPolicy`): a 503 that carries `Retry-After` (a model loading, a full queue) and
a connection error before any response are retried with exponential backoff, 5 s x 1.5 capped
at 60 s as Livepeer's troubleshooting pages recommend, never sooner than `Retry-After` asks.
A 503 without `Retry-After` (the model is not on that machine) and every 4xx are raised at once.

This module imports neither torch nor PIL: an app backend needs only aiohttp and pydantic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import mimetypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import unquote_to_bytes

import aiohttp
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticValidationError

from .api import (
    HardwareInformation,
    HardwareStats,
    LiveVideoToVideoParams,
    LiveVideoToVideoResponse,
    Version,
)
from .batch_api import (
    AudioResponse,
    AudioToTextForm,
    ImageResponse,
    ImageToImageForm,
    ImageToTextForm,
    ImageToTextResponse,
    ImageToVideoForm,
    LLMRequest,
    LLMResponse,
    MasksResponse,
    SegmentAnything2Form,
    TextResponse,
    TextToImageParams,
    TextToSpeechParams,
    UpscaleForm,
    VideoResponse,
)
from .batch_api import ValidationError as FieldError

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Sleep = Callable[[float], Awaitable[object]]
HealthStatus = Literal["LOADING", "OK", "ERROR", "IDLE"]

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=15 * 60, sock_connect=30)
"""Of a session the client opens itself: a batch job may queue, then load a model, then run."""
DEFAULT_FILENAME = "image.png"
_MAX_MSG = 500
"""Characters of a non-JSON error body kept as the error's message."""


# --- errors ---------------------------------------------------------------------------------


class APIError(Exception):
    """An answer the client does not turn into a result: an HTTP error status, or a success
    whose body breaks the schema (`InvalidResponse`).

    `msg` is the server's message (`{"detail": {"msg": ...}}`), `detail` the decoded `detail`
    of the body (or the body's text when it is not JSON), `retry_after` the `Retry-After`
    header in seconds (None when absent or unreadable)."""

    def __init__(
        self,
        status: int,
        msg: str,
        *,
        detail: object = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.msg = msg
        self.detail = detail
        self.retry_after = retry_after


class UnauthorizedError(APIError):
    """401: the bearer token is missing or wrong."""


class InvalidFieldsError(APIError):
    """422: the server refused fields of the request; `errors` names them (`loc`, `msg`,
    `type`), as FastAPI and the service answer."""

    def __init__(self, status: int, errors: list[FieldError], *, detail: object = None) -> None:
        msg = "; ".join(f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in errors)
        super().__init__(status, msg or "invalid request", detail=detail)
        self.errors = errors


class UnavailableError(APIError):
    """503. With `retry_after` it would pass (model loading, queue full) and was retried until
    the policy's attempts ran out; without it, it will not (the model is not on that
    machine) and was not retried."""


class InvalidResponse(APIError):
    """A success status whose body is not the JSON the route's schema promises."""


_ERRORS: dict[int, type[APIError]] = {401: UnauthorizedError, 503: UnavailableError}
_FIELD_ERRORS = TypeAdapter(list[FieldError])


# --- retry policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a request again.

    Retried: a 503 that carries `Retry-After`, and `aiohttp.ClientConnectionError` raised before
    any response (refused connection, server gone). Never retried: any 4xx, a 503 without
    `Retry-After`, other statuses, timeouts. Note that a server that disconnects mid-request
    may have received it; batch routes are safe to repeat, a repeated `start_live` may leave a
    session behind that ends on its own when no media arrives.

    `max_attempts` counts every request sent, the first included (6: the first and 5 retries).
    Before retry n (1, 2, ...) the client waits `initial_s * factor**(n-1)`, and at least the
    server's `Retry-After`, all capped at `max_s`: a server asking for longer is asked again
    after `max_s`, and answers with a fresh `Retry-After`.

    `sleep` waits; tests pass a recorder to check delays without waiting for them.
    """

    max_attempts: int = 6
    initial_s: float = 5.0
    factor: float = 1.5
    max_s: float = 60.0
    sleep: Sleep = field(default=asyncio.sleep, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_s < 0 or self.max_s < 0:
            raise ValueError("delays must not be negative")
        if self.factor < 1:
            raise ValueError("factor must be at least 1")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `retry` (1 for the first)."""
        backoff = self.initial_s * self.factor ** (retry - 1)
        return min(max(backoff, retry_after or 0.0), self.max_s)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


# --- data URLs ------------------------------------------------------------------------------


def data_url_bytes(url: str) -> tuple[str, bytes]:
    """The media type and payload of a `data:` URL (RFC 2397), as batch routes return in
    `Media.url`: `data_url_bytes("data:image/png;base64,iVBO...")` is `("image/png",
    b"\\x89PNG...")`. The media type is lower case and without parameters (`text/plain` when
    the URL has none). Raises ValueError for anything else."""
    scheme, sep, rest = url.partition(":")
    if scheme.strip().lower() != "data" or not sep:
        raise ValueError(f"not a data: URL: {url[:40]!r}")
    header, comma, payload = rest.partition(",")
    if not comma:
        raise ValueError("a data: URL needs a comma before its payload")
    params = [p.strip() for p in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    mime = params[0].lower() or "text/plain"
    raw = unquote_to_bytes(payload)
    if not is_base64:
        return mime, raw
    try:
        return mime, base64.b64decode(b"".join(raw.split()), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the data: URL's base64 payload is invalid: {exc}") from exc


# --- the client -----------------------------------------------------------------------------


class _Health(BaseModel):
    status: HealthStatus


Body = Callable[[], dict[str, Any]]
"""Keyword arguments of `ClientSession.request` for one attempt (a fresh body each time)."""


class Client:
    """Async client of one service. Use it as an async context manager, or call `close()`.

    `base_url` is the service's root (a path prefix is kept). With `token`, every request
    carries `Authorization: Bearer <token>`. Without `session`, the client opens its own
    (with `DEFAULT_TIMEOUT`) on first use and closes it with itself; a session passed in is
    the caller's to close, and brings its own timeouts.
    """

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self._token = token
        self._session = session
        self._owns_session = session is None
        self._closed = False

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if the client opened it. Idempotent."""
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()

    # --- batch routes ---

    async def text_to_image(
        self, params: TextToImageParams | None = None, /, **fields: Any
    ) -> ImageResponse:
        """`POST /text-to-image` (JSON)."""
        body = _request_model(TextToImageParams, params, fields)
        return await self._post_json("/text-to-image", body, ImageResponse)

    async def image_to_image(
        self,
        form: ImageToImageForm | None = None,
        /,
        *,
        filename: str = DEFAULT_FILENAME,
        **fields: Any,
    ) -> ImageResponse:
        """`POST /image-to-image` (multipart); `image` is sent as a file named `filename`."""
        body = _request_model(ImageToImageForm, form, fields)
        return await self._post_form("/image-to-image", body, ImageResponse, {"image": filename})

    async def image_to_video(
        self,
        form: ImageToVideoForm | None = None,
        /,
        *,
        filename: str = DEFAULT_FILENAME,
        **fields: Any,
    ) -> VideoResponse:
        """`POST /image-to-video` (multipart); `image` is sent as a file named `filename`."""
        body = _request_model(ImageToVideoForm, form, fields)
        return await self._post_form("/image-to-video", body, VideoResponse, {"image": filename})

    async def upscale(
        self,
        form: UpscaleForm | None = None,
        /,
        *,
        filename: str = DEFAULT_FILENAME,
        **fields: Any,
    ) -> ImageResponse:
        """`POST /upscale` (multipart); `image` is sent as a file named `filename`."""
        body = _request_model(UpscaleForm, form, fields)
        return await self._post_form("/upscale", body, ImageResponse, {"image": filename})

    async def llm(self, request: LLMRequest | None = None, /, **fields: Any) -> LLMResponse:
        """`POST /llm` (JSON): the whole answer, in `choices[0].message`. To have the tokens as
        they are generated, `llm_stream`."""
        body = _request_model(LLMRequest, request, fields)
        if body.stream:
            raise ValueError("llm() returns the whole answer; llm_stream() streams it")
        return await self._post_json("/llm", body, LLMResponse)

    async def llm_stream(
        self, request: LLMRequest | None = None, /, **fields: Any
    ) -> AsyncIterator[LLMResponse]:
        """`POST /llm` with `stream: true`: the answer's chunks as the server generates them,
        each with its new text in `choices[0].delta.content` and the usage so far; the last
        has `finish_reason` and the final usage. Retried as every call until the stream has
        started; then an error the server reports in the stream raises `StreamError`, a
        stream cut short `InvalidResponse`.

        Leaving the loop early closes the connection, and the server stops generating; wrap
        the call in `contextlib.aclosing(...)` for that to happen at once rather than when
        the generator is collected."""
        body = _request_model(LLMRequest, request, {**fields, "stream": True})
        payload = body.model_dump(mode="json", exclude_unset=True)
        async with self._open("POST", "/llm", lambda: {"json": payload}) as resp:
            async for data in _sse_data(resp.content):
                if data == "[DONE]":
                    return
                yield _llm_chunk(resp.status, data)
            raise InvalidResponse(resp.status, "POST /llm: the stream ended before [DONE]")

    async def audio_to_text(
        self,
        form: AudioToTextForm | None = None,
        /,
        *,
        filename: str = "audio.wav",
        **fields: Any,
    ) -> TextResponse:
        """`POST /audio-to-text` (multipart); `audio` is sent as a file named `filename`."""
        body = _request_model(AudioToTextForm, form, fields)
        return await self._post_form("/audio-to-text", body, TextResponse, {"audio": filename})

    async def text_to_speech(
        self, params: TextToSpeechParams | None = None, /, **fields: Any
    ) -> AudioResponse:
        """`POST /text-to-speech` (JSON); the WAV comes back as a data URL in `audio.url`
        (`data_url_bytes` gives its bytes)."""
        body = _request_model(TextToSpeechParams, params, fields)
        return await self._post_json("/text-to-speech", body, AudioResponse)

    async def image_to_text(
        self,
        form: ImageToTextForm | None = None,
        /,
        *,
        filename: str = DEFAULT_FILENAME,
        **fields: Any,
    ) -> ImageToTextResponse:
        """`POST /image-to-text` (multipart); `image` is sent as a file named `filename`."""
        body = _request_model(ImageToTextForm, form, fields)
        return await self._post_form(
            "/image-to-text", body, ImageToTextResponse, {"image": filename}
        )

    async def segment_anything_2(
        self,
        form: SegmentAnything2Form | None = None,
        /,
        *,
        filename: str = DEFAULT_FILENAME,
        **fields: Any,
    ) -> MasksResponse:
        """`POST /segment-anything-2` (multipart); `image` is sent as a file named `filename`.
        The prompts are JSON text (`point_coords="[[120, 80]]"`), and so are the answer's
        fields: `json.loads(result.masks)` gives N x height x width numbers."""
        body = _request_model(SegmentAnything2Form, form, fields)
        return await self._post_form(
            "/segment-anything-2", body, MasksResponse, {"image": filename}
        )

    # --- live ---

    async def start_live(
        self, body: LiveVideoToVideoParams | None = None, /, **fields: Any
    ) -> LiveVideoToVideoResponse:
        """`POST /live-video-to-video`: start a live session. Leave out `subscribe_url` and
        `publish_url` for the service to host the channels; `params=` is the pipeline's
        initial params (a field of the request, hence the positional-only `body`)."""
        request = _request_model(LiveVideoToVideoParams, body, fields)
        return await self._post_json("/live-video-to-video", request, LiveVideoToVideoResponse)

    # --- probes ---

    async def health(self) -> HealthStatus:
        """`GET /health`: IDLE, LOADING, OK or ERROR."""
        return (await self._get("/health", _Health)).status

    async def version(self) -> Version:
        return await self._get("/version", Version)

    async def hardware_info(self) -> HardwareInformation:
        return await self._get("/hardware/info", HardwareInformation)

    async def hardware_stats(self) -> HardwareStats:
        return await self._get("/hardware/stats", HardwareStats)

    # --- the shared path every call takes ---

    async def _get(self, path: str, response: type[M]) -> M:
        return await self._call("GET", path, lambda: {}, response)

    async def _post_json(self, path: str, body: BaseModel, response: type[M]) -> M:
        payload = body.model_dump(mode="json", exclude_unset=True)
        return await self._call("POST", path, lambda: {"json": payload}, response)

    async def _post_form(
        self,
        path: str,
        form: BaseModel,
        response: type[M],
        filenames: Mapping[str, str] | None = None,
    ) -> M:
        """POST `form` as multipart/form-data: its `bytes` fields as files (named by
        `filenames`, else `<field>.bin`), the others as text."""
        # aiohttp's FormData is consumed by a send: a fresh one for every attempt.
        return await self._call(
            "POST", path, lambda: {"data": _form_data(form, filenames or {})}, response
        )

    async def _call(self, method: str, path: str, body: Body, response: type[M]) -> M:
        async with self._open(method, path, body) as resp:
            raw = await resp.read()
            try:
                return response.model_validate_json(raw)
            except PydanticValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                    for e in exc.errors(include_url=False)
                )
                msg = f"{method} {path}: the answer is not a valid {response.__name__}: {problems}"
                raise InvalidResponse(resp.status, msg, detail=_text(raw)) from exc

    @asynccontextmanager
    async def _open(
        self, method: str, path: str, body: Body
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """The successful response of `method path`, retried as `self.retry` says; an error
        status raises its `APIError`. A streaming call reads the body inside the block."""
        session = self._get_session()
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        policy = self.retry
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await session.request(method, url, headers=headers, **body())
            except aiohttp.ClientConnectionError as exc:
                if attempt >= policy.max_attempts:
                    raise
                delay = policy.delay(attempt)
                logger.info("%s %s: %s; retry %d in %.1fs", method, path, exc, attempt, delay)
                await policy.sleep(delay)
                continue
            async with resp:
                if resp.status < 400:
                    yield resp
                    return
                error = await _error_from(resp)
            retryable = isinstance(error, UnavailableError) and error.retry_after is not None
            if not retryable or attempt >= policy.max_attempts:
                raise error
            delay = policy.delay(attempt, error.retry_after)
            logger.info("%s %s: %s; retry %d in %.1fs", method, path, error, attempt, delay)
            await policy.sleep(delay)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=DEFAULT_TIMEOUT)
        return self._session


# --- helpers --------------------------------------------------------------------------------


def _request_model(model: type[M], given: M | None, fields: dict[str, Any]) -> M:
    """The request: `given`, with `fields` set on it, validated. Unknown field names raise
    TypeError (the models ignore extra fields, which would hide a typo); invalid values
    raise pydantic's ValidationError, before anything is sent."""
    unknown = sorted(fields.keys() - model.model_fields.keys())
    if unknown:
        raise TypeError(f"{model.__name__} has no field {', '.join(unknown)}")
    if given is None:
        return model.model_validate(fields)
    if not fields:
        return given
    kept = {name: getattr(given, name) for name in given.model_fields_set}
    return model.model_validate({**kept, **fields})


def _form_data(form: BaseModel, filenames: Mapping[str, str]) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    for name in type(form).model_fields:
        if name not in form.model_fields_set:
            continue  # the server's default applies
        value = getattr(form, name)
        if value is None:
            continue
        if isinstance(value, bytes | bytearray):
            filename = filenames.get(name, f"{name}.bin")
            content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            data.add_field(name, bytes(value), filename=filename, content_type=content_type)
        else:
            data.add_field(name, _form_text(value))
    return data


def _form_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, str | int | float):
        return str(value)
    return json.dumps(value)


async def _error_from(resp: aiohttp.ClientResponse) -> APIError:
    """The APIError of an error response, from the service's shapes: `{"detail": {"msg"}}`,
    422 `{"detail": [{"loc", "msg", "type"}]}`, FastAPI's `{"detail": "..."}`, or any text."""
    raw = await resp.read()
    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
    try:
        body = json.loads(raw)
    except ValueError:
        text = _text(raw)
        return _ERRORS.get(resp.status, APIError)(
            resp.status, text or resp.reason or "error", detail=text, retry_after=retry_after
        )
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if resp.status == 422 and isinstance(detail, list):
        try:
            return InvalidFieldsError(
                resp.status, _FIELD_ERRORS.validate_python(detail), detail=detail
            )
        except PydanticValidationError:
            pass  # not FastAPI's shape: a plain APIError below
    if isinstance(detail, dict) and isinstance(detail.get("msg"), str):
        msg = detail["msg"]
    elif isinstance(detail, str):
        msg = detail
    else:
        msg = _text(raw) or resp.reason or "error"
    return _ERRORS.get(resp.status, APIError)(
        resp.status, msg, detail=detail, retry_after=retry_after
    )


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds, from its delta-seconds or HTTP-date form; None when absent
    or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None  # HTTP dates are GMT; one without a zone is not an HTTP date
    return max(0.0, when.timestamp() - time.time())


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").strip()[:_MAX_MSG]


# --- server-sent events (POST /llm with stream) ---------------------------------------------


class StreamError(APIError):
    """The server failed after a stream had started: its 200 was sent, so the error came as
    the stream's last event (`data: {"error": "..."}`, as ai-runner sends it). `status` is 500."""


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """The `data` of each server-sent event (its `data:` lines joined by newlines); comments
    and other fields are skipped."""
    lines: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:  # a blank line ends an event
            if lines:
                yield "\n".join(lines)
            lines = []
            continue
        field_name, _, value = line.partition(":")
        if field_name == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _llm_chunk(status: int, data: str) -> LLMResponse:
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise InvalidResponse(status, "POST /llm: an event is not JSON", detail=data) from exc
    if isinstance(event, dict) and "error" in event:
        raise StreamError(500, str(event["error"]), detail=event)
    try:
        return LLMResponse.model_validate(event)
    except PydanticValidationError as exc:
        msg = f"POST /llm: an event is not a valid LLMResponse: {exc.error_count()} errors"
        raise InvalidResponse(status, msg, detail=event) from exc
