"""Loading errors: each bad checkpoint or input gives its specific vlm.errors exception, quickly."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlm
import vlm.tiny
from vlm import errors
from vlm.layers.linear import PackedLinear


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("q"))


@pytest.fixture
def copy(tiny_dir, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, target)
    return target


def test_missing_directory():
    with pytest.raises(errors.ModelNotFoundError, match="not a checkpoint directory"):
        vlm.load("/nonexistent/model")


def test_offline_hub_says_how_to_use_a_local_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(errors.HubUnreachableError, match="local-dir") as caught:
        vlm.load("Qwen/Qwen2-VL-2B-Instruct")
    message = str(caught.value)
    command = re.search(r"`(\S+) download Qwen/Qwen2-VL-2B-Instruct --local-dir DIR`", message)
    shipped = {e.name for e in importlib.metadata.distribution("huggingface_hub").entry_points
               if e.group == "console_scripts"}
    assert command and command.group(1) in shipped, (message, shipped)  # a command the installed hub client has
    assert "HF_HUB_OFFLINE" in message and not re.match(r"(?i)(cannot|could not) load", message)  # the UI says that


def test_unknown_family_names_the_supported_ones(copy):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(errors.UnsupportedModelError, match="qwen2_vl"):
        vlm.load(copy)


def test_corrupt_safetensors(copy):
    (copy / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(errors.CheckpointError, match="model.safetensors"):
        vlm.load(copy, dtype="float32")


def test_missing_and_unexpected_tensors_are_listed(copy):
    tensors = load_file(copy / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(errors.MissingTensorError, match="model.norm.weight"):
        vlm.load(copy, dtype="float32")
    tensors["model.norm.weight"] = torch.ones(64)
    tensors["model.extra.weight"] = torch.ones(3)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(errors.UnexpectedTensorError, match="model.extra.weight"):
        vlm.load(copy, dtype="float32")


def test_wrong_shape_is_a_checkpoint_error(copy):
    tensors = load_file(copy / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(65)
    save_file(tensors, copy / "model.safetensors")
    with pytest.raises(errors.CheckpointError, match="shape"):
        vlm.load(copy, dtype="float32")


def test_weights_load_in_the_target_dtype(tiny_dir):
    pipe = vlm.load(tiny_dir, dtype="bfloat16")
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    head = pipe.model.lm_head
    weight = head.sources[0] if isinstance(head, PackedLinear) else head.weight  # packed on first use (CPU)
    assert weight.data_ptr() == pipe.model.model.embed_tokens.weight.data_ptr()  # tied


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    return vlm.load(tiny_dir, dtype="float32")


def _ask(pipe, part):
    return pipe.generate([{"role": "user", "content": [part, {"type": "text", "text": "?"}]}], max_new_tokens=2)


def test_undecodable_image(pipe, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not an image")
    with pytest.raises(errors.ImageDecodeError):
        _ask(pipe, {"type": "image", "path": str(fake)})


def test_zero_byte_files(pipe, tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(errors.EmptyFileError):
        _ask(pipe, {"type": "image", "path": str(empty)})
    with pytest.raises(errors.EmptyFileError):
        _ask(pipe, {"type": "video", "path": str(empty)})


def test_video_without_video_stream(pipe, tmp_path):
    import av
    import numpy as np

    path = tmp_path / "audio_only.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(errors.VideoDecodeError, match="no video stream"):
        _ask(pipe, {"type": "video", "path": str(path)})


def test_urls_are_not_fetched(pipe):
    with pytest.raises(errors.InputError, match="URLs are not fetched"):
        _ask(pipe, {"type": "image", "url": "http://example.com/cat.jpg"})


@pytest.mark.parametrize("conversation", [[], [{"content": "x"}], [{"role": "robot", "content": "x"}],
                                          [{"role": "user", "content": [{"type": "audio"}]}],
                                          [{"role": "user", "content": "   "}]])
def test_malformed_conversations(pipe, conversation):
    with pytest.raises(errors.InputError):
        pipe.generate(conversation, max_new_tokens=2)


def test_typed_placeholders_stay_text(pipe, media_dir):
    conv = [{"role": "user", "content": [{"type": "image", "path": f"{media_dir}/coco.jpg"},
                                         {"type": "text", "text": "and <|vision_start|><|image_pad|><|vision_end|>"}]}]
    out = pipe.generate(conv, max_new_tokens=2)  # typed placeholders stay text: one image, one placeholder
    assert len(out) == 1


def test_prompt_longer_than_the_context(pipe):
    with pytest.raises(errors.ContextLengthError, match="context"):
        pipe.generate([{"role": "user", "content": "cat " * 5000}], max_new_tokens=2)


PEAK_SCRIPT = """
import ctypes, re, sys, vlm, vlm.families.qwen2_vl as family
import vlm.checkpoint as checkpoint
def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
def weights_resident():  # anonymous memory + the checkpoint's mapped pages (not libraries' code pages)
    mapped, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = len(fields) > 5 and fields[5].startswith(sys.argv[1])
        elif inside and fields[0] == "Rss:":
            mapped += int(fields[1]) * 1024
    return status("RssAnon") + mapped
