"""The engine serves requests at once: each request's greedy tokens in a concurrent run equal the same
request run alone (fp32, the families' parity configs), with prompts chunked between decodes, requests
arriving at different steps and some cancelled; the KV budget queues requests with their place shown;
failures stay in their request; vision encoding takes turns with the decoding steps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import vlm
import vlm.tiny
from tests.parity import assert_same_greedy
from tests.threads import engines_stop
from vlm.engine import Engine, Request
from vlm.errors import ContextLengthError, KVBudgetError
from vlm.generation import Sampling
from vlm.layers.attention import CacheSpec

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "glm4v", "glm4", "idefics"]
CHUNK = 7  # prompt rows per step while others decode: every prompt here takes several steps
STEPS = 12

pytestmark = pytest.mark.timeout(300)


def text(words: str) -> list[dict]:
    return [{"role": "user", "content": words}]


def image(*names: str, question: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [*({"type": "image", "path": str(ASSETS / n)} for n in names),
                                         {"type": "text", "text": question}]}]


def video(question: str = "What happens?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "video", "path": str(ASSETS / "bouncing_ball.mp4")},
                                         {"type": "text", "text": question}]}]


# Different lengths and media (the video first: reading its frames takes longest); five at most run together.
TEXT_ONLY = [text("Hi"), text("Tell me a long story about a cat that sits on a red sofa next to a window."),
             text("Numbers 0 1 2 3"), text("Mountains, rivers, lakes and trees at night."),
             [*text("What is the answer?"), {"role": "assistant", "content": "The answer is 42."},
              *text("And how many dogs run across the grass?")]]
WITH_MEDIA = [video(), image("shapes.png"), text("Hi"), image("cat.png", "street.png", question="Compare them."),
              text("Tell me a long story about a cat that sits on a red sofa next to a window.")]
WITH_IMAGES = [image("street.png", question="Describe the street in detail."), *WITH_MEDIA[1:]]  # IDEFICS reads no video
LONG = 300  # tokens of the requests that run to the end: still running when the last one arrives


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request, tmp_path_factory):
    directory = vlm.tiny.write(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    return vlm.load(directory, dtype="float32")


def conversations(pipe) -> list[list[dict]]:
    return {"glm4": TEXT_ONLY, "idefics": WITH_IMAGES}.get(pipe.family, WITH_MEDIA)


def request(pipe, conversation, tokens=STEPS, **fields) -> Request:
    return Request(pipe.encode(conversation), Sampling(max_new_tokens=tokens, repetition_penalty=1.0),
                   frozenset(pipe.stop_ids), **fields)


def endless(pipe, conversation, tokens) -> Request:
    """A request that runs to `tokens` (no stop id), so that it is still running when the next ones come."""
    return Request(pipe.encode(conversation), Sampling(max_new_tokens=tokens, repetition_penalty=1.0), frozenset())


class Gaps:
    """A logits processor recording each step's top-1/top-2 gap (near-ties may part two runs' tokens)."""

    def __init__(self):
        self.gaps: list[float] = []

    def __call__(self, logits, history):
        top = logits.float().topk(2, dim=-1).values[0]
        self.gaps.append(float(top[0] - top[1]))
        return logits


@pytest.fixture(scope="module")
def alone(pipe):
    """Each conversation's tokens and gaps run on its own, on a fresh engine (nothing reused)."""
    runs = []
    for conversation in conversations(pipe):
        gaps = Gaps()
        tokens = list(Engine(pipe.model).submit(request(pipe, conversation, processors=[gaps])))
        runs.append((tokens, gaps.gaps))
    return runs


def record_steps(engine: Engine, monkeypatch) -> list[list[int]]:
    """The rows of each request in every step the engine runs."""
    steps = []
    forward = engine.model.forward

    def recording(embeds, positions, rows):
        steps.append(list(rows.counts))
        return forward(embeds, positions, rows)

    monkeypatch.setattr(engine.model, "forward", recording)
    return steps


