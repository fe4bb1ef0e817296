"""protocol.client against small real aiohttp servers on 127.0.0.1 that answer as the service
does: its own error middleware and error classes, its bearer check, its request models.

Retry delays are recorded by an injected sleep rather than waited for, except in one test that
runs the real sleep with millisecond delays."""

from __future__ import annotations

import base64
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import ValidationError

from protocol.api import (
    HardwareInformation,
    HardwareStats,
    LiveVideoToVideoParams,
    LiveVideoToVideoResponse,
    Version,
)
from protocol.batch_api import (
    ImageResponse,
    ImageToImageForm,
    ImageToVideoForm,
    Media,
    TextToImageParams,
    UpscaleForm,
    VideoResponse,
)
from protocol.client import (
    NO_RETRY,
    APIError,
    Client,
    InvalidFieldsError,
    InvalidResponse,
    RetryPolicy,
    UnauthorizedError,
    UnavailableError,
    data_url_bytes,
    parse_retry_after,
)
from protocol.errors import (
    InvalidFields,
    InvalidRequest,
    Unavailable,
    error_body,
    error_middleware,
)
from protocol.requests import require_bearer

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()
IMAGES = ImageResponse(images=[Media(url=PNG_URL, seed=7, nsfw=False)]).model_dump()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sleeps:
    """An injected sleep that records the delays it is asked for and returns at once; `then`
    runs on each call (to change the world between attempts)."""

    def __init__(self, then: Callable[[], Awaitable[None]] | None = None) -> None:
        self.delays: list[float] = []
        self.then = then

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if self.then is not None:
            await self.then()


def counted(seen: list[web.Request], handler: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        return await handler(request)

    return wrapper


async def serve(aiohttp_server: Any, *routes: web.RouteDef, **server_kwargs: Any) -> str:
    app = web.Application(middlewares=[error_middleware])
    app.add_routes(routes)
    server = await aiohttp_server(app, **server_kwargs)
    return str(server.make_url("/"))


async def answer_images(request: web.Request) -> web.Response:
    return web.json_response(IMAGES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- retries ---


async def test_503_with_retry_after_is_retried_until_it_passes(aiohttp_server):
    seen: list[web.Request] = []

    async def loading_twice(request: web.Request) -> web.Response:
        if len(seen) <= 2:
            return web.json_response(
                error_body("model loading"), status=503, headers={"Retry-After": "0"}
            )
        return web.json_response(IMAGES)

    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, loading_twice)))
    # The real sleep, with millisecond delays.
    async with Client(url, retry=RetryPolicy(initial_s=0.001, max_s=0.01)) as client:
        result = await client.text_to_image(prompt="a lighthouse")
    assert len(seen) == 3
    assert result == ImageResponse.model_validate(IMAGES)


async def test_backoff_grows_by_factor_up_to_the_cap_then_gives_up(aiohttp_server):
    seen: list[web.Request] = []

    async def always_loading(request: web.Request) -> web.Response:
        raise Unavailable("model loading", retry_after_s=1)

    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, always_loading)))
    sleeps = Sleeps()
    async with Client(url, retry=RetryPolicy(max_attempts=10, sleep=sleeps)) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.text_to_image(prompt="x")
    assert len(seen) == 10
    # The troubleshooting pages' schedule: 5 s, x1.5 each time, capped at 60 s.
    assert sleeps.delays == pytest.approx([min(5 * 1.5**n, 60) for n in range(9)])
    assert sleeps.delays[-2:] == [60, 60]
    assert caught.value.status == 503
    assert caught.value.msg == "model loading"
    assert caught.value.retry_after == 1


async def test_default_policy_makes_six_attempts(aiohttp_server):
    seen: list[web.Request] = []

    async def queue_full(request: web.Request) -> web.Response:
        raise Unavailable("queue full", retry_after_s=2)

    url = await serve(aiohttp_server, web.get("/version", counted(seen, queue_full)))
    sleeps = Sleeps()
    async with Client(url, retry=RetryPolicy(sleep=sleeps)) as client:
        with pytest.raises(UnavailableError):
            await client.version()
    assert len(seen) == 6
    assert len(sleeps.delays) == 5


@pytest.mark.parametrize(
    ("retry_after", "delays"),
    [
        ("30", [30, 30, 30]),  # longer than the backoff: honoured
        ("6", [6, 7.5, 11.25]),  # shorter than the backoff from the second retry on
        ("120", [60, 60, 60]),  # longer than the cap: asked again after the cap
    ],
)
async def test_retry_after_is_a_lower_bound_of_the_delay(aiohttp_server, retry_after, delays):
    seen: list[web.Request] = []

    async def busy(request: web.Request) -> web.Response:
        return web.json_response(
            error_body("busy"), status=503, headers={"Retry-After": retry_after}
        )

    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, busy)))
    sleeps = Sleeps()
    async with Client(url, retry=RetryPolicy(max_attempts=4, sleep=sleeps)) as client:
        with pytest.raises(UnavailableError):
            await client.text_to_image(prompt="x")
    assert sleeps.delays == pytest.approx(delays)
    assert len(seen) == 4


