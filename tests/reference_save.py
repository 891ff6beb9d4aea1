"""Re-save checkpoints with whichever transformers is importable, the two ways a user's code saves one.

`python tests/reference_save.py FAMILY HUB_DIR OUT_DIR [FAMILY HUB_DIR OUT_DIR ...]` (also run in a separate
venv holding the newest transformers release) writes OUT_DIR/loaded (the checkpoint loaded with from_pretrained, then
save_pretrained) and OUT_DIR/built (a model built from its config, given the same weights, then
save_pretrained), each with the processor or tokenizer saved by the same version, and prints the version.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "glm4v": "Glm4vForConditionalGeneration",
    "glm4": "Glm4ForCausalLM",
    "groupvit": "GroupViTModel",
}
PROCESSOR_CLASSES = {"glm4": "AutoTokenizer", "groupvit": "CLIPTokenizer"}


def save_both_ways(family: str, hub: Path, out: Path) -> str:
    """Write out/loaded and out/built; return the transformers version that wrote them."""
    import transformers

    transformers.logging.set_verbosity_error()
    model_class = getattr(transformers, MODEL_CLASSES[family])
    processor = getattr(transformers, PROCESSOR_CLASSES.get(family, "AutoProcessor")).from_pretrained(hub)
    loaded = model_class.from_pretrained(hub)
    built = model_class(loaded.config)
    built.load_state_dict(loaded.state_dict())
    for name, model in (("loaded", loaded), ("built", built)):
        model.save_pretrained(out / name)
        processor.save_pretrained(out / name)
        if family == "groupvit":  # GroupViT has no processor class of its own: CLIP's image settings
            transformers.CLIPImageProcessor.from_pretrained(hub).save_pretrained(out / name)
    return transformers.__version__


if __name__ == "__main__":
    args = sys.argv[1:]
    for i in range(0, len(args), 3):
        version = save_both_ways(args[i], Path(args[i + 1]), Path(args[i + 2]))
    print(version)
