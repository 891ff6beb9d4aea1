"""GroupViT against transformers' GroupViTModel, CLIPTokenizer and CLIPImageProcessor (Pillow backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from vlm.checkpoint import read_config
from vlm.errors import CheckpointError, InputError, MissingTensorError
from vlm.families.groupvit import BACKGROUND, load, write_tiny
from vlm.families.groupvit.model import GroupViTConfig
from vlm.families.groupvit.pipeline import clean_labels, window_starts
from vlm.families.groupvit.processor import ClipTokenizer, ImageProcessor
from vlm.families.groupvit.segmentation import bilinear, label_map, resize_index
from vlm.families.groupvit.tiny import train_tokenizer, write_tokenizer_files

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MEDIA = ROOT.parent / "shared" / "media"  # real photos, read in place (absent from a fresh clone)
ASSETS = ROOT / "assets"  # the project's own pictures
PHOTOS = ["coco.jpg", "ctx.jpg", "voc.jpg"]  # GroupViT's demo images, 448 x 448
WIDE = "waterview.jpg"  # 1000 x 667
LABELS = ["giraffe", "rock", "tree", "sky", "road", "person", "water", "grass"]
PROMPT = "a photo of a {}."
CPU = torch.device("cpu")

# Two tiny configs that differ in every structural dimension (stages, groups, patch, widths, text pooling);
# seeds chosen so that several labels win somewhere (see test_parity_cases_are_discriminative).
CONFIGS = {
    "three_stages": dict(
        seed=0,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=32, intermediate_size=64, depths=[1, 1, 1], num_hidden_layers=3,
                           num_group_tokens=[16, 8, 0], num_output_groups=[16, 8, 8], num_attention_heads=4,
                           patch_size=16),
        projection_dim=24, projection_intermediate_dim=48,
    ),
    "two_grouping_stages": dict(
        seed=1,
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
                         hidden_act="gelu", legacy_eos=True),
        vision_config=dict(hidden_size=48, intermediate_size=80, depths=[2, 1], num_hidden_layers=3,
                           num_group_tokens=[16, 8], num_output_groups=[16, 6], num_attention_heads=2,
                           patch_size=32, assign_mlp_ratio=[1.0, 2]),
        projection_dim=16, projection_intermediate_dim=40,
    ),
}


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def vocab_merges():
    return train_tokenizer()


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and BatchNorm statistic at random (transformers leaves biases 0 and norms 1);
    attention q/k scaled up so attention is sharp enough for the image to matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            elif name == "logit_scale":
                t.fill_(2.0)
            elif t.dim() == 1 and name.endswith("weight"):
                t.copy_(1 + 0.2 * noise)
            elif t.dim() >= 2 and "embedding" not in name and "group_token" not in name:
                gain = 2.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                t.copy_(gain * noise / t[0].numel() ** 0.5)
            else:
                t.copy_(0.2 * noise)


def reference_checkpoint(directory: Path, name: str, vocab, merges):
    """A transformers GroupViTModel saved with save_pretrained, plus our tokenizer and CLIP's processor."""
    spec = json.loads(json.dumps(CONFIGS[name]))
    seed = spec.pop("seed")
    legacy = spec["text_config"].pop("legacy_eos", False)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    spec["text_config"].update(vocab_size=len(vocab), bos_token_id=0 if legacy else bos,
                               eos_token_id=2 if legacy else eos, pad_token_id=1 if legacy else eos)
    model = transformers.GroupViTModel(transformers.GroupViTConfig(**spec)).eval()
    redraw(model, seed)
    model.save_pretrained(directory)
    transformers.CLIPImageProcessorPil().save_pretrained(directory)
    write_tokenizer_files(directory, vocab, merges)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory, vocab_merges):
    directory = tmp_path_factory.mktemp(request.param)
    reference = reference_checkpoint(directory, request.param, *vocab_merges)
    return directory, reference, load(directory, read_config(directory), CPU, torch.float32)


