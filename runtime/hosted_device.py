"""The device of a worker process (runtime/worker_child.py), as the models there see it.

A worker process serves one device. Its `Device`, with the model cache, is made on first use
and shared by everything that runs there: live sessions' pipelines (live/pipeline_child.py)
and batch routes' models (batch/hosted.py). Two sessions of one model share its weights, as
they do in the service's own process without `--worker-process`.
"""

from __future__ import annotations

import threading

from .runtime import Device, RuntimeConfig

_devices: dict[str, Device] = {}
"""By label. Module state because the process itself is the owner: it lives as long as the
worker process does, and nothing else imports this module."""
_making = threading.Lock()
"""Loads make it on the loader lane; the main thread must find the same one."""


def device_here(label: str, name: str, setting: str, config: RuntimeConfig) -> Device:
    """This worker process's device (made by the first caller)."""
    with _making:
        device = _devices.get(label)
        if device is None:
            device = _devices[label] = Device(label, name, setting, config)
        return device
