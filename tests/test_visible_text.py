"""What a person reads: box markup never shown raw (CLI answer and reasoning, the page's answer and Thinking
block), and the CLI's --verbose statistics, checked against what the pipeline builds and generates."""

from __future__ import annotations

import re

import pytest
from PIL import Image

import vlm
import vlm.cli
import vlm.tiny
from tests.scripted import script
from vlm.session import Snapshot, Stats
from vlm.ui.turns import answer_messages

QWEN_BOX = ["A", " ", "<|object_ref_start|>", "cat", "<|object_ref_end|>", "<|box_start|>", "(100,200),(300,400)",
            "<|box_end|>"]
GLM_BOXES = ["<think>", "The", " cat", " is", " at", " ", "<|begin_of_box|>", "[100,200,300,400]", "<|end_of_box|>",
             "</think>", "<answer>", "Here", " ", "<|begin_of_box|>", "[100,200,300,400]", "<|end_of_box|>",
             "</answer>"]
MARKUP = re.compile(r"<\|[a-z_]+\|>")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return vlm.load(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("qwen")), dtype="float32")


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    return vlm.load(vlm.tiny.write("glm4v", tmp_path_factory.mktemp("glm4v"), seed=1), dtype="float32")


def run_cli(pipe, monkeypatch, capsys, *args):
    monkeypatch.setattr(vlm, "load", lambda *a, **k: pipe)
    assert vlm.cli.main(["chat", "tiny", *args]) == 0
    return capsys.readouterr()


def test_the_cli_shows_boxes_without_their_markup(qwen, monkeypatch, capsys):
    script(qwen, monkeypatch, QWEN_BOX, then="<|im_end|>")
    out = run_cli(qwen, monkeypatch, capsys, "Where is the cat?", "--max-new-tokens", "60")
    assert out.out.strip() == "A cat(100,200),(300,400)" and not MARKUP.search(out.err)


def test_the_cli_shows_reasoning_without_box_markup(glm, monkeypatch, capsys):
    script(glm, monkeypatch, GLM_BOXES)
    out = run_cli(glm, monkeypatch, capsys, "Where is the cat?", "--max-new-tokens", "60", "--repetition-penalty", "1")
    assert out.err.strip() == "The cat is at [100,200,300,400]"  # the reasoning, on stderr
    assert out.out.strip() == "Here [100,200,300,400]"


def test_the_pages_thinking_block_and_answer_show_no_box_markup(glm, monkeypatch):
    script(glm, monkeypatch, GLM_BOXES)
    text = glm.generate([{"role": "user", "content": "Where?"}], max_new_tokens=60, repetition_penalty=1.0)[0]
    assert MARKUP.search(text.reasoning) and MARKUP.search(text.text)  # the library keeps it, to draw boxes
    snap = Snapshot(1, "", text.reasoning, text.text, done=True, finish="stop", stats=Stats(0.1, 17, 0.5, 0))
    thinking, answer = answer_messages(snap)
    assert thinking["metadata"]["title"] == "Thinking" and thinking["content"] == "The cat is at [100,200,300,400]"
    assert answer["content"].startswith("Here [100,200,300,400]\n\n")


def test_verbose_prints_the_prompt_the_time_to_first_token_speed_and_memory(qwen, monkeypatch, capsys, tmp_path):
    image = tmp_path / "photo.png"
    Image.radial_gradient("L").convert("RGB").resize((160, 120)).save(image)
    args = ["Describe it.", "--image", str(image), "--max-new-tokens", "6", "--max-pixels", "12544"]
    out = run_cli(qwen, monkeypatch, capsys, *args, "--verbose")
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(image)},
                                                 {"type": "text", "text": "Describe it."}]}]
    inputs = qwen.encode(conversation, max_pixels=12544)
    visual = int((inputs["input_ids"] == qwen.build_inputs.ids.image).sum())
    answer = qwen.generate(conversation, max_new_tokens=6, max_pixels=12544)[0]
    lines = out.err.strip().splitlines()
    prompt = re.fullmatch(r"prompt: (\d+) tokens \((\d+) visual\), ([\d.]+) s to first token \(([\d.]+) tokens/s\)",
                          lines[0])
    assert prompt, lines
    assert (int(prompt[1]), int(prompt[2])) == (inputs["input_ids"].shape[1], visual)
    seconds, rate = float(prompt[3]), float(prompt[4])  # the rate is the prompt over the (rounded) seconds
    assert int(prompt[1]) / (seconds + 0.005) - 0.05 <= rate <= int(prompt[1]) / max(seconds - 0.005, 1e-9) + 0.05
    assert re.fullmatch(rf"generation: {len(answer.token_ids) - (answer.finish_reason == 'stop')} tokens, "
                        r"[\d.]+ tokens/s", lines[1]), lines
    assert re.fullmatch(r"peak memory: [\d.]+ (MB|GB)", lines[2]), lines
    assert len(lines) == 3
    quiet = run_cli(qwen, monkeypatch, capsys, *args)
    assert quiet.err == ""  # without --verbose, nothing on stderr
