"""IDEFICS parity with transformers: input_ids, image attention masks, pixel values and greedy tokens on tiny
random configs (with and without the perceiver resampler, cross-attention every 1, 2 or 4 layers, several
image sizes, float and vector gates, tied and untied heads, two layouts of the additional vocabulary)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

import vlm
import vlm.tiny
from tests.parity import assert_same_greedy, greedy_tokens, reference_greedy, reference_pair
from vlm.errors import CheckpointError, InputError
from vlm.layers.attention import Rows

transformers = pytest.importorskip("transformers")

CONFIGS = {
    # perceiver (8 latents, qk LayerNorms), cross-attention before layers 0 and 2, qk RMSNorms, float gates;
    # 30 px images = 5x5 patches; the three added tokens in the additional tables
    "resampler": dict(seed=1),
    # the ViT's 17 tokens read directly, cross-attention before every layer, per-channel gates, quick_gelu;
    # 32 px = 4x4 patches; <end_of_utterance> inside vocab_size, only the image tokens additional
    "direct": dict(seed=2, layout="end_of_utterance_in_vocab",
                   text=dict(use_resampler=False, cross_layer_interval=1, qk_layer_norms=False, alpha_type="vector",
                             num_hidden_layers=3, hidden_size=48, num_attention_heads=3, intermediate_size=96),
                   vision=dict(image_size=32, patch_size=8, embed_dim=24, num_attention_heads=2,
                               hidden_act="quick_gelu")),
    # one cross-attention block (every 4 layers), tied heads, another rotary base; 24 px = 6x6 patches;
    # a one-block perceiver of 5 latents without qk LayerNorms
    "tied": dict(seed=3, text=dict(cross_layer_interval=4, tie_word_embeddings=True, rope_theta=500.0),
                 vision=dict(image_size=24, patch_size=4),
                 perceiver=dict(resampler_depth=1, resampler_n_latents=5, qk_layer_norms_perceiver=False)),
}
STEPS = 12
EOU = "<end_of_utterance>"


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return vlm.tiny.write("idefics", tmp_path_factory.mktemp(request.param), **CONFIGS[request.param])


@pytest.fixture(scope="module")
def ours(checkpoint):
    return vlm.load(checkpoint, dtype="float32")


def _reference(path):
    return reference_pair("IdeficsForVisionText2Text", path, left_padding=True)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return _reference(checkpoint)


def _img(path):
    return {"type": "image", "path": path}


def _text(text):
    return {"type": "text", "text": text}


def _reference_inputs(processor, prompts):
    """The model card's prompt lists (text and PIL images), processed by the reference processor."""
    prompts = [[Image.open(p["path"]) if isinstance(p, dict) else p for p in prompt] for prompt in prompts]
    return processor(text=prompts, add_end_of_utterance_token=False, return_tensors="pt")


def _generate_kwargs(processor):
    """As on the model card: stop at <end_of_utterance> (and </s>), never write the image tokens."""
    tok = processor.tokenizer
    bad = tok(["<image>", "<fake_token_around_image>"], add_special_tokens=False).input_ids
    return dict(bad_words_ids=bad, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids(EOU)])


