"""GLM-4 parity with transformers (input_ids, greedy tokens) and the thinking hooks on a GLM-Z1-style template."""

from __future__ import annotations

import json

import pytest
import torch

import vlm
import vlm.tiny
from tests.parity import assert_same_greedy, reference_greedy
from vlm.errors import InputError
from vlm.families.glm4.tiny import CHAT_TEMPLATE, Z1_CHAT_TEMPLATE

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # GQA 4:2, head_dim 16 (= hidden / heads), rotary on half of each head
    "gqa2": dict(seed=1),
    # GQA 6:2, head_dim 24 (!= hidden / heads), rotary on a quarter, no attention bias, 3 layers
    "head24": dict(seed=5, text=dict(num_attention_heads=6, num_key_value_heads=2, head_dim=24, num_hidden_layers=3,
                                     partial_rotary_factor=0.25, attention_bias=False, intermediate_size=96)),
}
STEPS = 12
SYSTEM = {"role": "system", "content": "You are a terse assistant."}
MULTI_TURN = [SYSTEM, {"role": "user", "content": "What is in this image? Describe the video."},
              {"role": "assistant", "content": "A cat sits on a red sofa next to a window."},
              {"role": "user", "content": [{"type": "text", "text": "How many dogs run across the grass?"}]}]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return vlm.tiny.write("glm4", tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = transformers.Glm4ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _check(ours, reference, conversations) -> list[list[int]]:
    model, tokenizer = reference
    ref_inputs = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt", padding=True)
    assert ours.encode(conversations)["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    theirs, gaps = reference_greedy(model, dict(ref_inputs), STEPS)
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, theirs[row], gaps[row], ours.stop_ids)
    return theirs


def _plain(conversation):
    """The reference template needs string content."""
    return [{**m, "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]}
            for m in conversation]


def test_multi_turn(ours, reference):
    assert ours.family == "glm4"
    model, tokenizer = reference
    ref_inputs = tokenizer.apply_chat_template([_plain(MULTI_TURN)], add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
    assert ours.encode(MULTI_TURN)["input_ids"].tolist() == ref_inputs["input_ids"].tolist()
    theirs, gaps = reference_greedy(model, dict(ref_inputs), STEPS)
    assert_same_greedy(ours.generate(MULTI_TURN, max_new_tokens=STEPS, do_sample=False)[0].token_ids,
                       theirs[0], gaps[0], ours.stop_ids)


def test_left_padded_batch(ours, reference):
    _check(ours, reference, [[{"role": "user", "content": "Hi"}], _plain(MULTI_TURN)])


def test_the_test_sees_the_history(ours, reference):
    """Discrimination: the reference's tokens depend on an earlier turn, so matching them means something."""
    other = [*MULTI_TURN[:2], {"role": "assistant", "content": "Mountains, rivers and the moon."}, MULTI_TURN[3]]
    assert _check(ours, reference, [_plain(MULTI_TURN)]) != _check(ours, reference, [_plain(other)])


def test_stream_matches_generate(ours):
    out = ours.generate(MULTI_TURN, max_new_tokens=STEPS, do_sample=False)[0]
    deltas = list(ours.stream(MULTI_TURN, max_new_tokens=STEPS, do_sample=False))
    assert {d.kind for d in deltas} == {"answer"} and "".join(deltas) == out.text and out.reasoning == ""


def test_images_are_refused(ours, media_dir):
    with pytest.raises(InputError, match="text only"):
        ours.encode([{"role": "user", "content": [{"type": "image", "path": f"{media_dir}/coco.jpg"}]}])


def test_thinking_switch_needs_template_support(ours):
    with pytest.raises(InputError, match="no switch"):
        ours.generate(MULTI_TURN, enable_thinking=False)


def test_transformers_layout_and_shards(checkpoint, ours, reference, tmp_path):
    """save_pretrained's config (rope_parameters, dtype) and a sharded copy give the same tokens."""
    model, tokenizer = reference
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config and (tmp_path / "model.safetensors.index.json").exists()
    expected = ours.generate(MULTI_TURN, max_new_tokens=STEPS, do_sample=False)[0].token_ids
    again = vlm.load(tmp_path, dtype="float32").generate(MULTI_TURN, max_new_tokens=STEPS, do_sample=False)[0]
    assert again.token_ids == expected


# ------------------------------------------------------------------------------------ thinking (GLM-Z1 style)
@pytest.fixture(scope="module")
def z1(tmp_path_factory):
    return vlm.load(vlm.tiny.write("glm4", tmp_path_factory.mktemp("z1"), seed=3, chat_template=Z1_CHAT_TEMPLATE),
                    dtype="float32")


def test_open_think_in_the_prompt_makes_the_output_reasoning(z1):
    conv = [{"role": "user", "content": "Why is the sky blue?"}]
    out = z1.generate(conv, max_new_tokens=STEPS, do_sample=False)[0]
    assert out.reasoning and out.text == ""  # the tiny model never closes </think>
    deltas = list(z1.stream(conv, max_new_tokens=STEPS, do_sample=False))
    assert "".join(d for d in deltas if d.kind == "thinking") == out.reasoning


def test_thinking_budget_forces_the_answer(z1):
    conv = [{"role": "user", "content": "Why is the sky blue?"}]
    forced = z1.tokenizer.encode("</think>")
    out = z1.generate(conv, max_new_tokens=STEPS, do_sample=False, thinking_budget=3)[0]
    assert out.token_ids[3:3 + len(forced)] == forced
    assert out.reasoning == z1.tokenizer.decode(out.token_ids[:3]).strip()
    assert out.text == z1.tokenizer.decode(out.token_ids[3 + len(forced):]).strip()
    deltas = list(z1.stream(conv, max_new_tokens=STEPS, do_sample=False, thinking_budget=3))
    assert "".join(d for d in deltas if d.kind == "answer") == out.text
    assert "".join(d for d in deltas if d.kind == "thinking") == out.reasoning


def test_earlier_reasoning_is_dropped_from_the_history(z1):
    with_reasoning = [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "<think>The user greets me.</think>\nHello!"},
                      {"role": "user", "content": "Bye"}]
    plain = [with_reasoning[0], {"role": "assistant", "content": "Hello!"}, with_reasoning[2]]
    assert z1.encode(with_reasoning)["input_ids"].tolist() == z1.encode(plain)["input_ids"].tolist()


def test_enable_thinking_reaches_a_template_that_has_the_switch(tmp_path):
    switch = CHAT_TEMPLATE.replace(
        "{% if add_generation_prompt %}<|assistant|>{% endif %}",
        "{% if add_generation_prompt %}<|assistant|>\n<think>"
        "{% if enable_thinking is defined and not enable_thinking %}</think>{% endif %}{% endif %}")
    pipe = vlm.load(vlm.tiny.write("glm4", tmp_path, seed=3, chat_template=switch), dtype="float32")
    conv = [{"role": "user", "content": "Why is the sky blue?"}]
    off = pipe.generate(conv, max_new_tokens=4, do_sample=False, enable_thinking=False)[0]
    on = pipe.generate(conv, max_new_tokens=4, do_sample=False, enable_thinking=True)[0]
    assert off.text and not off.reasoning and on.reasoning and not on.text
    assert pipe.tokenizer.decode(pipe.encode(conv, enable_thinking=False)["input_ids"][0].tolist()).endswith("</think>")


def test_thinking_budget_is_validated(z1):
    with pytest.raises(InputError, match="thinking_budget"):
        z1.generate([{"role": "user", "content": "Hi"}], thinking_budget=-1)
