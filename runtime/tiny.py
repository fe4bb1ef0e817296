"""Tiny models of the real architectures, with random weights, saved under the real model ids.

The same code users run loads them (`from_pretrained` on a folder), so tests, the CI and a
deployment smoke test (`live-v2v models tiny DIR`, then `--models-dir DIR`) exercise the whole
path without downloading gigabytes. The outputs are noise-like; only shapes and plumbing matter.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .random_full import mark_random
from .tiny_audio import MMS_TTS, WHISPER, build_tiny_vits, build_tiny_whisper
from .tiny_llm import LLAMA_31_8B_INSTRUCT, build_tiny_llama3
from .tiny_vision import BLIP_LARGE, SAM2_LARGE, build_tiny_blip, build_tiny_sam2

SD_TURBO = "stabilityai/sd-turbo"
TAESD = "madebyollin/taesd"
SDXL_LIGHTNING = "SG161222/RealVisXL_V4.0_Lightning"
PIX2PIX = "timbrooks/instruct-pix2pix"
SVD_XT = "stabilityai/stable-video-diffusion-img2vid-xt"
X4_UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"

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


def _tiny_unet(**overrides: Any) -> Any:
    """The SD 1.x/2.x-shaped UNet of the tiny models: two blocks, one with cross-attention on
    the 32-wide CLIP text encoder; `overrides` set what a pipeline's UNet has of its own."""
    from diffusers import UNet2DConditionModel

    config: dict[str, Any] = {
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 32,
        "attention_head_dim": 8,
    }
    return UNet2DConditionModel(**(config | overrides))


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """An SD-turbo-shaped pipeline folder: UNet, CLIP text encoder and tokenizer, a small
    AutoencoderKL and the scheduler config, as `save_pretrained` lays them out."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
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
    unet = _tiny_unet(in_channels=4)
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


def _clip_tokenizer():  # type: ignore[no-untyped-def]
    """The tiny BPE tokenizer, built in a scratch folder that is gone afterwards (the
    pipeline's save_pretrained writes it again as tokenizer.json)."""
    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as scratch:
        return _tokenizer(Path(scratch))


def _clip_text_config(tokenizer: Any, hidden_size: int = 32, projection_dim: int = 32) -> Any:
    """A tiny CLIP text config whose special ids are the tokenizer's; vocab_size 1000 covers
    every id of the tiny tokenizer (518 tokens)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )


def _tiny_vae(down_blocks: int = 4, scaling_factor: float = 0.18215) -> Any:
    """A narrow AutoencoderKL; `down_blocks` sets the scale factor (2 ** (down_blocks - 1)),
    so the latent grid has the real model's size relative to the image."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 16, 32, 32)[-down_blocks:],
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * down_blocks,
        up_block_types=("UpDecoderBlock2D",) * down_blocks,
        scaling_factor=scaling_factor,
    )


def _save(pipeline: Any, folder: Path) -> Path:
    """save_pretrained without the per-file progress bars, which are noise in a build that
    writes tiny files."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    folder.mkdir(parents=True, exist_ok=True)
    bars = (
        diffusers_logging.is_progress_bar_enabled(),
        transformers_logging.is_progress_bar_enabled(),
    )
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipeline.save_pretrained(folder)
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
    return folder


def build_tiny_sdxl(folder: Path, seed: int = 0) -> Path:
    """A RealVisXL-Lightning-shaped StableDiffusionXLPipeline folder: a UNet with SDXL's
    "text_time" added conditioning, two CLIP text encoders (the second with a projection,
    whose pooled output feeds the UNet), two tokenizers and an 8x AutoencoderKL."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = _clip_tokenizer(), _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer, hidden_size=32))
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(tokenizer_2, hidden_size=32, projection_dim=32)
    )
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        transformer_layers_per_block=(1, 2),
        # 6 size/crop numbers, each embedded, plus text_encoder_2's pooled projection.
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        # The two encoders' hidden states are concatenated: 32 + 32.
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    # SDXL's VAE scaling factor; Lightning distillations sample on trailing timesteps.
    vae = _tiny_vae(down_blocks=4, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipeline, folder)