async def raise_unauthorized(request: web.Request) -> web.Response:
    require_bearer(request, "s3cret")
    raise AssertionError("no token was given")


async def raise_invalid_fields(request: web.Request) -> web.Response:
    raise InvalidFields(
        [{"loc": ["body", "width"], "msg": "must be a multiple of 8", "type": "multiple_of"}]
    )


async def raise_bad_request(request: web.Request) -> web.Response:
    raise InvalidRequest("loras are not supported by this service yet")


async def raise_absent_model(request: web.Request) -> web.Response:
    raise Unavailable("the model acme/huge is not on this machine")


async def too_many_with_retry_after(request: web.Request) -> web.Response:
    return web.json_response(error_body("slow down"), status=429, headers={"Retry-After": "1"})


async def proxy_error(request: web.Request) -> web.Response:
    return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")


@pytest.mark.parametrize(
    ("handler", "error", "status", "msg"),
    [
        (raise_unauthorized, UnauthorizedError, 401, "missing or invalid bearer token"),
        (raise_invalid_fields, InvalidFieldsError, 422, "body.width: must be a multiple of 8"),
        (raise_bad_request, APIError, 400, "loras are not supported by this service yet"),
        (raise_absent_model, UnavailableError, 503, "the model acme/huge is not on this machine"),
        (too_many_with_retry_after, APIError, 429, "slow down"),
        (proxy_error, APIError, 502, "<html>Bad Gateway</html>"),
    ],
)
async def test_errors_that_will_not_pass_are_raised_at_once(
    aiohttp_server, handler, error, status, msg
):
    seen: list[web.Request] = []
    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, handler)))
    sleeps = Sleeps()
    async with Client(url, retry=RetryPolicy(sleep=sleeps)) as client:
        with pytest.raises(error) as caught:
            await client.text_to_image(prompt="x")
    assert len(seen) == 1
    assert sleeps.delays == []
    assert caught.value.status == status
    assert caught.value.msg == msg
    assert str(caught.value) == f"HTTP {status}: {msg}"


async def test_422_keeps_the_field_errors(aiohttp_server):
    url = await serve(aiohttp_server, web.post("/text-to-image", raise_invalid_fields))
    async with Client(url) as client:
        with pytest.raises(InvalidFieldsError) as caught:
            await client.text_to_image(prompt="x")
    [field] = caught.value.errors
    assert (field.loc, field.msg, field.type) == (
        ["body", "width"],
        "must be a multiple of 8",
        "multiple_of",
    )
    assert caught.value.retry_after is None


async def test_connection_errors_are_retried_until_the_server_is_up(aiohttp_server):
    port = free_port()
    seen: list[web.Request] = []

    async def start_server() -> None:
        if len(sleeps.delays) == 2:  # refused twice, then the server comes up
            await serve(
                aiohttp_server, web.get("/version", counted(seen, answer_version)), port=port
            )

    sleeps = Sleeps(then=start_server)
    async with Client(f"http://127.0.0.1:{port}", retry=RetryPolicy(sleep=sleeps)) as client:
        version = await client.version()
    assert version.pipeline == "live-video-to-video"
    assert sleeps.delays == [5, 7.5]
    assert len(seen) == 1


async def test_connection_errors_are_raised_after_the_last_attempt():
    sleeps = Sleeps()
    policy = RetryPolicy(max_attempts=3, sleep=sleeps)
    async with Client(f"http://127.0.0.1:{free_port()}", retry=policy) as client:
        with pytest.raises(aiohttp.ClientConnectionError):
            await client.health()
    assert sleeps.delays == [5, 7.5]


async def test_no_retry_policy_sends_once(aiohttp_server):
    seen: list[web.Request] = []

    async def loading(request: web.Request) -> web.Response:
        raise Unavailable("model loading", retry_after_s=30)

    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, loading)))
    async with Client(url, retry=NO_RETRY) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.text_to_image(prompt="x")
    assert len(seen) == 1
    assert caught.value.retry_after == 30


# --- what is sent ---


async def test_bearer_token_is_sent(aiohttp_server):
    async def guarded(request: web.Request) -> web.Response:
        require_bearer(request, "s3cret")
        return web.json_response(IMAGES)

    url = await serve(aiohttp_server, web.post("/text-to-image", guarded))
    async with Client(url, token="s3cret") as client:
        await client.text_to_image(prompt="x")
    async with Client(url, token="wrong") as client:
        with pytest.raises(UnauthorizedError):
            await client.text_to_image(prompt="x")


