"""What the GPUs are and how busy they are, for `/hardware/info` and `/hardware/stats`.

Read through torch's CUDA API (NVML, when torch can reach it, for utilisation); a machine without
a CUDA GPU has none to report, which is an empty map, not an error. Blocking: call off the loop.
"""

from __future__ import annotations

import logging

from protocol.api import GPUComputeInfo, GPUUtilizationInfo

from .device import has_cuda

logger = logging.getLogger(__name__)


def _gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if has_cuda() else []


def gpu_info() -> dict[str, GPUComputeInfo]:
    import torch

    info = {}
    for index in _gpus():
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        info[str(index)] = GPUComputeInfo(
            id=str(getattr(properties, "uuid", index)),
            name=properties.name,
            memory_total=total,
            memory_free=free,
            major=properties.major,
            minor=properties.minor,
        )
    return info


def gpu_stats() -> dict[str, GPUUtilizationInfo]:
    import torch

    stats = {}
    for index in _gpus():
        properties = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        try:
            compute = int(torch.cuda.utilization(index))
        except Exception as exc:  # NVML missing (pynvml not installed): report 0, say why once
            logger.debug("GPU utilisation unavailable: %r", exc)
            compute = 0
        stats[str(index)] = GPUUtilizationInfo(
            id=str(getattr(properties, "uuid", index)),
            name=properties.name,
            memory_total=total,
            memory_free=free,
            utilization_compute=compute,
            utilization_memory=round(100 * (total - free) / total) if total else 0,
        )
    return stats