def _check(ours, reference, conversations, prompts):
    """Same input_ids, attention and image masks, pixel values and greedy tokens as the reference."""
    model, processor = reference
    theirs = _reference_inputs(processor, prompts)
    mine = ours.encode(conversations)
    assert mine["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert mine["attention_mask"].tolist() == theirs["attention_mask"].tolist()
    assert mine["image_attention_mask"].tolist() == theirs["image_attention_mask"].long().tolist()
    if "pixel_values" in mine:
        torch.testing.assert_close(mine["pixel_values"], theirs["pixel_values"], atol=1e-6, rtol=0)
    else:  # the reference sends zero images with a text-only batch
        assert not theirs["pixel_values"].any()
    tokens, gaps = reference_greedy(model, theirs, STEPS, **_generate_kwargs(processor))
    outs = ours.generate(conversations, max_new_tokens=STEPS, do_sample=False)
    for row, out in enumerate(outs):
        assert_same_greedy(out.token_ids, tokens[row], gaps[row], ours.stop_ids)
    return tokens


def test_one_image(ours, reference, media_dir):
    ironing = f"{media_dir}/extreme_ironing.jpg"
    _check(ours, reference, [[{"role": "user", "content": [_text("What is in this image?"), _img(ironing)]}]],
           [["User: What is in this image?", _img(ironing), EOU, "\nAssistant:"]])
    radar = f"{media_dir}/llava_v1_5_radar.jpg"
    _check(ours, reference, [[{"role": "user", "content": [_img(radar), _text("Which model is best?")]}]],
           [["User:", _img(radar), f"Which model is best?{EOU}", "\nAssistant:"]])


def test_two_images_in_one_message(ours, reference, media_dir):
    a, b = f"{media_dir}/waterview.jpg", f"{media_dir}/coco.jpg"  # adjacent: one fake token between them
    _check(ours, reference, [[{"role": "user", "content": [_img(a), _img(b), _text("Compare them.")]}]],
           [["User:", _img(a), _img(b), f"Compare them.{EOU}", "\nAssistant:"]])
    _check(ours, reference, [[{"role": "user", "content": [_text("First"), _img(a), _text("then"), _img(b)]}]],
           [["User: First", _img(a), "then", _img(b), EOU, "\nAssistant:"]])


def test_images_in_two_turns(ours, reference, media_dir):
    radar, voc = f"{media_dir}/llava_v1_5_radar.jpg", f"{media_dir}/voc.jpg"
    conv = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [_text("What chart is this?"), _img(radar)]},
            {"role": "assistant", "content": "A radar chart."},  # a plain string, as a UI sends it
            {"role": "user", "content": [_img(voc), _text("And this one?")]}]
    _check(ours, reference, [conv],
           [["Answer briefly.", "\nUser: What chart is this?", _img(radar), EOU,
             f"\nAssistant: A radar chart.{EOU}", "\nUser:", _img(voc), f"And this one?{EOU}", "\nAssistant:"]])


def test_text_only(ours, reference):
    _check(ours, reference, [[{"role": "user", "content": "Hi there, how are you?"}]],
           [[f"User: Hi there, how are you?{EOU}", "\nAssistant:"]])


def test_left_padded_batch(ours, reference, media_dir):
    ironing, a, b = f"{media_dir}/extreme_ironing.jpg", f"{media_dir}/waterview.jpg", f"{media_dir}/ctx.jpg"
    _check(ours, reference,
           [[{"role": "user", "content": "Hi"}],
            [{"role": "user", "content": [_img(ironing), _text("Describe it in detail.")]}]],
           [[f"User: Hi{EOU}", "\nAssistant:"], ["User:", _img(ironing), f"Describe it in detail.{EOU}", "\nAssistant:"]])
    # Rows with one and two images: the first row's second image slot is zero padding, never attended.
    _check(ours, reference,
           [[{"role": "user", "content": [_text("Look"), _img(a)]}],
            [{"role": "user", "content": [_img(b), _text("and"), _img(ironing), _text("Hm?")]}]],
           [["User: Look", _img(a), EOU, "\nAssistant:"], ["User:", _img(b), "and", _img(ironing), f"Hm?{EOU}",
                                                          "\nAssistant:"]])


def test_the_test_sees_the_image(ours, reference, media_dir, tmp_path):
    """Discrimination: the reference's tokens change when the image is mirrored, so matching means something."""
    path = f"{media_dir}/extreme_ironing.jpg"
    mirrored = str(tmp_path / "mirrored.png")
    ImageOps.mirror(Image.open(path).convert("RGB")).save(mirrored)
    outs = [_check(ours, reference, [[{"role": "user", "content": [_img(p), _text("What is it?")]}]],
                   [["User:", _img(p), f"What is it?{EOU}", "\nAssistant:"]]) for p in (path, mirrored)]
    assert outs[0] != outs[1]


