"""Full-size models with random weights: the real architectures at their real sizes, so that a
GPU with no weights and no network times exactly what the real models would cost.

A model's speed and memory depend on its architecture and sizes, never on the values of its
weights: sd-turbo's UNet with random weights runs as fast and takes as much memory as the real
one. The configurations below are the published ones (each model's `config.json`), written out
here because nothing can be downloaded. The outputs are noise.

Stored under ids that say what they are (`random/sd-turbo-full`), never under the real ids, and
every folder carries a `RANDOM_WEIGHTS` file, which `live-v2v models list` reports.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RANDOM_MARKER = "RANDOM_WEIGHTS"
"""A file in a model folder whose weights are random (tiny or full-size test models)."""

SD_TURBO_FULL = "random/sd-turbo-full"
TAESD_FULL = "random/taesd-full"

# -- the published configurations -------------------------------------------------------------

# stabilityai/sd-turbo unet/config.json: the SD 2.1 UNet at 512x512 (latents 64x64).
SD_TURBO_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "attention_head_dim": (5, 10, 20, 20),
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

# stabilityai/sd-turbo text_encoder/config.json: OpenCLIP ViT-H/14's text tower, penultimate
# layer (23 of 24 layers kept).
SD_TURBO_TEXT: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# stabilityai/sd-turbo vae/config.json: the SD 2.x autoencoder (the live pipeline decodes with
# TAESD; the folder has the full VAE as the real one does, and batch routes use it).
SD_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}

# madebyollin/taesd config.json.
TAESD: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "encoder_block_out_channels": (64, 64, 64, 64),
    "decoder_block_out_channels": (64, 64, 64, 64),
    "num_encoder_blocks": (1, 3, 3, 3),
    "num_decoder_blocks": (3, 3, 3, 1),
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "upsampling_scaling_factor": 2,
    "scaling_factor": 1.0,
    "act_fn": "relu",
}

# stabilityai/sd-turbo scheduler/scheduler_config.json, the part that matters.
SD_TURBO_SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}

CLIP_VOCAB = 49408
"""CLIP's BPE vocabulary: 512 byte symbols, 48894 merges, two special tokens."""


@dataclass(frozen=True)
class SdSpec:
    """What a random SD-2.x-shaped folder is built from: the UNet, CLIP text and VAE configs,
    the tokenizer's vocabulary size, and the TAESD config (written as its own model)."""

    unet: dict[str, Any]
    text: dict[str, Any]
    vae: dict[str, Any]
    taesd: dict[str, Any]
    vocab_size: int = CLIP_VOCAB
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD_TURBO_SCHEDULER))


SD_TURBO_SPEC = SdSpec(SD_TURBO_UNET, SD_TURBO_TEXT, SD_VAE, TAESD)

# A spec of the same layout at toy widths: what the benchmark's dry run writes on a CPU, so
# that the very code that writes and loads the full-size folder runs in seconds.
SD_TURBO_DRY_SPEC = SdSpec(
    unet=SD_TURBO_UNET
    | {
        "sample_size": 8,
        "block_out_channels": (32, 32, 64, 64),
        "layers_per_block": 1,
        "attention_head_dim": (2, 2, 4, 4),
        "cross_attention_dim": 32,
    },
    text=SD_TURBO_TEXT
    | {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "vocab_size": 1000,
    },
    vae=SD_VAE
    | {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8},
    taesd=TAESD
    | {
        "encoder_block_out_channels": (8, 8, 8, 8),
        "decoder_block_out_channels": (8, 8, 8, 8),
        "num_encoder_blocks": (1, 1, 1, 1),
        "num_decoder_blocks": (1, 1, 1, 1),
    },
    vocab_size=1000,
)


# -- building ---------------------------------------------------------------------------------


def mark_random(folder: Path, what: str) -> None:
    """Say in the folder that its weights are random (read by `live-v2v models list`)."""
    (folder / RANDOM_MARKER).write_text(
        f"{what}: random weights, outputs are noise; for timing and plumbing tests only\n"
    )


