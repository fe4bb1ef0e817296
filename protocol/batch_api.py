"""Batch route schemas, field for field as Livepeer's runner OpenAPI spec (shared/seeds):
the same names, defaults and response shapes, so Livepeer clients and gateways work unchanged.

Beyond the spec, fields carry bounds (sizes, steps, counts), so that a request the service
cannot serve is a 422 naming the field rather than an out-of-memory error minutes later.
JSON bodies are validated strictly (`"1024"` is not an integer, as the runner's FastAPI has it);
multipart fields arrive as text and are converted.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.json_schema import SkipJsonSchema

from .bounded_json import loads
from .model_ids import OptionalModelId

# An uploaded file: bytes in the handler, `string`/`binary` in the OpenAPI document.
Upload = Annotated[bytes, WithJsonSchema({"type": "string", "format": "binary"})]

Seed = Annotated[int, Field(ge=0, lt=2**63, description="Seed for random number generation.")]
# `seed` is optional (a random one when absent) but never null on the wire, as in the spec:
# a form cannot carry null, and the spec types it as a plain integer.
Size = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]

HISTORY_MAX_CHARS = 1_000_000
"""The longest `history` an LLM form may send (its JSON, in characters)."""

MODEL_ID = "Hugging Face model ID (empty: the route's default model)."
LORAS = "LoRA models and weights as a JSON object; not supported by this service yet."
SAFETY = "Run the safety checker on the output (see the README for its state here)."
NEGATIVE = "Text prompt(s) to guide what to exclude from image generation."


class _Body(BaseModel):
    # Unknown fields are ignored, as the runner's FastAPI models do.
    model_config = ConfigDict(extra="ignore")


class TextToImageParams(_Body):
    model_id: OptionalModelId = Field("", description=MODEL_ID)
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
    model_id: OptionalModelId = Field("", description=MODEL_ID)
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
    model_id: OptionalModelId = Field("", description=MODEL_ID)
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
    model_id: OptionalModelId = Field("", description=MODEL_ID)
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


class GatewayVideoResponse(BaseModel):
    """Livepeer's gateway answers image-to-video with the video itself: one `Media` whose URL
    is an MP4 (the gateway spec's `VideoResponse`, as Livepeer's SDKs parse it)."""

    images: list[Media] = Field(
        description="The generated video: one MP4, at a URL valid for --video-ttl-s."
    )


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


# --- /llm (OpenAI-style chat completions, as the runner's LLM pipeline) ---------------------

LLM_MAX_TOKENS = 4096
"""The most tokens one request may ask for: a bound on how long one job holds the device."""


LLM_ROLE_LENGTH = 64


class LLMMessage(_Body):
    # Any string, as the runner takes it: "system", "user" and "assistant" are the usual
    # ones, and a model's chat template decides what else it knows ("tool", "ipython", ...).
    role: str = Field(
        max_length=LLM_ROLE_LENGTH,
        description="Who says it: system, user, assistant, or another role the model's chat "
        "template knows.",
    )
    content: str = Field(description="What is said.")

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        # JSON may escape half of a UTF-16 pair ("\udaf8"); no tokenizer takes that.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("is not valid Unicode text (half of a surrogate pair)") from None
        return value


class LLMRequest(_Body):
    messages: list[LLMMessage] = Field(
        min_length=1, max_length=1000, description="The conversation so far, oldest first."
    )
    model: OptionalModelId = Field(
        "", description="Hugging Face model ID (empty: the route's default)."
    )
    temperature: float = Field(
        0.7, ge=0, le=2, description="Sampling temperature; 0 picks the likeliest token."
    )
    max_tokens: int = Field(
        256, ge=1, le=LLM_MAX_TOKENS, description="The most tokens to generate."
    )
    top_p: float = Field(
        1.0, gt=0, le=1, description="Sample from the likeliest tokens that make up this mass."
    )
    top_k: int = Field(
        -1, ge=-1, description="Sample from this many likeliest tokens (-1 or 0: all)."
    )
    stream: bool = Field(
        False, description="Answer with server-sent events, one per generated token."
    )


class StudioLLMForm(_Body):
    """The form body of `POST /llm` in Livepeer Studio's older generate API, as its SDKs (npm
    `livepeer` 3, PyPI `livepeer` 0.3) send it: one prompt, a system message and the earlier
    turns as JSON. Taken on the gateway-shaped routes, read into an `LLMRequest`."""

    prompt: str = Field(min_length=1, max_length=200_000, description="The user's turn.")
    model_id: OptionalModelId = Field("", description="Hugging Face model ID (empty: the default).")
    system_msg: str = Field("", max_length=200_000, description="The system message, if any.")
    temperature: float = Field(0.7, ge=0, le=2, description="Sampling temperature.")
    max_tokens: int = Field(256, ge=1, le=LLM_MAX_TOKENS, description="The most tokens.")
    history: str = Field(
        "[]",
        max_length=HISTORY_MAX_CHARS,
        description='The earlier turns, as a JSON array of {"role", "content"} objects.',
    )
    stream: bool = Field(False, description="Not taken in this form: send JSON to stream.")

    def chat_request(self) -> LLMRequest:
        """The same conversation as the JSON body's `messages`. Raises ValueError for a
        `history` that is not a JSON array of messages."""
        # JSONRefused is a ValueError, its message in words; 4 bytes a character at most.
        turns = loads(self.history, limit=4 * HISTORY_MAX_CHARS, what="history")
        if not isinstance(turns, list):
            raise ValueError('history must be a JSON array of {"role", "content"} objects')
        system = [LLMMessage(role="system", content=self.system_msg)] if self.system_msg else []
        history = [LLMMessage.model_validate(turn) for turn in turns]
        return LLMRequest(
            messages=[*system, *history, LLMMessage(role="user", content=self.prompt)],
            model=self.model_id,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )


class StudioLLMResponse(BaseModel):
    """Livepeer Studio's older answer of `POST /llm` to its form body."""

    response: str = Field(description="The generated text.")
    tokens_used: int = Field(description="Tokens of the prompt and of the answer.")


class LLMTokenUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LLMChoice(BaseModel):
    index: int
    finish_reason: str = Field(
        "", description='"stop" (end of turn), "length" (max_tokens); "" until the last chunk.'
    )
    # Either may be absent, never null: the spec types both as an object (see batch/llm.py).
    delta: LLMMessage | SkipJsonSchema[None] = Field(
        None, description="The new text (streamed chunks)."
    )
    message: LLMMessage | SkipJsonSchema[None] = Field(
        None, description="The whole answer (no stream)."
    )


class LLMResponse(BaseModel):
    id: str
    model: str
    created: int
    usage: LLMTokenUsage
    choices: list[LLMChoice]


# --- audio routes ----------------------------------------------------------------------------

# `return_timestamps` as the runner parses it (case aside): "true", "1" and "sentence" mean
# sentence timestamps (Whisper's own), "false" and "0" none, "word" word timestamps.
TIMESTAMP_MODES = {
    "true": "sentence",
    "1": "sentence",
    "sentence": "sentence",
    "false": "none",
    "0": "none",
    "word": "word",
}
TTS_DESCRIPTION = (
    "A male speaker delivers a slightly expressive and animated speech with a moderate speed "
    "and pitch."
)


class AudioToTextForm(_Body):
    """Multipart body of `POST /audio-to-text` (the spec's `Body_genAudioToText`)."""

    audio: Upload = Field(description="Uploaded audio file to be transcribed.")
    model_id: OptionalModelId = Field(
        "", description="Hugging Face model ID used for transcription."
    )
    return_timestamps: str = Field(
        "true",
        description="Return timestamps for the transcribed text. Supported values: "
        "'sentence', 'word', or a string boolean ('true' or 'false'). Default is 'true' "
        "('sentence'). 'false' means no timestamps. 'word' means word-based timestamps.",
    )
    metadata: str = Field(
        "{}",
        max_length=65536,
        description="Additional job information to be passed to the pipeline (a JSON object).",
    )

    @field_validator("return_timestamps")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in TIMESTAMP_MODES:
            # The runner passes an unknown value on to the model, which fails with a 500.
            raise ValueError("must be 'true' (or 'sentence'), 'false' or 'word'")
        return value

    @field_validator("metadata")
    @classmethod
    def _json_object(cls, value: str) -> str:
        parsed = loads(value, what="metadata")  # JSONRefused: a ValueError, in words
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return value

    @property
    def timestamps(self) -> Literal["sentence", "word", "none"]:
        return TIMESTAMP_MODES[self.return_timestamps]  # type: ignore[return-value]