async def test_json_body_has_only_the_fields_set(aiohttp_server):
    bodies: list[Any] = []

    async def text_to_image(request: web.Request) -> web.Response:
        body = await request.json()
        bodies.append(body)
        # The service validates JSON strictly ("512" is not an integer).
        TextToImageParams.model_validate(body, strict=True)
        return web.json_response(IMAGES)

    url = await serve(aiohttp_server, web.post("/text-to-image", text_to_image))
    async with Client(url) as client:
        await client.text_to_image(prompt="x", width="512", seed=None, safety_check=False)
        await client.text_to_image(TextToImageParams(prompt="a", num_inference_steps=4))
        await client.text_to_image(TextToImageParams(prompt="a", height=512), prompt="b")
    assert bodies == [
        # Unset fields are left to the server's defaults (few-step models depend on that).
        {"prompt": "x", "width": 512, "seed": None, "safety_check": False},
        {"prompt": "a", "num_inference_steps": 4},
        {"prompt": "b", "height": 512},
    ]


async def test_multipart_sends_files_as_files_and_the_rest_as_text(aiohttp_server):
    forms: list[ImageToImageForm] = []

    async def image_to_image(request: web.Request) -> web.Response:
        assert request.content_type == "multipart/form-data"
        post = await request.post()
        image = post["image"]
        assert isinstance(image, web.FileField)
        assert (image.filename, image.content_type) == ("photo.jpg", "image/jpeg")
        fields = {k: v for k, v in post.items() if k != "image"}
        assert fields == {
            "prompt": "make it snowy",
            "strength": "0.5",
            "safety_check": "false",
            "num_inference_steps": "4",
        }  # seed=None and every unset field are left out
        # ... and they validate as the service's multipart parsing does (lax, from text).
        forms.append(ImageToImageForm.model_validate({**fields, "image": image.file.read()}))
        return web.json_response(IMAGES)

    url = await serve(aiohttp_server, web.post("/image-to-image", image_to_image))
    async with Client(url) as client:
        result = await client.image_to_image(
            prompt="make it snowy",
            image=PNG,
            filename="photo.jpg",
            strength=0.5,
            safety_check=False,
            num_inference_steps=4,
            seed=None,
        )
    [form] = forms
    assert form.image == PNG
    assert form.model_fields_set == {
        "prompt",
        "image",
        "strength",
        "safety_check",
        "num_inference_steps",
    }
    assert data_url_bytes(result.images[0].url) == ("image/png", PNG)


async def test_multipart_body_is_sent_whole_on_every_attempt(aiohttp_server):
    seen: list[web.Request] = []
    uploads: list[tuple[bytes, str]] = []

    async def upscale(request: web.Request) -> web.Response:
        post = await request.post()
        image = post["image"]
        assert isinstance(image, web.FileField)
        uploads.append((image.file.read(), str(post["prompt"])))
        if len(seen) == 1:
            raise Unavailable("model loading", retry_after_s=1)
        return web.json_response(IMAGES)

    async def image_to_video(request: web.Request) -> web.Response:
        post = await request.post()
        assert isinstance(post["image"], web.FileField)
        assert post["image"].filename == "image.png"
        assert (post["fps"], post["motion_bucket_id"]) == ("8", "100")
        frames = [[Media(url=PNG_URL, seed=3, nsfw=False)] * 2]
        return web.json_response(VideoResponse(frames=frames).model_dump())

    url = await serve(
        aiohttp_server,
        web.post("/upscale", counted(seen, upscale)),
        web.post("/image-to-video", image_to_video),
    )
    async with Client(url, retry=RetryPolicy(sleep=Sleeps())) as client:
        await client.upscale(UpscaleForm(prompt="sharper", image=PNG))
        video = await client.image_to_video(
            ImageToVideoForm(image=PNG, fps=8), motion_bucket_id=100
        )
    assert uploads == [(PNG, "sharper"), (PNG, "sharper")]
    assert len(video.frames[0]) == 2


async def test_bad_requests_fail_here_before_anything_is_sent(aiohttp_server):
    seen: list[web.Request] = []
    url = await serve(aiohttp_server, web.post("/text-to-image", counted(seen, answer_images)))
    async with Client(url) as client:
        with pytest.raises(TypeError, match="num_inference_step"):
            await client.text_to_image(prompt="x", num_inference_step=4)  # a typo
        with pytest.raises(ValidationError, match="width"):
            await client.text_to_image(prompt="x", width=100)  # not a multiple of 8
        with pytest.raises(ValidationError, match="prompt"):
            await client.text_to_image()
    assert seen == []