@pytest.mark.parametrize("count", [2, 3, 5])
def test_concurrent_requests_get_the_tokens_they_get_alone(pipe, alone, count, monkeypatch):
    """`count` requests arrive one after another while the earlier ones decode (each runs past a stop id,
    to LONG tokens, and its first tokens are compared); the second is cancelled mid-way."""
    engine = Engine(pipe.model, chunk_tokens=CHUNK)
    steps = record_steps(engine, monkeypatch)
    handles, received = [], []
    for i, conversation in enumerate(conversations(pipe)[:count]):
        handles.append(engine.submit(endless(pipe, conversation, 5000 if i == 1 else LONG)))
        received.append([next(handles[-1]) for _ in range(2)])  # the next one arrives two tokens later
    received[1] += [next(handles[1]) for _ in range(STEPS)]
    handles[1].cancel()
    for i, handle in enumerate(handles):
        received[i] += list(handle)
    for i, (tokens, handle) in enumerate(zip(received, handles)):
        if i == 1:
            assert handle.finish_reason == "cancelled" and len(tokens) < 5000
        else:
            assert handle.finish_reason == "length" and len(tokens) == LONG
        assert_same_greedy(tokens, *alone[i], pipe.stop_ids)
    assert max(len(rows) for rows in steps) == count  # all ran in one step at some point
    assert any(1 in rows and max(rows) > 1 for rows in steps)  # prompt chunks rode along with decodes
    assert max(max(rows) for rows in steps[1:]) <= max(CHUNK, 1)  # the later prompts came in chunks
    assert engine.active() == 0 and engines_stop()


def test_a_list_of_conversations_runs_through_the_engine_at_once(pipe, alone, monkeypatch):
    steps = record_steps(pipe.engine, monkeypatch)
    outs = pipe.generate(conversations(pipe)[:3], max_new_tokens=STEPS, do_sample=False, repetition_penalty=1.0)
    for out, (theirs, gaps) in zip(outs, alone):
        assert_same_greedy(out.token_ids, theirs, gaps, pipe.stop_ids)
    assert max(len(rows) for rows in steps) >= 2  # the next was embedded while the first ran: at least two together


