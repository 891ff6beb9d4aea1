"""Which checkpoint serves each family, and the built-in tiny random ones.

Per family: a remote server when VLM_REMOTE_<FAMILY> is set (source "remote:<url>"); else VLM_MODEL_<FAMILY>
if set; else the family's default hub checkpoint when it is cached or the hub answers (and VLM_TINY is not
set); else a tiny random checkpoint, written once into the cache directory on first use. A tiny
checkpoint's source is "tiny:<family>".
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError
from ..families import FAMILIES
from .settings import Settings

TINY_PREFIX = "tiny:"
REMOTE_PREFIX = "remote:"
HUB_TIMEOUT = 4.0  # seconds to wait for the hub before serving tiny checkpoints


@dataclass(frozen=True)
class Catalog:
    settings: Settings
    families: tuple[str, ...]  # the families served (VLM_FAMILIES, default all)
    hub_reachable: bool

    @classmethod
    def discover(cls, settings: Settings) -> "Catalog":
        """Probe the hub once (skipped when every family is decided without it)."""
        families = served_families(settings)
        needs_hub = not settings.tiny and any(
            name not in settings.models and name not in settings.remote
            and not is_cached(FAMILIES[name].default_checkpoint) for name in families)
        return cls(settings, families, needs_hub and hub_reachable())

    def default(self, family: str) -> str:
        """The checkpoint a family starts with."""
        if family in self.settings.remote:
            return REMOTE_PREFIX + self.settings.remote[family].url
        if family in self.settings.models:
            return self.settings.models[family]
        repo = FAMILIES[family].default_checkpoint
        if not self.settings.tiny and (self.hub_reachable or is_cached(repo)):
            return repo
        return TINY_PREFIX + family

    def choices(self, family: str) -> list[tuple[str, str]]:
        """(label, source) pairs for the checkpoint box: the configured one, the hub default, tiny (a remote
        family: its server only)."""
        if family in self.settings.remote:
            return [(label(self.default(family)), self.default(family))]
        sources = [self.default(family), FAMILIES[family].default_checkpoint, TINY_PREFIX + family]
        unique = list(dict.fromkeys(sources))
        return [(label(s), s) for s in unique]

    def tiny_families(self) -> list[str]:
        return [name for name in self.families if is_tiny(self.default(name))]

    def resolve(self, source: str) -> Path:
        """Local directory of a source: tiny checkpoints are written here, others go through vlm.hub."""
        if is_tiny(source):
            return write_tiny(source[len(TINY_PREFIX):], self.settings.cache_dir)
        if not self.settings.custom_checkpoints and source not in self.known_sources():
            raise ModelNotFoundError(f"{source!r} is not one of this server's checkpoints "
                                     "(set VLM_CUSTOM_CHECKPOINTS=1 to allow any hub id or directory).")
        from ..hub import resolve

        return resolve(source)

    def known_sources(self) -> set[str]:
        return {source for name in self.families for _, source in self.choices(name)}

    def banner(self) -> str:
        """Markdown warning shown when some family serves random answers ("" when none does)."""
        tiny = self.tiny_families()
        if not tiny:
            return ""
        from huggingface_hub import constants

        if self.settings.tiny:
            why = "VLM_TINY=1 is set"
        elif constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE is set and the weights are not in the cache"
        else:
            why = "the Hugging Face Hub cannot be reached and the weights are not in the cache"
        example = tiny[0]
        return (
            f"⚠️ **Demo mode: answers are random.** {', '.join(tiny)} run on tiny random checkpoints built into "
            f"this app ({why}). To use real weights, start the app with "
            f"`VLM_MODEL_{example.upper()}={FAMILIES[example].default_checkpoint}` (a hub id) or "
            f"`VLM_MODEL_{example.upper()}=/path/to/checkpoint` (a local directory), or with hub access pick "
            "the hub checkpoint in the *Checkpoint* box."
        )


def served_families(settings: Settings) -> tuple[str, ...]:
    """The registered families, or those VLM_FAMILIES names (checked)."""
    unknown = set(settings.families or ()) - set(FAMILIES)
    if unknown:
        raise ValueError(f"VLM_FAMILIES names unknown families {sorted(unknown)}; available: {', '.join(FAMILIES)}.")
    return tuple(name for name in FAMILIES if settings.families is None or name in settings.families)


def is_tiny(source: str) -> bool:
    return source.startswith(TINY_PREFIX)


def is_remote(source: str) -> bool:
    return source.startswith(REMOTE_PREFIX)


def label(source: str) -> str:
    if is_remote(source):
        return f"remote server {source[len(REMOTE_PREFIX):]}"
    return f"tiny random ({source[len(TINY_PREFIX):]})" if is_tiny(source) else source


def is_cached(repo: str) -> bool:
    """True when the hub cache holds the repo's config.json (its weights were downloaded before)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """Whether huggingface.co answers within `timeout` seconds (False when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    answered = threading.Event()

    def probe() -> None:
        from huggingface_hub import HfApi

        try:
            HfApi().model_info(FAMILIES[next(iter(FAMILIES))].default_checkpoint)
            answered.set()
        except Exception:  # any failure means "not usable now"
            pass

    threading.Thread(target=probe, name="vlm-hub-probe", daemon=True).start()
    return answered.wait(timeout)


_write_lock = threading.Lock()


def write_tiny(family: str, cache_dir: Path) -> Path:
    """The tiny checkpoint of `family`, written on first use into `cache_dir/<family>-<code hash>`.

    The hash covers the library's code, so a new version writes a fresh checkpoint (and drops old ones).
    """
    from .. import tiny

    target = Path(cache_dir) / f"{family}-{code_hash()}"
    with _write_lock:
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{family}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=target.parent))
        try:
            tiny.write(family, staging)
            os.replace(staging, target)  # atomic: another process sees all files or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def code_hash() -> str:
    """Short hash of the library's code (vlm/ without the UI)."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for file in sorted(package.rglob("*.py")):
        if "ui" not in file.relative_to(package).parts[:1]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:10]
