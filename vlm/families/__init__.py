"""Registry of model families: config.json's model_type / architectures -> the family's package.

Each family package exposes `load(directory, config, device, dtype)` returning a pipeline and
`write_tiny(out_dir, **overrides)` writing a tiny random checkpoint in the hub layout.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    default_checkpoint: str

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")

    def load(self, *args: Any, **kwargs: Any):
        return self.module.load(*args, **kwargs)

    def write_tiny(self, *args: Any, **kwargs: Any):
        return self.module.write_tiny(*args, **kwargs)


FAMILIES = {
    f.name: f
    for f in (
        Family("qwen2_vl", ("qwen2_vl",), ("Qwen2VLForConditionalGeneration",), "Qwen/Qwen2-VL-2B-Instruct"),
        Family("qwen2_5_vl", ("qwen2_5_vl",), ("Qwen2_5_VLForConditionalGeneration",),
               "Qwen/Qwen2.5-VL-3B-Instruct"),
        Family("llava_onevision", ("llava_onevision",), ("LlavaOnevisionForConditionalGeneration",),
               "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"),
        Family("groupvit", ("groupvit",), ("GroupViTModel",), "nvidia/groupvit-gcc-yfcc"),
        Family("glm4v", ("glm4v",), ("Glm4vForConditionalGeneration",), "THUDM/GLM-4.1V-9B-Thinking"),
        Family("glm4", ("glm4",), ("Glm4ForCausalLM",), "THUDM/GLM-4-9B-0414"),
    )
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedModelError(f"Unknown family {name!r}; supported: {', '.join(FAMILIES)}.") from None


def detect_family(config: dict[str, Any]) -> Family:
    """The family of a checkpoint from its config's model_type, else its architectures."""
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    for family in FAMILIES.values():
        if model_type in family.model_types or any(a in family.architectures for a in architectures):
            return family
    found = model_type or ", ".join(architectures) or "nothing"
    raise UnsupportedModelError(
        f"config.json names {found!r}, which this demo does not run. Supported families: "
        + ", ".join(f"{f.name} (e.g. {f.default_checkpoint})" for f in FAMILIES.values())
    )
