"""GLM-4.1V parity with transformers (input_ids, pixel values, greedy tokens) on tiny random configs, the
config layouts, and the thinking / box plumbing of the pipeline."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, ImageOps

import vlm
import vlm.tiny
from tests.parity import assert_same_greedy, reference_greedy
from tests.scripted import script
from vlm.boxes import parse_boxes
from vlm.errors import InputError
from vlm.media import probe_video

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # text: MHA-free GQA 2:1, head_dim 32, rotary 16 dims in mrope [2,3,3]; vision: 2 heads, 6x6 position table
    "small": dict(seed=1),
    # text: GQA 4:2, head_dim 24, rotary 12 dims in mrope [2,2,2], 3 layers; vision: 3 heads, depth 3, 8x8 table
    "wide": dict(seed=4, text=dict(hidden_size=96, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
                                   num_hidden_layers=3, mrope_section=[2, 2, 2]),
                 vision=dict(hidden_size=48, num_heads=3, depth=3, intermediate_size=80, image_size=112),
                 image_size=dict(longest_edge=2 * 28 * 28 * 30), video_size=dict(longest_edge=300_000)),
}
STEPS = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return vlm.tiny.write("glm4v", tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor = transformers.AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
    processor.tokenizer.padding_side = "left"
    return model, processor


def _image_conv(paths, text="What is in the picture?"):
    return [{"role": "user",
             "content": [*({"type": "image", "path": p} for p in paths), {"type": "text", "text": text}]}]


def _opened(conv):
    """The conversation as the model card passes it: images opened as PIL images."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else [
        {"type": "image", "image": Image.open(p["path"])} if p["type"] == "image" else p for p in m["content"]]}
        for m in conv]


def _compare(ours, model, ref_inputs, conversations) -> list[list[int]]:
    our_inputs = ours.encode(conversations)
    assert our_inputs["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    assert our_inputs["mm_token_type_ids"].tolist() == ref_inputs["mm_token_type_ids"].tolist()
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert (key in our_inputs) == (key in ref_inputs), key
        if key in ref_inputs:
            torch.testing.assert_close(our_inputs[key].to(ref_inputs[key].dtype), ref_inputs[key], atol=1e-5, rtol=0)
    positions, _ = model.model.get_rope_index(ref_inputs["input_ids"], ref_inputs["mm_token_type_ids"],
                                              ref_inputs.get("image_grid_thw"), ref_inputs.get("video_grid_thw"),
                                              ref_inputs["attention_mask"])
    valid = ref_inputs["attention_mask"].bool()
    assert torch.equal(our_inputs["positions"][:, valid], positions[:, valid])
    theirs, gaps = reference_greedy(model, dict(ref_inputs), STEPS)  # the checkpoint's repetition_penalty 1.1
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, theirs[row], gaps[row], ours.stop_ids)
    return theirs


def _check(ours, reference, conversations) -> list[list[int]]:
    model, processor = reference
    ref_inputs = processor.apply_chat_template([_opened(c) for c in conversations], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt",
                                               processor_kwargs={"padding": True})
    return _compare(ours, model, ref_inputs, conversations)


def test_one_image(ours, reference, media_dir):
    assert ours.family == "glm4v"
    _check(ours, reference, [_image_conv([f"{media_dir}/extreme_ironing.jpg"])])


def test_two_images_and_a_second_turn(ours, reference, media_dir):
    conv = _image_conv([f"{media_dir}/waterview.jpg", f"{media_dir}/llava_v1_5_radar.jpg"], "Compare them.") + [
        {"role": "assistant", "content": "A lake, and a radar chart."},
        {"role": "user", "content": [{"type": "image", "path": f"{media_dir}/voc.jpg"},
                                     {"type": "text", "text": "And this one?"}]}]
    _check(ours, reference, [conv])


def test_left_padded_batch(ours, reference, media_dir):
    _check(ours, reference, [[{"role": "user", "content": "Hi"}],
                             _image_conv([f"{media_dir}/ctx.jpg", f"{media_dir}/coco.jpg"], "Describe both pictures.")])


def test_the_test_sees_the_image(ours, reference, media_dir, tmp_path):
    """Discrimination: mirroring the image changes the reference's tokens, so matching them means something."""
    mirrored = tmp_path / "mirrored.png"
    ImageOps.mirror(Image.open(f"{media_dir}/extreme_ironing.jpg").convert("RGB")).save(mirrored)
    original = _check(ours, reference, [_image_conv([f"{media_dir}/extreme_ironing.jpg"])])
    assert original != _check(ours, reference, [_image_conv([str(mirrored)])])


def test_video(ours, reference, media_dir):
    """The reference samples the frames (from the same metadata) and gets them decoded by PyAV here."""
    model, processor = reference
    path = f"{media_dir}/video/flipping_a_pancake.mkv"
    info = probe_video(path)
    metadata = transformers.video_utils.VideoMetadata(
        total_num_frames=info.num_frames, fps=info.fps, duration=info.duration, width=info.width, height=info.height)
    metadata.frames_indices = processor.video_processor.sample_frames(metadata)
    frames = _decode(path, metadata.frames_indices.tolist())
    question = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    text = processor.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    ref_inputs = processor(text=[text], videos=[frames], videos_kwargs={"video_metadata": [metadata],
                                                                        "do_sample_frames": False}, return_tensors="pt")
    assert "<|end_of_image|>9" in processor.tokenizer.decode(ref_inputs["input_ids"][0])  # 20 frames, 2 fps
    conv = [{"role": "user", "content": [{"type": "video", "path": path}, {"type": "text", "text": "What happens?"}]}]
    _compare(ours, model, ref_inputs, [conv])