def test_requests_wait_for_kv_room_with_their_place_in_the_queue(pipe, alone, monkeypatch):
    """A budget for two requests: the third and fourth wait (told places 1 and 2, then 1), then run."""
    places: list[list[int]] = [[] for _ in range(4)]
    requests = [endless(pipe, conversations(pipe)[0], LONG) for _ in range(4)]
    for request_, told in zip(requests, places):
        request_.on_queue = told.append
    size = pipe.model.cache_spec().nbytes(requests[0].inputs["input_ids"].shape[1] + LONG)
    engine = Engine(pipe.model, kv_budget_bytes=2 * size + size // 2)
    steps = record_steps(engine, monkeypatch)
    handles = [engine.submit(r) for r in requests]
    outputs = [list(handle) for handle in handles]
    theirs, gaps = alone[0]
    for tokens in outputs:
        assert_same_greedy(tokens, theirs, gaps, pipe.stop_ids)
    assert all(p[-1] == 0 and p == sorted(p, reverse=True) for p in places)  # moving up the queue, then running
    assert max(places[2]) >= 1 and max(places[3]) >= 2  # the third waited; the fourth behind it
    assert max(len(rows) for rows in steps) == 2  # never more than the budget holds
    assert engine.active() == 0


def test_max_batch_bounds_the_requests_in_a_step(pipe, monkeypatch):
    engine = Engine(pipe.model, max_batch=2)
    steps = record_steps(engine, monkeypatch)
    requests = [endless(pipe, c, 40) for c in conversations(pipe)[:4]]
    handles = [engine.submit(r) for r in requests]
    assert all(len(list(h)) == 40 and h.finish_reason == "length" for h in handles)
    assert max(len(rows) for rows in steps) == 2


def test_a_request_that_could_never_fit_the_budget_is_refused(pipe):
    engine = Engine(pipe.model, kv_budget_bytes=pipe.model.cache_spec().nbytes(64))
    with pytest.raises(KVBudgetError, match="KV cache") as error:
        engine.submit(request(pipe, conversations(pipe)[0], tokens=200))
    assert isinstance(error.value, ContextLengthError)  # a session may drop old turns to fit
    assert engine.active() == 0


def test_a_deadline_ends_the_request_with_timeout(pipe):
    engine = Engine(pipe.model)
    endless = request(pipe, conversations(pipe)[1], tokens=5000, deadline=time.monotonic() + 0.3)
    endless.stop_ids = frozenset()
    handle = engine.submit(endless)
    tokens = list(handle)
    assert handle.finish_reason == "timeout" and 0 < len(tokens) < 5000 and engine.active() == 0


def test_a_failing_prompt_fails_alone_and_the_others_go_on(pipe, alone, monkeypatch):
    """The first step mixing a new prompt with decodes raises: the new request gets the error, the
    decoding one continues with the tokens it gets alone."""
    engine = Engine(pipe.model, chunk_tokens=CHUNK)
    forward = pipe.model.forward
    failed = []

    def failing_once(embeds, positions, rows):
        if not failed and len(rows.counts) > 1:
            failed.append(True)
            raise RuntimeError("boom")
        return forward(embeds, positions, rows)

    monkeypatch.setattr(pipe.model, "forward", failing_once)
    first = engine.submit(endless(pipe, conversations(pipe)[0], LONG))  # still running when the second comes
    tokens = [next(first)]
    second = engine.submit(request(pipe, conversations(pipe)[1]))
    with pytest.raises(RuntimeError, match="boom"):
        list(second)
    tokens += list(first)
    assert_same_greedy(tokens, *alone[0], pipe.stop_ids)
    assert second.finish_reason == "error" and first.finish_reason == "length"


def test_a_cache_that_cannot_be_allocated_fails_only_its_request(pipe, monkeypatch):
    new = CacheSpec.new

    def scarce(spec, capacity):
        if capacity > 1000:
            raise MemoryError("no room")
        return new(spec, capacity)

    monkeypatch.setattr(CacheSpec, "new", scarce)
    engine = Engine(pipe.model)
    big = engine.submit(request(pipe, conversations(pipe)[1], tokens=2000))
    small = engine.submit(request(pipe, conversations(pipe)[1], tokens=4))
    with pytest.raises(MemoryError):
        list(big)
    assert list(small) and small.finish_reason in ("stop", "length") and engine.active() == 0


# ------------------------------------------------------------------------------------- vision turns
@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return vlm.load(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("qwen"), seed=1), dtype="float32")


def test_vision_encoding_takes_turns_with_decoding_steps(qwen, monkeypatch):
    """While one request decodes, another's image is encoded (every vision module that has no submodule
    slowed by 30 ms): the decoding steps run between the vision modules, never at the same time as one."""
    engine = Engine(qwen.model)
    spans: list[tuple[str, float, float]] = []

    def timed(kind, call):
        def run(*args, **kwargs):
            start = time.monotonic()
            out = call(*args, **kwargs)
            if kind == "vision":
                time.sleep(0.03)
            spans.append((kind, start, time.monotonic()))
            return out
        return run

    for module in qwen.model.visual.modules():
        if not list(module.children()):
            monkeypatch.setattr(module, "forward", timed("vision", module.forward))
    monkeypatch.setattr(qwen.model, "forward", timed("step", qwen.model.forward))
    decoding = engine.submit(request(qwen, text("Tell me a long story."), tokens=200))
    next(decoding)
    with_image = engine.submit(request(qwen, image("street.png"), tokens=2))
    assert list(with_image)
    decoding.cancel()
    list(decoding)
    vision = [(a, b) for kind, a, b in spans if kind == "vision"]
    steps = [(a, b) for kind, a, b in spans if kind == "step"]
    between = [s for s in steps if vision[0][1] <= s[0] and s[1] <= vision[-1][0]]
    assert len(between) >= 2  # decoding went on while the image was encoded
    assert not any(a < d and c < b for a, b in vision for c, d in steps)  # never both at once


class Order:
    """A logits processor that writes `name` into a shared list each time its request picks a token."""

    def __init__(self, log: list[str], name: str):
        self.log, self.name = log, name

    def __call__(self, logits, history):
        self.log.append(self.name)
        return logits


