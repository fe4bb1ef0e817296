"""Images in and out of batch routes: uploads decoded with a clear 400 when they are not
images, results as PNG data URLs (the runner's `url` field)."""

from __future__ import annotations

import asyncio
import base64
import io
import warnings
from typing import TYPE_CHECKING, Any

from aiohttp import web

from protocol.batch_api import ImageResponse, Media
from protocol.errors import InvalidRequest, in_words

if TYPE_CHECKING:
    from PIL import Image

    from .jobs import StepGate


def open_image(
    data: bytes, max_pixels: int, min_side: int = 1, field: str = "image"
) -> Image.Image:
    """An uploaded image as RGB. Raises InvalidRequest for what is not an image this service
    reads, and for one larger than `max_pixels` (checked from the header, before decoding) or
    with a side under `min_side`."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InvalidRequest(f"the {field} file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"the {field} is {width}x{height} pixels; at most {max_pixels:,} "
                    "pixels are accepted here"
                )
            if min(width, height) < min_side:
                raise InvalidRequest(
                    f"the {field} is {width}x{height} pixels; each side must be at least "
                    f"{min_side} pixels"
                )
            image.load()
    except InvalidRequest:
        raise
    except UnidentifiedImageError as exc:
        # PIL's message names only the in-memory file object; the kinds read are the news.
        raise InvalidRequest(
            f"the {field} file is not an image this service can read (PNG, JPEG, WebP, GIF, "
            "BMP, TIFF)"
        ) from exc
    except (Image.DecompressionBombError, Warning) as exc:
        raise InvalidRequest(
            f"the {field} file is not an image this service can read: {in_words(exc)}"
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequest(f"the {field} file is damaged or truncated: {in_words(exc)}") from exc
    return image.convert("RGB")


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    # compress_level 1: a data URL is read once; speed matters more than bytes here.
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


async def png_data_urls(images: list[Image.Image]) -> list[str]:
    # PNG encoding is CPU work: off the event loop, and off the device's worker.
    return await asyncio.to_thread(lambda: [png_data_url(image) for image in images])


def one_image_per_seed(
    pipe: Any, count: int, seed: int, gate: StepGate, **kwargs: Any
) -> list[Any]:
    """`count` images, the i-th from seed `seed + i`, one call at a time: the peak memory of
    one image whatever the count, as the runner does. `kwargs` go to the diffusers pipeline."""
    import torch

    images = []
    for i in range(count):
        result = pipe(
            generator=torch.Generator("cpu").manual_seed(seed + i),
            callback_on_step_end=gate.on_step_end,
            **kwargs,
        )
        images.append(result.images[0])
    return images


async def image_response(images: list[Image.Image], seed: int) -> web.Response:
    """The runner's `ImageResponse`: PNG data URLs, the i-th image with seed `seed + i`."""
    urls = await png_data_urls(images)
    body = ImageResponse(
        images=[Media(url=url, seed=seed + i, nsfw=False) for i, url in enumerate(urls)]
    )
    return web.json_response(body.model_dump())


def decode_data_url(url: str) -> Image.Image:
    """The image of a data URL (the client's and the tests' side of `png_data_url`)."""
    from PIL import Image

    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"not an image data URL: {header[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(payload)))
