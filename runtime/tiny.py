"""Tiny models of the real architectures, with random weights, saved under the real model ids.

The same code users run loads them (`from_pretrained` on a folder), so tests, the CI and a
deployment smoke test (`live-v2v models tiny DIR`, then `--models-dir DIR`) exercise the whole
path without downloading gigabytes. The outputs are noise-like; only shapes and plumbing matter.
"""

from __future__ import annotations

import json
from pathlib import Path

SD_TURBO = "stabilityai/sd-turbo"
TAESD = "madebyollin/taesd"

# sd-turbo's scheduler_config.json, the part that matters.
SCHEDULER_CONFIG = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
}

# CLIP's byte-level alphabet plus a few merges: a real BPE tokenizer, tiny.
_MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "r e", "re d</w>"]


def _tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    for merge in _MERGES:
        vocab[merge.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,
    )


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """An SD-turbo-shaped pipeline folder: UNet, CLIP text encoder and tokenizer, a small
    AutoencoderKL and the scheduler config, as `save_pretrained` lays them out."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(folder / "_tokenizer_src")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    for leftover in (folder / "_tokenizer_src").iterdir():
        leftover.unlink()
    (folder / "_tokenizer_src").rmdir()
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def build_tiny_taesd(folder: Path, seed: int = 0) -> Path:
    """A TAESD-shaped AutoencoderTiny with narrow blocks."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    )
    vae.save_pretrained(folder)
    return folder


def write_tiny_models(models_dir: Path) -> list[Path]:
    """Tiny models under the real ids in `models_dir`: what `live-v2v models tiny` writes."""
    return [
        build_tiny_sd(models_dir / SD_TURBO),
        build_tiny_taesd(models_dir / TAESD),
    ]