def test_a_question_arriving_while_others_decode_is_read_at_once(qwen, monkeypatch):
    """Its prompt (one chunk) would take many decode steps to earn, yet it is read in the next step: its first
    token comes within a few of the running answer's."""
    engine = Engine(qwen.model)
    for rows in (0, 10):  # a decode step 50 ms, a prompt row 10 ms (1 s chunks: 100 rows), measurements frozen
        engine.pace.observe(1, rows, 0.05 + rows * 0.01)
    monkeypatch.setattr(engine.pace, "observe", lambda *args: None)
    log: list[str] = []
    running = engine.submit(Request(qwen.encode(text("Go on.")), Sampling(max_new_tokens=60, repetition_penalty=1.0),
                                    frozenset(), processors=[Order(log, "running")]))
    next(running), next(running)
    question = text("Tell me a long story about a cat that sits on a red sofa next to a window.")
    arrived = engine.submit(request(qwen, question, tokens=1, processors=[Order(log, "arrived")]))
    log.append("submitted")
    assert len(list(arrived)) == 1
    between = log[log.index("submitted"):log.index("arrived")]
    rows = qwen.encode(question)["input_ids"].shape[-1]
    assert rows <= 100 and rows * 0.01 / (0.6 * 0.05) > 10  # one chunk; its credit would take over 10 steps
    assert between.count("running") <= 2, log
    running.cancel()
    assert engines_stop()


def test_cancel_while_an_image_is_encoded_returns_at_once(qwen, monkeypatch):
    engine = Engine(qwen.model)
    cancel = threading.Event()
    for block in qwen.model.visual.blocks:
        monkeypatch.setattr(block, "forward", lambda *a, _f=block.forward, **k: time.sleep(0.2) or _f(*a, **k))
    threading.Timer(0.3, cancel.set).start()
    started = time.monotonic()
    handle = engine.submit(request(qwen, image("cat.png"), cancel=cancel))
    assert list(handle) == [] and handle.finish_reason == "cancelled"
    assert time.monotonic() - started < 0.3 + 0.5  # within a vision block of the cancel


EXIT_CHILD = """
import sys, vlm
pipe = vlm.load(sys.argv[1], dtype="float32")
pipe.stop_ids = set()
deltas = pipe.stream([{"role": "user", "content": "Go on."}], max_new_tokens=100000)
next(deltas), next(deltas)
print("exiting mid-answer", flush=True)
"""


def test_the_interpreter_exits_cleanly_while_an_engine_is_mid_answer(tmp_path):
    """At exit the running schedulers are stopped between two steps (a daemon thread inside a torch op
    while the interpreter finalizes aborts the process)."""
    import subprocess
    import sys

    directory = vlm.tiny.write("qwen2_vl", tmp_path / "q")
    out = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(directory)], capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert out.returncode == 0 and "exiting mid-answer" in out.stdout, out.stderr[-2000:]
    assert "terminate called" not in out.stderr


SLOW_TAIL_CHILD = """
import sys, threading, torch, vlm
from vlm.engine import engine

serve = engine.Engine._serve

def serve_then_free_slowly(self):  # as a scheduler still freeing its last step's tensors after it is idle
    serve(self)
    a = torch.randn(100_000)
    for _ in range(20_000):  # torch ops, each releasing the GIL: the abort if the interpreter finalizes now
        a = a + 1
    print("tail done", flush=True)

engine.Engine._serve = serve_then_free_slowly
pipe = vlm.load(sys.argv[1], dtype="float32")
pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)
print("answered", flush=True)
"""


def test_the_interpreter_exits_after_an_answer_while_the_scheduler_still_frees_its_step(tmp_path):
    """The answer is back but the scheduler thread is not gone yet: the exit waits for it."""
    import subprocess
    import sys

    directory = vlm.tiny.write("qwen2_vl", tmp_path / "q")
    out = subprocess.run([sys.executable, "-c", SLOW_TAIL_CHILD, str(directory)], capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert out.returncode == 0 and "answered" in out.stdout and "tail done" in out.stdout, out.stderr[-2000:]
