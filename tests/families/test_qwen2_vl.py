"""Qwen2-VL parity with transformers: input_ids, pixel values and greedy tokens on tiny random configs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image, ImageOps

import vlm
import vlm.tiny
from tests.parity import (assert_same_greedy, image_conv, multi_turn_conv, opened, original_text_after_video,
                          padded_batch, reference_greedy)

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA 4:2, head_dim 16, mrope [2,3,3], patch 14 / merge 2
    "gqa2": dict(seed=1),
    # GQA 3:1, head_dim 32, mrope [4,6,6], patch 16 / merge 2, other pixel bounds
    "gqa3": dict(seed=2, text=dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                                   intermediate_size=160, mrope_section=[4, 6, 6]),
                 vision=dict(patch_size=16, embed_dim=48, num_heads=2, depth=3),
                 processor=dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 30)),
    # MHA 2:2, head_dim 32, mrope [8,4,4], patch 8 / merge 3
    "merge3": dict(seed=3, text=dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                     mrope_section=[8, 4, 4], num_hidden_layers=3),
                   vision=dict(patch_size=8, spatial_merge_size=3, embed_dim=24, num_heads=3),
                   processor=dict(min_pixels=24 * 24 * 4, max_pixels=24 * 24 * 25)),
}
STEPS = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    original_text_after_video(model)  # the trained models' rule for the text after a video
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    return model, processor


def _reference_inputs(processor, conversations, **kwargs):
    """Reference processor inputs; image paths are opened as PIL images (as the model card does)."""
    processor.tokenizer.padding_side = "left"
    return processor.apply_chat_template([opened(c) for c in conversations], add_generation_prompt=True,
                                         tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"padding": True}, **kwargs)


def _check(ours, reference, conversations):
    model, processor = reference
    ref_inputs = _reference_inputs(processor, conversations)
    our_inputs = ours.encode(conversations)
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    for key in ("pixel_values", "image_grid_thw"):
        if key in ref_inputs:
            torch.testing.assert_close(our_inputs[key].to(ref_inputs[key].dtype), ref_inputs[key], atol=1e-5, rtol=0)
    theirs, gaps = reference_greedy(model, ref_inputs, STEPS, repetition_penalty=1.0)
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, theirs[row], gaps[row], ours.stop_ids)
    return theirs


def test_one_image(ours, reference, media_dir):
    _check(ours, reference, [image_conv([f"{media_dir}/extreme_ironing.jpg"])])


def test_two_images(ours, reference, media_dir):
    _check(ours, reference, [image_conv([f"{media_dir}/waterview.jpg", f"{media_dir}/coco.jpg"], "Compare them.")])


def test_multi_turn(ours, reference, media_dir):
    _check(ours, reference, [multi_turn_conv(media_dir)])


def test_left_padded_batch(ours, reference, media_dir):
    _check(ours, reference, padded_batch(media_dir))
    _check(ours, reference, [image_conv([f"{media_dir}/coco.jpg"]), image_conv([f"{media_dir}/waterview.jpg"], "Hm?")])


def test_the_test_sees_the_image(ours, reference, media_dir, tmp_path):
    """Discrimination: the reference's tokens change when the image is mirrored, so matching means something."""
    model, processor = reference
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(f"{media_dir}/extreme_ironing.jpg").convert("RGB")).save(mirrored)
    original = _check(ours, reference, [image_conv([f"{media_dir}/extreme_ironing.jpg"])])
    flipped = _check(ours, reference, [image_conv([str(mirrored)])])
    assert original != flipped


@pytest.fixture(scope="module")
def pancake_frames(media_dir):
    """Every frame of the Matroska video (its stream reports no frame count, so decode them all)."""
    import av
    import numpy as np

    with av.open(f"{media_dir}/video/flipping_a_pancake.mkv") as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(frames) == 310
    return frames


