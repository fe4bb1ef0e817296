"""Livepeer's own Python SDK, `livepeer-ai` (Speakeasy-generated from Livepeer's gateway spec),
unchanged, against the real service: every one of its methods, each answer parsed by the SDK's
own models. The SDK's server URL is the service's gateway-shaped API (`/api/beta/generate`,
the path of Livepeer Studio's gateway, one of the SDK's own servers); its bearer token is the
SDK's `http_bearer` security option. No RetryConfig: a first call on a fresh server waits for
its model rather than failing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import re
import threading
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest
from livepeer_ai import Livepeer
from livepeer_ai.models import components, errors
from PIL import Image

from batch import text_to_image
from batch.videos import VIDEOS
from live.keys import RUNTIME
from protocol.client import data_url_bytes
from protocol.clips import make_clip
from runtime.models import resolve_model
from tests.live.streams import Viewer, publish_clip
from tests.waiting import wait_until

from .audio_clips import WAV, tone
from .conftest import png
from .test_image_routes import form

TOKEN = "sdk-token"
GATEWAY = "/api/beta/generate"


def sdk(client: Any, prefix: str = GATEWAY, token: str = TOKEN) -> Livepeer:
    """The SDK as a user builds it, on the test service; its calls are awaited (`*_async`)
    so that the service, on the same event loop, answers them."""
    # A generous timeout (httpx's default is 5 s): a first call waits for its model's load.
    return Livepeer(http_bearer=token, server_url=str(client.make_url(prefix)), timeout_ms=120_000)


def image_file(data: bytes, name: str = "in.png") -> dict[str, Any]:
    return {"file_name": name, "content": data, "content_type": "image/png"}


def decode_png(url: str) -> Image.Image:
    mime, data = data_url_bytes(url)
    assert mime == "image/png"
    return Image.open(io.BytesIO(data))


def decode_video(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(autouse=True)
def _sdks_closed_here() -> Iterator[None]:
    """The SDK closes its HTTP clients in a finalizer, when an SDK object (in a reference cycle)
    is garbage-collected. Collected on the event loop's thread, inside a thread pool's `submit`
    (which holds concurrent.futures' global lock), the finalizer starts a pool of its own to
    close the async client and deadlocked on that lock: the whole run hung. Collected here,
    after the test and off any loop, it closes them with `asyncio.run`, as it means to."""
    yield
    gc.collect()


@pytest.fixture
async def cold_service(batch_service):  # type: ignore[no-untyped-def]
    """The service with a token and no model loaded: every first call meets a cold model."""
    return await batch_service(warm=(), auth_token=TOKEN)


async def test_image_methods_parse(cold_service) -> None:
    lp = sdk(cold_service)
    # text_to_image: the first call of a fresh server (its model loads meanwhile).
    assert cold_service.app[RUNTIME].models.models() == []
    answer = await lp.generate.text_to_image_async(
        request={
            "prompt": "a red cat",
            "width": 64,
            "height": 96,
            "seed": 7,
            "num_inference_steps": 2,
            "num_images_per_prompt": 2,
        }
    )
    assert answer.http_meta.response.status_code == 200
    images = answer.image_response.images
    assert [image.seed for image in images] == [7, 8]
    assert all(isinstance(image, components.Media) for image in images)
    assert [decode_png(image.url).size for image in images] == [(64, 96)] * 2

    answer = await lp.generate.image_to_image_async(
        request={
            "prompt": "make it blue",
            "image": image_file(png(96, 64)),
            "seed": 3,
            "num_inference_steps": 2,
        }
    )
    (image,) = answer.image_response.images
    assert image.seed == 3
    assert decode_png(image.url).size == (96, 64)

    answer = await lp.generate.upscale_async(
        request={"prompt": "sharp", "image": image_file(png(64, 48)), "num_inference_steps": 2}
    )
    (image,) = answer.image_response.images
    assert decode_png(image.url).size == (256, 192)  # 4x

    answer = await lp.generate.image_to_text_async(request={"image": image_file(png(64, 64))})
    assert isinstance(answer.image_to_text_response.text, str)

    answer = await lp.generate.segment_anything2_async(
        request={
            "image": image_file(png(96, 64)),
            "point_coords": "[[30, 20]]",
            "point_labels": "[1]",
            "multimask_output": False,
        }
    )
    masks = answer.masks_response
    assert np.array(json.loads(masks.masks)).shape == (1, 64, 96)
    assert np.array(json.loads(masks.scores)).shape == (1,)
    assert np.array(json.loads(masks.logits)).shape == (1, 256, 256)


async def test_image_to_video_answers_one_mp4_of_the_frames(cold_service) -> None:
    """The gateway's answer: `images[0].url` is an MP4 the service serves, without a token,
    holding the frames the runner's route answers for the same seed."""
    lp = sdk(cold_service)
    fields = {"width": 64, "height": 64, "fps": 8, "seed": 11, "num_inference_steps": 2}
    answer = await lp.generate.image_to_video_async(
        request={"image": image_file(png(64, 64)), **fields}
    )
    (video,) = answer.video_response.images
    assert video.seed == 11 and video.nsfw is False
    assert video.url.startswith(str(cold_service.make_url("/videos/")))
    async with httpx.AsyncClient() as http:  # the user's own download, no token
        response = await http.get(video.url)
    assert response.status_code == 200
    assert response.headers["content-type"] == "video/mp4"
    frames = decode_video(response.content)
    with av.open(io.BytesIO(response.content)) as container:
        assert container.streams.video[0].average_rate == 8

    # The runner's route, same request: the same frames, one PNG each.
    runner = await cold_service.post(
        "/image-to-video",
        data=form(png(64, 64), **fields),
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert runner.status == 200
    (pngs,) = (await runner.json())["frames"]
    assert len(frames) == len(pngs) > 1
    for decoded, media in zip(frames, pngs, strict=True):
        original = np.asarray(decode_png(media["url"]).convert("RGB"), dtype=float)
        assert decoded.shape == original.shape
        assert np.abs(decoded - original).mean() < 12  # H.264 at CRF 18: close, not equal


async def test_a_video_url_is_a_capability_that_expires(batch_service) -> None:
    client = await batch_service(warm=("image-to-video",), auth_token=TOKEN, video_ttl_s=600)
    lp = sdk(client)
    answer = await lp.generate.image_to_video_async(
        request={
            "image": image_file(png(64, 64)),
            "width": 64,
            "height": 64,
            "num_inference_steps": 1,
        }
    )
    url = answer.video_response.images[0].url
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 200
        # Another name is nobody's video; a 404 says why in words.
        wrong = await http.get(url[: -len(".mp4") - 4] + "AAAA.mp4")
        assert wrong.status_code == 404
        assert "expired" in wrong.json()["detail"]["msg"]
    store = client.app[VIDEOS]
    store._clock = lambda: float("inf")  # every video's lifetime over
    async with httpx.AsyncClient() as http:
        assert (await http.get(url)).status_code == 404
    assert len(store) == 0 and store.bytes == 0


async def test_audio_and_text_methods_parse(cold_service) -> None:
    lp = sdk(cold_service)
    answer = await lp.generate.audio_to_text_async(
        request={"audio": {"file_name": "tone.wav", "content": tone(WAV, 2.0, 16_000)}}
    )
    text = answer.text_response
    assert isinstance(text.text, str)
    assert all(isinstance(chunk, components.Chunk) for chunk in text.chunks)

    answer = await lp.generate.text_to_speech_async(request={"text": "hello there"})
    mime, data = data_url_bytes(answer.audio_response.audio.url)
    assert mime == "audio/wav"
    with wave.open(io.BytesIO(data)) as wav:
        assert wav.getnframes() > 0

    answer = await lp.generate.llm_async(
        request={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    )
    llm = answer.llm_response
    assert llm.usage.completion_tokens <= 3
    assert llm.choices[0].message is not None
    assert llm.choices[0].message.role == "assistant"
    assert isinstance(llm.choices[0].message.content, str)


async def test_live_video_to_video_session_urls_work(cold_service) -> None:
    lp = sdk(cold_service)
    answer = await lp.generate.live_video_to_video_async(
        request={"subscribe_url": "", "publish_url": "", "model_id": "noop"}
    )
    urls = answer.live_video_to_video_response
    assert isinstance(urls, components.LiveVideoToVideoResponse)
    assert urls.publish_url and urls.subscribe_url and urls.control_url and urls.events_url
    viewer = Viewer(urls.subscribe_url)
    reading = asyncio.create_task(viewer.run())
    publishing = asyncio.create_task(
        publish_clip(urls.publish_url, make_clip(60, width=64, height=64), realtime=False)
    )
    try:
        await viewer.wait_frames(30)
    finally:
        session_id = answer.http_meta.response.json()["session_id"]
        stop = await cold_service.delete(
            f"/live-video-to-video/{session_id}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert stop.status == 200
        for task in (publishing, reading):
            task.cancel()
        await asyncio.gather(publishing, reading, return_exceptions=True)
    assert viewer.frames[0].frame.shape == (64, 64, 3)


async def test_errors_parse_as_the_sdk_error_models(cold_service) -> None:
    """401 and 400 as `HTTPError`, 422 as `HTTPValidationError`, each with its message."""
    # Each SDK object is kept while in use: it closes its HTTP clients when collected.
    lp, stranger = sdk(cold_service), sdk(cold_service, token="wrong")
    with pytest.raises(errors.HTTPError) as refused:
        await stranger.generate.text_to_image_async(request={"prompt": "x"})
    assert refused.value.data.detail.msg

    with pytest.raises(errors.HTTPError) as not_an_image:
        await lp.generate.upscale_async(
            request={"prompt": "x", "image": image_file(b"this is not a picture")}
        )
    message = not_an_image.value.data.detail.msg
    assert message.startswith("the image file is not an image this service can read")
    assert "object at 0x" not in message and "BytesIO" not in message

    with pytest.raises(errors.HTTPValidationError) as invalid:
        await lp.generate.text_to_image_async(
            request={"prompt": "x", "width": 100}  # not a multiple of 8
        )
    (error,) = invalid.value.data.detail
    assert error.loc == ["body", "width"]


async def test_every_gateway_prefix_and_the_root_answer(cold_service) -> None:
    """The Studio SDKs' prefixes (Python: /api/beta/generate, JavaScript: /api/generate) and
    the root (a runner, or the community gateway's layout) serve the same handlers."""
    request = {"prompt": "a dog", "width": 64, "height": 64, "seed": 5, "num_inference_steps": 1}
    answers = []
    for prefix in ("/api/beta/generate", "/api/generate", ""):
        lp = sdk(cold_service, prefix)
        answer = await lp.generate.text_to_image_async(request=request)
        answers.append(np.asarray(decode_png(answer.image_response.images[0].url)))
    assert all(np.array_equal(answers[0], other) for other in answers[1:])


# --- a model that is loading ----------------------------------------------------------------


def hold_load(client: Any, route_load: Any, kind: str, model_id: str) -> threading.Event:
    """Start loading `model_id` for `kind` the way a request does, but held until the returned
    event is set: a load as slow as the test wants."""
    runtime = client.app[RUNTIME]
    path = resolve_model(model_id, runtime.config.models_dir)
    release = threading.Event()

    def slow_load() -> Any:
        assert release.wait(120), "the test never released the load"
        return route_load(path, runtime.spec)

    with pytest.raises(Exception, match="is loading"):
        runtime.models.request(runtime.key(kind, model_id), slow_load)
    return release


async def test_a_load_past_the_wait_is_503_with_retry_after_then_served(batch_service) -> None:
    client = await batch_service(warm=(), auth_token=TOKEN, load_wait_s=0.05)
    release = hold_load(client, text_to_image.load, "text-to-image", text_to_image.DEFAULT_MODEL)
    request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    try:
        lp = sdk(client)
        with pytest.raises(errors.SDKError) as unavailable:
            await lp.generate.text_to_image_async(request=request)
        response = unavailable.value.raw_response
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) >= 1
        message = response.json()["detail"]["msg"]
        assert "still loading after 0.05 s of waiting" in message
    finally:
        release.set()
    runtime = client.app[RUNTIME]
    key = runtime.key("text-to-image", text_to_image.DEFAULT_MODEL)
    await wait_until(lambda: runtime.models.ready(key) is not None, "the held load to end")
    answer = await lp.generate.text_to_image_async(request=request)
    assert len(answer.image_response.images) == 1


# --- the README's recipe --------------------------------------------------------------------


def readme_recipe() -> str:
    """The Python block after README's `pip install livepeer-ai`."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    after = text[text.index("pip install livepeer-ai") :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```", start)]


async def test_the_readme_recipe_runs_as_written(batch_service, tmp_path: Path) -> None:
    """The README's lines, with the address, token and file put in, and sizes for tiny models
    on a CPU: the SDK's blocking calls, on a thread of their own as a user's script would be."""
    client = await batch_service(warm=(), auth_token=TOKEN)
    picture = tmp_path / "in.png"
    picture.write_bytes(png(64, 64))
    code = (
        readme_recipe()
        .replace("http://127.0.0.1:8000", str(client.make_url("")).rstrip("/"))
        .replace('"TOKEN"', repr(TOKEN))
        .replace('"in.png"', repr(str(picture)))
    )
    code = re.sub(r'"(width|height)": \d+', r'"\1": 64', code)
    names: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        await asyncio.to_thread(exec, code, names)
    seed, video_url, publish_url = printed.getvalue().split()
    assert int(seed) >= 0
    async with httpx.AsyncClient() as http:
        video = await http.get(video_url)
    assert video.status_code == 200 and decode_video(video.content)
    assert publish_url == names["live"].live_video_to_video_response.publish_url
    session_id = names["live"].http_meta.response.json()["session_id"]
    stop = await client.delete(
        f"/live-video-to-video/{session_id}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert stop.status == 200