def build_tiny_pix2pix(folder: Path, seed: int = 0) -> Path:
    """An instruct-pix2pix-shaped folder: an SD 1.x UNet whose input is the noisy latent
    concatenated with the input image's latent (8 channels), EulerAncestral as shipped."""
    import torch
    from diffusers import (
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    unet = _tiny_unet(in_channels=8)
    # instruct-pix2pix's scheduler_config.json.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
    )
    pipeline = StableDiffusionInstructPix2PixPipeline(
        vae=_tiny_vae(down_blocks=4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _save(pipeline, folder)


def build_tiny_svd(folder: Path, seed: int = 0) -> Path:
    """A stable-video-diffusion-img2vid-xt-shaped folder: a spatio-temporal UNet, a VAE with a
    temporal decoder, a CLIP vision encoder for the conditioning image and its processor."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8,
        in_channels=8,  # noisy latent + the conditioning image's latent
        out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,  # the image encoder's projection
        num_attention_heads=(2, 4),
        # fps, motion bucket id and noise augmentation strength, each embedded.
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=3 * time_embed_dim,
        num_frames=25,
    )
    # The temporal decoder's GroupNorms are hard-wired to 32 groups: 32 channels is the least.
    vae = AutoencoderKLTemporalDecoder(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
    )
    # The pipeline resizes the conditioning image to 224x224 itself, so the encoder must take
    # 224; 32-pixel patches keep it to 49 tokens.
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=224,
            patch_size=32,
            projection_dim=32,
            hidden_act="gelu",
        )
    )
    # Without torchvision this is transformers' PIL fallback; it saves as CLIPImageProcessor.
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    # SVD-XT's scheduler_config.json: EDM-style continuous sigmas on a Karras schedule.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipeline = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    _save(pipeline, folder)
    _name_class(folder, "feature_extractor", ["transformers", "CLIPImageProcessor"])
    return folder


def _name_class(folder: Path, component: str, library_class: list[str]) -> None:
    """Name a component's class in model_index.json as the real model does. (The PIL fallback
    would be recorded as CLIPImageProcessorPil, which a loader with torchvision would then
    pick over the default backend.)"""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index[component] = library_class
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def build_tiny_x4_upscaler(folder: Path, seed: int = 0) -> Path:
    """A stable-diffusion-x4-upscaler-shaped folder: the UNet denoises a latent at the low-res
    image's size, concatenated with that (noised) image (4 + 3 channels), and takes the noise
    level as a class label; the VAE has 3 blocks, so it decodes to 4x the latent's size."""
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_text_config(tokenizer))
    unet = _tiny_unet(
        in_channels=7,
        sample_size=16,
        use_linear_projection=True,
        num_class_embeds=1000,  # noise levels up to max_noise_level (350)
    )
    # The two scheduler configs the real model ships.
    low_res_scheduler = DDPMScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        variance_type="fixed_small",
    )
    scheduler = DDIMScheduler(
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="v_prediction",
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionUpscalePipeline(
        vae=_tiny_vae(down_blocks=3, scaling_factor=0.08333),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )
    return _save(pipeline, folder)


def write_tiny_models(models_dir: Path) -> list[Path]:
    """Tiny models under the real ids in `models_dir`: what `live-v2v models tiny` writes,
    each folder marked as random weights (`live-v2v models list` says so)."""
    folders = [
        build_tiny_sd(models_dir / SD_TURBO),
        build_tiny_taesd(models_dir / TAESD),
        build_tiny_sdxl(models_dir / SDXL_LIGHTNING),
        build_tiny_pix2pix(models_dir / PIX2PIX),
        build_tiny_svd(models_dir / SVD_XT),
        build_tiny_x4_upscaler(models_dir / X4_UPSCALER),
        build_tiny_llama3(models_dir / LLAMA_31_8B_INSTRUCT),
        build_tiny_whisper(models_dir / WHISPER),
        build_tiny_vits(models_dir / MMS_TTS),
        build_tiny_blip(models_dir / BLIP_LARGE),
        build_tiny_sam2(models_dir / SAM2_LARGE),
    ]
    for folder in folders:
        mark_random(folder, f"tiny {folder.relative_to(models_dir).as_posix()}")
    return folders
