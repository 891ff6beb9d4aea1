"""Streaming, cancellation, exceptions and sampling of generation through the engine."""

from __future__ import annotations

import threading

import pytest
import torch

import vlm
import vlm.tiny
from tests.threads import engine_threads, engines_stop
from vlm.errors import GenerationError, InputError
from vlm.generation import Sampler, Sampling

CONV = [{"role": "user", "content": "Tell me a long story about a cat."}]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return vlm.load(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("q")), dtype="float32")


def test_stream_concatenates_to_generate(pipe):
    out = pipe.generate(CONV, max_new_tokens=40)[0]
    deltas = list(pipe.stream(CONV, max_new_tokens=40))
    assert len(deltas) > 1
    assert "".join(deltas) == out.text
    assert out.finish_reason in ("stop", "length")


def test_stream_deltas_count_the_tokens_and_the_first_token_sends_one(pipe):
    out = pipe.generate(CONV, max_new_tokens=40, do_sample=False)[0]
    deltas = list(pipe.stream(CONV, max_new_tokens=40, do_sample=False))
    counts = [d.tokens for d in deltas]
    assert counts[0] == 1 and counts == sorted(counts)
    assert counts[-1] == sum(t not in pipe.stop_ids for t in out.token_ids) > 1


def test_cancel_mid_stream_ends_the_thread(pipe):
    cancel = threading.Event()
    stream = pipe.stream(CONV, cancel=cancel, max_new_tokens=3000, repetition_penalty=1.0)
    next(stream)
    assert len(engine_threads()) == 1 and pipe.engine.active() == 1
    cancel.set()
    rest = list(stream)  # ends within a step
    assert len(rest) < 3000
    assert pipe.engine.active() == 0 and engines_stop()


def test_closing_the_stream_cancels(pipe):
    stream = pipe.stream(CONV, max_new_tokens=3000)
    next(stream)
    stream.close()
    assert engines_stop() and pipe.engine.active() == 0


def test_generate_cancelled_reason(pipe):
    cancel = threading.Event()
    cancel.set()
    assert pipe.generate(CONV, cancel=cancel, max_new_tokens=10)[0].finish_reason == "cancelled"


def test_exception_in_model_reaches_the_caller(pipe, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipe.model, "logits", broken)
    with pytest.raises(GenerationError, match="boom"):
        list(pipe.stream(CONV, max_new_tokens=5))
    assert engines_stop()


def test_seeded_sampling_is_reproducible(pipe):
    a = pipe.generate(CONV, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7, max_new_tokens=20)[0]
    b = pipe.generate(CONV, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=7, max_new_tokens=20)[0]
    c = pipe.generate(CONV, do_sample=True, temperature=1.5, top_k=50, top_p=0.9, seed=8, max_new_tokens=20)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_bad_sampling_settings_are_input_errors(pipe):
    with pytest.raises(InputError, match="top_p"):
        pipe.generate(CONV, top_p=0)
    with pytest.raises(InputError, match="Unknown"):
        pipe.generate(CONV, temprature=0.3)
    with pytest.raises(InputError, match="max_new_tokens"):
        pipe.generate(CONV, max_new_tokens=0)


def test_sampler_matches_transformers_processors():
    transformers = pytest.importorskip("transformers")
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    history = torch.randint(0, 50, (2, 7))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(history, expected)
    allowed = torch.isfinite(expected)
    sampler = Sampler(Sampling(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3, seed=0),
                      torch.device("cpu"))
    picks = torch.stack([sampler(logits, history) for _ in range(200)], dim=1)
    assert all(allowed[row, picks[row]].all() for row in range(2))
    greedy = Sampler(Sampling(repetition_penalty=1.3), torch.device("cpu"))
    assert greedy(logits, history).tolist() == RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone()).argmax(-1).tolist()


def test_generation_config_defaults_and_overrides(pipe):
    assert pipe.defaults.do_sample is False
    assert pipe.defaults.override(temperature=0.5, top_p=None).temperature == 0.5


def test_out_of_memory_is_a_specific_error(pipe, monkeypatch):
    from vlm.errors import OutOfMemoryError

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(pipe.model, "logits", exhausted)
    with pytest.raises(OutOfMemoryError, match="fewer"):
        list(pipe.stream(CONV, max_new_tokens=5))
    monkeypatch.undo()
    assert pipe.generate(CONV, max_new_tokens=2)[0].token_ids  # the next request works
