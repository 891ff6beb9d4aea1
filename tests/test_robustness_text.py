"""Hostile and unusual text (issue #8): prompts longer than the context, special-token strings typed by
users, invalid UTF-8 (lone surrogates), empty messages, and characters split across tokens while
streaming. test_tokenizer.py already covers a typed <|image_pad|> in one Qwen2-VL user message and
emoji streamed from known text; these tests cover every family, every place text can be, and
arbitrary token sequences.
"""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vlm
import vlm.tiny
from vlm.conversation import drop_oldest_turn, normalize
from vlm.errors import ContextLengthError, InputError
from vlm.session import Limits, SessionManager
from vlm.tokenizer import IncrementalDetokenizer, Tokenizer

CHAT_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "glm4v", "glm4")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def short_qwen(tmp_path_factory) -> str:
    """A tiny Qwen2-VL with a 256-token context."""
    return str(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("short"), text={"max_position_embeddings": 256}))


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict:
    return {name: vlm.load(vlm.tiny.write(name, tmp_path_factory.mktemp(name)), dtype="float32")
            for name in CHAT_FAMILIES}


def finish(generation):
    *_, last = generation.updates(0.01)
    assert generation.join(10)
    return last


def long_chat(turns: int, words: int = 40) -> list[dict]:
    """A system prompt, `turns` answered exchanges of about `words` tokens each, and a short question."""
    chat = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        chat += [{"role": "user", "content": f"Question {i}: " + "cat " * words},
                 {"role": "assistant", "content": "dog " * words}]
    return chat + [{"role": "user", "content": "And now?"}]


# --------------------------------------------------------------------------------------- context window
def test_a_prompt_longer_than_the_context_is_an_error_or_loses_its_oldest_exchanges(short_qwen):
    chat = long_chat(6)  # ~500 tokens for a 256-token context; the last exchanges fit
    strict = SessionManager(dtype="float32")
    last = finish(strict.generate("qwen2_vl", short_qwen, chat, max_new_tokens=4))
    assert isinstance(last.error, ContextLengthError) and "context holds 256" in str(last.error)

    manager = SessionManager(dtype="float32", limits=Limits(context_overflow="truncate"))
    pipe = manager.get("qwen2_vl", short_qwen)
    seen = []
    stream = pipe.stream
    pipe.stream = lambda conversation, **kw: seen.append(conversation) or stream(conversation, **kw)
    last = finish(manager.generate("qwen2_vl", short_qwen, chat, max_new_tokens=4))
    assert last.error is None and last.finish in ("stop", "length") and last.stats.dropped_turns >= 2
    kept = seen[-1]
    assert len(kept) == len(chat) - 2 * last.stats.dropped_turns
    assert kept[0] == chat[0] and kept[-1] == chat[-1] and kept[1:] == chat[1 + 2 * last.stats.dropped_turns:]
    assert len(pipe.encode(kept)["input_ids"][0]) < 256 <= len(pipe.encode(seen[-2])["input_ids"][0])

    alone = [{"role": "user", "content": "cat " * 400}]  # the question alone does not fit: nothing to drop
    last = finish(manager.generate("qwen2_vl", short_qwen, alone, max_new_tokens=4))
    assert isinstance(last.error, ContextLengthError)


def test_drop_oldest_turn_keeps_system_prompts_and_the_last_question():
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "system", "content": "s2"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}]
    once = drop_oldest_turn(chat)
    assert [m["content"] for m in once] == ["s", "s2", "u2", "a2", "u3"]
    assert [m["content"] for m in drop_oldest_turn(once)] == ["s", "s2", "u3"]
    assert drop_oldest_turn(drop_oldest_turn(once)) is None