def photo_path(name: str) -> Path:
    """One of the project's assets, or a real photo from ../shared/media (the test skips without it)."""
    path = ASSETS / name if (ASSETS / name).is_file() else MEDIA / name
    if not path.is_file():
        pytest.skip(f"{name} is a real photo of ../shared/media, which is not present")
    return path


def photo(name: str) -> Image.Image:
    return Image.open(photo_path(name)).convert("RGB")


def reference_inputs(directory: Path, image: Image.Image, texts: list[str], **processor_kwargs):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    ids = tokenizer(texts, padding=True, return_tensors="pt").input_ids
    processor = transformers.CLIPImageProcessorPil(**processor_kwargs)
    return ids, processor(images=image, return_tensors="pt").pixel_values


def reference_outputs(model, ids, pixels):
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, output_segmentation=True)
    return out.logits_per_image, out.segmentation_logits


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).double().mean().item()


# ---------------------------------------------------------------------------------------------- processor


def test_tokenizer_ids_match_clip_tokenizer_for_both_file_layouts(tmp_path, vocab_merges):
    vocab, merges = vocab_merges
    write_tokenizer_files(tmp_path, vocab, merges)
    texts = ["A photo of a CAT.", "  many   spaces\tand\nnewlines  ", "don't stop, it's 2024!",
             "café naïve Ünïcode", "日本語のテキスト", "emoji 🐱🐶", "x" * 300, " ".join(["giraffe"] * 100),
             "<|endoftext|> inside", ""]
    expected = transformers.CLIPTokenizer.from_pretrained(tmp_path)(texts, truncation=True, max_length=77).input_ids
    assert max(map(len, expected)) == 77  # truncation is exercised
    for layout, files in {"json": ["tokenizer.json"], "bpe": ["vocab.json", "merges.txt"]}.items():
        (tmp_path / layout).mkdir()
        for name in files:
            (tmp_path / layout / name).write_bytes((tmp_path / name).read_bytes())
        ours = ClipTokenizer.from_directory(tmp_path / layout)
        assert [ours.encode(t) for t in texts] == expected


def test_tokenizer_batch_pads_with_end_token(vocab_merges):
    tokenizer = ClipTokenizer(*vocab_merges)
    ids = tokenizer(["cat", "a photo of a small dog"])
    assert ids.shape[0] == 2 and (ids[0] == tokenizer.eos_id).sum() > 1 and ids[1, -1] == tokenizer.eos_id


@pytest.mark.parametrize("size", [None, (300, 200), (199, 401), (224, 224), (1000, 31)])
@pytest.mark.parametrize("name", PHOTOS + [WIDE])
def test_preprocessing_equals_clip_image_processor_pil(name, size):
    image = photo(name) if size is None else photo(name).resize(size)
    expected = transformers.CLIPImageProcessorPil()(images=image, return_tensors="pt").pixel_values[0]
    assert torch.equal(ImageProcessor()(image), expected)


def test_uncropped_preprocessing_equals_clip_image_processor_without_crop():
    image = photo(WIDE)
    expected = transformers.CLIPImageProcessorPil(do_center_crop=False)(images=image, return_tensors="pt")
    ours = ImageProcessor()
    assert torch.equal(ours.normalize(ours.resize(image)), expected.pixel_values[0])


def test_processor_configs_of_both_layouts_are_read(tmp_path):
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 240, "width": 230},
                                       image_mean=[0.5, 0.4, 0.3]).save_pretrained(tmp_path)
    read = ImageProcessor.from_directory(tmp_path)
    assert (read.shortest_edge, read.crop_size, read.mean) == (256, (240, 230), (0.5, 0.4, 0.3))
    hub = ImageProcessor.from_directory(write_tiny(tmp_path / "hub"))  # "size": 224, "crop_size": 224
    assert (hub.shortest_edge, hub.crop_size) == (224, (224, 224))


# ---------------------------------------------------------------------------------------------- model parity