class Chunk(BaseModel):
    timestamp: list[float] = Field(
        description="The timestamp of the chunk: [start, end] in seconds from the audio's start."
    )
    text: str = Field(description="The text of the chunk.")


class TextResponse(BaseModel):
    text: str = Field(description="The generated text.")
    chunks: list[Chunk] = Field(
        description="The generated text chunks: sentences or words with their timestamps "
        "(none when return_timestamps is 'false')."
    )


class TextToSpeechParams(_Body):
    model_id: OptionalModelId = Field(
        "", description="Hugging Face model ID used for text to speech generation."
    )
    # The spec's default is "" only because the runner's Go client cannot express an
    # optional field; the runner itself refuses empty text (400). Here it is a 422 naming
    # the field, as is blank text; and the docs' bound, ~600 characters, is enforced.
    text: str = Field(
        "",
        min_length=1,
        max_length=600,
        validate_default=True,
        description="Text input for speech generation (at most 600 characters).",
    )
    description: str = Field(
        TTS_DESCRIPTION,
        max_length=1000,
        description="Description of speaker to steer text to speech generation (Parler-TTS "
        "models; VITS models have one voice).",
    )

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the text is blank; send something to say")
        return value


class MediaURL(BaseModel):
    url: str = Field(description="The URL where the media can be accessed (a data: URL here).")


class AudioResponse(BaseModel):
    audio: MediaURL = Field(description="The generated audio.")


# --- vision routes: image to text, segment anything 2 ---------------------------------------

JSON_ARRAY = "As a JSON array in text, e.g. "


class ImageToTextForm(_Body):
    """Multipart body of `POST /image-to-text` (the spec's `Body_genImageToText`)."""

    image: Upload = Field(description="Uploaded image to transform with the pipeline.")
    prompt: str = Field(
        "",
        max_length=2000,
        description="Text the caption continues (BLIP's conditional captioning); empty: none.",
    )
    model_id: OptionalModelId = Field("", description=MODEL_ID)


class ImageToTextResponse(BaseModel):
    text: str = Field(description="The generated text.")


class SegmentAnything2Form(_Body):
    """Multipart body of `POST /segment-anything-2` (the spec's `Body_genSegmentAnything2`).
    The prompts are JSON arrays in text fields, as the spec types them."""

    image: Upload = Field(description="Image to segment.")
    model_id: OptionalModelId = Field("", description=MODEL_ID)
    point_coords: str | SkipJsonSchema[None] = Field(
        None,
        description="Nx2 array of point prompts to the model, where each point is in (X,Y) "
        f"in pixels. {JSON_ARRAY}[[120, 80], [40, 60]].",
    )
    point_labels: str | SkipJsonSchema[None] = Field(
        None,
        description="Labels for the point prompts, where 1 indicates a foreground point and 0 "
        f"indicates a background point. {JSON_ARRAY}[1, 0].",
    )
    box: str | SkipJsonSchema[None] = Field(
        None,
        description="A length 4 array given as a box prompt to the model, in XYXY format. "
        f"{JSON_ARRAY}[10, 20, 200, 150].",
    )
    mask_input: str | SkipJsonSchema[None] = Field(
        None,
        description="A low-resolution mask input to the model, typically from a previous "
        "prediction iteration, with the form 1xHxW (H=W=256 for SAM): an entry of a previous "
        "answer's `logits`, in brackets.",
    )
    multimask_output: bool = Field(
        True,
        description="If true, the model will return three masks for ambiguous input prompts, "
        "often producing better masks than a single prediction.",
    )
    return_logits: bool = Field(
        True,
        description="If true, returns un-thresholded mask logits instead of a binary mask.",
    )
    normalize_coords: bool = Field(
        True,
        description="If true, the point coordinates will be normalized to the range [0,1], "
        "with point_coords expected to be with respect to image dimensions (pixels); if false, "
        "they are already in [0,1].",
    )


class MasksResponse(BaseModel):
    """Each field is a JSON array written into a string, as the runner answers."""

    masks: str = Field(
        description="The generated masks: N x height x width, logits or 0/1 (return_logits)."
    )
    scores: str = Field(
        description="The model's confidence scores for each generated mask: N numbers."
    )
    logits: str = Field(
        description="The raw, unnormalized predictions (logits) for the masks: N x 256 x 256."
    )
