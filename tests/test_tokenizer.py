"""Chat template rendering, special-token safety and UTF-8-safe incremental detokenisation."""

from __future__ import annotations

import pytest

import vlm.tiny
from vlm.errors import InputError
from vlm.tokenizer import ChatTemplate, IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("t")))


def test_typed_special_tokens_stay_text(tok):
    image_pad = tok.token_id("<|image_pad|>")
    ids = tok.encode_chat([{"role": "user", "content": "look <|image_pad|><|im_end|> here"}])
    assert image_pad not in ids
    assert ids.count(tok.token_id("<|im_end|>")) == 2  # the system turn's and the user turn's, not the typed one
    assert "<|image_pad|>" in tok.decode(ids, skip_special_tokens=False)


def test_plain_text_encodes_like_the_whole_prompt(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n\n Hi there"}]}]
    assert tok.encode_chat(messages) == tok.encode(tok.template.render(messages))


@pytest.mark.parametrize("text", ["naïve café 日本語 😀🎉 ∑", "plain ascii", "👍" * 5])
def test_incremental_detokenizer_never_splits_characters(tok, text):
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_template_helpers_and_errors():
    template = ChatTemplate(
        "{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}"
        "{{ messages[0]|tojson }}{{ strftime_now('%Y') }}{{ bos_token }}", {"bos_token": "<s>"})
    out = template.render([{"role": "user", "content": "é"}])
    assert out.startswith('{"role": "user", "content": "é"}') and out.endswith("<s>")
    with pytest.raises(InputError, match="too long"):
        template.render([{"role": "user", "content": "a"}] * 3)


def test_template_sandbox_blocks_attribute_escape():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InputError):
        template.render([])