def test_alpha_is_composited_on_white_like_the_reference(ours, reference, tmp_path):
    rgba = Image.new("RGBA", (40, 20), (200, 30, 60, 255))
    rgba.paste((10, 250, 10, 0), (0, 0, 20, 20))  # transparent half: white, whatever its colour
    path = str(tmp_path / "alpha.png")
    rgba.save(path)
    _check(ours, reference, [[{"role": "user", "content": [_img(path), _text("Colour?")]}]],
           [["User:", _img(path), f"Colour?{EOU}", "\nAssistant:"]])


def test_attended_image_follows_the_reference_on_any_sequence(ours, reference):
    """Which image each token sees, end-of-sequence rule included, on random sequences of image, eos and text."""
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    _, processor = reference
    build = ours.build_inputs
    image, eos = build.ids.image, build.ids.eos
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        ids = torch.tensor([[image, eos, 5, 6][i] for i in torch.randint(0, 4, (12,), generator=gen)])
        theirs, _ = image_attention_mask_for_packed_input_ids(ids[None], processor.tokenizer, "pt")
        assert build.attended_image(ids.tolist()).tolist() == theirs[0].tolist(), ids.tolist()


def test_image_states_are_computed_once_per_request(ours, media_dir):
    """The vision tower runs once for a whole answer (its states are kept for every step), and not at all for
    the same image again."""
    calls = []
    hook = ours.model.model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    try:
        ours.clear_caches()
        conv = [{"role": "user", "content": [_img(f"{media_dir}/coco.jpg"), _text("Describe.")]}]
        out = ours.generate(conv, max_new_tokens=STEPS, do_sample=False)[0]
        assert len(calls) == 1 and len(out.token_ids) > 1
        ours.generate(conv, max_new_tokens=STEPS, do_sample=False)
        assert len(calls) == 1
    finally:
        hook.remove()


def test_prefix_cache_is_never_reused_over_another_image(checkpoint, ours, media_dir):
    """The same token ids over another image reuse the keys and values only before the image (from its <image>
    token on they depend on it) and answer as a fresh pipeline does; a follow-up turn over the same image
    reuses the first turn's cache (only its new tokens run) and still answers alike."""
    convs = [[{"role": "user", "content": [_img(f"{media_dir}/{name}"), _text("What is it?")]}]
             for name in ("waterview.jpg", "voc.jpg")]
    ours.clear_caches()
    first = greedy_tokens(ours, convs[0], STEPS)
    runs = []  # tokens of every forward pass: the prompt's (or what a pooled cache lacks), then one per step
    hook = ours.model.model.register_forward_pre_hook(lambda module, args: runs.append(args[0].shape[0]))
    try:
        second = greedy_tokens(ours, convs[1], STEPS)
        follow = convs[1] + [{"role": "assistant", "content": ours.tokenizer.decode(second)},
                             {"role": "user", "content": "Why?"}]
        third = greedy_tokens(ours, follow, STEPS)
    finally:
        hook.remove()
    fresh = vlm.load(checkpoint, dtype="float32")
    prompt, longer = (ours.encode(c)["input_ids"].shape[1] for c in (convs[1], follow))
    before_image = ours.encode(convs[1])["input_ids"][0].tolist().index(ours.tokenizer.token_id("<image>"))
    assert runs[0] == prompt - before_image and first != second == greedy_tokens(fresh, convs[1], STEPS)
    assert runs[len(second)] <= longer - prompt + 1 and third == greedy_tokens(fresh, follow, STEPS)


def test_stream_matches_generate(ours, media_dir):
    conv = [{"role": "user", "content": [_img(f"{media_dir}/coco.jpg"), _text("Describe.")]}]
    assert "".join(ours.stream(conv, max_new_tokens=STEPS)) == ours.generate(conv, max_new_tokens=STEPS)[0].text


