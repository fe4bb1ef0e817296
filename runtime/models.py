"""Where models live and how they are found: a models directory first, then the Hugging Face
cache, offline. Only `pull` ever reaches the hub, and only when a user asks for it.

A model id is a Hugging Face id (`stabilityai/sd-turbo`); in the models directory it is the
folder of the same path (`models/stabilityai/sd-turbo`), holding what `save_pretrained` writes.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from protocol.model_ids import BadModelId, check_model_id

from .random_full import has_random_weights

logger = logging.getLogger(__name__)

__all__ = ["BadModelId", "ModelNotFound", "check_model_id", "resolve_model"]

MARKERS = ("model_index.json", "config.json")


class ModelNotFound(LookupError):
    """A model is not on this machine; the message says how to get it. It never names the
    models directory: callers of a public route must not learn the host's paths (the
    operator finds them in the log, `where`)."""

    def __init__(self, model_id: str, models_dir: Path) -> None:
        self.model_id = model_id
        self.where = f"looked in {models_dir.resolve()} and the Hugging Face cache"
        super().__init__(
            f"model {model_id} is not on this machine (neither in the models directory nor in "
            f"the Hugging Face cache); the operator fetches it with "
            f"`live-v2v models pull {model_id}` (or `live-v2v models tiny` for tiny random "
            "test models)"
        )


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    path: Path
    size_bytes: int
    source: str  # "models dir" or "hf cache"
    random_weights: bool = False
    """A test model (`live-v2v models tiny` or `random-full`): its outputs are noise."""


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in MARKERS)


def _inside(path: Path, root: Path) -> bool:
    # Real paths: a symlink in the models directory may not lead out of it.
    try:
        return path.resolve(strict=True).is_relative_to(root.resolve(strict=True))
    except OSError:
        return False


def resolve_model(model_id: str, models_dir: Path) -> Path:
    """The local folder of `model_id`: in the models directory, else in the Hugging Face
    cache, and never outside them (symlinks followed). Raises BadModelId for an id that is
    not a Hugging Face id, ModelNotFound when it is not here (never downloads). The one place
    a model id becomes a folder."""
    check_model_id(model_id)
    local = models_dir / model_id
    if _is_model_dir(local) and _inside(local, models_dir):
        return local
    cached = _from_hf_cache(model_id)
    if cached is not None:
        return cached
    raise ModelNotFound(model_id, models_dir)


def _from_hf_cache(model_id: str) -> Path | None:
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        # local_files_only: looks in the cache and never opens a connection.
        path = Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None
    return path if _is_model_dir(path) else None


def folder_size(path: Path) -> int:
    """Bytes of every file under `path`. A walk of every file, so remembered per folder and
    modification time (a pull or a rewrite changes the time): the walk of a large model took
    ~20 ms, too much to repeat per request. Still blocking: call it off the event loop."""
    try:
        stamp = max(
            path.stat().st_mtime_ns,
            *((path / m).stat().st_mtime_ns for m in MARKERS if (path / m).exists()),
        )
    except OSError:
        return 0
    return _walk_size(str(path.resolve()), stamp)


@functools.lru_cache(maxsize=256)
def _walk_size(path: str, stamp: int) -> int:
    # A pure function of the disk's content at `stamp`: a memo, not service state.
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


def list_models(models_dir: Path) -> list[ModelInfo]:
    """Models in the models directory (two levels: org/name, or one) and the HF cache."""
    found: list[ModelInfo] = []
    if models_dir.is_dir():
        for candidate in sorted(models_dir.glob("*")) + sorted(models_dir.glob("*/*")):
            if _is_model_dir(candidate):
                model_id = candidate.relative_to(models_dir).as_posix()
                found.append(
                    ModelInfo(
                        model_id,
                        candidate,
                        folder_size(candidate),
                        "models dir",
                        has_random_weights(candidate),
                    )
                )
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return found
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type == "model":
            found.append(ModelInfo(repo.repo_id, repo.repo_path, repo.size_on_disk, "hf cache"))
    return found


def pull_model(model_id: str, models_dir: Path) -> Path:
    """Download `model_id` into the models directory, with a progress bar. Raises
    ConnectionError with a plain explanation when the hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    target = models_dir / check_model_id(model_id)
    try:
        snapshot_download(
            model_id,
            local_dir=target,
            allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model", "tokenizer*"],
        )
    except OfflineModeIsEnabled as exc:
        raise ConnectionError(
            f"cannot download {model_id}: HF_HUB_OFFLINE is set; unset it to download"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ConnectionError(
            f"cannot download {model_id} from the Hugging Face hub ({exc.__class__.__name__}: "
            f"{exc}); check the network, or copy the model folder to {target}"
        ) from exc
    return target