# ------------------------------------------------------------------------------- special-token strings
def test_special_token_strings_typed_anywhere_stay_text_in_every_family(pipes):
    for name, pipe in pipes.items():
        typed = "".join(pipe.tokenizer.special_strings)  # every special token this tokenizer has
        assert len(pipe.tokenizer.special_strings) >= 5, name

        def chat(text: str) -> list[dict]:
            return [{"role": "system", "content": text},
                    {"role": "user", "content": [{"type": "text", "text": text}]},
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"look: {text}"}]

        typed_ids = pipe.encode(chat(typed))["input_ids"][0].tolist()
        plain_ids = pipe.encode(chat("x"))["input_ids"][0].tolist()
        specials = pipe.tokenizer.special_ids
        # the special tokens are the template's own, whatever the user typed
        assert sorted(i for i in typed_ids if i in specials) == sorted(i for i in plain_ids if i in specials), name


# -------------------------------------------------------------------------------------- invalid UTF-8
def test_lone_surrogates_are_replaced_everywhere(pipes, short_qwen):
    broken = "caf\udce9 \ud83d and \udfff end"  # what surrogateescape decoding of invalid bytes leaves
    chat = [{"role": "system", "content": broken}, {"role": "user", "content": broken},
            {"role": "assistant", "content": [{"type": "text", "text": broken}]},
            {"role": "user", "content": [{"type": "text", "text": broken}]}]
    for message in normalize(chat):
        text = message["content"] if isinstance(message["content"], str) else message["content"][0]["text"]
        assert text == "caf? ? and ? end"
    for pipe in pipes.values():
        assert pipe.encode(chat)["input_ids"].shape[1] > 10
    last = finish(SessionManager(dtype="float32").generate("qwen2_vl", short_qwen, chat[-1:], max_new_tokens=3))
    assert last.error is None and last.finish in ("stop", "length")  # answered (to its end or its budget)


# ------------------------------------------------------------------------------------- empty messages
@pytest.mark.parametrize("conversation", [
    [], None, "hello", [{"role": "user", "content": ""}], [{"role": "user", "content": " \n\t "}],
    [{"role": "user", "content": None}], [{"role": "user", "content": []}],
    [{"role": "user", "content": [{"type": "text", "text": "  "}]}], [{"role": "assistant", "content": "hi"}],
    [{"role": "system", "content": "hi"}], [{"content": "no role"}], [{"role": "robot", "content": "hi"}],
    [{"role": "user", "content": 42}], [{"role": "user", "content": [{"type": "text", "text": None}]}],
    [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}],
])
def test_empty_or_malformed_messages_are_input_errors(pipes, conversation):
    with pytest.raises(InputError):
        normalize(conversation)
    with pytest.raises(InputError):
        pipes["qwen2_vl"].encode(conversation)


def test_empty_message_in_the_ui_is_refused_before_anything_runs():
    from vlm.ui.turns import user_turn

    for text in ("", "   ", "\n"):
        with pytest.raises(InputError, match="Type a question"):
            user_turn(text, [])


# ------------------------------------------------------------------------------ streaming and UTF-8
@pytest.fixture(scope="module")
def tok(pipes) -> Tokenizer:
    return pipes["qwen2_vl"].tokenizer


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streamed_text_equals_the_whole_decode_for_any_token_sequence(tok, data):
    vocab = tok.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    whole = tok.decode(ids)
    assert "".join(deltas) == whole
    for delta in deltas:
        delta.encode("utf-8")  # never a lone surrogate
    if "\ufffd" not in whole:  # a character split across tokens is never shown half-decoded
        assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(st.characters(codec="utf-8"), max_size=30))
def test_text_streamed_token_by_token_comes_back_unchanged(tok, text):
    ids = tok.encode_plain(text)
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text


def test_stream_deltas_are_valid_text_while_generating(pipes):
    pipe = pipes["qwen2_vl"]
    cancel = threading.Event()
    deltas = list(pipe.stream([{"role": "user", "content": "😀🎉👍 日本語"}], cancel=cancel, max_new_tokens=60,
                              do_sample=True, temperature=1.5, seed=3))
    assert deltas and all(isinstance(d, str) for d in deltas)
    assert deltas[0].tokens == 1  # sent even when the first token is part of a character (then empty)
    for delta in deltas:
        delta.encode("utf-8")
    assert not [t for t in threading.enumerate() if t.name == "vlm-generate"]