@pytest.mark.parametrize("name", PHOTOS)
def test_model_matches_groupvit_model(checkpoint, name):
    directory, reference, pipe = checkpoint
    texts = [PROMPT.format(label) for label in LABELS]
    ids, pixels = reference_inputs(directory, photo(name), texts)
    assert torch.equal(pipe.tokenizer(texts), ids)
    ref_image, ref_seg = reference_outputs(reference, ids, pixels)
    with torch.no_grad():
        image_logits, seg_logits = pipe.model(ids, pixels)
    torch.testing.assert_close(image_logits, ref_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seg_logits, ref_seg, atol=1e-4, rtol=1e-4)
    # The test can fail: the mirrored image changes the reference's segmentation well beyond the tolerance.
    _, mirrored = reference_outputs(reference, ids, pixels.flip(-1))
    assert (mirrored - ref_seg).abs().max() > 100 * 1e-4


def test_parity_cases_are_discriminative(checkpoint):
    """In at least two test images the reference gives 5% or more of the pixels to a second label, so a
    99% mask agreement could not come from predicting one label everywhere."""
    directory, reference, _ = checkpoint
    minority = []
    for name in PHOTOS + [WIDE]:
        ids, pixels = reference_inputs(directory, photo(name), [PROMPT.format(label) for label in LABELS])
        winners = reference_outputs(reference, ids, pixels)[1][0].argmax(0).flatten()
        minority.append(1 - winners.bincount().max().item() / winners.numel())
    assert sum(share >= 0.05 for share in minority) >= 2, minority


@pytest.mark.parametrize("name", PHOTOS)
def test_segment_matches_reference_on_square_photos(checkpoint, name):
    directory, reference, pipe = checkpoint
    image = photo(name)
    ids, pixels = reference_inputs(directory, image, [PROMPT.format(label) for label in LABELS])
    ref_image, ref_seg = reference_outputs(reference, ids, pixels)
    seg = pipe.segment(image, LABELS, templates=[PROMPT], threshold=0.0)
    torch.testing.assert_close(seg.logits, ref_seg[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seg.logits_per_image, ref_image[0], atol=1e-4, rtol=1e-4)
    ref_mask = F.interpolate(ref_seg, size=(image.height, image.width), mode="bilinear").argmax(1)[0]
    assert seg.mask.shape == (image.height, image.width)
    assert agreement(seg.mask, ref_mask) >= 0.99


def test_segment_covers_a_wide_image_with_reference_windows(checkpoint):
    directory, reference, pipe = checkpoint
    image = photo(WIDE)
    ids, full = reference_inputs(directory, image, [PROMPT.format(label) for label in LABELS],
                                 do_center_crop=False)
    _, height, width = full[0].shape
    assert (height, window_starts(width, 224)) == (224, [0, 111])  # two overlapping windows
    summed = torch.zeros(len(LABELS), height, width)
    count = torch.zeros(height, width)
    for left in (0, 111):
        _, ref_seg = reference_outputs(reference, ids, full[..., left:left + 224])
        summed[:, :, left:left + 224] += ref_seg[0]
        count[:, left:left + 224] += 1
    expected = summed / count
    seg = pipe.segment(image, LABELS, templates=[PROMPT], threshold=0.0)
    torch.testing.assert_close(seg.logits, expected, atol=1e-4, rtol=1e-4)
    crop = transformers.CLIPImageProcessorPil()(images=image, return_tensors="pt").pixel_values
    ref_image, _ = reference_outputs(reference, ids, crop)
    torch.testing.assert_close(seg.logits_per_image, ref_image[0], atol=1e-4, rtol=1e-4)
    ref_mask = F.interpolate(expected[None], size=(image.height, image.width), mode="bilinear").argmax(1)[0]
    assert seg.mask.shape == (image.height, image.width)
    assert agreement(seg.mask, ref_mask) >= 0.99


def test_templates_are_averaged_then_renormalised(checkpoint):
    directory, reference, pipe = checkpoint
    templates = ["a photo of a {}.", "itap of a {}.", "art of the {}."]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    expected = []
    for label in LABELS:
        ids = tokenizer([t.format(label) for t in templates], padding=True, return_tensors="pt").input_ids
        with torch.no_grad():
            embeds = reference.get_text_features(input_ids=ids).pooler_output
        expected.append(F.normalize(embeds.mean(0), dim=-1))
    with torch.no_grad():
        ours = pipe.embed_labels(tuple(LABELS), tuple(templates))
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=1e-5)
    single = pipe.embed_labels(tuple(LABELS), tuple(templates[:1]))
    assert (ours - single).abs().max() > 1e-3  # the other templates count


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = write_tiny(tmp_path_factory.mktemp("tiny"))
    return directory, load(directory, read_config(directory), CPU, torch.float32)


