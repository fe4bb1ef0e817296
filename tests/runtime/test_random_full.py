"""The full-size random models: the published architectures at their real sizes (checked by
parameter count on the meta device, which holds nothing), written as a folder the service's own
loader reads, and marked as random weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from live.pipelines.diffusion import load_components
from runtime.device import choose_device
from runtime.random_full import (
    CLIP_VOCAB,
    SD_TURBO_DRY_SPEC,
    has_random_weights,
    parameter_counts,
    synthetic_clip_tokenizer,
    write_random_sd,
)


def test_full_size_configs_have_the_published_parameter_counts() -> None:
    # sd-turbo's UNet (SD 2.1), its OpenCLIP-H text encoder, the SD 2.x VAE and TAESD.
    assert parameter_counts() == {
        "unet": 865_910_724,
        "text_encoder": 340_387_840,
        "vae": 83_653_863,
        "taesd": 2_445_063,
    }


def test_synthetic_tokenizer_has_clips_vocabulary_size(tmp_path: Path) -> None:
    tokenizer = synthetic_clip_tokenizer(tmp_path)
    assert len(tokenizer) == CLIP_VOCAB
    ids = tokenizer("a lighthouse at dusk", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id == CLIP_VOCAB - 2
    assert max(ids) < CLIP_VOCAB


def test_random_folder_loads_with_the_live_pipelines_loader_and_is_listed_as_random(
    tmp_path: Path,
) -> None:
    sd, taesd = write_random_sd(tmp_path, SD_TURBO_DRY_SPEC, "random/sd-dry", "random/taesd-dry")
    assert has_random_weights(sd) and has_random_weights(taesd)
    parts = load_components(sd, taesd, choose_device("cpu"))
    assert type(parts["vae"]).__name__ == "AutoencoderTiny"
    assert parts["text_encoder"].config.vocab_size == SD_TURBO_DRY_SPEC.vocab_size
    out = subprocess.run(
        [sys.executable, "-m", "live", "models", "list", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "random weights" in lines["random/sd-dry"]
    assert "random weights" in lines["random/taesd-dry"]


def test_batch_routes_full_size_pipelines_assemble_with_the_published_sizes() -> None:
    """Each batch route's full-size pipeline, built as the GPU run builds it, on the meta
    device (no memory): the route's pipeline class, half precision, the published sizes."""
    import torch

    from runtime.random_batch import SDXL_LIGHTNING, SPECS, SVD_XT, build_pipeline

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    built = {spec.route: build_pipeline(spec, "meta", torch.float16) for spec in SPECS}
    assert {route: type(p).__name__ for route, p in built.items()} == {
        spec.route: spec.pipeline for spec in SPECS
    }
    assert all(p.unet.dtype == torch.float16 for p in built.values())
    sdxl = built[SDXL_LIGHTNING.route]
    # SDXL's UNet and its two text encoders (CLIP ViT-L, OpenCLIP bigG with projection).
    assert count(sdxl.unet) == 2_567_463_684
    assert count(sdxl.text_encoder) == 123_060_480
    assert count(sdxl.text_encoder_2) == 694_659_840
    assert len(sdxl.tokenizer) == len(sdxl.tokenizer_2) == CLIP_VOCAB
    assert count(built[SVD_XT.route].unet) == 1_524_623_082