def test_nested_and_sharded_layouts_match_hub(checkpoint, ours, reference, media_dir, tmp_path):
    """transformers' save_pretrained (rope_parameters, dtype, processor_config.json) and a sharded copy load to
    the same tokens as the hub layout."""
    model, processor = reference
    nested = tmp_path / "nested"
    model.save_pretrained(nested, max_shard_size="100KB")
    processor.save_pretrained(nested)
    assert "rope_parameters" in json.loads((nested / "config.json").read_text())
    assert (nested / "model.safetensors.index.json").exists() and not (nested / "preprocessor_config.json").exists()
    conv = [{"role": "user", "content": [_img(f"{media_dir}/waterview.jpg"), _text("What is it?")]}]
    assert greedy_tokens(vlm.load(nested, dtype="float32"), conv, STEPS) == greedy_tokens(ours, conv, STEPS)


def _with_head_row(checkpoint, tmp_path, token: str, pipe, conv):
    """A copy of the checkpoint whose output row for `token` wins the first step by far."""
    copy = shutil.copytree(checkpoint, tmp_path / "copy")
    inputs = pipe.encode(conv)
    length = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        embedded = pipe.model.embed(inputs)
        rows = Rows([pipe.model.cache_spec().new(length)], [length], [embedded.extras])
        hidden = pipe.model.forward(embedded.embeds, inputs["positions"][:, 0], rows)[-1]
    tensors = load_file(str(copy / "model.safetensors"))
    row, vocab = pipe.tokenizer.token_id(token), pipe.model.cfg.text.vocab_size
    head, embedding = ("lm_head.weight", "model.embed_tokens.weight") if row < vocab else (
        "lm_head.additional_fc.weight", "model.embed_tokens.additional_embedding.weight")
    head = head if head in tensors else embedding  # tied: the head is the embedding
    tensors[head][row if row < vocab else row - vocab] = 100 * hidden / hidden.norm()
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_image_tokens_are_never_generated(checkpoint, ours, media_dir, tmp_path):
    """With an <image> output row that would win, we write what the reference writes with bad_words_ids (and not
    <image>, which the reference writes without them)."""
    conv = [{"role": "user", "content": [_img(f"{media_dir}/coco.jpg"), _text("Describe.")]}]
    copy = _with_head_row(checkpoint, tmp_path, "<image>", ours, conv)
    model, processor = _reference(copy)
    theirs = _reference_inputs(processor, [["User:", _img(f"{media_dir}/coco.jpg"), f"Describe.{EOU}", "\nAssistant:"]])
    image = ours.tokenizer.token_id("<image>")
    assert reference_greedy(model, theirs, 1)[0][0][0] == image
    tokens, gaps = reference_greedy(model, theirs, STEPS, **_generate_kwargs(processor))
    mine = greedy_tokens(vlm.load(copy, dtype="float32"), conv, STEPS)
    assert image not in mine
    assert_same_greedy(mine, tokens[0], gaps[0])


def test_end_of_utterance_ends_the_answer(checkpoint, ours, media_dir, tmp_path):
    conv = [{"role": "user", "content": [_img(f"{media_dir}/coco.jpg"), _text("Describe.")]}]
    copy = _with_head_row(checkpoint, tmp_path, EOU, ours, conv)
    out = vlm.load(copy, dtype="float32").generate(conv, max_new_tokens=STEPS, do_sample=False)[0]
    assert out.token_ids == [ours.tokenizer.token_id(EOU)] and out.finish_reason == "stop" and out.text == ""


def test_typed_image_tokens_and_urls_stay_text(ours, monkeypatch):
    """`<image>` typed by a user is text, not an image slot; a URL in the text is never fetched (the reference
    processor would download it)."""
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    typed = "<fake_token_around_image><image><fake_token_around_image> https://example.com/cat.jpg"
    inputs = ours.encode([{"role": "user", "content": [_text(typed)]}])
    ids = inputs["input_ids"][0].tolist()
    assert ours.tokenizer.token_id("<image>") not in ids and "pixel_values" not in inputs
    assert not inputs["image_attention_mask"].any()
    assert ours.tokenizer.decode(ids).count("<image>") == 1
    assert len(greedy_tokens(ours, [{"role": "user", "content": [_text(typed)]}], STEPS)) > 0


