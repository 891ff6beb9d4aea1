"""SessionManager: lazy loading once, LRU eviction under a memory budget, per-family slots, caps, and
generations in background threads (streaming, cancel, timeout, errors, no thread left behind)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

import vlm
import vlm.tiny
from vlm.errors import InputError
from vlm.reasoning import Delta, Report
from vlm.session import Limits, MemoryBudgetError, SessionManager

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "assets" / "shapes.png")
VIDEO = str(ROOT / "assets" / "bouncing_ball.mp4")  # 3 s at 10 fps
TEXT = [{"role": "user", "content": "Tell me a story."}]

pytestmark = pytest.mark.timeout(120)


class FakePipeline:
    """Streams `deltas` one every `delay` seconds, honouring cancel; raises after `fail_after` deltas; ends
    with `report` (as pipelines do) unless it is None."""

    def __init__(self, deltas=("one ", "two ", "three "), delay=0.01, fail_after=None, report=None):
        self.deltas, self.delay, self.fail_after, self.report = list(deltas), delay, fail_after, report
        self.options: dict = {}

    def stream(self, conversation, cancel=None, **options):
        self.options = options
        for i, delta in enumerate(self.deltas):
            if i == self.fail_after:
                raise RuntimeError("boom")
            if cancel is not None and cancel.is_set():
                return
            time.sleep(self.delay)
            yield Delta(delta, getattr(delta, "kind", "answer"), tokens=i + 1)  # one token per delta
        if self.report is not None:
            yield Delta("", tokens=len(self.deltas), report=self.report)


def fake_manager(sizes=None, budget=None, make=lambda source: FakePipeline(), load_seconds=0.0, families=None,
                 **kwargs):
    """A manager whose sources are names: `sizes[name]` bytes, `families[name]` its family (unknown if
    absent), `make(name)` builds the pipeline, loads are recorded in `manager.loads`."""
    loads: list[str] = []

    def load(directory):
        loads.append(directory)
        time.sleep(load_seconds)
        return make(directory)

    manager = SessionManager(budget, resolve=lambda source: source, estimate=lambda d: (sizes or {}).get(d, 1),
                             load=load, identify=lambda d: (families or {}).get(d), **kwargs)
    manager.loads = loads
    return manager


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("vlm-session", "vlm-generate"))]


def finish(generation):
    *_, last = generation.updates(0.01)
    assert generation.join(5)
    return last


@pytest.fixture(autouse=True)
def no_thread_left_behind():
    yield
    deadline = time.monotonic() + 5
    while session_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not session_threads()


# --------------------------------------------------------------------------------------------- loading
def test_loads_lazily_once_under_concurrent_requests():
    manager = fake_manager(load_seconds=0.3)
    assert manager.loads == [] and manager.loaded() == {}
    barrier = threading.Barrier(8)
    got = []

    def ask():
        barrier.wait()
        got.append(manager.get("qwen2_vl", "q"))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert manager.loads == ["q"]
    assert len(got) == 8 and all(p is got[0] for p in got)


def test_evicts_the_least_recently_used_family_to_fit_the_budget():
    manager = fake_manager({"a": 40, "b": 30, "c": 40}, budget=100)
    manager.get("fa", "a")
    manager.get("fb", "b")
    manager.get("fa", "a")  # fa is now more recent than fb
    manager.get("fc", "c")  # 40 + 30 + 40 > 100: fb goes
    assert set(manager.loaded()) == {"fa", "fc"}
    assert sum(e.nbytes for e in manager.loaded().values()) == 80


def test_a_model_larger_than_the_budget_fails_without_evicting_anything():
    manager = fake_manager({"a": 40, "huge": 200}, budget=100)
    manager.get("fa", "a")
    with pytest.raises(MemoryBudgetError, match="VLM_MEMORY_BUDGET_GB"):
        manager.get("fh", "huge")
    assert set(manager.loaded()) == {"fa"}


def test_one_model_per_family_and_explicit_unload():
    manager = fake_manager()
    first = manager.get("qwen2_vl", "q1")
    second = manager.get("qwen2_vl", "q2")
    assert first is not second
    assert [e.source for e in manager.loaded().values()] == ["q2"]
    assert manager.unload("qwen2_vl") and not manager.unload("qwen2_vl")
    assert manager.loaded() == {}
    manager.get("qwen2_vl", "q2")
    assert manager.loads == ["q1", "q2", "q2"]


def test_progress_reports_the_estimated_memory():
    manager = fake_manager({"q": 3 * 2**20})
    messages = []
    manager.get("qwen2_vl", "q", lambda done, message: messages.append((done, message)))
    assert messages[-1][0] == 1.0
    assert any("3.0 MB" in m for _, m in messages)


# ------------------------------------------------------------------------------------------ generation
def test_generation_streams_into_snapshots_with_stats():
    manager = fake_manager()
    generation = manager.generate("qwen2_vl", "q", TEXT, max_new_tokens=5)
    snaps = list(generation.updates(0.005))
    assert generation.join(5)
    last = snaps[-1]
    assert last.done and last.finish == "stop" and last.error is None
    assert last.answer == "one two three "
    assert any(not s.done and s.answer for s in snaps)  # text arrived before the end
    assert last.stats.tokens == 3 and last.stats.visual_tokens is None  # the pipeline reported nothing
    assert last.stats.seconds_to_first_token is not None


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_the_pipelines_report_gives_the_finish_and_the_prompt_counts(reason):
    manager = fake_manager(make=lambda source: FakePipeline(report=Report(reason, 17, 4)))
    last = finish(manager.generate("qwen2_vl", "q", TEXT))
    assert (last.finish, last.answer, last.stats.tokens) == (reason, "one two three ", 3)
    assert (last.stats.prompt_tokens, last.stats.visual_tokens) == (17, 4)


def test_thinking_deltas_are_kept_apart():
    manager = fake_manager(make=lambda source: FakePipeline([Delta("hmm ", "thinking"), Delta("so ", "thinking"),
                                                      Delta("yes", "answer")]))
    last = finish(manager.generate("glm4v", "g", TEXT))
    assert (last.thinking, last.answer) == ("hmm so ", "yes")


def test_cancel_stops_the_generation_and_its_thread():
    manager = fake_manager(make=lambda source: FakePipeline(["x "] * 1000, delay=0.01))
    cancel = threading.Event()
    generation = manager.generate("qwen2_vl", "q", TEXT, cancel)
    for snap in generation.updates(0.01):
        if snap.answer:
            cancel.set()
    assert generation.join(1)
    assert snap.done and snap.finish == "cancelled" and 0 < len(snap.answer) < 2000


def test_an_exception_becomes_the_error_and_keeps_the_text():
    manager = fake_manager(make=lambda source: FakePipeline(fail_after=2))
    last = finish(manager.generate("qwen2_vl", "q", TEXT))
    assert last.finish == "error" and isinstance(last.error, RuntimeError)
    assert last.answer == "one two "


def test_a_load_failure_is_the_generations_error():
    def load(directory):
        raise OSError("disk on fire")

    manager = SessionManager(resolve=lambda s: s, estimate=lambda d: 1, load=load, identify=lambda d: None)
    last = finish(manager.generate("qwen2_vl", "q", TEXT))
    assert last.finish == "error" and "disk on fire" in str(last.error)


def test_time_cap_cancels_with_timeout():
    manager = fake_manager(make=lambda source: FakePipeline(["x "] * 1000, delay=0.01), limits=Limits(max_seconds=0.3))
    last = finish(manager.generate("qwen2_vl", "q", TEXT))
    assert last.finish == "timeout" and last.answer


def test_requests_of_one_family_wait_for_a_slot_and_can_cancel_while_waiting():
    manager = fake_manager(make=lambda source: FakePipeline(["x "] * (500 if source == "q" else 3), delay=0.02),
                           family_concurrency=1)
    first = manager.generate("qwen2_vl", "q", TEXT)
    time.sleep(0.1)
    cancel = threading.Event()
    second = manager.generate("qwen2_vl", "q", TEXT, cancel)
    time.sleep(0.2)
    assert second.snapshot().status.startswith("Waiting") and not second.snapshot().answer
    other = finish(manager.generate("glm4v", "g", TEXT))  # another family is not blocked
    assert other.finish == "stop" and not first.snapshot().done
    cancel.set()
    assert finish(second).finish == "cancelled" and not second.snapshot().answer
    first.cancel()
    assert finish(first).finish == "cancelled"


@pytest.mark.parametrize("conversation, options, message", [
    (TEXT, {"max_new_tokens": 10_000}, "max_new_tokens"),
    ([{"role": "user", "content": [{"type": "image", "path": IMAGE}] * 3}], {}, "3 images"),
    ([{"role": "user", "content": [{"type": "video", "path": VIDEO}]}], {"fps": 2.0}, "6 frames"),
    ([{"role": "user", "content": [{"type": "video", "path": VIDEO}]}], {"num_frames": 8}, "8 frames"),
])
def test_requests_over_the_caps_are_refused(conversation, options, message):
    manager = fake_manager(limits=Limits(max_new_tokens=100, max_images=2, max_frames=4))
    last = finish(manager.generate("qwen2_vl", "q", conversation, **options))
    assert isinstance(last.error, InputError) and message in str(last.error)
    assert manager.loads == []  # refused before loading anything


# ---------------------------------------------------------------------------------- with a real model
@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return str(vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl")))


def test_real_tiny_model_counts_visual_tokens_and_stops(tiny_qwen):
    manager = SessionManager(dtype="float32")
    conversation = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "text", "text": "Hi"}]}]
    last = finish(manager.generate("qwen2_vl", tiny_qwen, conversation, max_new_tokens=8, max_pixels=56 * 56 * 4))
    assert last.error is None and (last.finish, last.stats.tokens) == ("length", 8)
    assert last.stats.visual_tokens == 12  # 640 x 480 resized to 112 x 84: 4 x 3 merged 28-pixel patches
    pipe = manager.get("qwen2_vl", tiny_qwen)
    assert last.stats.prompt_tokens == pipe.encode(conversation, max_pixels=56 * 56 * 4)["input_ids"].shape[1]
    bad = finish(manager.generate("qwen2_vl", tiny_qwen, TEXT, top_p=5.0))
    assert isinstance(bad.error, InputError) and "top_p" in str(bad.error)


@pytest.fixture(scope="module")
def tiny_groupvit(tmp_path_factory):
    return str(vlm.tiny.write("groupvit", tmp_path_factory.mktemp("groupvit")))


def test_a_checkpoint_of_another_family_is_refused_before_anything_is_unloaded(tiny_qwen, tiny_groupvit):
    manager = SessionManager(dtype="float32")
    qwen = manager.get("qwen2_vl", tiny_qwen)
    with pytest.raises(InputError, match="is a groupvit checkpoint, not a qwen2_vl one"):
        manager.get("qwen2_vl", tiny_groupvit)
    assert manager.get("qwen2_vl", tiny_qwen) is qwen and list(manager.loaded()) == ["qwen2_vl"]


@pytest.mark.parametrize("conversation, message", [
    ([{"role": "user", "content": "x" * 101}], "101 characters; this server takes at most 100 per message"),
    ([{"role": "system", "content": "x" * 101}, {"role": "user", "content": "hi"}], "at most 100 per message"),
    ([{"role": "user", "content": [{"type": "text", "text": "x" * 101}]}], "at most 100 per message"),
    ([{"role": "user", "content": "x" * 90}, {"role": "assistant", "content": "y" * 200},
      {"role": "user", "content": "z" * 90}], "The conversation has 380 characters; this server takes at most 250"),
])
def test_text_over_the_caps_is_refused_before_anything_runs(conversation, message):
    manager = fake_manager(limits=Limits(max_message_chars=100, max_conversation_chars=250))
    last = finish(manager.generate("qwen2_vl", "q", conversation))
    assert isinstance(last.error, InputError) and message in str(last.error)
    assert manager.loads == []  # refused before loading (or tokenizing) anything


def test_a_ten_megabyte_message_is_refused_at_once_with_the_default_caps():
    manager = fake_manager()
    started = time.monotonic()
    last = finish(manager.generate("qwen2_vl", "q", [{"role": "user", "content": "word " * 2_000_000}]))
    assert isinstance(last.error, InputError) and "16,000 per message" in str(last.error)
    assert manager.loads == [] and time.monotonic() - started < 5


class SlowStart(FakePipeline):
    """Streams forever; the first stream reads its inputs slowly (checking the cancel event, as the media and
    prefill stages do); `encode` (what counting visual tokens re-runs) takes `encode_seconds`."""

    def __init__(self, directory, start_seconds=0.0, encode_seconds=0.0):
        super().__init__(["x "] * 100_000, delay=0.01)
        self.directory, self.start_seconds, self.encode_seconds = directory, start_seconds, encode_seconds
        self.streams = 0

    def stream(self, conversation, cancel=None, **options):
        self.streams += 1
        deadline = time.monotonic() + (self.start_seconds if self.streams == 1 else 0)
        while time.monotonic() < deadline and not cancel.is_set():
            time.sleep(0.01)
        yield from super().stream(conversation, cancel, **options)

    def encode(self, conversation, **options):
        time.sleep(self.encode_seconds)
        return {"input_ids": torch.tensor([[1, 2, 3]])}


IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "text", "text": "Hi"}]}]


@pytest.mark.parametrize("stage", ["reading the inputs", "answering"])
def test_stop_at_any_stage_frees_the_slot_within_a_second(tiny_qwen, stage):
    """The slot is released as soon as the pipeline returns: nothing re-reads the media after a Stop."""
    pipeline = SlowStart(tiny_qwen, start_seconds=30 if stage == "reading the inputs" else 0, encode_seconds=10)
    manager = fake_manager(make=lambda source: pipeline, family_concurrency=1)
    cancel = threading.Event()
    first = manager.generate("qwen2_vl", "q", IMAGE_QUESTION, cancel)
    for snap in first.updates(0.01):
        if (snap.status.startswith("Reading") if stage == "reading the inputs" else snap.answer):
            break
    stopped = time.monotonic()
    cancel.set()
    second = manager.generate("qwen2_vl", "q", TEXT)  # waits for the family's only slot
    while not second.snapshot().answer:
        assert time.monotonic() - stopped < 1.0, (first.snapshot(), second.snapshot())
        time.sleep(0.01)
    assert first.join(1) and first.snapshot().finish == "cancelled"
    assert first.snapshot().stats is None or first.snapshot().stats.visual_tokens is None  # not counted
    second.cancel()
    assert finish(second).finish == "cancelled"


def test_a_request_stopped_while_its_model_loads_never_starts_answering():
    pipeline = FakePipeline(["x "] * 1000)
    calls = []
    pipeline.stream = lambda *args, **kwargs: calls.append(args) or iter(())
    manager = fake_manager(make=lambda source: pipeline, load_seconds=0.5)
    cancel = threading.Event()
    generation = manager.generate("qwen2_vl", "q", TEXT, cancel)
    while not generation.snapshot().status.startswith("Loading"):
        time.sleep(0.01)
    cancel.set()
    assert finish(generation).finish == "cancelled" and calls == []


def test_a_real_model_that_writes_its_end_token_finishes_with_stop(tmp_path):
    first = vlm.load(vlm.tiny.write("qwen2_vl", tmp_path / "a"), dtype="float32").generate(TEXT, max_new_tokens=1)
    stops = vlm.tiny.write("qwen2_vl", tmp_path / "b", generation={"eos_token_id": first[0].token_ids})  # same weights
    last = finish(SessionManager(dtype="float32").generate("qwen2_vl", str(stops), TEXT, max_new_tokens=8))
    assert last.error is None and (last.finish, last.stats.tokens, last.answer) == ("stop", 0, "")
