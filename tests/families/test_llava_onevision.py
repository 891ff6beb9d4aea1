"""LLaVA-OneVision parity with transformers: input_ids, pixel values and greedy tokens on tiny random configs."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vlm
import vlm.tiny
from tests.parity import assert_same_greedy, greedy_tokens, reference_greedy, reference_pair
from vlm.errors import InputError

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA 4:2, tied embeddings; tiles of 32 px = 4x4 patches; last vision layer; anyres_max_9
    "gqa2": dict(seed=1),
    # GQA 3:1, untied, an embedding larger than the tokenizer (as on the hub); tiles of 20 px = 5x5 patches
    # (odd: pooled to 3x3); two vision layers; anyres_max_4
    "gqa3": dict(seed=2, tie_word_embeddings=False,
                 text=dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1, intermediate_size=160,
                           vocab_size=512),
                 vision=dict(hidden_size=24, num_attention_heads=2, image_size=20, patch_size=4),
                 top=dict(vision_feature_layer=[-3, -1], vision_aspect_ratio="anyres_max_4")),
}
STEPS = 12
PANCAKE_FRAMES = 310  # flipping_a_pancake.mkv (its header has no frame count; see ../shared/media/README.md)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return vlm.tiny.write("llava_onevision", tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return reference_pair("LlavaOnevisionForConditionalGeneration", checkpoint)


def _image_conv(paths, text="What is in the picture?"):
    images = [{"type": "image", "path": p} for p in paths]
    return [{"role": "user", "content": [*images, {"type": "text", "text": text}]}]


def _reference_conv(conv):
    """The model card's form: PIL images, and every content a list of parts."""
    def part(p):
        return {"type": "image", "image": Image.open(p["path"])} if p["type"] == "image" else p
    return [{**m, "content": [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str)
             else [part(p) for p in m["content"]]} for m in conv]


def _check(ours, reference, conversations):
    model, processor = reference
    processor.tokenizer.padding_side = "left"
    ref_inputs = processor.apply_chat_template([_reference_conv(c) for c in conversations], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})
    our_inputs = ours.encode(conversations)
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    for key in ("pixel_values", "image_sizes", "batch_num_images"):
        assert (key in our_inputs) == (key in ref_inputs)
        if key in ref_inputs:
            torch.testing.assert_close(our_inputs[key].to(ref_inputs[key].dtype), ref_inputs[key], atol=1e-6, rtol=0)
    return _same_tokens(ours, model, ref_inputs, conversations)


def _same_tokens(ours, model, ref_inputs, conversations, **media):
    theirs, gaps = reference_greedy(model, ref_inputs, STEPS)
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False, **media)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, theirs[row], gaps[row], ours.stop_ids)
    return theirs


def test_one_image(ours, reference, media_dir):
    _check(ours, reference, [_image_conv([f"{media_dir}/extreme_ironing.jpg"])])
    _check(ours, reference, [_image_conv([f"{media_dir}/llava_v1_5_radar.jpg"], "Which model is best?")])


def test_two_images(ours, reference, media_dir):
    _check(ours, reference, [_image_conv([f"{media_dir}/waterview.jpg", f"{media_dir}/coco.jpg"], "Compare them.")])


def test_multi_turn(ours, reference, media_dir):
    conv = _image_conv([f"{media_dir}/llava_v1_5_radar.jpg"], "What chart is this?") + [
        {"role": "assistant", "content": "A radar chart of benchmark scores."},  # a plain string, as a UI sends it
        {"role": "user", "content": [{"type": "text", "text": "Which model wins?"}]},
    ]
    _check(ours, reference, [conv])
    conv += [{"role": "assistant", "content": [{"type": "text", "text": "LLaVA-1.5."}]},
             {"role": "user", "content": [{"type": "image", "path": f"{media_dir}/voc.jpg"},
                                          {"type": "text", "text": "And this one?"}]}]
    _check(ours, reference, [conv])


def test_left_padded_batch(ours, reference, media_dir):
    short = [{"role": "user", "content": "Hi"}]
    _check(ours, reference, [short, _image_conv([f"{media_dir}/extreme_ironing.jpg"], "Describe it in detail.")])
    # Patch counts padded across the batch: 1 image with AnyRes tiles next to 2 images of one tile each.
    _check(ours, reference, [_image_conv([f"{media_dir}/waterview.jpg"]),
                             _image_conv([f"{media_dir}/ctx.jpg", f"{media_dir}/coco.jpg"], "Hm?")])


def test_the_test_sees_the_image(ours, reference, media_dir, tmp_path):
    """Discrimination: the reference's tokens change when the image is mirrored, so matching means something."""
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(f"{media_dir}/extreme_ironing.jpg").convert("RGB")).save(mirrored)
    original = _check(ours, reference, [_image_conv([f"{media_dir}/extreme_ironing.jpg"])])
    flipped = _check(ours, reference, [_image_conv([str(mirrored)])])
    assert original != flipped


