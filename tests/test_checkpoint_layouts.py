"""Every tensor layout transformers writes or reads loads to the same model, through each family's name table.

- Hub checkpoints renamed into each other layout the reference reads (checked: the pinned reference must
  read it to the same weights), e.g. transformers 5's in-memory names or a headless base model's.
- Checkpoints re-saved by the pinned transformers and by the newest release on PyPI (installed once into a
  venv of its own on top of this one's packages), both as loaded and as built from a config: same weights,
  same encoded inputs and the same greedy tokens (segmentation logits for GroupViT) as the hub layout.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vlm
import vlm.tiny
from tests.reference_save import MODEL_CLASSES, save_both_ways

transformers = pytest.importorskip("transformers")

UNTIED = {"qwen2_vl": dict(tie_word_embeddings=False), "llava_onevision": dict(tie_word_embeddings=False)}

# (family, layout, hub prefix -> that layout's prefix; first match wins, other names stay the hub's)
LAYOUTS = [
    ("qwen2_vl", "transformers 5 in memory", {"model.": "model.language_model.", "visual.": "model.visual."}),
    ("qwen2_vl", "Qwen2VLModel with a head", {"model.": "language_model."}),
    ("llava_onevision", "transformers 5 in memory", {
        "language_model.model.": "model.language_model.", "language_model.lm_head.": "lm_head.",
        "vision_tower.vision_model.": "model.vision_tower.", "multi_modal_projector.": "model.multi_modal_projector.",
        "image_newline": "model.image_newline"}),
    ("llava_onevision", "in memory with SigLIP's prefix", {
        "language_model.model.": "model.language_model.", "vision_tower.": "model.vision_tower."}),
    ("llava_onevision", "save_pretrained of a model built from its config",
     {"vision_tower.vision_model.": "vision_tower."}),
    ("llava_onevision", "LlavaOnevisionModel with a head", {
        "language_model.model.": "language_model.", "language_model.lm_head.": "lm_head.",
        "vision_tower.vision_model.": "vision_tower."}),
    ("glm4v", "Glm4vModel with a head", {"model.language_model.": "language_model.", "model.visual.": "visual."}),
    ("glm4", "Glm4Model with a head", {"model.": ""}),
    ("groupvit", "under the base-model prefix", {"": "groupvit."}),
]


@pytest.fixture(scope="module")
def hub_checkpoints(tmp_path_factory):
    """family -> a tiny checkpoint in the hub's layout (untied heads where the family has a tie switch)."""
    root = tmp_path_factory.mktemp("hub")
    return {family: vlm.tiny.write(family, root / family, **UNTIED.get(family, {})) for family in MODEL_CLASSES}