@pytest.mark.parametrize("sampling", [{}, {"num_frames": 6}])
def test_video(ours, reference, media_dir, pancake_frames, sampling):
    """Our lazily sampled video equals the reference fed all frames with fps 2 (or num_frames) sampling."""
    model, processor = reference
    path = f"{media_dir}/video/flipping_a_pancake.mkv"
    question = [{"type": "text", "text": "What happens?"}]
    conv = [{"role": "user", "content": [{"type": "video", "path": path}, *question]}]
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}, *question]}],
                                         add_generation_prompt=True, tokenize=False)
    metadata = transformers.video_utils.VideoMetadata(total_num_frames=310, fps=30.0)
    ref_inputs = processor(text=[text], videos=[pancake_frames], video_metadata=[metadata], do_sample_frames=True,
                           return_tensors="pt", **(sampling or {"fps": 2.0}))
    our_inputs = ours.encode(conv, **sampling)
    assert our_inputs["video_grid_thw"].tolist() == ref_inputs["video_grid_thw"].tolist()
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    torch.testing.assert_close(our_inputs["pixel_values_videos"], ref_inputs["pixel_values_videos"], atol=1e-5, rtol=0)
    rope_args = (ref_inputs["input_ids"], ref_inputs["mm_token_type_ids"], None, ref_inputs["video_grid_thw"])
    assert torch.equal(our_inputs["positions"], model.model.get_rope_index(*rope_args)[0])
    theirs, gaps = reference_greedy(model, ref_inputs, STEPS, repetition_penalty=1.0)
    ours_out = ours.generate(conv, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0, **sampling)[0]
    assert_same_greedy(ours_out.token_ids, theirs[0], gaps[0], ours.stop_ids)


def test_text_after_a_video_starts_after_its_last_frame_group(checkpoint, ours, media_dir):
    """At 2 fps the clip has 10 frame groups over a grid at most 7 merged tokens wide: the original rule (text at
    the largest position + 1) and the pinned reference's (at start + max(h, w) / merge) part here."""
    conv = [{"role": "user", "content": [{"type": "video", "path": f"{media_dir}/video/flipping_a_pancake.mkv"},
                                         {"type": "text", "text": "What happens?"}]}]
    inputs = ours.encode(conv)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    merge = ours.build_inputs.settings.merge_size
    assert t - 1 > max(h, w) // merge
    video = inputs["input_ids"][0] == ours.model.video_token_id
    after = int(video.nonzero().max()) + 1
    assert inputs["positions"][:, 0, after].tolist() == [int(inputs["positions"][:, 0, video].max()) + 1] * 3
    unpatched = transformers.Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    types = video.long()[None] * 2
    positions, _ = unpatched.model.get_rope_index(inputs["input_ids"], types, None, inputs["video_grid_thw"])
    assert not torch.equal(positions, inputs["positions"])


def test_nested_and_sharded_layouts_match_flat(checkpoint, ours, reference, media_dir, tmp_path):
    """transformers' save_pretrained (nested config, rope_parameters) and a sharded copy load to the same tokens."""
    model, processor = reference
    nested = tmp_path / "nested"
    model.save_pretrained(nested, max_shard_size="100KB")
    processor.save_pretrained(nested)
    config = json.loads((nested / "config.json").read_text())
    assert "text_config" in config and os.path.exists(nested / "model.safetensors.index.json")
    conv = [image_conv([f"{media_dir}/coco.jpg"])]
    expected = ours.generate(conv, max_new_tokens=STEPS, do_sample=False)[0].token_ids
    assert vlm.load(nested, dtype="float32").generate(conv, max_new_tokens=STEPS, do_sample=False)[0].token_ids == expected


def test_the_test_sees_mrope_positions(ours, reference, media_dir, monkeypatch):
    """Discrimination: with plain 1-D positions our tokens no longer match the reference."""
    conv = [image_conv([f"{media_dir}/extreme_ironing.jpg"])]
    model, processor = reference
    theirs, _ = reference_greedy(model, _reference_inputs(processor, conv), STEPS, repetition_penalty=1.0)
    build = ours.build_inputs

    def one_d(*args, **kwargs):
        inputs = build(*args, **kwargs)
        mask = inputs["attention_mask"]
        inputs["positions"] = ((mask.cumsum(-1) - 1).clamp(min=0))[None].expand(3, -1, -1)
        inputs["next_position"] = mask.sum(-1)
        return inputs

    monkeypatch.setattr(ours, "build_inputs", one_d)
    assert ours.generate(conv, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0)[0].token_ids != theirs[0]
