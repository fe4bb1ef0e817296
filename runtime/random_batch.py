"""The batch routes' diffusion models at full size with random weights, built in memory on the
device (never written: SDXL alone would be 10 GB of float32 files).

Each is the diffusers pipeline the route's `load` returns for the real model, assembled from the
published configurations (each model's `config.json`, written out here since nothing can be
downloaded), so a job on it costs what the real model's would. `DRY` overrides shrink the same
layouts to toy widths: the benchmark's dry run builds them the same way on a CPU.

The language, speech and vision routes (Llama 3.1 8B, Whisper large v3, MMS-TTS, BLIP, SAM 2)
have no full-size random variant here: they run on the tiny models of `runtime/tiny*.py`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .random_full import CLIP_VOCAB, SD_TURBO_TEXT, SD_VAE, synthetic_clip_tokenizer

# CLIP ViT-L/14's text tower (SD 1.x, SDXL's first encoder).
CLIP_L_TEXT: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "vocab_size": CLIP_VOCAB,
    "max_position_embeddings": 77,
}
# OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder).
CLIP_BIGG_TEXT: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "hidden_act": "gelu",
    "projection_dim": 1280,
    "vocab_size": CLIP_VOCAB,
    "max_position_embeddings": 77,
}
TINY_TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
    "vocab_size": 1000,
    # The special tokens of a 1000-token synthetic vocabulary: its last two.
    "bos_token_id": 998,
    "eos_token_id": 999,
    "pad_token_id": 999,
}
TINY_VAE: dict[str, Any] = {
    "block_out_channels": (16, 16, 32, 32),
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
TRAILING_EULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}

CONFIG_CLASSES = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "CLIPVisionModelWithProjection": "CLIPVisionConfig",
}


@dataclass(frozen=True)
class PipelineSpec:
    """A diffusers pipeline class and its parts: modules as (library, class, config),
    synthetic CLIP tokenizers by name, and the constructor's other arguments."""

    route: str
    model_id: str
    """The id it is served under: says random, and keeps the real id's few-step marker
    ("lightning") so the route picks the real model's default steps."""
    pipeline: str
    modules: dict[str, tuple[str, str, dict[str, Any]]]
    tokenizers: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    dry: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config overrides per module for the dry run: the same layout at toy widths."""


SDXL_LIGHTNING = PipelineSpec(
    route="text-to-image",
    model_id="random/realvisxl-v4-lightning-full",
    pipeline="StableDiffusionXLPipeline",
    modules={
        # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (RealVisXL keeps it).
        "unet": (
            "diffusers",
            "UNet2DConditionModel",
            {
                "sample_size": 128,
                "in_channels": 4,
                "out_channels": 4,
                "down_block_types": (
                    "DownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                ),
                "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                "block_out_channels": (320, 640, 1280),
                "layers_per_block": 2,
                "attention_head_dim": (5, 10, 20),
                "transformer_layers_per_block": (1, 2, 10),
                "use_linear_projection": True,
                "cross_attention_dim": 2048,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "norm_num_groups": 32,
            },
        ),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L_TEXT),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_BIGG_TEXT),
        "vae": (
            "diffusers",
            "AutoencoderKL",
            SD_VAE | {"sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        ),
        "scheduler": ("diffusers", "EulerDiscreteScheduler", TRAILING_EULER),
    },
    tokenizers=("tokenizer", "tokenizer_2"),
    extra={
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    },
    dry={
        "unet": {
            "sample_size": 16,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "attention_head_dim": (2, 4),
            "transformer_layers_per_block": (1, 2),
            "cross_attention_dim": 64,
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
        },
        "text_encoder": TINY_TEXT,
        "text_encoder_2": TINY_TEXT,
        "vae": TINY_VAE,
    },
)

# The SD 1.5 UNet as instruct-pix2pix ships it: 8 input channels (the noisy latent and the
# input image's latent).
PIX2PIX = PipelineSpec(
    route="image-to-image",
    model_id="random/instruct-pix2pix-full",
    pipeline="StableDiffusionInstructPix2PixPipeline",
    modules={
        "unet": (
            "diffusers",
            "UNet2DConditionModel",
            {
                "sample_size": 64,
                "in_channels": 8,
                "out_channels": 4,
                "block_out_channels": (320, 640, 1280, 1280),
                "layers_per_block": 2,
                "attention_head_dim": 8,
                "cross_attention_dim": 768,
                "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                "norm_num_groups": 32,
            },
        ),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L_TEXT),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE | {"sample_size": 512}),
        "scheduler": (
            "diffusers",
            "EulerAncestralDiscreteScheduler",
            {
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "prediction_type": "epsilon",
                "steps_offset": 1,
            },
        ),
    },
    tokenizers=("tokenizer",),
    extra={
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    },
    dry={
        "unet": {
            "sample_size": 8,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        },
        "text_encoder": TINY_TEXT,
        "vae": TINY_VAE,
    },
)

X4_UPSCALER = PipelineSpec(
    route="upscale",
    model_id="random/stable-diffusion-x4-upscaler-full",
    pipeline="StableDiffusionUpscalePipeline",
    modules={
        # stabilityai/stable-diffusion-x4-upscaler unet/config.json.
        "unet": (
            "diffusers",
            "UNet2DConditionModel",
            {
                "sample_size": 128,
                "in_channels": 7,
                "out_channels": 4,
                "block_out_channels": (256, 512, 512, 1024),
                "layers_per_block": 2,
                "attention_head_dim": 8,
                "cross_attention_dim": 1024,
                "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                "up_block_types": ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
                "only_cross_attention": (True, True, True, False),
                "num_class_embeds": 1000,
                "use_linear_projection": True,
                "norm_num_groups": 32,
            },
        ),
        "text_encoder": ("transformers", "CLIPTextModel", SD_TURBO_TEXT),
        "vae": (
            "diffusers",
            "AutoencoderKL",
            SD_VAE
            | {
                "block_out_channels": (128, 256, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 3,
                "up_block_types": ("UpDecoderBlock2D",) * 3,
                "scaling_factor": 0.08333,
            },
        ),
        "low_res_scheduler": (
            "diffusers",
            "DDPMScheduler",
            {
                "beta_start": 0.0001,
                "beta_end": 0.02,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "clip_sample": False,
                "variance_type": "fixed_small",
            },
        ),
        "scheduler": (
            "diffusers",
            "DDIMScheduler",
            {
                "beta_start": 0.0001,
                "beta_end": 0.02,
                "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000,
                "clip_sample": False,
                "prediction_type": "v_prediction",
                "set_alpha_to_one": False,
                "steps_offset": 1,
            },
        ),
    },
    tokenizers=("tokenizer",),
    extra={
        "safety_checker": None,
        "feature_extractor": None,
        "watermarker": None,
        "max_noise_level": 350,
    },
    dry={
        "unet": {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "only_cross_attention": False,
        },
        "text_encoder": TINY_TEXT,
        "vae": TINY_VAE
        | {
            "block_out_channels": (16, 32, 32),
        },
    },
)

SVD_XT = PipelineSpec(
    route="image-to-video",
    model_id="random/stable-video-diffusion-img2vid-xt-full",
    pipeline="StableVideoDiffusionPipeline",
    modules={
        # stabilityai/stable-video-diffusion-img2vid-xt unet/config.json.
        "unet": (
            "diffusers",
            "UNetSpatioTemporalConditionModel",
            {
                "sample_size": 96,
                "in_channels": 8,
                "out_channels": 4,
                "down_block_types": ("CrossAttnDownBlockSpatioTemporal",) * 3
                + ("DownBlockSpatioTemporal",),
                "up_block_types": ("UpBlockSpatioTemporal",)
                + ("CrossAttnUpBlockSpatioTemporal",) * 3,
                "block_out_channels": (320, 640, 1280, 1280),
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 768,
                "layers_per_block": 2,
                "cross_attention_dim": 1024,
                "transformer_layers_per_block": 1,
                "num_attention_heads": (5, 10, 20, 20),
                "num_frames": 25,
            },
        ),
        # OpenCLIP ViT-H/14's image tower with its projection.
        "image_encoder": (
            "transformers",
            "CLIPVisionModelWithProjection",
            {
                "hidden_size": 1280,
                "intermediate_size": 5120,
                "num_attention_heads": 16,
                "num_hidden_layers": 32,
                "image_size": 224,
                "patch_size": 14,
                "projection_dim": 1024,
                "hidden_act": "gelu",
            },
        ),
        "vae": (
            "diffusers",
            "AutoencoderKLTemporalDecoder",
            {
                "block_out_channels": (128, 256, 512, 512),
                "down_block_types": ("DownEncoderBlock2D",) * 4,
                "layers_per_block": 2,
                "latent_channels": 4,
                "sample_size": 768,
                "scaling_factor": 0.18215,
            },
        ),
        "scheduler": (
            "diffusers",
            "EulerDiscreteScheduler",
            {
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
                "interpolation_type": "linear",
                "num_train_timesteps": 1000,
                "prediction_type": "v_prediction",
                "sigma_max": 700.0,
                "sigma_min": 0.002,
                "steps_offset": 1,
                "timestep_spacing": "leading",
                "timestep_type": "continuous",
                "use_karras_sigmas": True,
            },
        ),
    },
    extra={"feature_extractor": "clip-image-processor"},
    dry={
        "unet": {
            "sample_size": 8,
            "down_block_types": ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            "up_block_types": ("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "cross_attention_dim": 32,
            "num_attention_heads": (2, 4),
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 24,
        },
        "image_encoder": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 32,
            "projection_dim": 32,
        },
        "vae": {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
    },
)

SPECS: tuple[PipelineSpec, ...] = (SDXL_LIGHTNING, PIX2PIX, X4_UPSCALER, SVD_XT)


def _module(library: str, name: str, config: dict[str, Any]) -> Any:
    import diffusers
    import transformers

    if library == "transformers":
        model_class = getattr(transformers, name)
        return model_class(getattr(transformers, CONFIG_CLASSES[name])(**config))
    return getattr(diffusers, name)(**config)


def build_pipeline(
    spec: PipelineSpec, device: str, dtype: Any, *, dry: bool = False, seed: int = 0
) -> Any:
    """The pipeline of `spec` with random weights, on `device` in `dtype`, ready for the
    route's jobs (as its `load` leaves it). Modules are created on the device itself: random
    initialisation of billions of parameters takes seconds there, minutes on a CPU."""
    import diffusers
    import torch
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    # diffusers warns, for every module cast to half, that from_pretrained would keep some
    # modules in float32; these models have none, and the warning is noise in a report.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        parts = _modules(spec, device, dtype, dry)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory(prefix="random-tokenizer-") as scratch:
        for name in spec.tokenizers:
            vocab = 1000 if dry else CLIP_VOCAB
            parts[name] = synthetic_clip_tokenizer(Path(scratch) / name, vocab)
    extra = dict(spec.extra)
    if extra.get("feature_extractor") == "clip-image-processor":
        extra["feature_extractor"] = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    pipe = getattr(diffusers, spec.pipeline)(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modules(spec: PipelineSpec, device: str, dtype: Any, dry: bool) -> dict[str, Any]:
    import torch

    parts: dict[str, Any] = {}
    for name, (library, class_name, config) in spec.modules.items():
        if dry:
            config = config | spec.dry.get(name, {})
        if class_name.endswith("Scheduler"):
            # Schedulers keep their tables on the CPU (the pipelines move what they need).
            parts[name] = _module(library, class_name, config)
            continue
        with torch.device(device):
            module = _module(library, class_name, config)
        parts[name] = module.to(dtype).eval().requires_grad_(False)
    return parts


def parameter_counts(spec: PipelineSpec) -> dict[str, int]:
    """Parameters of each module of `spec` at full size, built on the meta device."""
    import torch

    with torch.device("meta"):
        modules = {
            name: _module(library, class_name, config)
            for name, (library, class_name, config) in spec.modules.items()
            if library == "transformers" or class_name.startswith(("UNet", "Autoencoder"))
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
