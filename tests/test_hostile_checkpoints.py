"""Hostile checkpoints (issue #14): a user with VLM_CUSTOM_CHECKPOINTS=1, or a bad download, must get a
vlm.errors.CheckpointError with a message, quickly and with memory bounded; never a hang, a crash or a
raw Python exception. Every file is made here from a tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import vlm
import vlm.tiny
import vlm.tokenizer
from vlm.errors import CheckpointError, InputError
from vlm.tokenizer import ChatTemplate, Tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("qwen2_vl", "llava_onevision", "glm4v", "glm4", "groupvit")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {family: vlm.tiny.write(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def copy_of(tiny, family: str, tmp_path: Path) -> Path:
    target = tmp_path / family
    shutil.copytree(tiny[family], target)
    return target


def edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "config.json").read_text())
    change(config.get("text_config", config))  # the language model's fields, nested or flat
    (directory / "config.json").write_text(json.dumps(config))


def refused(directory: Path, match: str = "", seconds: float = 30) -> CheckpointError:
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=match) as info:
        vlm.load(directory, dtype="float32")
    assert time.monotonic() - start < seconds
    return info.value


# ----------------------------------------------------------------------------------------- config.json
MUTATIONS = {
    "a billion layers": (lambda t: t.update(num_hidden_layers=10**9), "num_hidden_layers"),  # main: hangs, memory grows
    "zero heads": (lambda t: t.update(num_attention_heads=0), "num_attention_heads"),  # main: ZeroDivisionError
    "string width": (lambda t: t.update(hidden_size="64"), "hidden_size"),  # main: TypeError
    "float width": (lambda t: t.update(hidden_size=64.0), "hidden_size"),  # main: TypeError
    "uneven head groups": (lambda t: t.update(num_attention_heads=3, num_key_value_heads=2), "multiple of"),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_config_sizes_out_of_range_are_refused_before_building(tiny, tmp_path, family, mutation):
    change, field = MUTATIONS[mutation]
    directory = copy_of(tiny, family, tmp_path)
    edit_config(directory, change)
    message = refused(directory, field, seconds=15)
    assert "config.json" in str(message)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_missing_field_is_named(tiny, tmp_path, family):
    directory = copy_of(tiny, family, tmp_path)
    edit_config(directory, lambda t: t.pop("hidden_size"))  # main: KeyError (or AttributeError)
    defaults = family in ("llava_onevision", "groupvit")  # these fall back to the reference's default width,
    refused(directory, "shape" if defaults else "lacks 'hidden_size'")  # which the weights then contradict


def test_config_that_is_not_an_object_or_nests_too_deep(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)
    (directory / "config.json").write_text(json.dumps([{"model_type": "qwen2_vl"}]))
    refused(directory, "must hold a JSON object, not a list")  # main: AttributeError
    (directory / "config.json").write_text('{"model_type": "qwen2_vl", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(directory, "nests its JSON too deeply")  # main: RecursionError
    (directory / "config.json").write_text(" " * (17 << 20) + "{}")
    refused(directory, "files up to")


def test_processor_and_generation_configs_are_bounded_too(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").write_text(json.dumps({**processor, "min_pixels": 10**12}))
    refused(directory, "min_pixels")  # every image would be upscaled to a trillion pixels
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({**generation, "max_new_tokens": 10**12}))
    refused(directory, "max_new_tokens")
    groupvit = copy_of(tiny, "groupvit", tmp_path)
    (groupvit / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 10**7}}))
    refused(groupvit, "size")


# --------------------------------------------------------------------------------------------- weights
def rewrite_header(file: Path, change) -> None:
    """Rewrite a safetensors file's header with `change(header, data_length)`; the data stays in place
    (the file is extended, sparse, when the new header claims more)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + length]), raw[8 + length:]
    end = change(header, len(data))
    encoded = json.dumps(header).encode()
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + data)
        f.truncate(8 + len(encoded) + max(end, len(data)))


def test_a_tensor_claiming_64_gb_is_refused_before_anything_is_mapped(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)

    def claim(header, size):  # the last tensor, moved past the data, claims 16 G floats
        header["model.norm.weight"] = {"dtype": "F32", "shape": [4, 4 << 30], "data_offsets": [size, size + (64 << 30)]}
        return size + (64 << 30)

    rewrite_header(directory / "model.safetensors", claim)
    assert (directory / "model.safetensors").stat().st_size > 64 << 30  # sparse: no disk used
    refused(directory, r"model.norm.weight has shape \(4, 4294967296\)")  # main: OSError from mmap


