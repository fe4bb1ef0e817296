"""Batch route schemas, field for field as Livepeer's runner OpenAPI spec (shared/seeds):
the same names, defaults and response shapes, so Livepeer clients and gateways work unchanged.

Beyond the spec, fields carry bounds (sizes, steps, counts), so that a request the service
cannot serve is a 422 naming the field rather than an out-of-memory error minutes later.
JSON bodies are validated strictly (`"1024"` is not an integer, as the runner's FastAPI has it);
multipart fields arrive as text and are converted.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

# An uploaded file: bytes in the handler, `string`/`binary` in the OpenAPI document.
Upload = Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]

Seed = Annotated[int, Field(ge=0, lt=2**63, description="Seed for random number generation.")]
# `seed` is optional (a random one when absent) but never null on the wire, as in the spec:
# a form cannot carry null, and the spec types it as a plain integer.
Size = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]

MODEL_ID = "Hugging Face model ID (empty: the route's default model)."
LORAS = "LoRA models and weights as a JSON object; not supported by this service yet."
SAFETY = "Run the safety checker on the output (see the README for its state here)."
NEGATIVE = "Text prompt(s) to guide what to exclude from image generation."


class _Body(BaseModel):
    # Unknown fields are ignored, as the runner's FastAPI models do.
    model_config = ConfigDict(extra="ignore")


class TextToImageParams(_Body):
    model_id: str = Field("", description=MODEL_ID)
    loras: str = Field("", description=LORAS)
    prompt: str = Field(
        description="Text prompt(s) to guide image generation.", min_length=1, max_length=4000
    )
    height: Size = Field(576, description="The height in pixels of the generated image.")
    width: Size = Field(1024, description="The width in pixels of the generated image.")
    guidance_scale: float = Field(
        7.5, ge=0, le=50, description="How closely the image follows the prompt."
    )
    negative_prompt: str = Field("", max_length=4000, description=NEGATIVE)
    safety_check: bool = Field(True, description=SAFETY)
    seed: Seed | SkipJsonSchema[None] = None
    num_inference_steps: int = Field(
        50, ge=1, le=200, description="Number of denoising steps (Lightning/turbo models: 4)."
    )
    num_images_per_prompt: int = Field(
        1, ge=1, le=8, description="Number of images to generate per prompt."
    )


class ImageToImageForm(_Body):
    """Multipart body of `POST /image-to-image` (the spec's `Body_genImageToImage`)."""

    prompt: str = Field(
        description="Text prompt(s) to guide image generation.", min_length=1, max_length=4000
    )
    image: Upload = Field(description="Uploaded image to modify with the pipeline.")
    model_id: str = Field("", description=MODEL_ID)
    loras: str = Field("", description=LORAS)
    strength: float = Field(
        0.8, ge=0, le=1, description="Degree of transformation applied to the reference image."
    )
    guidance_scale: float = Field(7.5, ge=0, le=50, description="Guidance of the text prompt.")
    image_guidance_scale: float = Field(
        1.5, ge=0, le=50, description="How far the result is pushed towards the initial image."
    )
    negative_prompt: str = Field("", max_length=4000, description=NEGATIVE)
    safety_check: bool = Field(True, description=SAFETY)
    seed: Seed | SkipJsonSchema[None] = None
    num_inference_steps: int = Field(100, ge=1, le=200, description="Number of denoising steps.")
    num_images_per_prompt: int = Field(
        1, ge=1, le=8, description="Number of images to generate per prompt."
    )


class ImageToVideoForm(_Body):
    """Multipart body of `POST /image-to-video` (the spec's `Body_genImageToVideo`)."""

    image: Upload = Field(description="Uploaded image to generate a video from.")
    model_id: str = Field("", description=MODEL_ID)
    height: Size = Field(576, description="The height in pixels of the generated video.")
    width: Size = Field(1024, description="The width in pixels of the generated video.")
    fps: int = Field(6, ge=1, le=60, description="The frames per second of the generated video.")
    motion_bucket_id: int = Field(
        127, ge=0, le=255, description="Amount of motion: higher numbers, more motion."
    )
    noise_aug_strength: float = Field(
        0.02, ge=0, le=1, description="Noise added to the conditioning image."
    )
    safety_check: bool = Field(True, description=SAFETY)
    seed: Seed | SkipJsonSchema[None] = None
    num_inference_steps: int = Field(25, ge=1, le=200, description="Number of denoising steps.")


class UpscaleForm(_Body):
    """Multipart body of `POST /upscale` (the spec's `Body_genUpscale`)."""

    prompt: str = Field(
        description="Text prompt(s) to guide upscaled image generation.", max_length=4000
    )
    image: Upload = Field(description="Uploaded image to upscale (4x).")
    model_id: str = Field("", description=MODEL_ID)
    safety_check: bool = Field(True, description=SAFETY)
    seed: Seed | SkipJsonSchema[None] = None
    num_inference_steps: int = Field(75, ge=1, le=200, description="Number of denoising steps.")


class Media(BaseModel):
    url: str = Field(description="The URL where the media can be accessed (a data: URL here).")
    seed: int = Field(description="The seed used to generate the media.")
    nsfw: bool = Field(description="Whether the media was flagged as NSFW.")


class ImageResponse(BaseModel):
    images: list[Media] = Field(description="The generated images.")


class VideoResponse(BaseModel):
    frames: list[list[Media]] = Field(description="The generated video frames.")


class APIError(BaseModel):
    msg: str = Field(description="The error message.")


class HTTPError(BaseModel):
    detail: APIError = Field(description="Detailed error information.")


class ValidationError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class HTTPValidationError(BaseModel):
    detail: list[ValidationError]