def test_write_tiny_is_a_hub_layout_checkpoint_transformers_loads(tiny):
    directory, pipe = tiny
    model, info = transformers.GroupViTModel.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info
    assert read_config(directory)["text_config"]["eos_token_id"] == 2  # the hub's legacy pooling rule
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    texts = [PROMPT.format(label) for label in LABELS]
    assert tokenizer(texts).input_ids == [pipe.tokenizer.encode(t) for t in texts]
    image = photo("street.png").resize((448, 448))  # square: the reference's centre crop is the whole image
    pixels = transformers.CLIPImageProcessorPil.from_pretrained(directory)(images=image,
                                                                          return_tensors="pt").pixel_values
    ref_image, ref_seg = reference_outputs(model.eval(), pipe.tokenizer(texts), pixels)
    seg = pipe.segment(image, LABELS, templates=[PROMPT], threshold=0.0)
    torch.testing.assert_close(seg.logits, ref_seg[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seg.logits_per_image, ref_image[0], atol=1e-4, rtol=1e-4)


def test_tiny_tokenizer_is_the_same_in_every_process():
    code = "import json; from vlm.families.groupvit.tiny import train_tokenizer; print(json.dumps(train_tokenizer()))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[2]).stdout for _ in range(2)}
    assert len(runs) == 1 and json.loads(runs.pop()) == json.loads(json.dumps(train_tokenizer()))


def test_write_tiny_is_seeded_and_takes_overrides(tmp_path):
    a = write_tiny(tmp_path / "a", seed=1, vision_config={"depths": [2, 1, 1]}, projection_dim=8)
    b = write_tiny(tmp_path / "b", seed=1, vision_config={"depths": [2, 1, 1]}, projection_dim=8)
    c = write_tiny(tmp_path / "c", seed=2)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    config = read_config(a)
    assert config["vision_config"]["depths"] == [2, 1, 1] and config["projection_dim"] == 8
    assert config["vision_config"]["num_group_tokens"] == [16, 8, 0]  # untouched fields stay
    load(a, config, CPU, torch.float32)


def test_labels_are_cleaned_and_deduplicated(tiny):
    _, pipe = tiny
    assert clean_labels([" cat ", "Cat", "", "   ", "big   dog", "dog", "CAFÉ", "café"]) == \
        ("cat", "big dog", "dog", "CAFÉ")
    assert clean_labels("cat, dog,,grass ,") == ("cat", "dog", "grass")
    seg = pipe.segment(photo("cat.png"), ["cat", "CAT ", "", "dog"])
    assert seg.labels == ("cat", "dog") and seg.logits.shape[0] == 2


@pytest.mark.parametrize("labels", ["", " , ,", [], ["  "]])
def test_empty_labels_are_asked_for_as_the_label_box_takes_them(labels):
    with pytest.raises(InputError) as caught:
        clean_labels(labels)
    assert "cat, dog, grass" in str(caught.value) and "[" not in str(caught.value)  # typed as a box takes them


@pytest.mark.parametrize("labels, templates, threshold", [
    ([], None, 0.5), (["", "  "], None, 0.5), ([3], None, 0.5), (None, None, 0.5),
    (["cat"], ["no placeholder"], 0.5), (["cat"], [], 0.5), (["cat"], None, 1.5), (["cat"], None, -0.1),
])
def test_bad_inputs_raise_input_error(tiny, labels, templates, threshold):
    _, pipe = tiny
    with pytest.raises(InputError):
        pipe.segment(photo("cat.png"), labels, templates=templates, threshold=threshold)


def test_background_threshold(tiny):
    _, pipe = tiny
    image = photo("street.png")
    none = pipe.segment(image, LABELS, threshold=0.0)
    assert (none.mask != BACKGROUND).all() and none.background_area == 0.0
    confidence = F.interpolate(none.confidence[None, None], size=none.mask.shape, mode="bilinear")[0, 0]
    cut = (confidence.min() + confidence.max()).item() / 2
    some = pipe.segment(image, LABELS, threshold=cut)
    expected = confidence < cut
    assert 0 < expected.double().mean() < 1
    assert agreement(some.mask == BACKGROUND, expected) > 0.999
    assert abs(some.background_area - expected.double().mean().item()) < 1e-3
    kept = some.mask != BACKGROUND
    assert torch.equal(some.mask[kept], none.mask[kept])
    assert abs(float(some.areas.sum()) + some.background_area - 1.0) < 1e-9
    strict = pipe.segment(image, LABELS, threshold=1.0)  # capped at the best confidence: never all background
    assert 0 < (strict.mask != BACKGROUND).sum() < strict.mask.numel()


def test_segment_accepts_paths_and_bytes(tiny):
    _, pipe = tiny
    path = ASSETS / "shapes.png"
    from_path = pipe.segment(path, LABELS)
    from_bytes = pipe.segment(path.read_bytes(), LABELS)
    assert torch.equal(from_path.mask, from_bytes.mask) and from_path.image.size == (640, 480)


def test_missing_weights_are_reported(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    directory, _ = tiny
    for name in directory.iterdir():
        (tmp_path / name.name).write_bytes(name.read_bytes())
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["vision_model.encoder.stages.1.group_projector.0.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(MissingTensorError, match="group_projector"):
        load(tmp_path, read_config(tmp_path), CPU, torch.float32)


def test_config_sub_configs_are_read_from_either_key(tiny):
    directory, _ = tiny
    config = read_config(directory)
    old_style = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    old_style.update(text_config=None, text_config_dict=config["text_config"],
                     vision_config_dict=config["vision_config"])
    assert GroupViTConfig.from_dict(old_style) == GroupViTConfig.from_dict(config)
    assert GroupViTConfig.from_dict(config).text.hidden_size == 32  # not the default 256


def test_bfloat16_pipeline_agrees_with_float32(tiny):
    directory, pipe = tiny
    half = load(directory, read_config(directory), CPU, torch.bfloat16)
    image = photo("street.png").resize((448, 448))  # several labels win somewhere
    ours, reference = half.segment(image, LABELS, threshold=0.0), pipe.segment(image, LABELS, threshold=0.0)
    assert ours.logits.dtype == torch.float32 and agreement(ours.mask, reference.mask) > 0.9


def test_config_without_grouping_stage_is_rejected(tmp_path):
    directory = write_tiny(tmp_path)
    config = read_config(directory)
    config["vision_config"]["num_group_tokens"] = [0, 0, 0]
    with pytest.raises(CheckpointError, match="group tokens"):
        load(directory, config, CPU, torch.float32)


# ---------------------------------------------------------------------------------------------- label map


@pytest.mark.parametrize("size", [(448, 448), (667, 1000), (100, 80), (3, 7), (224, 335), (5, 2)])
def test_bilinear_equals_interpolate(size):
    x = torch.randn(3, 224, 335)
    expected = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
    ours = bilinear(x, resize_index(224, size[0]), size[1])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_label_map_in_row_chunks_equals_full_resize():
    logits, confidence = torch.randn(5, 24, 40), torch.rand(24, 40)
    size = (2000, 3001)  # several row chunks
    mask = label_map(logits, confidence, 0.0, size)
    expected = F.interpolate(logits[None], size=size, mode="bilinear").argmax(1)[0]
    assert agreement(mask, expected) > 0.9999
