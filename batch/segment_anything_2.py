"""`POST /segment-anything-2`: masks of the object a prompt points at, by SAM 2 (ai-runner
runner/app/routes/segment_anything_2.py, which runs Meta's `SAM2ImagePredictor`; here the
Transformers port, `Sam2Model` with `Sam2Processor`).

Prompts arrive as JSON arrays in text fields, as the spec types them: `point_coords` (Nx2, X,Y),
`point_labels` (N: 1 foreground, 0 background), `box` (x0, y0, x1, y1), `mask_input` (1x256x256
logits, as a previous answer's `logits` entry). With `normalize_coords` (the default) points and
box are in pixels of the image; without it, already relative to its size (0..1).

The answer is the runner's `MasksResponse`, each field a JSON array written into a string:
`masks` N x height x width (logits at the image's size, or 0.0/1.0 with `return_logits` false),
`scores` N (predicted IoU), `logits` N x 256 x 256 (low resolution, clamped to +-32, as the
predictor returns them); N is 3 with `multimask_output`, else 1, sorted by descending score as
the runner sorts them. Numbers are rounded to 6 decimals: the float32 values lose nothing that
matters, the answer is half the size of full float64 digits, and a 256x256 logits mask sent
back as `mask_input` fits the form's 1 MiB text field limit.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from protocol.batch_api import MasksResponse, SegmentAnything2Form
from protocol.bounded_json import JSONRefused, loads
from protocol.errors import InvalidFields
from runtime.device import DeviceSpec

from .images import open_image
from .jobs import StepGate
from .models import quiet_loading
from .route import BatchRoute, batch_state, parse_form, run_on_model

DEFAULT_MODEL = "facebook/sam2-hiera-large"
MAX_PIXELS = 2048 * 1024
"""The masks come back at the image's size, as JSON text: a Full HD image (1920x1080) with 3
masks of logits is already 60 MB of JSON."""
MIN_SIDE = 8
MAX_POINTS = 64
MASK_SIDE = 256
"""SAM 2's low-resolution mask side (4 x the 64x64 image embedding of its 1024x1024 input)."""
MASK_INPUT_LIMIT = 1e4
"""Bound of a `mask_input` logit: the model's own are clamped to +-32."""
LOGITS_CLAMP = 32.0
DECIMALS = 6


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segmenter:
    model: Any  # Sam2Model
    processor: Any  # Sam2Processor
    spec: DeviceSpec


@functools.cache
def sam2_image_processor_class() -> type:
    """transformers' `Sam2ImageProcessor` on the PIL backend.

    transformers ships SAM 2's image processor for the torchvision backend only, and
    torchvision's wheels need the CUDA build of torch, which this service's CPU installs do not
    have. This one does the same preprocessing (a bilinear resize to 1024x1024, rescale,
    ImageNet normalization) and the same `post_process_masks` (bilinear upscaling to the image's
    size, then the threshold), reads the same preprocessor_config.json, and is what
    `Sam2Processor` is given. Made on first use: transformers is imported only with a model."""
    import torch
    import torch.nn.functional as F
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import (
        IMAGENET_DEFAULT_MEAN,
        IMAGENET_DEFAULT_STD,
        PILImageResampling,
        make_flat_list_of_images,
    )

    class Sam2ImageProcessorPil(PilBackend):
        resample = PILImageResampling.BILINEAR
        image_mean = IMAGENET_DEFAULT_MEAN
        image_std = IMAGENET_DEFAULT_STD
        size = {"height": 1024, "width": 1024}
        do_resize = True
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True

        def preprocess(self, images: Any, segmentation_maps: Any = None, **kwargs: Any) -> Any:
            if segmentation_maps is not None:
                raise ValueError("segmentation maps are not supported here")
            flat = make_flat_list_of_images(images)
            features = super().preprocess(flat, **kwargs)
            # (height, width) of each image, as Sam2ImageProcessor reports them.
            features["original_sizes"] = torch.tensor([[im.height, im.width] for im in flat])
            return features

        def post_process_masks(
            self,
            masks: Any,
            original_sizes: Any,
            mask_threshold: float = 0.0,
            binarize: bool = True,
            max_hole_area: float = 0.0,  # ignored, as by Sam2ImageProcessor
            max_sprinkle_area: float = 0.0,  # ignored, as by Sam2ImageProcessor
            apply_non_overlapping_constraints: bool = False,
            **kwargs: Any,
        ) -> list[Any]:
            if apply_non_overlapping_constraints:
                raise NotImplementedError("non-overlapping constraints are not supported here")
            if isinstance(original_sizes, torch.Tensor):
                original_sizes = original_sizes.tolist()
            upscaled = []
            for image_masks, size in zip(masks, original_sizes, strict=True):
                mask = F.interpolate(image_masks, size, mode="bilinear", align_corners=False)
                upscaled.append(mask > mask_threshold if binarize else mask)
            return upscaled

    return Sam2ImageProcessorPil