def has_random_weights(folder: Path) -> bool:
    return (folder / RANDOM_MARKER).is_file()


def synthetic_clip_tokenizer(folder: Path, vocab_size: int = CLIP_VOCAB) -> Any:
    """A CLIP BPE tokenizer with a made-up vocabulary of `vocab_size` tokens (the real one
    has 49408): the byte symbols, then merges of symbol pairs, then the two special tokens.
    Tokenizing costs nothing next to the UNet; the size matters for the text encoder's
    embedding table, which the real vocabulary size keeps exact."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    merges_wanted = vocab_size - len(vocab) - 2
    if merges_wanted < 0:
        raise ValueError(f"a CLIP vocabulary has at least {len(vocab) + 2} tokens")
    merges = []
    for pair in _pairs(symbols):
        if len(merges) >= merges_wanted:
            break
        left, right = pair
        merges.append(f"{left} {right}")
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,
    )


def _pairs(symbols: list[str]) -> Iterable[tuple[str, str]]:
    # Word-final pairs and inner pairs, alternating, so that both kinds of merge exist.
    for first in symbols:
        for second in symbols:
            yield first, second + "</w>"
            yield first, second


def build_sd_components(spec: SdSpec, scratch: Path, seed: int = 0) -> dict[str, Any]:
    """The modules of a random SD-2.x-shaped model, in memory (float32, on the CPU)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = synthetic_clip_tokenizer(scratch, spec.vocab_size)
    text = spec.text | {"vocab_size": max(spec.text["vocab_size"], len(tokenizer))}
    return {
        "unet": UNet2DConditionModel(**spec.unet),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text)),
        "tokenizer": tokenizer,
        "vae": AutoencoderKL(**spec.vae),
        "scheduler": EulerDiscreteScheduler(**spec.scheduler),
        "taesd": AutoencoderTiny(**spec.taesd),
    }


def write_random_sd(
    models_dir: Path,
    spec: SdSpec = SD_TURBO_SPEC,
    model_id: str = SD_TURBO_FULL,
    taesd_id: str = TAESD_FULL,
    seed: int = 0,
) -> list[Path]:
    """Write a random model of `spec` as `models_dir/model_id` (a StableDiffusionPipeline
    folder, float32 safetensors as the real repository's default files) and its TAESD as
    `models_dir/taesd_id`. Both are marked as random. Returns the two folders."""
    from diffusers import StableDiffusionPipeline

    from .tiny import _save

    folder, taesd_folder = models_dir / model_id, models_dir / taesd_id
    scratch = folder.parent / f".{folder.name}-tokenizer"
    try:
        parts = build_sd_components(spec, scratch, seed)
        taesd = parts.pop("taesd")
        pipeline = StableDiffusionPipeline(
            **parts,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )
        _save(pipeline, folder)
        taesd.save_pretrained(taesd_folder)
    finally:
        for leftover in scratch.glob("*"):
            leftover.unlink()
        if scratch.exists():
            scratch.rmdir()
    mark_random(folder, f"{model_id} (sd-turbo's architecture)")
    mark_random(taesd_folder, f"{taesd_id} (TAESD's architecture)")
    return [folder, taesd_folder]


def drop_from_page_cache(folder: Path) -> int:
    """Flush the folder's files to disk and drop them from the page cache, so that the next
    load reads the disk as a first load after a reboot would (no root needed: the pages are
    clean once flushed). Returns the bytes dropped; 0 where the OS has no such call."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    dropped = 0
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            dropped += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return dropped


def parameter_counts(spec: SdSpec = SD_TURBO_SPEC) -> dict[str, int]:
    """Parameters of each module of `spec`, built on the meta device (no memory, no time):
    how the full-size configurations are checked on a machine that cannot hold them."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        modules = {
            "unet": UNet2DConditionModel(**spec.unet),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**spec.text)),
            "vae": AutoencoderKL(**spec.vae),
            "taesd": AutoencoderTiny(**spec.taesd),
        }
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
