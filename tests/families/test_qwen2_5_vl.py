"""Qwen2.5-VL parity with transformers: input_ids, pixel values, 3-D positions and greedy tokens on tiny random
configs (windows smaller and larger than the images, full-attention blocks not at the end, GQA ratios, head
dims, mrope sections, tokens_per_second), videos at 2 and 3 fps, the flat hub, nested and sharded layouts.

The reference is transformers 5.23 (pinned in requirements-dev.txt) with its text-after-video position rule
corrected to the original one (`tests.parity.original_text_after_video`).
"""

from __future__ import annotations

import itertools
import json

import av
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vlm
import vlm.tiny
from tests.parity import (assert_same_greedy, image_conv, multi_turn_conv, opened, original_text_after_video,
                          padded_batch, reference_greedy)

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # windows of 2x2 merged tokens (every image spans several), full attention in block 0 of 3; GQA 4:2,
    # head_dim 16, mrope [2,3,3], 2 tokens per second
    "win2": dict(seed=1),
    # windows of 3x3 (patch 16: 112 px // 2 // 16); full attention in block 1 of 3; GQA 3:1, head_dim 32,
    # mrope [4,6,6], vision head_dim 24, 4 tokens per second
    "win3": dict(seed=2, text=dict(hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
                                   intermediate_size=160, mrope_section=[4, 6, 6]),
                 vision=dict(patch_size=16, hidden_size=48, num_heads=2, intermediate_size=64, window_size=112,
                             fullatt_block_indexes=[1], tokens_per_second=4),
                 processor=dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 30)),
    # merge 3, patch 8, windows of 4x4 merged tokens (small images fit one), full attention in blocks 0 and 2
    # of 4; MHA 2:2, head_dim 32, mrope [8,4,4], 3 layers, 3 tokens per second
    "merge3": dict(seed=3, text=dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                                     mrope_section=[8, 4, 4], num_hidden_layers=3),
                   vision=dict(patch_size=8, spatial_merge_size=3, hidden_size=24, num_heads=3, intermediate_size=40,
                               depth=4, window_size=96, fullatt_block_indexes=[0, 2], tokens_per_second=3),
                   processor=dict(min_pixels=24 * 24 * 4, max_pixels=24 * 24 * 25)),
}
STEPS = 12
PANCAKE = "video/flipping_a_pancake.mkv"  # 310 frames at 30 fps


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def config(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(config, tmp_path_factory):
    return vlm.tiny.write("qwen2_5_vl", tmp_path_factory.mktemp(config), **CONFIGS[config])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    original_text_after_video(model)
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    processor.tokenizer.padding_side = "left"
    return model, processor


@pytest.fixture(scope="module")
def pancake_frames(media_dir):
    """Every frame of the Matroska video (its stream reports no frame count, so decode them all)."""
    with av.open(f"{media_dir}/{PANCAKE}") as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(frames) == 310
    return frames


def _compare(ours, reference, ref_inputs, conversations, **options) -> list[list[int]]:
    """Same ids, pixels, grids, seconds per frame group and positions; the same greedy tokens."""
    model, _ = reference
    our_inputs = ours.encode(conversations, **options)
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert (key in our_inputs) == (key in ref_inputs), key
        if key in ref_inputs:
            torch.testing.assert_close(our_inputs[key].to(ref_inputs[key].dtype), ref_inputs[key], atol=1e-5, rtol=0)
    positions, _ = model.model.get_rope_index(
        ref_inputs["input_ids"], ref_inputs["mm_token_type_ids"], ref_inputs.get("image_grid_thw"),
        ref_inputs.get("video_grid_thw"), ref_inputs.get("second_per_grid_ts"), ref_inputs["attention_mask"])
    valid = ref_inputs["attention_mask"].bool()
    assert torch.equal(our_inputs["positions"][:, valid], positions[:, valid])
    theirs, gaps = reference_greedy(model, dict(ref_inputs), STEPS, repetition_penalty=1.0)
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0, **options)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, theirs[row], gaps[row], ours.stop_ids)
    return theirs


def _check(ours, reference, conversations) -> list[list[int]]:
    _, processor = reference
    ref_inputs = processor.apply_chat_template([opened(c) for c in conversations], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})
    return _compare(ours, reference, ref_inputs, conversations)