def _decode(path: str, indices: list[int]) -> np.ndarray:
    wanted, frames = set(indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    return np.stack([frames[i] for i in indices])


def test_layouts_match(checkpoint, ours, reference, media_dir, tmp_path):
    """transformers' save_pretrained (rope_parameters, processor_config.json, shards) and a flat config.json
    with older tensor names load to the same tokens as the hub layout."""
    model, processor = reference
    nested = tmp_path / "nested"
    model.save_pretrained(nested, max_shard_size="200KB")
    processor.save_pretrained(nested)
    config = json.loads((nested / "config.json").read_text())
    assert "rope_parameters" in config["text_config"] and (nested / "processor_config.json").exists()
    flat = tmp_path / "flat"
    vlm.tiny.write("glm4v", flat, flat=True, **CONFIGS[checkpoint.name.rstrip("0123456789")])
    assert "text_config" not in json.loads((flat / "config.json").read_text())
    # the older names: model.layers.* for the language model, visual.* for the vision tower
    tensors = safetensors.torch.load_file(flat / "model.safetensors")
    safetensors.torch.save_file({k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
                                 for k, v in tensors.items()}, flat / "model.safetensors")
    conv = [_image_conv([f"{media_dir}/coco.jpg"])]
    expected = ours.generate(conv, max_new_tokens=STEPS, do_sample=False)[0].token_ids
    for directory in (nested, flat):
        again = vlm.load(directory, dtype="float32").generate(conv, max_new_tokens=STEPS, do_sample=False)[0]
        assert again.token_ids == expected


def test_media_options(ours, media_dir):
    conv = _image_conv([f"{media_dir}/waterview.jpg"])
    small = ours.encode(conv, max_pixels=56 * 56)["image_grid_thw"].prod()
    assert small < ours.encode(conv)["image_grid_thw"].prod()
    video = [{"role": "user", "content": [{"type": "video", "path": f"{media_dir}/video/flipping_a_pancake.mkv"}]}]
    assert ours.encode(video, fps=1)["video_grid_thw"][0, 0] == 5  # 10 frames
    assert ours.encode(video, num_frames=3)["video_grid_thw"][0, 0] == 2  # rounded up to 4 frames


# ------------------------------------------------------------------------------- thinking and boxes, scripted
SCRIPT = ["<think>", "Look", " at", " the", " cat", "</think>", "<answer>", "The", " cat", " is", " at", " ",
          "<|begin_of_box|>", "[", "100", ",", "200", ",", "300", ",", "400", "]", "<|end_of_box|>", "</answer>"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return vlm.load(vlm.tiny.write("glm4v", tmp_path_factory.mktemp("scripted"), seed=1), dtype="float32")


def test_reasoning_answer_and_boxes(small, monkeypatch):
    conv = [{"role": "user", "content": "Where is the cat?"}]
    script(small, monkeypatch, SCRIPT)
    out = small.generate(conv, max_new_tokens=40, do_sample=False, repetition_penalty=1.0)[0]
    assert out.finish_reason == "stop"  # </answer> is an end token of GLM-4.1V
    assert out.reasoning == "Look at the cat"
    assert out.text == "The cat is at <|begin_of_box|>[100,200,300,400]<|end_of_box|>"
    (box,) = parse_boxes(out.text)
    assert (box.x1, box.y1, box.x2, box.y2) == (0.1, 0.2, 0.3, 0.4)
    script(small, monkeypatch, SCRIPT)
    deltas = list(small.stream(conv, max_new_tokens=40, do_sample=False, repetition_penalty=1.0))
    assert "".join(d for d in deltas if d.kind == "thinking") == out.reasoning
    assert "".join(d for d in deltas if d.kind == "answer") == out.text
    assert [d.kind for d in deltas].index("answer") > [d.kind for d in deltas].index("thinking")


def test_thinking_budget_forces_the_answer(small, monkeypatch):
    conv = [{"role": "user", "content": "Where is the cat?"}]
    script(small, monkeypatch, ["<think>"], then=" the")
    out = small.generate(conv, max_new_tokens=12, do_sample=False, repetition_penalty=1.0, thinking_budget=3)[0]
    close, answer = small.tokenizer.token_id("</think>"), small.tokenizer.token_id("<answer>")
    assert out.token_ids[4:6] == [close, answer]  # <think>, 3 reasoning tokens, then the forced tags
    word = small.tokenizer.decode(out.token_ids[1:2])
    assert out.reasoning == (word * 3).strip() and out.text == (word * 6).strip()


def test_earlier_reasoning_is_dropped_from_the_history(small):
    turn = [{"role": "user", "content": "Where?"}]
    answered = turn + [{"role": "assistant", "content": "<think>Let me see.</think><answer>Here "
                                                        "<|begin_of_box|>[1,2,3,4]<|end_of_box|></answer>"},
                       {"role": "user", "content": "Sure?"}]
    plain = turn + [{"role": "assistant", "content": "Here [1,2,3,4]"}, answered[2]]
    assert small.encode(answered)["input_ids"].tolist() == small.encode(plain)["input_ids"].tolist()


def test_thinking_cannot_be_switched_off_by_this_template(small):
    with pytest.raises(InputError, match="thinking_budget=0"):
        small.generate([{"role": "user", "content": "Hi"}], enable_thinking=False)
