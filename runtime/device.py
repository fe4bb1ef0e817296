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


DEVICE_LIST_MAX = 64
"""Entries `--devices` may name: more workers than this is a typo, not a machine."""


def _one_device(entry: str) -> str:
    entry = entry.strip()
    if entry == "cuda":
        return "cuda:0"  # the GPU a bare `cuda` means to torch, named so labels are unique
    if entry in ("cpu", "mps") or (
        entry.startswith("cuda:") and entry[5:].isdigit() and len(entry) <= 9
    ):
        return entry
    raise ValueError(f'"{entry}" is not a device; name cpu, mps, cuda or cuda:N')


def device_list(setting: str) -> list[str] | None:
    """The devices an explicit `--devices` list names, each a torch device ("cuda" spelled
    "cuda:0"); None for "auto" or empty (every visible GPU, else the CPU: see
    `visible_devices`). Raises ValueError for an entry that is not a device. Needs no torch."""
    setting = setting.strip()
    if setting in ("", "auto"):
        return None
    entries = setting.split(",")
    if len(entries) > DEVICE_LIST_MAX:
        raise ValueError(f"{len(entries)} devices named; at most {DEVICE_LIST_MAX}")
    names = [_one_device(entry) for entry in entries]
    gpus = [name for name in names if name != "cpu"]
    if len(set(gpus)) != len(gpus):
        # Two workers on one GPU would split its memory and compete for it: not a placement.
        raise ValueError(f"a GPU is named twice ({setting}); only cpu may repeat")
    return names


def visible_devices() -> list[str]:
    """What `--devices auto` means here: every CUDA GPU torch sees, else MPS, else the CPU."""
    if has_cuda():
        import torch

        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["mps"] if has_mps() else ["cpu"]


def check_devices_present(names: list[str]) -> None:
    """Raise ValueError naming the first device of `names` that is not on this machine."""
    for name in names:
        if name.startswith("cuda"):
            if not has_cuda():
                raise ValueError(f"device {name} was asked for, but torch sees no CUDA GPU")
            import torch

            count = torch.cuda.device_count()
            if int(name[5:]) >= count:
                raise ValueError(f"device {name} was asked for, but torch sees {count} CUDA GPU(s)")
        elif name == "mps" and not has_mps():
            raise ValueError("device mps was asked for, but it is not available")


def device_labels(names: list[str]) -> list[str]:
    """Unique names for the workers of `names`: the device itself, or `cpu:0`, `cpu:1`... when
    the CPU is named more than once (each its own worker)."""
    cpus = names.count("cpu")
    labels, seen = [], 0
    for name in names:
        if name == "cpu" and cpus > 1:
            labels.append(f"cpu:{seen}")
            seen += 1
        else:
            labels.append(name)
    return labels
