"""The vision routes end to end over real HTTP, on tiny models of the real architectures
loaded through the runtime: image to text (BLIP) and segment anything 2 (SAM 2). The answers
have the spec's shapes, decoding is reproducible, every prompt is checked field by field, and
both jobs step their gate (the worker's safe point for live frames and cancellation)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from aiohttp import FormData

from batch import image_to_text, segment_anything_2
from batch.images import open_image
from batch.jobs import JobCancelled, StepGate
from protocol.batch_api import SegmentAnything2Form
from protocol.client import InvalidFieldsError
from runtime.device import DeviceSpec
from runtime.tiny_vision import BLIP_LARGE, SAM2_LARGE, build_tiny_sam2

from .conftest import png
from .test_image_routes import api, form

CAPTION = ("image-to-text",)
SEGMENT = ("segment-anything-2",)
WIDTH, HEIGHT = 96, 64  # not square: masks must come back at the image's own size
CPU = DeviceSpec("cpu", "float32")


def arrays(body) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """masks, scores and logits of a MasksResponse: JSON arrays in strings."""
    return tuple(np.array(json.loads(text)) for text in (body.masks, body.scores, body.logits))


async def field_errors(response) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    assert response.status == 422, await response.text()
    return [(e["loc"][-1], e["msg"]) for e in (await response.json())["detail"]]


# --- image to text --------------------------------------------------------------------------


async def test_image_to_text_captions_reproducibly_and_continues_a_prompt(batch_service) -> None:
    service = api(await batch_service(warm=CAPTION))
    plain = await service.image_to_text(image=png(WIDTH, HEIGHT))
    assert isinstance(plain.text, str)
    again = await service.image_to_text(image=png(WIDTH, HEIGHT))
    assert again.text == plain.text  # greedy decoding

    # Conditional captioning: the caption continues the prompt, which it starts with.
    prompted = await service.image_to_text(image=png(WIDTH, HEIGHT), prompt="a picture of")
    assert prompted.text.startswith("a picture of")
    assert prompted == await service.image_to_text(image=png(WIDTH, HEIGHT), prompt="a picture of")


async def test_image_to_text_refuses_what_it_cannot_caption(batch_service) -> None:
    client = await batch_service(warm=CAPTION, max_upload_mb=0.05)
    not_image = await client.post("/image-to-text", data=form(b"plain text, not a picture"))
    assert not_image.status == 400
    assert "not an image" in (await not_image.json())["detail"]["msg"]

    missing = FormData()
    missing.add_field("prompt", "a picture of")
    assert await field_errors(await client.post("/image-to-text", data=missing)) == [
        ("image", "Field required")
    ]

    too_long = await client.post("/image-to-text", data=form(png(16, 16), prompt="a " * 1001))
    assert [loc for loc, _ in await field_errors(too_long)] == ["prompt"]

    # Short enough in characters, too many tokens for the decoder's 512 positions.
    many_tokens = await client.post("/image-to-text", data=form(png(16, 16), prompt="a " * 490))
    assert many_tokens.status == 400
    assert "tokens" in (await many_tokens.json())["detail"]["msg"]

    oversized = await client.post("/image-to-text", data=form(b"\0" * 80_000))
    assert oversized.status == 413

    ok = await client.post("/image-to-text", data=form(png(16, 16)))
    assert ok.status == 200


def test_caption_steps_the_gate_per_token_and_stops_when_cancelled(tiny_models_dir) -> None:
    captioner = image_to_text.load(tiny_models_dir / BLIP_LARGE, CPU)
    image = open_image(png(WIDTH, HEIGHT), 10**6)
    gate = StepGate(lambda: 0)
    image_to_text.caption(captioner, "a photo of", image, gate)
    assert 1 <= gate.steps <= image_to_text.MAX_NEW_TOKENS

    cancelled = StepGate(lambda: 0)
    cancelled.cancelled.set()
    with pytest.raises(JobCancelled):
        image_to_text.caption(captioner, "", image, cancelled)


# --- segment anything 2 ---------------------------------------------------------------------


async def test_masks_have_the_image_size_and_one_or_three_candidates(batch_service) -> None:
    service = api(await batch_service(warm=SEGMENT))
    prompt = {"point_coords": "[[30, 20], [70, 40]]", "point_labels": "[1, 0]"}
    body = await service.segment_anything_2(image=png(WIDTH, HEIGHT), **prompt)
    masks, scores, logits = arrays(body)
    assert masks.shape == (3, HEIGHT, WIDTH)
    assert scores.shape == (3,)
    assert list(scores) == sorted(scores, reverse=True)  # best first, as the runner sorts
    assert logits.shape == (3, 256, 256)
    assert np.abs(logits).max() <= 32  # clamped, as SAM 2's predictor returns them

    single = await service.segment_anything_2(
        image=png(WIDTH, HEIGHT), multimask_output=False, **prompt
    )
    masks, scores, logits = arrays(single)
    assert (masks.shape, scores.shape, logits.shape) == ((1, HEIGHT, WIDTH), (1,), (1, 256, 256))

    assert await service.segment_anything_2(image=png(WIDTH, HEIGHT), **prompt) == body


async def test_box_mask_input_and_binary_masks(batch_service) -> None:
    service = api(await batch_service(warm=SEGMENT))
    image = png(WIDTH, HEIGHT)
    boxed = await service.segment_anything_2(image=image, box="[10, 8, 60.5, 50]")
    masks, scores, logits = arrays(boxed)
    assert masks.shape == (3, HEIGHT, WIDTH) and scores.shape == (3,)

    # A previous answer's best logits, sent back as the mask prompt (it fits the form's
    # 1 MiB text field limit), with a point and a box.
    mask_input = json.dumps([logits[0].tolist()])
    refined = await service.segment_anything_2(
        image=image,
        mask_input=mask_input,
        point_coords="[[30, 20]]",
        point_labels="[1]",
        box="[10, 8, 60, 50]",
        multimask_output=False,
        return_logits=False,
    )
    masks, _, logits = arrays(refined)
    assert masks.shape == (1, HEIGHT, WIDTH) and logits.shape == (1, 256, 256)
    assert set(np.unique(masks)) <= {0.0, 1.0}

    # No prompt at all: SAM 2 still answers (its "no point" embedding).
    masks, _, _ = arrays(await service.segment_anything_2(image=image))
    assert masks.shape == (3, HEIGHT, WIDTH)


async def test_coordinates_relative_to_the_image_without_normalize_coords(batch_service) -> None:
    service = api(await batch_service(warm=SEGMENT))
    image = png(WIDTH, HEIGHT)
    in_pixels = await service.segment_anything_2(
        image=image, point_coords="[[24, 48]]", point_labels="[1]", box="[0, 16, 48, 64]"
    )
    relative = await service.segment_anything_2(
        image=image,
        point_coords="[[0.25, 0.75]]",
        point_labels="[1]",
        box="[0, 0.25, 0.5, 1]",
        normalize_coords=False,
    )
    for ours, theirs in zip(arrays(in_pixels), arrays(relative), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
    other_point = await service.segment_anything_2(
        image=image, point_coords="[[0.9, 0.1]]", point_labels="[1]", normalize_coords=False
    )
    assert arrays(other_point)[2].tolist() != arrays(relative)[2].tolist()


async def test_a_plain_sam2_checkpoint_loads_too(batch_service, tiny_models_dir: Path) -> None:
    """The Sam2Model layout (model_type sam2), beside the video checkpoint of the default."""
    model_id = "test/sam2-plain"
    if not (tiny_models_dir / model_id).exists():
        # Writes weights: off the event loop the test may watch.
        await asyncio.to_thread(build_tiny_sam2, tiny_models_dir / model_id, seed=1, video=False)
    service = api(await batch_service(warm=()))
    body = await service.segment_anything_2(
        image=png(WIDTH, HEIGHT), model_id=model_id, box="[10, 8, 60, 50]"
    )
    masks, scores, logits = arrays(body)
    assert (masks.shape, scores.shape, logits.shape) == (
        (3, HEIGHT, WIDTH),
        (3,),
        (3, 256, 256),
    )


async def test_prompts_that_break_the_spec_are_422_naming_the_field(batch_service) -> None:
    client = await batch_service(warm=SEGMENT)
    cases: list[tuple[dict[str, object], list[str], str]] = [
        ({"point_labels": "[1]"}, ["point_labels"], "without point_coords"),
        ({"point_coords": "[[10, 20]]"}, ["point_labels"], "needs point_labels"),
        ({"point_coords": "[10, 20]", "point_labels": "[1]"}, ["point_coords"], "Nx2"),
        ({"point_coords": "[[10, 20, 3]]", "point_labels": "[1]"}, ["point_coords"], "Nx2"),
        ({"point_coords": '[["10", 20]]', "point_labels": "[1]"}, ["point_coords"], "Nx2"),
        ({"point_coords": "[[10, 20]", "point_labels": "[1]"}, ["point_coords"], "valid JSON"),
        ({"point_coords": "[[NaN, 20]]", "point_labels": "[1]"}, ["point_coords"], "finite"),
        ({"point_coords": "[[10, 20]]", "point_labels": "[2]"}, ["point_labels"], "0 (back"),
        ({"point_coords": "[[10, 20]]", "point_labels": "[1, 1]"}, ["point_labels"], "2 labels"),
        ({"point_coords": "[[100, 20]]", "point_labels": "[1]"}, ["point_coords"], "96x64"),
        ({"box": "[1, 2, 3]"}, ["box"], "4 numbers"),
        ({"box": "[50, 2, 10, 30]"}, ["box"], "x0 <= x1"),
        ({"box": "[0, 0, 0.5, 2]", "normalize_coords": False}, ["box"], "0..1"),
        ({"mask_input": "[[1, 2], [3, 4]]"}, ["mask_input"], "1x256x256"),
        ({"multimask_output": "maybe"}, ["multimask_output"], "boolean"),
        # Every bad field is named, not only the first.
        (
            {"point_coords": "{}", "box": "[]", "mask_input": "x"},
            ["point_coords", "box", "mask_input"],
            "",
        ),
    ]
    for fields, locs, words in cases:
        response = await client.post("/segment-anything-2", data=form(png(WIDTH, HEIGHT), **fields))
        errors = await field_errors(response)
        assert sorted(loc for loc, _ in errors) == sorted(locs), fields
        assert words in errors[0][1], (fields, errors)

    # The typed client raises them as InvalidFieldsError, with the same fields.
    with pytest.raises(InvalidFieldsError) as raised:
        await api(client).segment_anything_2(image=png(WIDTH, HEIGHT), box="[1, 2, 3]")
    assert [e.loc for e in raised.value.errors] == [["body", "box"]]


async def test_segment_anything_2_refuses_bad_uploads(batch_service) -> None:
    client = await batch_service(warm=(), max_upload_mb=0.05)
    not_image = await client.post("/segment-anything-2", data=form(b"GIF89a, or so it says"))
    assert not_image.status == 400
    assert "not an image" in (await not_image.json())["detail"]["msg"]

    missing = FormData()
    missing.add_field("box", "[1, 2, 3, 4]")
    errors = await field_errors(await client.post("/segment-anything-2", data=missing))
    assert errors == [("image", "Field required")]

    oversized = await client.post("/segment-anything-2", data=form(b"\0" * 80_000))
    assert oversized.status == 413
    assert "0.05 MiB" in (await oversized.json())["detail"]["msg"]


def test_segment_steps_the_gate_between_encoder_and_decoder(tiny_models_dir) -> None:
    segmenter = segment_anything_2.load(tiny_models_dir / SAM2_LARGE, CPU)
    form_ = SegmentAnything2Form(image=b"", box="[10, 8, 60, 50]")
    image = open_image(png(WIDTH, HEIGHT), 10**6)
    prompts = segment_anything_2.parse_prompts(form_, WIDTH, HEIGHT)
    gate = StepGate(lambda: 0)
    result = segment_anything_2.segment(segmenter, image, prompts, form_, gate)
    assert gate.steps == 1
    assert result.masks.shape == (3, HEIGHT, WIDTH)

    cancelled = StepGate(lambda: 0)
    cancelled.cancelled.set()
    with pytest.raises(JobCancelled):
        segment_anything_2.segment(segmenter, image, prompts, form_, cancelled)