def load(path: Path, spec: DeviceSpec) -> Segmenter:
    quiet_loading()
    from transformers import AutoConfig, Sam2Config, Sam2Model, Sam2Processor

    config = AutoConfig.from_pretrained(path)
    if config.model_type == "sam2_video":
        # facebook/sam2-hiera-large's Transformers weights are the video model's checkpoint;
        # its image part is Sam2Model, whose loading leaves the memory modules out.
        parts = ("vision_config", "prompt_encoder_config", "mask_decoder_config")
        config = Sam2Config(**{part: getattr(config, part).to_dict() for part in parts})
    elif config.model_type != "sam2":
        raise ValueError(f"{path.name} is a {config.model_type} model, not SAM 2")
    model = Sam2Model.from_pretrained(path, config=config, dtype=spec.dtype)
    image_processor = sam2_image_processor_class().from_pretrained(path)
    processor = Sam2Processor(image_processor=image_processor)
    return Segmenter(model.to(spec.device).eval(), processor, spec)


# --- prompts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """A request's prompts, checked, with points and box in pixels of the image."""

    points: list[list[float]] | None
    labels: list[int] | None
    box: list[float] | None
    mask: list[list[list[float]]] | None  # 1 x 256 x 256


def _is_number(value: object) -> bool:
    # JSON numbers (not booleans, a bool being an int); no integer a float cannot hold.
    return type(value) is float or (type(value) is int and abs(value) <= 2**53)


def _numbers(value: object, count: int, limit: float = float("inf")) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(_is_number(v) and -limit <= v <= limit for v in value)  # type: ignore[operator]
    )


def parse_prompts(form: SegmentAnything2Form, width: int, height: int) -> Prompts:
    """The prompts of `form` for an image of `width` x `height`. Raises InvalidFields (422,
    each error naming its field) for malformed JSON, wrong shapes, labels other than 0 and 1,
    points or a box outside the image, and labels without points (or points without labels)."""
    errors: list[dict[str, object]] = []
    bad: set[str] = set()  # fields already reported: no further checks build on them

    def fail(field: str, msg: str, kind: str = "value_error") -> None:
        bad.add(field)
        errors.append({"loc": ["body", field], "msg": msg, "type": kind})

    parsed: dict[str, Any] = {}
    for field in ("point_coords", "point_labels", "box", "mask_input"):
        text = getattr(form, field)
        if text is None or not text.strip():
            continue  # an empty field is an absent one, as the runner reads it
        try:
            parsed[field] = loads(text, what=field)
        except JSONRefused as exc:
            fail(field, str(exc), "json_invalid")

    # Pixels in, or 0..1 relative to the image without normalize_coords (the runner's
    # SAM2ImagePredictor divides pixels by the image's size itself).
    scale_x, scale_y = (1.0, 1.0) if form.normalize_coords else (float(width), float(height))
    unit = "pixels" if form.normalize_coords else "fractions of the image's size (0..1)"
    extent = f"the {width}x{height} image" if form.normalize_coords else "0..1"

    def to_pixels(x: float, y: float) -> list[float]:
        return [x * scale_x, y * scale_y]

    def inside(x: float, y: float) -> bool:
        px, py = to_pixels(x, y)
        return 0 <= px <= width and 0 <= py <= height

    points = parsed.get("point_coords")
    if "point_coords" in parsed:
        if not (
            isinstance(points, list)
            and 1 <= len(points) <= MAX_POINTS
            and all(_numbers(point, 2) for point in points)
        ):
            fail(
                "point_coords",
                f"point_coords must be an Nx2 array of numbers, [[x, y], ...], with 1 to "
                f"{MAX_POINTS} points",
            )
        elif outside := [point for point in points if not inside(*point)]:
            fail(
                "point_coords",
                f"point_coords: the point {outside[0]} lies outside {extent} (coordinates are "
                f"{unit})",
            )

    labels = parsed.get("point_labels")
    coords_given = "point_coords" in parsed or "point_coords" in bad
    if "point_labels" in parsed:
        if not (
            isinstance(labels, list)
            and all(type(label) is int and label in (0, 1) for label in labels)
        ):
            fail(
                "point_labels", "point_labels must be an array of 0 (background) or 1 (foreground)"
            )
        elif not coords_given:
            fail("point_labels", "point_labels was given without point_coords: one label per point")
        elif "point_coords" not in bad and len(labels) != len(points):
            fail("point_labels", f"point_labels has {len(labels)} labels for {len(points)} points")
    elif "point_coords" in parsed and not bad & {"point_coords", "point_labels"}:
        fail(
            "point_labels",
            "point_coords needs point_labels: one label per point, 1 (foreground) or 0 "
            "(background)",
            "missing",
        )

    box = parsed.get("box")
    if "box" in parsed:
        if not _numbers(box, 4):
            fail("box", "box must be an array of 4 numbers, [x0, y0, x1, y1]")
        elif not (box[0] <= box[2] and box[1] <= box[3]):
            fail("box", f"box {box} is not x0, y0, x1, y1 with x0 <= x1 and y0 <= y1")
        elif not (inside(box[0], box[1]) and inside(box[2], box[3])):
            fail("box", f"box {box} reaches outside {extent} (coordinates are {unit})")

    mask = parsed.get("mask_input")
    if "mask_input" in parsed and not (
        isinstance(mask, list)
        and len(mask) == 1
        and isinstance(mask[0], list)
        and len(mask[0]) == MASK_SIDE
        and all(_numbers(row, MASK_SIDE, MASK_INPUT_LIMIT) for row in mask[0])
    ):
        fail(
            "mask_input",
            f"mask_input must be a 1x{MASK_SIDE}x{MASK_SIDE} array of logits (numbers within "
            f"+-{MASK_INPUT_LIMIT:g}), as an entry of a previous answer's logits, in brackets",
        )

    if errors:
        raise InvalidFields(errors)
    return Prompts(
        points=None if points is None else [to_pixels(x, y) for x, y in points],
        labels=labels,
        box=None if box is None else [*to_pixels(*box[:2]), *to_pixels(*box[2:])],
        mask=mask,
    )