# --- what comes back ---


async def test_an_answer_that_breaks_the_schema_raises_invalid_response(aiohttp_server):
    async def wrong_shape(request: web.Request) -> web.Response:
        return web.json_response({"images": [{"url": "data:,"}]})  # no seed, no nsfw

    async def not_json(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    url = await serve(
        aiohttp_server, web.post("/text-to-image", wrong_shape), web.get("/version", not_json)
    )
    async with Client(url) as client:
        with pytest.raises(InvalidResponse, match=r"not a valid ImageResponse.*seed") as caught:
            await client.text_to_image(prompt="x")
        assert caught.value.status == 200
        with pytest.raises(InvalidResponse, match="not a valid Version"):
            await client.version()


async def answer_version(request: web.Request) -> web.Response:
    body = Version(pipeline="live-video-to-video", model_id="noop", version="0.1.0")
    return web.json_response(body.model_dump())


async def test_start_live_and_probes(aiohttp_server):
    starts: list[Any] = []
    gpu = {"id": "0", "name": "H200", "memory_total": 2**37, "memory_free": 2**36}

    async def start(request: web.Request) -> web.Response:
        body = await request.json()
        starts.append(body)
        LiveVideoToVideoParams.model_validate(body)
        answer = LiveVideoToVideoResponse(
            subscribe_url="http://h/out", publish_url="http://h/in", session_id="abc"
        )
        return web.json_response(answer.model_dump())

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "IDLE"})

    async def hardware_info(request: web.Request) -> web.Response:
        info = {"0": {**gpu, "major": 9, "minor": 0}}
        body = HardwareInformation(pipeline="p", model_id="m", gpu_info=info)
        return web.json_response(body.model_dump())

    async def hardware_stats(request: web.Request) -> web.Response:
        stats = {"0": {**gpu, "utilization_compute": 50, "utilization_memory": 10}}
        body = HardwareStats(pipeline="p", model_id="m", gpu_stats=stats)
        return web.json_response(body.model_dump())

    url = await serve(
        aiohttp_server,
        web.post("/live-video-to-video", start),
        web.get("/health", health),
        web.get("/version", answer_version),
        web.get("/hardware/info", hardware_info),
        web.get("/hardware/stats", hardware_stats),
    )
    async with Client(url) as client:
        # `params` is a field of the request (the positional argument is `body`).
        live = await client.start_live(model_id="noop", params={"prompt": "watercolor"})
        await client.start_live(LiveVideoToVideoParams(stream_id="s1"))
        assert await client.health() == "IDLE"
        assert (await client.version()).model_id == "noop"
        assert (await client.hardware_info()).gpu_info["0"].major == 9
        assert (await client.hardware_stats()).gpu_stats["0"].utilization_compute == 50
    assert (live.session_id, live.publish_url) == ("abc", "http://h/in")
    assert starts == [{"model_id": "noop", "params": {"prompt": "watercolor"}}, {"stream_id": "s1"}]


# --- the session ---


async def test_an_owned_session_is_closed_with_the_client(aiohttp_server):
    url = await serve(aiohttp_server, web.get("/version", answer_version))
    async with Client(url) as client:
        await client.version()
        session = client._session
        assert session is not None and not session.closed
    assert session.closed
    with pytest.raises(RuntimeError, match="closed"):
        await client.version()


async def test_a_given_session_is_left_open(aiohttp_server):
    url = await serve(aiohttp_server, web.get("/version", answer_version))
    async with aiohttp.ClientSession() as session:
        async with Client(url, session=session) as client:
            await client.version()
        assert not session.closed


# --- helpers ---


def test_data_url_bytes():
    assert data_url_bytes(PNG_URL) == ("image/png", PNG)
    assert data_url_bytes("data:,hello%20world") == ("text/plain", b"hello world")
    assert data_url_bytes("DATA:Text/Plain;charset=utf-8;base64,aGk=") == ("text/plain", b"hi")
    for bad in ("http://x/y.png", "data:image/png;base64", "data:image/png;base64,***"):
        with pytest.raises(ValueError):
            data_url_bytes(bad)


def test_parse_retry_after():
    assert parse_retry_after(None) is None
    assert parse_retry_after("5") == 5
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("-3") == 0
    assert parse_retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < parse_retry_after(later) <= 30  # type: ignore[operator]
    earlier = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(earlier) == 0


def test_retry_policy_checks_its_values():
    assert RetryPolicy().delay(1) == 5
    assert RetryPolicy().delay(1, retry_after=8) == 8
    for bad in ({"max_attempts": 0}, {"initial_s": -1}, {"factor": 0.5}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)