def test_video(ours, reference, media_dir):
    model, processor = reference
    path = f"{media_dir}/video/flipping_a_pancake.mkv"
    indices = np.arange(8) * PANCAKE_FRAMES // 8  # the reference's uniform sampling of 8 frames
    frames, _ = transformers.video_utils.load_video(path, backend="pyav", sample_indices_fn=lambda **_: indices)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                          "text": "What happens?"}]}], add_generation_prompt=True, tokenize=False)
    ref_inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    conv = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "What happens?"}]}]
    our_inputs = ours.encode(conv, num_frames=8)
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    torch.testing.assert_close(our_inputs["pixel_values_videos"], ref_inputs["pixel_values_videos"], atol=1e-5, rtol=0)
    _same_tokens(ours, model, ref_inputs, conv, num_frames=8)


def test_nested_and_sharded_layouts_match_hub(checkpoint, ours, reference, media_dir, tmp_path):
    """transformers' save_pretrained (nested processor_config, rope_parameters, dtype) and a sharded copy load
    to the same tokens as the hub layout."""
    model, processor = reference
    nested = tmp_path / "nested"
    model.save_pretrained(nested, max_shard_size="100KB")
    processor.save_pretrained(nested)
    config = json.loads((nested / "config.json").read_text())
    assert "rope_parameters" in config["text_config"] and os.path.exists(nested / "model.safetensors.index.json")
    assert not (nested / "preprocessor_config.json").exists()
    conv = [_image_conv([f"{media_dir}/waterview.jpg"])]
    assert greedy_tokens(vlm.load(nested, dtype="float32"), conv, STEPS) == greedy_tokens(ours, conv, STEPS)


def test_placeholder_feature_mismatch_is_an_error(checkpoint, media_dir, tmp_path):
    """A processor that counts other placeholders than the model makes features is refused, never truncated."""
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    settings = json.loads((copy / "processor_config.json").read_text())
    (copy / "processor_config.json").write_text(json.dumps({**settings, "vision_aspect_ratio": "anyres_max_1"}))
    with pytest.raises(InputError, match="placeholder"):
        vlm.load(copy, dtype="float32").generate(_image_conv([f"{media_dir}/extreme_ironing.jpg"]), max_new_tokens=2)


def test_transformers_in_memory_names_load(checkpoint, ours, reference, media_dir, tmp_path):
    """Tensors under the names transformers 5 uses in memory (`model.language_model.*`, ...) load the same."""
    from safetensors.torch import save_file

    model, _ = reference
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    save_file({k: v.clone().contiguous() for k, v in model.state_dict().items()}, str(copy / "model.safetensors"))
    conv = [_image_conv([f"{media_dir}/extreme_ironing.jpg"])]
    assert greedy_tokens(vlm.load(copy, dtype="float32"), conv, STEPS) == greedy_tokens(ours, conv, STEPS)


def test_stream_matches_generate(ours, media_dir):
    conv = _image_conv([f"{media_dir}/coco.jpg"])
    assert "".join(ours.stream(conv, max_new_tokens=STEPS)) == ours.generate(conv, max_new_tokens=STEPS)[0].text


@pytest.fixture(scope="module")
def default_strategy(tmp_path_factory):
    """A checkpoint with the 'default' feature strategy (drops the first patch) and a short context."""
    path = vlm.tiny.write("llava_onevision", tmp_path_factory.mktemp("default"), seed=3,
                          text=dict(max_position_embeddings=512), top=dict(vision_feature_select_strategy="default"))
    return path, vlm.load(path, dtype="float32")


def test_default_strategy_matches_on_several_images(default_strategy, media_dir):
    """'default' works for multi-image prompts; for one image (AnyRes) the reference fails, and so do we, clearly."""
    path, ours = default_strategy
    _check(ours, reference_pair("LlavaOnevisionForConditionalGeneration", path), [_image_conv([f"{media_dir}/waterview.jpg", f"{media_dir}/coco.jpg"])])
    with pytest.raises(vlm.errors.UnsupportedModelError, match="default"):
        ours.generate(_image_conv([f"{media_dir}/waterview.jpg"]), max_new_tokens=2)


def test_video_longer_than_the_context_is_refused(default_strategy, media_dir):
    """Every frame (the reference's default) would overflow the context: refused before decoding, with advice."""
    _, ours = default_strategy
    conv = [{"role": "user", "content": [{"type": "video", "path": f"{media_dir}/video/flipping_a_pancake.mkv"}]}]
    with pytest.raises(InputError, match="num_frames"):
        ours.encode(conv)