def test_videos_and_mismatched_checkpoints_are_refused(checkpoint, media_dir, tmp_path):
    pipe = vlm.load(checkpoint, dtype="float32")
    with pytest.raises(InputError, match="not videos"):
        pipe.encode([{"role": "user", "content": [{"type": "video", "path": f"{media_dir}/video/flipping_a_pancake.mkv"},
                                                  _text("What happens?")]}])
    for name, change, message in (("preprocessor_config.json", {"image_size": 64}, "resizes to 64"),
                                  ("config.json", {"cross_layer_interval": 5}, "must divide")):
        copy = shutil.copytree(checkpoint, tmp_path / name)
        settings = json.loads((copy / name).read_text())
        (copy / name).write_text(json.dumps({**settings, **change}))
        with pytest.raises(CheckpointError, match=message):
            vlm.load(copy, dtype="float32")


@pytest.mark.parametrize("legacy", [False, True])
def test_a_legacy_llama_tokenizer_file_reads_as_transformers_5_builds_it(legacy, tmp_path, media_dir):
    """The hub's Llama tokenizer.json files prefix every piece of text with '▁' in a normaliser (also after
    special tokens); transformers 5 rebuilds a LlamaTokenizer's pipeline from its vocabulary (a Metaspace
    prefix at the start only, unless `legacy`). We read such a file as the reference does."""
    path = vlm.tiny.write("idefics", tmp_path / "legacy")
    data = json.loads((path / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                              {"type": "Replace", "pattern": {"String": " "},
                                                               "content": "\u2581"}]}
    data["pre_tokenizer"], data["model"]["unk_token"] = None, "<unk>"
    (path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    _, processor = _reference(path)
    radar = f"{media_dir}/llava_v1_5_radar.jpg"
    conv = [{"role": "user", "content": [_text("What is in this  image?"), _img(radar), _text("Tell me.")]},
            {"role": "assistant", "content": "A chart  with café ☕ data."}, {"role": "user", "content": " Why?"}]
    prompt = ["User: What is in this  image?", _img(radar), f"Tell me.{EOU}", f"\nAssistant: A chart  with café ☕ "
              f"data.{EOU}", f"\nUser:  Why?{EOU}", "\nAssistant:"]
    assert vlm.load(path, dtype="float32").encode([conv])["input_ids"].tolist() == \
        _reference_inputs(processor, [prompt])["input_ids"].tolist()


def test_int8_quantizes_the_decoder_its_cross_attention_and_head_not_the_towers(checkpoint, media_dir):
    from vlm.quantize import Int8Linear
    from vlm.quantize_vnni import Int8VnniLinear

    int8 = (Int8Linear, Int8VnniLinear)  # PyTorch's kernel, or this project's where the VNNI kernels build
    pipe = vlm.load(checkpoint, dtype="bfloat16", quantization="int8")
    kinds = {name: type(module) for name, module in pipe.model.named_modules()}
    for name in ("model.layers.0.self_attn.qkv_proj.inner", "model.gated_cross_attn_layers.0.cross_attn.k_proj",
                 "model.gated_cross_attn_layers.0.mlp.down_proj", "lm_head.fused"):  # q/k/v and the heads fused
        assert kinds[name] in int8, name
    assert not set(int8) & {kind for name, kind in kinds.items() if name.startswith(("model.vision_model",
                                                                                     "model.perceiver"))}
    out = pipe.generate([{"role": "user", "content": [_img(f"{media_dir}/coco.jpg"), _text("Describe.")]}],
                        max_new_tokens=STEPS, do_sample=False)[0]
    assert out.finish_reason in ("stop", "length") and out.token_ids
