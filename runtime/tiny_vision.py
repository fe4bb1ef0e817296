"""Tiny vision models of the real architectures, with random weights, for the vision routes:
BLIP (image to text) under `Salesforce/blip-image-captioning-large` and SAM 2 (segment anything)
under `facebook/sam2-hiera-large`.

What is kept real, because the routes depend on it: BLIP's text decoder with its `[DEC]` start
token and `[SEP]` end, a WordPiece BERT tokenizer (built offline from a small vocab.txt) and the
processor pair the real folder has; SAM 2's Hiera backbone, FPN neck, prompt encoder and mask
decoder at the real 1024x1024 input, so the image embeddings are 64x64, the low-resolution masks
and `mask_input` 256x256, and there are 3 multimask outputs. What is tiny: widths, depths, the
vocabulary (about 80 words), BLIP's input image (32x32 instead of 384x384).

The SAM 2 folder is laid out as the real `facebook/sam2-hiera-large`, whose Transformers weights
are the video model's checkpoint (`Sam2VideoModel`, model_type `sam2_video`, with the memory
modules the image route does not use); `video=False` writes a plain `Sam2Model` checkpoint
(model_type `sam2`) instead, the other layout the route loads. Its processor files are written
as JSON: transformers' SAM 2 image processor needs torchvision, which this machine lacks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BLIP_LARGE = "Salesforce/blip-image-captioning-large"
SAM2_LARGE = "facebook/sam2-hiera-large"

# A WordPiece vocabulary: BERT's five specials first, as in the real vocab.txt, then words.
_BLIP_WORDS = (
    "a an the of in on at with and is are there two three some picture photo photography "
    "painting drawing image close up view man woman person people child dog cat bird horse car "
    "tree trees house building street road field grass sky cloud clouds water sea beach "
    "mountain snow red blue green yellow white black brown small large sitting standing "
    "walking lying table room window door light dark background front top ##s ##ing ##ed"
).split()
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# SAM 2's image processor settings (Sam2ImageProcessor's defaults, as the real folder has them).
SAM2_PREPROCESSOR = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "mask_size": {"height": 256, "width": 256},
    "resample": 2,
    "rescale_factor": 1 / 255,
    "size": {"height": 1024, "width": 1024},
}


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """No per-file progress bars while saving: noise in a build that writes tiny files."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _blip_tokenizer(folder: Path) -> Any:
    """BLIP's tokenizer: BERT's WordPiece from a vocab.txt, plus `[DEC]` (the decoder's start
    token, as bos) and `[ENC]`, added as the real one adds them."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"  # stays, as in the real folder (beside tokenizer.json)
    vocab_file.write_text("\n".join([*_BERT_SPECIALS, *_BLIP_WORDS]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab_file), model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def build_tiny_blip(folder: Path, seed: int = 0) -> Path:
    """A blip-image-captioning-large-shaped folder: BlipForConditionalGeneration (ViT vision
    encoder, BERT text decoder with cross-attention) and its BlipProcessor."""
    import torch
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,
        BlipProcessor,
        BlipTextConfig,
        BlipVisionConfig,
    )

    torch.manual_seed(seed)
    tokenizer = _blip_tokenizer(folder)
    hidden = 32
    config = BlipConfig(
        text_config=BlipTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            encoder_hidden_size=hidden,  # cross-attention over the vision encoder's output
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=BlipVisionConfig(
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=hidden,
    )
    model = BlipForConditionalGeneration(config)
    # The PIL image processor: saved as "BlipImageProcessor", as the real folder names it.
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    with _no_progress_bars():
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
    return folder


def _sam2_parts() -> dict[str, Any]:
    """SAM 2's vision, prompt encoder and mask decoder configs, at the smallest widths that
    work: the mask decoder's high-resolution convolutions take hidden/8 and hidden/4 channels,
    and a global-attention block may not open a query-pooling stage (so the last stage has
    two blocks, the second global)."""
    from transformers import (
        Sam2HieraDetConfig,
        Sam2MaskDecoderConfig,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    hidden = 32
    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 2, 2],
        blocks_per_stage=[1, 1, 1, 2],
        global_attention_blocks=[4],
    )
    return {
        "vision_config": Sam2VisionConfig(
            backbone_config=backbone,
            backbone_channel_list=[64, 32, 16, 8],
            fpn_hidden_size=hidden,
        ),
        "prompt_encoder_config": Sam2PromptEncoderConfig(hidden_size=hidden, mask_input_channels=4),
        "mask_decoder_config": Sam2MaskDecoderConfig(
            hidden_size=hidden, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=hidden
        ),
    }


def build_tiny_sam2(folder: Path, seed: int = 0, *, video: bool = True) -> Path:
    """A sam2-hiera-large-shaped folder: the video model's checkpoint (`video=True`, as the
    real one) or a plain Sam2Model's, with SAM 2's processor and image processor configs."""
    import torch
    from transformers import Sam2Config, Sam2Model, Sam2VideoConfig, Sam2VideoModel

    torch.manual_seed(seed)
    parts = _sam2_parts()
    if video:
        hidden = parts["mask_decoder_config"].hidden_size
        model: Any = Sam2VideoModel(
            Sam2VideoConfig(
                vision_config=parts["vision_config"],
                prompt_encoder_config=parts["prompt_encoder_config"].to_dict(),
                mask_decoder_config=parts["mask_decoder_config"].to_dict(),
                memory_attention_hidden_size=hidden,
                memory_attention_feed_forward_hidden_size=64,
                memory_encoder_hidden_size=hidden,
                memory_encoder_output_channels=16,
                mask_downsampler_embed_dim=hidden,
                memory_fuser_embed_dim=hidden,
            )
        )
    else:
        model = Sam2Model(Sam2Config(**parts))
    processor_class = "Sam2VideoProcessor" if video else "Sam2Processor"
    with _no_progress_bars():
        model.save_pretrained(folder)
    processor = {"point_pad_value": -10, "processor_class": processor_class, "target_size": 1024}
    preprocessor = {
        **SAM2_PREPROCESSOR,
        "image_processor_type": "Sam2ImageProcessor",
        "processor_class": processor_class,
    }
    for name, content in (
        ("processor_config.json", processor),
        ("preprocessor_config.json", preprocessor),
    ):
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return folder