def _video_inputs(reference, frames, content, fps, images=None):
    """The reference's inputs for one user message (`content` with bare {"type": "video"/"image"} parts),
    sampling the decoded frames at `fps` from their metadata as its video processor does."""
    _, processor = reference
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    metadata = transformers.video_utils.VideoMetadata(total_num_frames=310, fps=30.0)
    return processor(text=[text], images=images, videos=[frames], return_tensors="pt",
                     videos_kwargs={"video_metadata": [metadata], "do_sample_frames": True, "fps": fps})


def test_one_image(ours, reference, media_dir):
    assert ours.family == "qwen2_5_vl"
    _check(ours, reference, [image_conv([f"{media_dir}/extreme_ironing.jpg"])])


def test_windows_differ_from_full_attention(ours, media_dir):
    """The configs exercise window attention: an image spans several windows in every config."""
    from vlm.families.qwen2_5_vl.vision import window_order

    grid = ours.encode(image_conv([f"{media_dir}/extreme_ironing.jpg"]))["image_grid_thw"]
    cfg = ours.model.visual.cfg
    merge = cfg.spatial_merge_size
    order, windows = window_order(grid, merge, cfg.window_size // merge // cfg.patch_size)
    assert len(windows) > 1 and sum(windows) == int(grid.prod()) and sorted(order.tolist()) == list(range(len(order)))


@pytest.mark.parametrize("window_size, patch, merge", [(112, 14, 2), (56, 14, 2), (96, 8, 3), (112, 16, 2)])
def test_window_order_matches_the_reference(window_size, patch, merge):
    """Windows cut per frame group, edges smaller, sizes that are and are not multiples of the window."""
    from transformers.vision_utils import get_vision_window_index

    from vlm.families.qwen2_5_vl.vision import window_order

    m = merge
    grid = torch.tensor([[1, 8 * m, 8 * m], [2, 6 * m, 10 * m], [1, m, m], [3, 8 * m, 4 * m], [1, 5 * m, m]])
    order, windows = window_order(grid, m, window_size // m // patch)
    ref_order, ref_bounds = get_vision_window_index(grid, m, window_size, patch)
    assert torch.equal(order, ref_order)
    assert [0, *itertools.accumulate(windows)] == ref_bounds.tolist()


def test_two_images_of_different_sizes(ours, reference, media_dir):
    conv = image_conv([f"{media_dir}/waterview.jpg", f"{media_dir}/llava_v1_5_radar.jpg"], "Compare them.")
    grids = ours.encode(conv)["image_grid_thw"]
    assert not torch.equal(grids[0], grids[1])
    _check(ours, reference, [conv])


def test_small_image_in_one_window(ours, reference, media_dir, tmp_path):
    """A small image: 2x3 merged tokens, one window in the win3 and merge3 configs, two in win2."""
    small = tmp_path / "small.png"
    Image.open(f"{media_dir}/coco.jpg").convert("RGB").resize((40, 30)).save(small)
    _check(ours, reference, [image_conv([str(small)])])


def test_multi_turn(ours, reference, media_dir):
    _check(ours, reference, [multi_turn_conv(media_dir)])


def test_left_padded_batch(ours, reference, media_dir):
    _check(ours, reference, padded_batch(media_dir))


def test_the_test_sees_the_image(ours, reference, media_dir, tmp_path):
    """Discrimination: the reference's tokens change when the image is mirrored, so matching means something."""
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(f"{media_dir}/extreme_ironing.jpg").convert("RGB")).save(mirrored)
    original = _check(ours, reference, [image_conv([f"{media_dir}/extreme_ironing.jpg"])])
    assert original != _check(ours, reference, [image_conv([str(mirrored)])])


@pytest.mark.parametrize("fps", [2.0, 3.0])
def test_video(ours, reference, media_dir, pancake_frames, fps):
    """Time-aligned M-RoPE at a whole and a fractional interval (2 / sampled fps seconds per frame group),
    with text after the video whose temporal positions go past its height and width."""
    question = [{"type": "text", "text": "What happens?"}]
    ref_inputs = _video_inputs(reference, pancake_frames, [{"type": "video"}, *question], fps)
    conv = [{"role": "user", "content": [{"type": "video", "path": f"{media_dir}/{PANCAKE}"}, *question]}]
    seconds = float(ref_inputs["second_per_grid_ts"][0])
    assert seconds != round(seconds)  # 2 fps of a 30 fps clip samples 20 of 310 frames: 1.03 s per group
    _compare(ours, reference, ref_inputs, [conv], fps=fps)
    t, h, w = ref_inputs["video_grid_thw"][0].tolist()
    merge = ours.build_inputs.settings.merge_size
    tokens_per_second = ours.model.visual.cfg.tokens_per_second
    assert (t - 1) * seconds * tokens_per_second > max(h, w) // merge  # where the two position rules part


def test_image_and_video_in_one_message(ours, reference, media_dir, pancake_frames):
    image = f"{media_dir}/coco.jpg"
    parts = [{"type": "text", "text": "Is the picture in the video?"}]
    ref_inputs = _video_inputs(reference, pancake_frames, [{"type": "image"}, {"type": "video"}, *parts], 2.0,
                               images=[Image.open(image)])
    conv = [{"role": "user", "content": [{"type": "image", "path": image},
                                         {"type": "video", "path": f"{media_dir}/{PANCAKE}"}, *parts]}]
    _compare(ours, reference, ref_inputs, [conv], fps=2.0)


def test_the_reference_patch_matters_after_a_video(ours, reference, media_dir, pancake_frames, checkpoint):
    """Discrimination: the unpatched reference (5.3+ rule) places the text after the video elsewhere."""
    model, _ = reference
    ref_inputs = _video_inputs(reference, pancake_frames, [{"type": "video"}, {"type": "text", "text": "Hm?"}], 2.0)
    args = (ref_inputs["input_ids"], ref_inputs["mm_token_type_ids"], None, ref_inputs["video_grid_thw"],
            ref_inputs["second_per_grid_ts"], ref_inputs["attention_mask"])
    unpatched = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    assert not torch.equal(model.model.get_rope_index(*args)[0], unpatched.model.get_rope_index(*args)[0])


def test_layouts_match(config, checkpoint, ours, reference, media_dir, tmp_path):
    """transformers' save_pretrained (nested config, rope_parameters, processor_config.json, shards) and a sharded
    copy of the flat hub layout load to the same tokens as the flat hub layout."""
    model, processor = reference
    nested = tmp_path / "nested"
    model.save_pretrained(nested, max_shard_size="100KB")
    processor.save_pretrained(nested)
    nested_config = json.loads((nested / "config.json").read_text())
    assert "text_config" in nested_config and (nested / "model.safetensors.index.json").exists()
    flat = json.loads((checkpoint / "config.json").read_text())
    assert "text_config" not in flat and flat["rope_scaling"]["type"] == "mrope"
    sharded = vlm.tiny.write("qwen2_5_vl", tmp_path / "sharded", shard_bytes=50_000, **CONFIGS[config])
    assert len(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    conv = [image_conv([f"{media_dir}/coco.jpg"])]
    expected = ours.generate(conv, max_new_tokens=STEPS, do_sample=False)[0].token_ids
    for directory in (nested, sharded):
        assert vlm.load(directory, dtype="float32").generate(conv, max_new_tokens=STEPS,
                                                             do_sample=False)[0].token_ids == expected


def test_boxes_are_in_pixels_of_the_resized_image(ours, media_dir):
    """A box answer maps from the resized image the model saw back onto the original picture."""
    path = f"{media_dir}/extreme_ironing.jpg"
    width, height = Image.open(path).size
    grid = ours.encode(image_conv([path]))["image_grid_thw"][0]
    patch = ours.build_inputs.settings.patch_size
    resized = (int(grid[2]) * patch, int(grid[1]) * patch)
    assert ours.box_frame(width, height) == resized != (width, height)
    x2, y2 = resized
    (box,) = ours.boxes(f'```json\n[{{"bbox_2d": [0, 0, {x2 // 2}, {y2}], "label": "left half"}}]\n```',
                        (width, height))
    assert box.label == "left half" and box.pixels(width, height) == (0, 0, round(x2 // 2 / x2 * width), height)
    small = ours.box_frame(width, height, max_pixels=28 * 28 * 4)
    assert small[0] * small[1] < resized[0] * resized[1]  # the request's pixel bound changes the frame
