"""Which checkpoint serves each family, and the built-in tiny random ones.

Per family: a remote server when VLM_REMOTE_<FAMILY> is set (source "remote:<url>"); else VLM_MODEL_<FAMILY>
if set; else the family's default hub checkpoint when it is cached or the hub answers (and VLM_TINY is not
set); else a tiny random checkpoint, written once into the cache directory on first use. A tiny
checkpoint's source is "tiny:<family>".

Requests name a checkpoint by its label in the Checkpoint box (`choices`), never by a path or a source:
`source(family, choice)` maps the label to this server's source, and refuses anything else (unless
VLM_CUSTOM_CHECKPOINTS=1, where a typed hub id or directory is the source). Nothing a request sends
reaches the file system: tiny checkpoints exist only for the served families, and stale ones are
removed once, when the catalog is made.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, ModelNotFoundError
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
        remove_stale_tiny(settings.cache_dir, families)
        return cls(settings, families, needs_hub and hub_reachable())

    def default_source(self, family: str) -> str:
        """The source of the checkpoint a family starts with."""
        if family in self.settings.remote:
            return REMOTE_PREFIX + self.settings.remote[family].url
        if family in self.settings.models:
            return self.settings.models[family]
        repo = FAMILIES[family].default_checkpoint
        if not self.settings.tiny and (self.hub_reachable or is_cached(repo)):
            return repo
        return TINY_PREFIX + family

    def default(self, family: str) -> str:
        """The label of the checkpoint a family starts with (the Checkpoint box's value)."""
        return label(self.default_source(family))

    def sources(self, family: str) -> dict[str, str]:
        """label -> source of a family's checkpoints: the configured one, the hub default, tiny (a remote
        family: its server only)."""
        if family in self.settings.remote:
            return {label(self.default_source(family)): self.default_source(family)}
        candidates = [self.default_source(family), FAMILIES[family].default_checkpoint, TINY_PREFIX + family]
        return {label(s): s for s in dict.fromkeys(candidates)}

    def choices(self, family: str) -> list[str]:
        """The Checkpoint box's choices for `family` (labels, without server paths)."""
        return list(self.sources(family))

    def source(self, family: str, choice: str) -> str:
        """The source of the checkpoint a request names (a label of `family`'s choices, or with custom
        checkpoints any hub id or directory); InputError for anything else."""
        if family not in self.families:
            raise InputError(f"{family!r} is not a family this server serves ({', '.join(self.families)}).")
        known = self.sources(family)
        if choice in known:
            return known[choice]
        if self.settings.custom_checkpoints and choice.strip() and not is_tiny(choice) and choice not in self.labels():
            return choice.strip()
        if choice in self.labels():
            raise InputError(f"{choice!r} is not a {family} checkpoint; pick one of: {', '.join(known)}.")
        raise InputError(f"{choice!r} is not one of this server's {family} checkpoints ({', '.join(known)}); "
                         "set VLM_CUSTOM_CHECKPOINTS=1 to allow any hub id or directory.")

    def labels(self) -> set[str]:
        return {name for family in self.families for name in self.sources(family)}

    def tiny_families(self) -> list[str]:
        return [name for name in self.families if is_tiny(self.default_source(name))]

    def resolve(self, source: str) -> Path:
        """Local directory of a source from `source()`: tiny checkpoints are written into the cache
        directory, others go through vlm.hub."""
        tiny = {TINY_PREFIX + name: name for name in self.families}
        if source in tiny:
            return write_tiny(tiny[source], self.settings.cache_dir)
        known = {s for name in self.families for s in self.sources(name).values()}
        if is_tiny(source) or not (self.settings.custom_checkpoints or source in known):
            raise ModelNotFoundError(f"{source!r} is not one of this server's checkpoints "
                                     "(set VLM_CUSTOM_CHECKPOINTS=1 to allow any hub id or directory).")
        from ..hub import resolve

        return resolve(source)

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
    """How a checkpoint is named to users: a hub id as is, a local directory by its name only."""
    if is_remote(source):
        return f"remote server {source[len(REMOTE_PREFIX):]}"
    if is_tiny(source):
        return f"tiny random ({source[len(TINY_PREFIX):]})"
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or Path(source).expanduser().is_dir():
        return f"{Path(source).name} (local directory)"
    return source


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
    """The tiny checkpoint of `family` (a registered family), written on first use into
    `cache_dir/<family>-<code hash>`. The hash covers the library's code, so a new version writes a fresh
    checkpoint (`remove_stale_tiny` drops the old ones)."""
    from .. import tiny

    if family not in FAMILIES:
        raise ValueError(f"No tiny checkpoint for {family!r}.")
    target = Path(cache_dir) / f"{family}-{code_hash()}"
    with _write_lock:
        if (target / "config.json").is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
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


def remove_stale_tiny(cache_dir: Path, families: tuple[str, ...]) -> None:
    """Delete tiny checkpoints that an older version of the code wrote (`<family>-<other hash>` only)."""
    current = code_hash()
    for family in families:
        for path in Path(cache_dir).glob(f"{family}-*"):
            ours = re.fullmatch(rf"{re.escape(family)}-[0-9a-f]{{10}}", path.name)
            if ours and path.name != f"{family}-{current}" and path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)


def code_hash() -> str:
    """Short hash of the library's code (vlm/ without the UI)."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha1()
    for file in sorted(package.rglob("*.py")):
        if "ui" not in file.relative_to(package).parts[:1]:
            digest.update(file.read_bytes())
    return digest.hexdigest()[:10]
