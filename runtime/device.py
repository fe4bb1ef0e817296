"""Device and dtype choice: CUDA with fp16 (bf16 on request), Apple MPS, or the CPU with fp32
(bf16 on request where the CPU has it). Settings override the automatic choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
DtypeName = Literal["auto", "float32", "float16", "bfloat16"]


@dataclass(frozen=True)
class DeviceSpec:
    device: str  # "cpu", "cuda", "cuda:1", "mps"
    dtype_name: str  # "float32", "float16", "bfloat16"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith(("cuda", "mps"))

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype_name}"


def cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_cuda() -> bool:
    """Whether torch sees a CUDA GPU here: the one probe behind every "is there a GPU" answer
    (device choice, `/hardware/*`, `/pipelines`, `models pull`, `serve`'s start-up check)."""
    import torch

    return bool(torch.cuda.is_available())


def has_mps() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def has_gpu() -> bool:
    """A GPU a pipeline can run on in real time: CUDA, or Apple's MPS."""
    return has_cuda() or has_mps()


def choose_device(device: DeviceName | str = "auto", dtype: DtypeName | str = "auto") -> DeviceSpec:
    """Resolve settings into a concrete device and dtype. Raises ValueError for a device that
    is not there (asking for CUDA on a machine without it is an error, not a silent CPU run)."""
    if device == "auto":
        if has_cuda():
            device = "cuda"
        elif has_mps():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not has_cuda():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU")
    if device == "mps" and not has_mps():
        raise ValueError("device mps was asked for, but it is not available")
    if dtype == "auto":
        dtype = "float16" if device != "cpu" else "float32"
    if dtype == "bfloat16" and device == "cpu" and not cpu_has_bf16():
        logger.warning("this CPU has no native bf16; bfloat16 will be slow")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"unknown dtype {dtype!r}")
    return DeviceSpec(device, dtype)


def free_gpu_memory(spec: DeviceSpec) -> int | None:
    """Free bytes on the GPU of `spec`, or None where that cannot be known (CPU, MPS)."""
    if not spec.device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(spec.device))
    return int(free)
