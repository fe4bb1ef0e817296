"""Every image and video route end to end over real HTTP, on tiny models of the real
architectures loaded through the runtime, called with the typed client an app backend uses:
the spec's shapes come back, and seeds reproduce."""

from __future__ import annotations

import io
import json

import numpy as np
from aiohttp import FormData
from PIL import Image

from protocol.client import Client, RetryPolicy, data_url_bytes
from runtime.tiny import SVD_XT

from .conftest import png


def form(image: bytes, **fields: object) -> FormData:
    data = FormData()
    for name, value in fields.items():
        data.add_field(name, str(value).lower() if isinstance(value, bool) else str(value))
    data.add_field("image", image, filename="in.png", content_type="image/png")
    return data


def pixels(url: str) -> np.ndarray:
    mime, data = data_url_bytes(url)
    assert mime == "image/png"
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def api(client) -> Client:  # type: ignore[no-untyped-def]
    """The typed client on the test service, retrying quickly while a model loads."""
    return Client(
        str(client.make_url("")),
        session=client.session,
        retry=RetryPolicy(initial_s=0.1, factor=1.5, max_s=1.0, max_attempts=60),
    )


async def test_text_to_image_gives_each_image_its_seed(batch_service) -> None:
    service = api(await batch_service(warm=("text-to-image",)))
    request = {"prompt": "a red cat", "width": 64, "height": 96, "seed": 41}
    body = await service.text_to_image(**request, num_images_per_prompt=2)
    assert [image.seed for image in body.images] == [41, 42]
    assert [image.nsfw for image in body.images] == [False, False]
    first, second = (pixels(image.url) for image in body.images)
    assert first.shape == second.shape == (96, 64, 3)
    assert not np.array_equal(first, second)

    # The same seed again: the same image, whether it came first or alone.
    (alone,) = (await service.text_to_image(**{**request, "seed": 42})).images
    assert alone.seed == 42
    assert np.array_equal(pixels(alone.url), second)


async def test_text_to_image_without_a_seed_reports_the_one_it_used(batch_service) -> None:
    service = api(await batch_service(warm=()))  # cold: the client waits out the load
    request = {"prompt": "a dog", "width": 64, "height": 64}
    (image,) = (await service.text_to_image(**request)).images
    (replayed,) = (await service.text_to_image(**request, seed=image.seed)).images
    assert np.array_equal(pixels(replayed.url), pixels(image.url))


async def test_image_to_image_keeps_the_input_size(batch_service) -> None:
    service = api(await batch_service(warm=("image-to-image",)))
    fields = {"prompt": "make it blue", "num_inference_steps": 3, "seed": 5}
    (image,) = (await service.image_to_image(image=png(96, 64), **fields)).images
    assert image.seed == 5
    assert pixels(image.url).shape == (64, 96, 3)
    (again,) = (await service.image_to_image(image=png(96, 64), **fields)).images
    assert np.array_equal(pixels(again.url), pixels(image.url))


async def test_image_to_image_runs_any_img2img_model_with_strength(batch_service) -> None:
    """A model that is not InstructPix2Pix (here SD-turbo) runs as img2img: `strength`
    decides how many of the steps run."""
    service = api(await batch_service(warm=()))
    fields = {
        "prompt": "a cat",
        "model_id": "stabilityai/sd-turbo",
        "seed": 2,
        "num_inference_steps": 4,
    }
    light = await service.image_to_image(image=png(64, 64), strength=0.3, **fields)
    heavy = await service.image_to_image(image=png(64, 64), strength=1.0, **fields)
    (a,), (b,) = light.images, heavy.images
    assert pixels(a.url).shape == pixels(b.url).shape == (64, 64, 3)
    assert not np.array_equal(pixels(a.url), pixels(b.url))


async def test_image_to_video_returns_the_models_frames(batch_service, tiny_models_dir) -> None:
    service = api(await batch_service(warm=("image-to-video",)))
    unet = json.loads((tiny_models_dir / SVD_XT / "unet" / "config.json").read_text())
    fields = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 9, "fps": 7}
    body = await service.image_to_video(image=png(80, 48), **fields)
    (frames,) = body.frames
    assert len(frames) == unet["num_frames"]
    assert {frame.seed for frame in frames} == {9}
    assert {pixels(frame.url).shape for frame in frames} == {(64, 64, 3)}


async def test_upscale_gives_four_times_the_size(batch_service) -> None:
    service = api(await batch_service(warm=("upscale",)))
    fields = {"prompt": "sharp", "num_inference_steps": 2, "seed": 3}
    (image,) = (await service.upscale(image=png(24, 16), **fields)).images
    assert pixels(image.url).shape == (64, 96, 3)
    (second,) = (await service.upscale(image=png(24, 16), **fields)).images
    assert np.array_equal(pixels(second.url), pixels(image.url))