def prepare(form: SegmentAnything2Form) -> tuple[Any, Prompts]:
    """The image (400 when it is not one) and the prompts checked against its size (422)."""
    image = open_image(form.image, MAX_PIXELS, MIN_SIDE)
    return image, parse_prompts(form, image.width, image.height)


# --- segmentation (on the worker's thread) --------------------------------------------------


@dataclass(frozen=True)
class Masks:
    masks: Any  # float32 (N, height, width)
    scores: Any  # float32 (N,)
    logits: Any  # float32 (N, 256, 256)


def segment(
    segmenter: Segmenter,
    image: Any,
    prompts: Prompts,
    form: SegmentAnything2Form,
    gate: StepGate,
) -> Masks:
    import torch

    model, processor, spec = segmenter.model, segmenter.processor, segmenter.spec
    prompt_inputs: dict[str, Any] = {}
    if prompts.points is not None:
        # One image, one object, N points (the processor's nesting).
        prompt_inputs["input_points"] = [[prompts.points]]
        prompt_inputs["input_labels"] = [[prompts.labels]]
    if prompts.box is not None:
        prompt_inputs["input_boxes"] = [[prompts.box]]
    inputs = processor(images=image, return_tensors="pt", **prompt_inputs)
    model_inputs: dict[str, Any] = {}
    for name in ("input_points", "input_boxes"):
        if name in inputs:
            model_inputs[name] = inputs[name].to(spec.device, spec.dtype)
    if "input_labels" in inputs:
        model_inputs["input_labels"] = inputs["input_labels"].to(spec.device)
    if prompts.mask is not None:
        mask = torch.tensor(prompts.mask, dtype=torch.float32)[None]  # 1 x 1 x 256 x 256
        model_inputs["input_masks"] = mask.to(spec.device, spec.dtype)
    with torch.inference_mode():
        embeddings = model.get_image_embeddings(inputs["pixel_values"].to(spec.device, spec.dtype))
        # The image encoder is nearly all the work: live frames may pass before the decoder.
        gate.step()
        output = model(
            image_embeddings=embeddings,
            multimask_output=form.multimask_output,
            **model_inputs,
        )
        low_res = output.pred_masks.float()  # 1 image x 1 object x N x 256 x 256
        (masks,) = processor.post_process_masks(
            low_res, inputs["original_sizes"], binarize=not form.return_logits
        )
        scores = output.iou_scores[0, 0].float()
        order = torch.argsort(scores, descending=True)
        return Masks(
            masks=masks[0][order].float().cpu().numpy(),
            scores=scores[order].cpu().numpy(),
            logits=low_res[0, 0][order].clamp(-LOGITS_CLAMP, LOGITS_CLAMP).cpu().numpy(),
        )


# --- the answer -----------------------------------------------------------------------------


def json_array(array: Any) -> str:
    """`array` as JSON text, nested lists of numbers rounded to `DECIMALS` (float64 first: a
    rounded float32 would print its binary expansion, 0.12345699965953827)."""
    import numpy as np

    # str() of a list of finite floats is its JSON, and twice as quick as json.dumps.
    return str(np.round(np.asarray(array, dtype=np.float64), DECIMALS).tolist())


def answer_body(result: Masks) -> str:
    return MasksResponse(
        masks=json_array(result.masks),
        scores=json_array(result.scores),
        logits=json_array(result.logits),
    ).model_dump_json()


async def handle(request: web.Request) -> web.Response:
    state = batch_state(request)
    form = await parse_form(request, SegmentAnything2Form, state.config.max_upload_bytes)
    image, prompts = await asyncio.to_thread(prepare, form)
    result = await run_on_model(
        state,
        ROUTE,
        form.model_id,
        segment,
        image,
        prompts,
        form,
    )
    # Megabytes of numbers as text: off the event loop, and off the device's worker.
    body = await asyncio.to_thread(answer_body, result)
    return web.Response(text=body, content_type="application/json")


ROUTE = BatchRoute(
    name="segment-anything-2",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genSegmentAnything2",
    summary="Segment Anything 2",
    description="Segment objects in an image.",
    request=SegmentAnything2Form,
    response=MasksResponse,
)