def renamed(hub: Path, out: Path, renames: dict[str, str]) -> Path:
    """A copy of `hub` whose tensor names are rewritten by `renames`."""
    shutil.copytree(hub, out, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    tensors = {}
    for file in hub.glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            source = next((s for s in renames if name.startswith(s)), None)
            tensors[name if source is None else renames[source] + name[len(source):]] = tensor
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return vlm.load(directory, dtype="float32").model.state_dict()


def assert_same_weights(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("family, layout, renames", LAYOUTS, ids=[f"{f}-{l}" for f, l, _ in LAYOUTS])
def test_every_layout_the_reference_reads_loads_the_same_weights(hub_checkpoints, tmp_path, family, layout, renames):
    hub = hub_checkpoints[family]
    variant = renamed(hub, tmp_path / "variant", renames)
    assert set(load_file(variant / "model.safetensors")) != set(load_file(hub / "model.safetensors"))
    model_class = getattr(transformers, MODEL_CLASSES[family])
    theirs, info = model_class.from_pretrained(variant, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    expected = model_class.from_pretrained(hub).state_dict()
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in expected.items())  # the reference reads it
    assert_same_weights(weights(variant), weights(hub))


def answer(directory: Path, family: str) -> dict:
    """The weights a checkpoint loads to and what it makes of a question: the encoded inputs and greedy
    tokens, or GroupViT's segmentation logits."""
    pipe = vlm.load(directory, dtype="float32")
    image = Image.radial_gradient("L").convert("RGB").resize((96, 64))
    if family == "groupvit":
        return {"weights": pipe.model.state_dict(), "logits": pipe.segment(image, ["cat", "dog"]).logits}
    parts = [] if family == "glm4" else [{"type": "image", "image": image}]
    conversation = [{"role": "user", "content": [*parts, {"type": "text", "text": "What is in the picture?"}]}]
    return {"weights": pipe.model.state_dict(), "inputs": pipe.encode(conversation),
            "tokens": pipe.generate(conversation, max_new_tokens=8, do_sample=False)[0].token_ids}


@pytest.fixture(scope="module")
def hub_answers(hub_checkpoints):
    cache = {}
    return lambda family: cache.setdefault(family, answer(hub_checkpoints[family], family))


def assert_same_model(saved: Path, expected: dict, family: str) -> None:
    """`saved` loads to the hub checkpoint's weights, encodes a question the same and answers it the same."""
    ours = answer(saved, family)
    assert_same_weights(ours.pop("weights"), expected["weights"])
    assert ours.keys() == expected.keys() - {"weights"}
    for key, value in ours.items():
        if key == "inputs":
            assert value.keys() == expected[key].keys()
            for name, tensor in value.items():
                assert torch.equal(tensor, expected[key][name]) if isinstance(tensor, torch.Tensor) else \
                    tensor == expected[key][name], name
        else:
            assert torch.equal(value, expected[key]) if isinstance(value, torch.Tensor) else value == expected[key]


@pytest.mark.parametrize("family", sorted(MODEL_CLASSES))
def test_checkpoints_saved_by_the_pinned_transformers_load_the_same(hub_checkpoints, hub_answers, tmp_path, family):
    save_both_ways(family, hub_checkpoints[family], tmp_path)
    for way in ("loaded", "built"):
        assert_same_model(tmp_path / way, hub_answers(family), family)


@pytest.fixture(scope="session")
def newest_transformers() -> Path:
    """The python of a venv holding the newest transformers on PyPI over this venv's packages (torch and the
    rest come from here through a .pth file), kept next to CI's venvs. Upgraded once per session; the cached
    release is used when PyPI cannot be reached; skipped when there is none."""
    base = sysconfig.get_paths()["purelib"]
    cache = Path(os.environ.get("VLM_CI_CACHE", Path.home() / ".cache" / "vlm-ci"))
    venv = cache / f"tf-latest-{hashlib.sha256(base.encode()).hexdigest()[:16]}"
    python = venv / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{venv.name}.lock", "w") as lock:  # test sessions running at once share the venv
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "_vlm_base.pth").write_text(base + "\n")
        upgrade = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--upgrade",
                                  "--retries", "1", "--timeout", "20", "transformers"],
                                 capture_output=True, text=True, timeout=900)
    if not Path(site, "transformers").is_dir():
        pytest.skip(f"the newest transformers could not be installed: {upgrade.stderr.strip()[-300:]}")
    return python


@pytest.fixture(scope="module")
def saved_by_the_newest(hub_checkpoints, newest_transformers, tmp_path_factory) -> Path:
    """family -> directory of the hub checkpoints re-saved by the newest transformers (one process for all)."""
    root = tmp_path_factory.mktemp("newest")
    args = [str(a) for family, hub in hub_checkpoints.items() for a in (family, hub, root / family)]
    run = subprocess.run([newest_transformers, Path(__file__).with_name("reference_save.py"), *args],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr[-2000:]
    print(f"saved by transformers {run.stdout.strip()}")
    return root


@pytest.mark.parametrize("family", sorted(MODEL_CLASSES))
def test_checkpoints_saved_by_the_newest_transformers_load_the_same(hub_answers, saved_by_the_newest, family):
    for way in ("loaded", "built"):
        assert_same_model(saved_by_the_newest / family / way, hub_answers(family), family)
