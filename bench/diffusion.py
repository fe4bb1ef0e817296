"""Diffusion benchmark: the streamdiffusion pipeline on the full-size sd-turbo architecture.

    python -m bench.diffusion --device cpu --size 256 --steps 1 2 4 [--frames 8] [--compile]

The components (SD 2.1 UNet, OpenCLIP-H text encoder, TAESD) are built from their configurations
with random weights: speed does not depend on weight values, and nothing is downloaded. The
pipeline is the service's own (`StreamDiffusionPipeline.attach`), fed a stream of frames. Prints
fps, ms per frame split into encode / UNet / decode, the stream-batch ratio against one plain
UNet call, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from live.pipelines.base import PipelineContext
from live.pipelines.diffusion import StreamDiffusionParams, StreamDiffusionPipeline
from protocol.clips import numbered_frame


def build_components(seed: int = 0) -> dict[str, object]:
    from diffusers import AutoencoderTiny, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from runtime.tiny import SCHEDULER_CONFIG, _tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # stabilityai/sd-turbo (SD 2.1) unet/config.json
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    text_encoder = CLIPTextModel(  # OpenCLIP ViT-H/14 text tower
        CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=1024,
            vocab_size=49408,
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
    scheduler = LCMScheduler(**SCHEDULER_CONFIG)
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "unet": unet,
        "vae": AutoencoderTiny(),
        "scheduler": scheduler,
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace, steps: int, components: dict[str, object]) -> dict[str, float]:
    t_index = [int(i * 50 / (steps + 1)) + 5 for i in range(steps)]
    params = StreamDiffusionParams(
        width=args.size,
        height=args.size,
        t_index_list=t_index,
        num_inference_steps=50,
        acceleration="compile" if args.compile else "none",
    )
    pipeline = StreamDiffusionPipeline(
        params, PipelineContext.private(device=args.device, dtype=args.dtype, compile=args.compile)
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    pipeline.attach(**components)
    frames = [numbered_frame(i, args.size, args.size) for i in range(args.frames)]
    device = pipeline._spec.device
    # Whole frames through process(): the figure a live session sees.
    start = time.perf_counter()
    for frame in frames:
        pipeline.process(frame)
    sync(device)
    per_frame = (time.perf_counter() - start) / len(frames)
    # The split, stage by stage, on the same inputs.
    enc = unet = dec = 0.0
    with torch.inference_mode():
        for frame in frames:
            x = torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].to(pipeline.dtype)
            x = x / 127.5 - 1
            sync(device)
            t0 = time.perf_counter()
            latent = pipeline._vae_encode(x)
            sync(device)
            t1 = time.perf_counter()
            batch = torch.cat([latent.expand(steps, -1, -1, -1)])
            denoised, _ = pipeline._unet_step(batch, pipeline.timesteps, slice(None))
            sync(device)
            t2 = time.perf_counter()
            pipeline._vae_decode(denoised[-1:])
            sync(device)
            t3 = time.perf_counter()
            enc, unet, dec = enc + t1 - t0, unet + t2 - t1, dec + t3 - t2
    n = len(frames)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0
    return {
        "steps": steps,
        "fps": 1 / per_frame,
        "ms_per_frame": per_frame * 1000,
        "encode_ms": enc / n * 1000,
        "unet_ms": unet / n * 1000,
        "decode_ms": dec / n * 1000,
        "gpu_mem_gib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"# diffusion python={platform.python_version()} torch={torch.__version__} "
        f"device={args.device} dtype={args.dtype} gpu={gpu} size={args.size} "
        f"compile={args.compile} threads={torch.get_num_threads()}"
    )
    components = build_components()
    results = []
    for steps in args.steps:
        r = run(args, steps, components)
        results.append(r)
        print(
            f"steps={steps}  {r['fps']:7.2f} fps  {r['ms_per_frame']:8.1f} ms/frame  "
            f"encode {r['encode_ms']:7.1f}  unet {r['unet_ms']:7.1f}  "
            f"decode {r['decode_ms']:7.1f} ms  gpu mem {r['gpu_mem_gib']:.2f} GiB"
        )
    if len(results) > 1:
        base = results[0]["unet_ms"]
        for r in results[1:]:
            print(
                f"stream batch: {r['steps']} steps cost {r['unet_ms'] / base:.2f}x the UNet "
                f"time of 1 step (one batched call, not {r['steps']} calls)"
            )
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