measured = {}
def load_weights(*args, **kwargs):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    measured["before"], measured["resident"] = status("VmRSS"), weights_resident()
    checkpoint.load_weights(*args, **kwargs)
    measured["peak"] = status("VmHWM")
    measured["weights"] = sum(p.numel() * p.element_size() for p in args[0].parameters())
family.load_weights = load_weights
pipe = vlm.load(sys.argv[1], dtype=sys.argv[2])
pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)  # CPU linears are packed on first use
ctypes.CDLL("libc.so.6").malloc_trim(0)  # count live memory, not free heap pages kept by the allocator
print((weights_resident() - measured["resident"]) / measured["weights"])
print((measured["peak"] - measured["before"]) / measured["weights"])
"""


@pytest.fixture(scope="module")
def big_dir(tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("big"), text=dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
        mrope_section=[12, 18, 18]), vision=dict(embed_dim=128, depth=2))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_memory_while_loading_is_about_the_weights(big_dir, dtype):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(big_dir), dtype], capture_output=True, text=True,
                            timeout=300, check=True)
    after_answer, ratio = map(float, result.stdout.strip().splitlines()[-2:])
    assert ratio <= 1.2, f"peak RSS while loading is {ratio:.2f}x the weights"
    assert after_answer <= 1.4, f"RSS after the first answer is {after_answer:.2f}x the weights"  # one copy


def test_pytorch_bin_weights_load_like_safetensors(copy, media_dir):
    """Older hub repos (e.g. nvidia/groupvit-gcc-yfcc) ship pytorch_model.bin only."""
    conv = [{"role": "user", "content": "Hello"}]
    expected = vlm.load(copy, dtype="float32").generate(conv, max_new_tokens=4)[0].token_ids
    torch.save(load_file(copy / "model.safetensors"), copy / "pytorch_model.bin")
    (copy / "model.safetensors").unlink()
    assert vlm.load(copy, dtype="float32").generate(conv, max_new_tokens=4)[0].token_ids == expected
    (copy / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(errors.CheckpointError, match="pytorch_model.bin"):
        vlm.load(copy, dtype="float32")


def test_answers_stop_at_the_end_of_the_context(pipe):
    per_word = pipe.encode([{"role": "user", "content": "cat " * 101}])["input_ids"].shape[1] - \
        pipe.encode([{"role": "user", "content": "cat " * 100}])["input_ids"].shape[1]
    conv = [{"role": "user", "content": "cat " * ((pipe.max_context - 80) // per_word)}]
    length = pipe.encode(conv)["input_ids"].shape[1]
    room = pipe.max_context - length
    assert 0 < room < 100
    stops, pipe.stop_ids = pipe.stop_ids, set()
    try:
        out = pipe.generate(conv, max_new_tokens=500)[0]
    finally:
        pipe.stop_ids = stops
    assert len(out.token_ids) == room and out.finish_reason == "length"
