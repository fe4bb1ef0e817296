"""Where models live and how they are found: a models directory first, then the Hugging Face
cache, offline. Only `pull` ever reaches the hub, and only when a user asks for it.

A model id is a Hugging Face id (`stabilityai/sd-turbo`); in the models directory it is the
folder of the same path (`models/stabilityai/sd-turbo`), holding what `save_pretrained` writes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MARKERS = ("model_index.json", "config.json")


class ModelNotFound(LookupError):
    """A model is not on this machine; the message says how to get it."""

    def __init__(self, model_id: str, models_dir: Path) -> None:
        self.model_id = model_id
        super().__init__(
            f"model {model_id!r} is not in {models_dir} nor in the Hugging Face cache; "
            f"fetch it with `live-v2v models pull {model_id} --models-dir {models_dir}` "
            f"(or `live-v2v models tiny {models_dir}` for tiny random test models)"
        )


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    path: Path
    size_bytes: int
    source: str  # "models dir" or "hf cache"


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in MARKERS)


def resolve_model(model_id: str, models_dir: Path) -> Path:
    """The local folder of `model_id`. Raises ModelNotFound (never downloads)."""
    direct = Path(model_id).expanduser()
    if direct.is_absolute() and _is_model_dir(direct):
        return direct
    local = models_dir / model_id
    if _is_model_dir(local):
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
                found.append(ModelInfo(model_id, candidate, folder_size(candidate), "models dir"))
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

    target = models_dir / model_id
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
