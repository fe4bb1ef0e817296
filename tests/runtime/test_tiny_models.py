"""The tiny batch-route models: each folder loads back offline, through the generic loader and
the task's own pipeline class, and runs on the CPU to outputs of the size a user would get."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from runtime import tiny

# transformers' one notice that it uses the PIL image processor because torchvision is absent:
# about the environment, not about the model folder.
ALLOWED = ("requires torchvision",)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@contextmanager
def no_load_warnings() -> Iterator[None]:
    """Fail on a warning logged by diffusers or transformers (their loggers do not propagate,
    so caplog would not see them) or raised with `warnings` (diffusers' deprecations are
    FutureWarnings): a missing component, an unexpected class, a config key that is ignored."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    # DeprecationWarnings come from the libraries' own code (numpy 2's copy keyword in the
    # schedulers), not from anything in the folder.
    messages = [r.getMessage() for r in records] + [
        str(w.message) for w in raised if not issubclass(w.category, DeprecationWarning)
    ]
    assert [m for m in messages if not any(a in m for a in ALLOWED)] == []


def load(build: Callable[[Path], Path], folder: Path, task_class: type) -> object:
    """Build, load through `DiffusionPipeline` (what a generic loader does), then through the
    task class; both must give the same pipeline class, silently."""
    from diffusers import DiffusionPipeline

    build(folder)
    with no_load_warnings():
        generic = DiffusionPipeline.from_pretrained(folder)
        pipeline = task_class.from_pretrained(folder)  # type: ignore[attr-defined]
    assert type(generic).__name__ == type(pipeline).__name__
    pipeline.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipeline


def pixels(image: object) -> np.ndarray:
    return np.asarray(image)


def generator(seed: int = 0):  # type: ignore[no-untyped-def]
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def an_image(width: int, height: int):  # type: ignore[no-untyped-def]
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_tiny_sdxl_lightning_text_to_image(tmp_path: Path) -> None:
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    pipe = load(tiny.build_tiny_sdxl, tmp_path / tiny.SDXL_LIGHTNING, AutoPipelineForText2Image)
    assert isinstance(pipe, StableDiffusionXLPipeline)

    def run(seed: int) -> object:
        return pipe(
            prompt="a red cat",
            negative_prompt="a dog",
            width=64,
            height=48,
            num_inference_steps=2,
            guidance_scale=1.5,
            generator=generator(seed),
        ).images

    images = run(7)
    assert len(images) == 1 and images[0].size == (64, 48)
    assert (pixels(images[0]) == pixels(run(7)[0])).all()
    assert (pixels(images[0]) != pixels(run(8)[0])).any()


def test_tiny_instruct_pix2pix_keeps_the_input_size(tmp_path: Path) -> None:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    pipe = load(
        tiny.build_tiny_pix2pix, tmp_path / tiny.PIX2PIX, StableDiffusionInstructPix2PixPipeline
    )
    source = an_image(64, 48)

    def run(seed: int) -> object:
        return pipe(
            prompt="make it a dog",
            image=source,
            num_inference_steps=2,
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            generator=generator(seed),
        ).images

    images = run(3)
    assert len(images) == 1 and images[0].size == source.size
    assert (pixels(images[0]) == pixels(run(3)[0])).all()


def test_tiny_svd_xt_image_to_video(tmp_path: Path) -> None:
    from diffusers import StableVideoDiffusionPipeline

    pipe = load(tiny.build_tiny_svd, tmp_path / tiny.SVD_XT, StableVideoDiffusionPipeline)

    def run(seed: int) -> list:
        return pipe(
            image=an_image(80, 60),
            width=64,
            height=48,
            num_frames=3,
            decode_chunk_size=2,
            num_inference_steps=2,
            min_guidance_scale=1.0,
            max_guidance_scale=2.5,
            fps=7,
            motion_bucket_id=127,
            noise_aug_strength=0.02,
            generator=generator(seed),
        ).frames

    videos = run(5)
    assert len(videos) == 1 and len(videos[0]) == 3
    assert {frame.size for frame in videos[0]} == {(64, 48)}
    again = run(5)
    assert all((pixels(a) == pixels(b)).all() for a, b in zip(videos[0], again[0], strict=True))


def test_tiny_x4_upscaler_gives_four_times_the_size(tmp_path: Path) -> None:
    from diffusers import StableDiffusionUpscalePipeline

    pipe = load(
        tiny.build_tiny_x4_upscaler, tmp_path / tiny.X4_UPSCALER, StableDiffusionUpscalePipeline
    )
    assert pipe.vae.config.scaling_factor == 0.08333  # type: ignore[attr-defined]
    source = an_image(16, 12)

    def run(seed: int) -> object:
        return pipe(
            prompt="a sharp photo",
            image=source,
            num_inference_steps=2,
            guidance_scale=4.0,
            noise_level=20,
            generator=generator(seed),
        ).images

    images = run(11)
    assert len(images) == 1 and images[0].size == (64, 48)
    assert (pixels(images[0]) == pixels(run(11)[0])).all()


def test_write_tiny_models_writes_every_route(tmp_path: Path) -> None:
    paths = tiny.write_tiny_models(tmp_path)
    # Every batch route's default model, under its real id, and the live pipeline's two.
    from batch import ROUTES

    expected = {tiny.SD_TURBO, tiny.TAESD} | {route.default_model for route in ROUTES}
    assert {path.relative_to(tmp_path).as_posix() for path in paths} == expected
    for path in paths:
        assert (path / "model_index.json").is_file() or (path / "config.json").is_file()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        assert size < 10_000_000, f"{path} is {size} bytes"
