"""`streamdiffusion`: img2img restyling at 1-4 denoising steps, the StreamDiffusion recipe, built
on diffusers components (no dependency on the StreamDiffusion package).

Per frame: the tiny autoencoder encodes the frame, the UNet runs ONCE over a batch that holds the
new frame at the first denoising step and the earlier frames at the later steps (stream batch),
and the frame leaving the last step is decoded. Prompt embeddings, timesteps, noise and scalings
are precomputed, so a prompt, seed or step change applies between two frames without a reload.

Parameter names and meanings follow Livepeer's StreamDiffusion pipeline (protocol/trickle.md §5).
torch and diffusers are imported inside methods: importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from protocol.model_ids import ModelId
from runtime.device import free_gpu_memory, has_gpu
from runtime.library_logs import route_library_logs
from runtime.models import ModelNotFound, folder_size, resolve_model
from runtime.worker_child import on_main

from .base import ADVANCED, HIDDEN, LivePipeline, PipelineContext, PipelineParams
from .bounds import (
    OPTION_MAX_ENTRIES,
    OptionList,
    Options,
    PromptText,
    Seed,
    Url,
    WeightedPrompts,
    WeightedSeeds,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "stabilityai/sd-turbo"
DEFAULT_VAE = "madebyollin/taesd"

NEEDS_GPU = (
    "streamdiffusion needs a CUDA GPU for real time, and this host has none; cartoon and noop "
    "run here, and streamdiffusion too, not in real time"
)
WITH_CPU = "with --device cpu"
ON_TINY_MODELS = (
    "on the tiny random test models (`live-v2v models tiny DIR`, then "
    "`live-v2v serve --models-dir DIR --device cpu`)"
)
ON_THE_CPU = "runs on the CPU here: not real time (it is made for a CUDA GPU)"


class StreamDiffusionParams(PipelineParams):
    model_id: ModelId = Field(
        DEFAULT_MODEL, description="diffusers model id, in the models directory or the HF cache"
    )
    vae_id: ModelId | None = Field(
        DEFAULT_VAE, description="tiny autoencoder (TAESD class); null: the model's own VAE"
    )
    width: int | None = Field(512, ge=64, le=1024, multiple_of=8, description="output width")
    height: int | None = Field(512, ge=64, le=1024, multiple_of=8, description="output height")
    prompt: PromptText | WeightedPrompts = Field(
        "flowers", description="what the video becomes; over the API also [prompt, weight] pairs"
    )
    prompt_interpolation_method: Literal["linear", "slerp"] = Field(
        "slerp", description="how weighted prompts blend", json_schema_extra=ADVANCED
    )
    normalize_prompt_weights: bool = Field(
        True, description="scale prompt weights to sum to 1", json_schema_extra=ADVANCED
    )
    negative_prompt: PromptText = Field(
        "blurry, low quality, flat, 2d",
        description="what to steer away from, when guidance scale is above 1",
    )
    guidance_scale: float = Field(1.0, description="above 1: follow the prompt more closely")
    delta: float = Field(
        0.7,
        title="Self-guidance",
        description="self-guidance strength, when guidance scale is above 1 and there is no "
        "negative prompt",
        json_schema_extra=ADVANCED,
    )
    num_inference_steps: int = Field(
        50,
        ge=1,
        le=100,
        title="Schedule length",
        description="points of the noise schedule that denoising steps pick from; "
        "not the steps run per frame",
        json_schema_extra=ADVANCED,
    )
    t_index_list: list[Annotated[int, Field(ge=0, le=99)]] = Field(
        # A value (pydantic copies it per instance), not a factory: the schema shows it.
        default=[12, 20, 32],
        min_length=1,
        max_length=4,
        title="Denoising steps",
        description="1 to 4 schedule points, ascending, each below the schedule length: one "
        "step each; lower points restyle more",
    )
    seed: Seed | WeightedSeeds = Field(
        789, description="the noise pattern; over the API also [seed, weight] pairs"
    )
    seed_interpolation_method: Literal["linear", "slerp"] = Field(
        "linear", description="how weighted seeds blend", json_schema_extra=ADVANCED
    )
    normalize_seed_weights: bool = Field(
        True, description="scale seed weights to sum to 1", json_schema_extra=ADVANCED
    )
    use_denoising_batch: bool = Field(
        True,
        title="Stream batch",
        description="all steps in one UNet call (the output trails by steps - 1 frames)",
        json_schema_extra=ADVANCED,
    )
    do_add_noise: bool = Field(
        True,
        title="Fresh noise between steps",
        description="fresh noise between steps when not batched (else the removed noise)",
        json_schema_extra=ADVANCED,
    )
    skip_diffusion: bool = Field(
        False, description="pass the camera through unchanged", json_schema_extra=ADVANCED
    )
    enable_similar_image_filter: bool = Field(
        False,
        title="Similar image filter",
        description="repeat the last output while the camera image barely changes",
        json_schema_extra=ADVANCED,
    )
    similar_image_filter_threshold: float = Field(
        0.98,
        title="Similar image threshold",
        ge=0.0,
        le=1.0,
        description="similarity above which a frame is skipped",
        json_schema_extra=ADVANCED,
    )
    similar_image_filter_max_skip_frame: int = Field(
        10,
        title="Similar images skipped in a row",
        ge=0,
        description="at most; then one frame is processed",
        json_schema_extra=ADVANCED,
    )
    acceleration: Literal["none", "xformers", "tensorrt", "compile"] = Field(
        "none",
        description="compile: the UNet and decoder through torch.compile",
        json_schema_extra=ADVANCED,
    )
    # Accepted so that a Livepeer gateway's full parameter sets validate; refused when they ask
    # for something this pipeline does not do (yet), rather than silently ignored. Not offered
    # (HIDDEN): a form shows what the pipeline does.
    use_lcm_lora: bool = Field(True, json_schema_extra=HIDDEN)
    lcm_lora_id: ModelId = Field("latent-consistency/lcm-lora-sdv1-5", json_schema_extra=HIDDEN)
    lora_dict: dict[ModelId, float] | None = Field(
        None, max_length=OPTION_MAX_ENTRIES, json_schema_extra=HIDDEN
    )
    use_safety_checker: bool = Field(False, json_schema_extra=HIDDEN)
    safety_checker_threshold: float = Field(0.5, json_schema_extra=HIDDEN)
    controlnets: OptionList = Field(default_factory=list, json_schema_extra=HIDDEN)
    ip_adapter: Options | None = Field(None, json_schema_extra=HIDDEN)
    ip_adapter_style_image_url: Url | None = Field(None, json_schema_extra=HIDDEN)
    image_preprocessing: Options | None = Field(None, json_schema_extra=HIDDEN)
    image_postprocessing: Options | None = Field(None, json_schema_extra=HIDDEN)
    latent_preprocessing: Options | None = Field(None, json_schema_extra=HIDDEN)
    latent_postprocessing: Options | None = Field(None, json_schema_extra=HIDDEN)
    cached_attention: Options | None = Field(None, json_schema_extra=HIDDEN)

    @field_validator("t_index_list")
    @classmethod
    def _non_decreasing(cls, value: list[int]) -> list[int]:
        if any(b < a for a, b in itertools.pairwise(value)) or min(value) < 0:
            raise ValueError("t_index_list must be non-negative and non-decreasing")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StreamDiffusionParams:
        if max(self.t_index_list) >= self.num_inference_steps:
            raise ValueError("every t_index_list entry must be below num_inference_steps")
        unsupported = []
        if any(c.get("enabled", True) for c in self.controlnets):
            unsupported.append("controlnets")
        if self.ip_adapter and self.ip_adapter.get("enabled", True):
            unsupported.append("ip_adapter")
        if self.lora_dict:
            unsupported.append("lora_dict")
        if self.use_safety_checker:
            unsupported.append("use_safety_checker")
        for name in (
            "image_preprocessing",
            "image_postprocessing",
            "latent_preprocessing",
            "latent_postprocessing",
            "cached_attention",
        ):
            value = getattr(self, name)
            if value and value.get("enabled", True):
                unsupported.append(name)
        if unsupported:
            raise ValueError(f"not supported by this runner yet: {', '.join(unsupported)}")
        return self


LIVE_PARAMS = frozenset(
    {
        "prompt",
        "prompt_interpolation_method",
        "normalize_prompt_weights",
        "negative_prompt",
        "guidance_scale",
        "delta",
        "num_inference_steps",
        "t_index_list",
        "seed",
        "seed_interpolation_method",
        "normalize_seed_weights",
        "skip_diffusion",
        "enable_similar_image_filter",
        "similar_image_filter_threshold",
        "similar_image_filter_max_skip_frame",
        "use_safety_checker",
        "safety_checker_threshold",
        "controlnets",
        "ip_adapter",
        "ip_adapter_style_image_url",
        "image_preprocessing",
        "image_postprocessing",
        "latent_preprocessing",
        "latent_postprocessing",
        "cached_attention",
        "do_add_noise",
    }
)


def _weights(pairs: list[tuple[Any, float]], normalize: bool) -> list[float]:
    weights = [float(w) for _, w in pairs]
    total = sum(weights)
    if normalize and total:
        weights = [w / total for w in weights]
    return weights


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    import torch

    a_flat, b_flat = a.flatten().float(), b.flatten().float()
    cos = torch.dot(a_flat, b_flat) / (a_flat.norm() * b_flat.norm() + 1e-8)
    omega = torch.arccos(cos.clamp(-1 + 1e-7, 1 - 1e-7))
    if omega.abs() < 1e-4:
        return (1 - t) * a + t * b
    so = torch.sin(omega)
    return ((torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b).to(a.dtype)


def _blend(items: Iterable[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """The weighted blend of `items`, taken one at a time (a generator makes each when it is
    needed), so that at most the running blend and one item are held, whatever their number."""
    if len(weights) == 1:
        (only,) = items
        return only * (weights[0] if weights[0] else 1.0)
    out: torch.Tensor | None = None
    acc = 0.0
    for x, w in zip(items, weights, strict=True):
        if out is None:
            out = x * w if method == "linear" else x
        elif method == "linear":
            out += w * x
        else:
            # slerp folds pairwise, each step weighted by the share of the newcomer.
            out = _slerp(out, x, w / (acc + w) if acc + w else 0.5)
        acc += w
    assert out is not None
    return out


class StreamDiffusionPipeline(LivePipeline):
    name = "streamdiffusion"
    description = "img2img restyling at 1-4 steps (sd-turbo class), stream-batched"
    Params = StreamDiffusionParams
    live_params = LIVE_PARAMS
    uses_device = True
    requires_gpu = True

    unet_calls: ClassVar[int] = 0  # counted across instances: tests read it

    def __init__(
        self, params: StreamDiffusionParams, context: PipelineContext | None = None
    ) -> None:  # type: ignore[override]
        super().__init__(params, context)
        self.params: StreamDiffusionParams = params
        self.skipped = 0
        self._loaded = False

    # -- availability and loading ---------------------------------------------------------------

    @classmethod
    def check_available(cls, params: PipelineParams, context: PipelineContext) -> str | None:
        assert isinstance(params, StreamDiffusionParams)
        # The device first: on a host without a GPU, that is what the operator must hear
        # before anything about weights (which would lead to a multi-GB download for nothing).
        spec = context.spec
        missing: ModelNotFound | None = None
        try:
            resolve_model(params.model_id, context.models_dir)
        except ModelNotFound as exc:
            missing = exc
        if spec.is_gpu:
            if missing is not None:
                raise missing
            return None
        if missing is None and context.device == "auto":
            raise RuntimeError(f"{NEEDS_GPU}, {WITH_CPU}")
        if missing is not None and not has_gpu():
            raise RuntimeError(f"{NEEDS_GPU}, {ON_TINY_MODELS}; also, {missing}")
        if missing is not None:
            raise missing
        return ON_THE_CPU

    @classmethod
    def model_ids(cls, params: PipelineParams) -> list[str]:
        assert isinstance(params, StreamDiffusionParams)
        return [params.model_id, *([params.vae_id] if params.vae_id else [])]

    @classmethod
    def model_memory(cls, params: PipelineParams, context: PipelineContext) -> tuple[str, int]:
        # The same id and estimate `load` gives the model cache.
        assert isinstance(params, StreamDiffusionParams)
        model = params.model_id
        if params.vae_id:
            with contextlib.suppress(LookupError):
                resolve_model(params.vae_id, context.models_dir)
                model = f"{params.model_id}+{params.vae_id}"
        return model, folder_size(resolve_model(params.model_id, context.models_dir))

    def keeps_serving_during_reload(self, new: PipelineParams) -> bool:
        # The old pipeline keeps serving while the new one loads beside it, when the GPU
        # can hold both; elsewhere (CPU, MPS: free memory unknown) the loading frame shows.
        if not self._loaded:
            return False
        free = free_gpu_memory(self._spec)
        return free is not None and free > 2 * self._weights_bytes

    def load(self) -> None:
        p = self.params
        self._spec = spec = self.context.spec
        path = resolve_model(p.model_id, self.context.models_dir)
        vae_path = self._vae_path()
        self._weights_bytes = folder_size(path)
        runtime = self.context.runtime
        model = f"{p.model_id}+{p.vae_id}" if vae_path is not None else p.model_id

        def load() -> dict[str, Any]:
            # Checked only when the weights are not loaded yet: a session that shares them
            # needs no room for another copy.
            free = free_gpu_memory(spec)
            if free is not None and free < self._weights_bytes * 1.3:
                raise MemoryError(
                    f"{p.model_id} needs about {self._weights_bytes / 2**30:.1f} GiB of GPU "
                    f"memory and {free / 2**30:.1f} GiB is free"
                )
            return load_components(path, vae_path, spec, compile=self._compiling(spec))

        if runtime is None:
            components = load()
        else:
            # Weights come from the runtime's cache: sessions of one model share one copy.
            self._lease = runtime.models.acquire(
                runtime.key(self.name, model), load, estimate=self._weights_bytes
            )
            components = self._lease.value
        try:
            # In a worker process this load runs on its loader lane, beside other sessions'
            # frames: the weights above were new modules then, but attaching runs the shared
            # ones (the prompt, the warm-up, a compile's first pass and its CUDA graphs), so it
            # runs on the thread that runs their frames. Elsewhere it runs here.
            on_main(lambda: self.attach(**components))
        except BaseException:
            # A load that fails after leasing (the warm-up running out of memory) gives the
            # model back: pinned and counted as in use, it would never be evicted.
            self.unload()
            raise

    def _compiling(self, spec: Any) -> bool:
        return self.params.acceleration == "compile" or (self.context.compile and spec.is_gpu)

    def attach(
        self, *, tokenizer: Any, text_encoder: Any, unet: Any, vae: Any, scheduler: Any
    ) -> None:
        """Take loaded components (from `load`, or built in memory by bench/diffusion.py),
        precompute this stream's state, and warm up. The components may be shared with other
        sessions: nothing here changes them; the scheduler, which keeps a step index, is this
        session's own copy."""
        p = self.params
        if not hasattr(self, "_spec"):
            self._spec = self.context.spec
            self._weights_bytes = 0
        spec = self._spec
        ready = prepare_components(
            {"text_encoder": text_encoder, "unet": unet, "vae": vae},
            spec,
            compile=self._compiling(spec),
        )
        self.tokenizer = tokenizer
        self.text_encoder = ready["text_encoder"]
        self.unet = ready["unet"]
        self.vae = ready["vae"]
        self.scheduler = type(scheduler).from_config(scheduler.config)
        self.device = _torch_device(spec.device)
        self.dtype = spec.dtype
        self._prepare(p)
        # Warm-up: the first passes allocate and (when compiling) compile; do them before
        # the pipeline reports ready.
        warm = np.zeros((p.height or 512, p.width or 512, 3), np.uint8)
        for _ in range(2):
            self.process(warm)
        self._prepare(p)  # forget the warm-up frames in the stream batch
        self._loaded = True

    def _vae_path(self) -> Path | None:
        vae_id = self.params.vae_id
        if not vae_id:
            return None
        try:
            return resolve_model(vae_id, self.context.models_dir)
        except LookupError:
            logger.warning("tiny autoencoder %s not found; using the model's own VAE", vae_id)
            return None

    def unload(self) -> None:
        for name in ("unet", "vae", "text_encoder", "tokenizer"):
            self.__dict__.pop(name, None)
        lease = self.__dict__.pop("_lease", None)
        if lease is not None:
            lease.release()
        if self._loaded and self._spec.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        self._loaded = False

    # -- live params ----------------------------------------------------------------------------

    def apply(self, params: PipelineParams) -> None:
        assert isinstance(params, StreamDiffusionParams)
        old = self.params
        self.params = params
        if _schedule_key(old) != _schedule_key(params):
            self._prepare(params)
        else:
            self._prepare_text(params)

    def _encode_prompt(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(
            text,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def _prepare_text(self, p: StreamDiffusionParams) -> None:
        import torch

        with torch.inference_mode():
            pairs = [(p.prompt, 1.0)] if isinstance(p.prompt, str) else list(p.prompt)
            embeds = (self._encode_prompt(text) for text, _ in pairs)
            weights = _weights(pairs, p.normalize_prompt_weights)
            self.prompt_embeds = _blend(embeds, weights, p.prompt_interpolation_method)
            self.full_cfg = p.guidance_scale > 1.0 and bool(p.negative_prompt)
            self.negative_embeds = self._encode_prompt(p.negative_prompt) if self.full_cfg else None

    def _prepare(self, p: StreamDiffusionParams) -> None:
        """Everything per-frame work needs: embeddings, timesteps, scalings, noise, buffers."""
        import torch

        self._prepare_text(p)
        width, height = p.width or 512, p.height or 512
        latent_shape = (4, height // 8, width // 8)
        self.scheduler.set_timesteps(p.num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        sub = torch.stack([timesteps[i] for i in p.t_index_list]).to(self.device)
        self.timesteps = sub
        alphas = self.scheduler.alphas_cumprod.to(self.device)[sub.long()]
        shape = (-1, 1, 1, 1)
        self.alpha = alphas.sqrt().view(shape).to(self.dtype)
        self.beta = (1 - alphas).sqrt().view(shape).to(self.dtype)
        skips, outs = zip(
            *(self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in sub),
            strict=True,
        )
        self.c_skip = (
            torch.stack([torch.as_tensor(s) for s in skips]).view(shape).to(self.device, self.dtype)
        )
        self.c_out = (
            torch.stack([torch.as_tensor(o) for o in outs]).view(shape).to(self.device, self.dtype)
        )
        steps = len(p.t_index_list)
        seeds = [(p.seed, 1.0)] if isinstance(p.seed, int) else list(p.seed)
        noises = (
            torch.randn(
                (steps, *latent_shape), generator=torch.Generator("cpu").manual_seed(int(s))
            )
            for s, _ in seeds
        )
        noise = _blend(
            noises, _weights(seeds, p.normalize_seed_weights), p.seed_interpolation_method
        )
        self.init_noise = noise.to(self.device, self.dtype)
        # The residual-noise trick: what re-noises a latent for its next step is the noise
        # the UNet actually removed, not fresh noise, so the stream stays temporally stable.
        self.stock_noise = self.init_noise.clone()
        self.buffer = torch.zeros((steps - 1, *latent_shape), device=self.device, dtype=self.dtype)
        self._last_input: np.ndarray | None = None
        self._last_output: np.ndarray | None = None
        self.skipped = 0

    # -- per frame --------------------------------------------------------------------------------

    def _similar(self, image: np.ndarray) -> bool:
        p = self.params
        last = self._last_input
        if not p.enable_similar_image_filter or last is None or last.shape != image.shape:
            return False
        a = image[::4, ::4].astype(np.float32).ravel()
        b = last[::4, ::4].astype(np.float32).ravel()
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-6))
        return cosine >= p.similar_image_filter_threshold

    def process(self, image: np.ndarray) -> np.ndarray:
        import torch

        p = self.params
        if p.skip_diffusion:
            return image
        if self._similar(image) and self.skipped < p.similar_image_filter_max_skip_frame:
            self.skipped += 1
            assert self._last_output is not None
            return self._last_output
        self.skipped = 0
        with torch.inference_mode():
            out = self._denoise(image)
        self._last_input = image
        self._last_output = out
        return out

    def _denoise(self, image: np.ndarray) -> np.ndarray:
        import torch

        p = self.params
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].to(self.dtype)
        x = x / 127.5 - 1.0
        height, width = (p.height or 512), (p.width or 512)
        if x.shape[-2:] != (height, width):
            x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear")
        latent = self._vae_encode(x)
        x_t = self.alpha[0] * latent + self.beta[0] * self.init_noise[0:1]
        steps = len(p.t_index_list)
        if p.use_denoising_batch or steps == 1:
            batch = torch.cat([x_t, self.buffer]) if steps > 1 else x_t
            denoised, eps = self._unet_step(batch, self.timesteps, slice(None))
            if steps > 1:
                self._advance(denoised, eps)
            out_latent = denoised[-1:]
        else:
            current = x_t
            for i in range(steps):
                denoised, eps = self._unet_step(current, self.timesteps[i : i + 1], slice(i, i + 1))
                if i + 1 < steps:
                    current = self.alpha[i + 1] * denoised + self.beta[i + 1] * (
                        self.init_noise[i + 1 : i + 2] if p.do_add_noise else eps
                    )
            out_latent = denoised
        return self._vae_decode(out_latent)

    def _unet_step(
        self, x: torch.Tensor, t: torch.Tensor, rows: slice
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        p = self.params
        n = x.shape[0]
        embeds = self.prompt_embeds.expand(n, -1, -1)
        if self.full_cfg:
            assert self.negative_embeds is not None
            eps_uncond, eps_text = self.unet(
                torch.cat([x, x]),
                torch.cat([t, t]),
                encoder_hidden_states=torch.cat([self.negative_embeds.expand(n, -1, -1), embeds]),
            ).sample.chunk(2)
            eps = eps_uncond + p.guidance_scale * (eps_text - eps_uncond)
        else:
            eps_text = self.unet(x, t, encoder_hidden_states=embeds).sample
            if p.guidance_scale > 1.0:
                # Self-guidance: the residual noise, scaled by delta, stands in for the
                # unconditional prediction (no second UNet pass).
                eps_uncond = self.stock_noise[rows] * p.delta
                eps = eps_uncond + p.guidance_scale * (eps_text - eps_uncond)
            else:
                eps = eps_text
        alpha, beta = self.alpha[rows], self.beta[rows]
        x0 = (x - beta * eps) / alpha
        denoised = self.c_out[rows] * x0 + self.c_skip[rows] * x
        return denoised, eps

    def _advance(self, denoised: torch.Tensor, eps: torch.Tensor) -> None:
        """Move every frame of the stream batch on by one step."""
        import torch

        p = self.params
        if p.do_add_noise:
            noise = self.init_noise[1:]
        else:
            noise = self.stock_noise[1:]
        self.buffer = self.alpha[1:] * denoised[:-1] + self.beta[1:] * noise
        # Residual noise for the next frame: shifted one step along the batch, with the fresh
        # frame's slot refilled from the initial noise.
        self.stock_noise = torch.cat([self.init_noise[0:1], eps[:-1]])

    def _vae_encode(self, x: torch.Tensor) -> torch.Tensor:
        encoded = self.vae.encode(x)
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
        return latents * self.vae.config.scaling_factor

    def _vae_decode(self, latent: torch.Tensor) -> np.ndarray:
        image = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        image = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(dtype=_uint8())
        return image.permute(1, 2, 0).contiguous().cpu().numpy()


def load_components(
    path: Path, vae_path: Path | None, spec: Any, *, compile: bool = False
) -> dict[str, Any]:
    """The model's weights, on the device and ready to share between sessions."""
    route_library_logs()  # before importing their classes: some warn as they are imported
    from diffusers import AutoencoderKL, AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    components = {
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder"),
        "unet": UNet2DConditionModel.from_pretrained(path, subfolder="unet"),
        "vae": AutoencoderTiny.from_pretrained(vae_path)
        if vae_path is not None
        else AutoencoderKL.from_pretrained(path, subfolder="vae"),
        "scheduler": LCMScheduler.from_pretrained(path, subfolder="scheduler"),
    }
    components.update(
        prepare_components(
            {k: components[k] for k in ("text_encoder", "unet", "vae")}, spec, compile=compile
        )
    )
    return components


def prepare_components(modules: dict[str, Any], spec: Any, *, compile: bool) -> dict[str, Any]:
    """Move to the device, freeze, count UNet calls, compile: once per module, so that doing
    it again for a module another session prepared changes nothing."""
    import torch

    for module in modules.values():
        module.to(spec.device, spec.dtype).eval().requires_grad_(False)
    unet = modules["unet"]
    if not getattr(unet, "_counts_calls", False):
        unet.register_forward_pre_hook(_count_unet_call)
        unet._counts_calls = True
    if compile and not isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
        modules["unet"] = torch.compile(unet, mode="reduce-overhead", fullgraph=False)
        vae = modules["vae"]
        vae.decoder = torch.compile(vae.decoder, mode="reduce-overhead")
    return modules


def _torch_device(name: str) -> torch.device:
    import torch

    return torch.device(name)


def _uint8():  # type: ignore[no-untyped-def]
    import torch

    return torch.uint8


def _schedule_key(p: StreamDiffusionParams) -> tuple[Any, ...]:
    return (
        p.num_inference_steps,
        tuple(p.t_index_list),
        p.seed,
        p.seed_interpolation_method,
        p.normalize_seed_weights,
    )


def _count_unet_call(module: Any, args: Any) -> None:
    StreamDiffusionPipeline.unet_calls += 1