def test_a_header_with_two_million_entries_is_refused_quickly_with_little_memory(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)

    def flood(header, size):
        header.update({f"x{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(2_000_000)})
        return size

    rewrite_header(directory / "model.safetensors", flood)
    script = ("import sys, vlm\nfrom vlm.session import estimate_bytes\n"
              "for step in (estimate_bytes, vlm.load):\n"
              "    try:\n        step(sys.argv[1])\n    except vlm.errors.CheckpointError as e:\n        print(e)\n"
              "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]))")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and all("exceeds the file or 8,388,608 bytes" in line for line in lines[:2]), out
    assert int(lines[2]) < 1_000_000 and time.monotonic() - start < 60, out  # KiB; main: 36 s and 1.8 GB


def test_shards_outside_the_checkpoint_are_refused(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    refused(directory, "file names in its own directory")


# ----------------------------------------------------------------------------------------- tokenizer
def with_pre_tokenizer(tiny, tmp_path: Path, pattern: str) -> Path:
    directory = copy_of(tiny, "qwen2_vl", tmp_path)
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return directory


def test_a_redos_pre_tokenizer_is_refused_at_load(tiny, tmp_path):
    directory = with_pre_tokenizer(tiny, tmp_path, r"(a|a)+$")  # catastrophic backtracking on "aaa...!"
    refused(directory, "tokenizer failed while trying")  # main: loads, then PanicException on such text


def test_a_pre_tokenizer_failing_on_user_text_is_a_checkpoint_error_not_a_panic(tiny, tmp_path):
    tokenizer = Tokenizer(with_pre_tokenizer(tiny, tmp_path, r"(z|z)+$"))  # the load probe has no run of z
    assert tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    with pytest.raises(CheckpointError, match="tokenizer failed while encoding"):  # main: PanicException
        tokenizer.encode_chat([{"role": "user", "content": "z" * 60 + "!"}])


def test_a_huge_tokenizer_file_is_not_read(tiny, tmp_path):
    directory = copy_of(tiny, "qwen2_vl", tmp_path)
    with open(directory / "tokenizer.json", "ab") as f:
        f.truncate(65 << 20)
    refused(directory, "files up to")


# ----------------------------------------------------------------------------------------- templates
MESSAGES = [{"role": "user", "content": "hi"}]


def own_rss() -> int:
    return psutil.Process().memory_info().rss


def test_a_template_that_loops_forever_is_stopped_at_its_deadline(monkeypatch):
    monkeypatch.setattr(vlm.tokenizer, "TEMPLATE_SECONDS", 1.0)
    template = ChatTemplate("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                            "{% endfor %}{% endfor %}{% endfor %}done")
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="took longer than 1 s"):  # main: runs for days
        template.render(MESSAGES)
    assert time.monotonic() - start < 10
    assert ChatTemplate("{{ messages[0].content }}").render(MESSAGES) == "hi"  # the next render works


@pytest.mark.parametrize("source, match", [
    ("{{ ('%s' % messages) * 10**6 }}", "more than"),  # ~30 MB of output for a 2-word conversation
    ("{% set x = 'abcd' * 10**9 %}{{ x|length }}", "memory"),  # 4 GB inside the template
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
     "memory"),  # doubling a string 40 times
])
def test_templates_that_blow_up_are_refused_with_memory_bounded(source, match):
    before = own_rss()
    start = time.monotonic()
    with pytest.raises(CheckpointError, match=match):
        ChatTemplate(source).render(MESSAGES)
    assert time.monotonic() - start < 30
    assert own_rss() - before < 100 << 20  # the template's memory was the child's, not this process's


def test_template_errors_keep_their_meaning():
    with pytest.raises(CheckpointError, match="does not parse"):
        ChatTemplate("{% for %}")
    with pytest.raises(InputError, match="rejected the conversation: no"):
        ChatTemplate("{{ raise_exception('no') }}").render(MESSAGES)
    with pytest.raises(InputError, match="failed on this conversation"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render(MESSAGES)
