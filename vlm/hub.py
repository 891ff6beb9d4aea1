"""Resolve a model argument to a local checkpoint directory (local path or hub snapshot)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HubUnreachableError, ModelNotFoundError

# Files a checkpoint needs; weights, configs, tokenizer, processor and chat-template files.
CHECKPOINT_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
]
LEGACY_WEIGHT_PATTERNS = ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"]


def resolve(model: str | os.PathLike, revision: str | None = None) -> Path:
    """Return the local directory holding `model`, downloading it from the hub if needed.

    Respects HF_HOME, HF_HUB_OFFLINE and `revision`; raises a `vlm.errors` exception when the
    directory does not exist and the hub cannot supply it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory but has no config.json; point at a checkpoint directory.")
        return path
    name = str(model)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelNotFoundError(f"{name!r} is not a checkpoint directory, nor a hub repo id of the form 'owner/name'.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(name, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))
        if not any(path.glob("*.safetensors")):  # an older repo with PyTorch pickles only
            path = Path(snapshot_download(name, revision=revision, allow_patterns=LEGACY_WEIGHT_PATTERNS))
        return path
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as exc:
        raise ModelNotFoundError(f"The hub has no accessible repo {name!r} (revision {revision or 'main'}): {exc}") from exc
    except LocalEntryNotFoundError as exc:
        raise HubUnreachableError(_unreachable(name, exc)) from exc
    except OSError as exc:  # requests/httpx connection errors derive from OSError
        raise HubUnreachableError(_unreachable(name, exc)) from exc


def _unreachable(name: str, exc: Exception) -> str:
    """What happened and what to do, without repeating "cannot load" (callers say that)."""
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else f"the hub cannot be reached ({type(exc).__name__})"
    return (
        f"{why} and the local cache has no copy of {name!r}. Download it where the hub is reachable "
        f"(`hf download {name} --local-dir DIR`) and pass that directory instead."
    )
