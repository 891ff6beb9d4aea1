"""SessionManager: lazy loading once, LRU eviction under a memory budget, caps, and generations followed in
background threads (streaming, cancel, timeout, errors, no thread left behind) while each family's engine
queues what its batch cannot hold."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlm
import vlm.session
import vlm.tiny
from vlm.admission import fit_frame_rate
from vlm import cancellation
from tests.endless import endless_qwen2_vl
from vlm.checkpoint import weights_bytes
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
    return [t for t in threading.enumerate() if t.name.startswith(("vlm-session", "vlm-engine"))]


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


IMAGE_QUESTION = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "text", "text": "Hi"}]}]


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    return str(endless_qwen2_vl(tmp_path_factory.mktemp("endless")))


@pytest.mark.parametrize("stage", ["reading the inputs", "answering"])
def test_stop_at_any_stage_frees_the_slot_within_a_second(endless, stage, monkeypatch):
    """One request in the family's batch (VLM_CONCURRENCY=1): a Stop while the first request reads its
    inputs (slowly, looking at its cancellation as the media stages do) or answers lets the next one answer
    within a second; nothing re-reads the media for the stopped answer's stats."""
    manager = SessionManager(dtype="float32", family_concurrency=1)
    pipe = manager.get("qwen2_vl", endless)
    build, reads = pipe.build_inputs, []

    def slow_first_read(*args, **kwargs):
        reads.append(1)
        deadline = time.monotonic() + (30 if stage == "reading the inputs" and len(reads) == 1 else 0)
        while time.monotonic() < deadline:
            cancellation.check()
            time.sleep(0.01)
        return build(*args, **kwargs)

    monkeypatch.setattr(pipe, "build_inputs", slow_first_read)
    first = manager.generate("qwen2_vl", endless, IMAGE_QUESTION, max_new_tokens=2000, max_pixels=56 * 56 * 4)
    for snap in first.updates(0.01):
        if (snap.status.startswith("Reading") if stage == "reading the inputs" else snap.answer):
            break
    stopped = time.monotonic()
    first.cancel()
    second = manager.generate("qwen2_vl", endless, TEXT, max_new_tokens=2000)  # the batch's only place
    while not second.snapshot().answer:
        assert time.monotonic() - stopped < 1.0, (first.snapshot(), second.snapshot())
        time.sleep(0.01)
    assert first.join(1) and first.snapshot().finish == "cancelled"
    stats = first.snapshot().stats
    if stage == "reading the inputs":
        assert stats.visual_tokens is None  # nothing was read, nothing counted
    else:
        assert stats.visual_tokens == 12 and len(reads) == 2  # counted from its own inputs, read once
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


# ------------------------------------------------------------------------------- frames and progress
VIDEO_ONLY = [{"role": "user", "content": [{"type": "video", "path": VIDEO}, {"type": "text", "text": "Hm?"}]}]


def test_a_video_sampled_by_rate_gets_a_rate_within_the_frame_cap():
    """The defaults work for any video: sampling by rate is lowered to fit the cap, and said so; a frame count
    stays what it is and is refused over the cap with advice that does not lead back to a refusal."""
    manager = fake_manager(limits=Limits(max_frames=4))
    for fps in (2.0, None):  # 6 frames at 2 fps, 30 when every frame is taken
        options, note = fit_frame_rate(VIDEO_ONLY, {"fps": fps, "max_pixels": 100}, 4)
        assert options["max_pixels"] == 100 and options["fps"] < 4 / 3  # 3 s at 10 fps
        manager.check(VIDEO_ONLY, options)
        assert "bouncing_ball.mp4 sampled at" in note and "at most 4 frames" in note
        assert ("2 frames/s" if fps else "every frame") in note
        last = finish(manager.generate("qwen2_vl", "q", VIDEO_ONLY, fit_frames=True, fps=fps))
        assert last.error is None and note in last.stats.notes and manager.loads
    assert fit_frame_rate(VIDEO_ONLY, {"fps": 1.0}, 4) == ({"fps": 1.0}, None)  # 3 frames: within the cap
    assert fit_frame_rate(VIDEO_ONLY, {"num_frames": 8}, 4) == ({"num_frames": 8}, None)
    with pytest.raises(InputError, match="Ask for fewer frames"):
        manager.check(VIDEO_ONLY, {"num_frames": 8})
    with pytest.raises(InputError, match="give a number of frames instead of an fps"):
        manager.check(VIDEO_ONLY, {"fps": 2.0})


def test_a_real_video_at_the_lowered_rate_stays_within_the_cap(tiny_qwen, tmp_path):
    from tests.test_robustness_media import make_video

    video = str(make_video(tmp_path / "long.mp4", 300, size=(64, 48)))  # 30 s at 10 fps: 60 frames at 2 fps
    conversation = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "Hm?"}]}]
    manager = SessionManager(limits=Limits(max_frames=16), dtype="float32")
    options, _ = fit_frame_rate(conversation, {"fps": 2.0}, manager.limits.max_frames)
    pipe = manager.get("qwen2_vl", tiny_qwen)
    t = int(pipe.encode(conversation, **options)["video_grid_thw"][0, 0])
    assert 12 <= 2 * t <= 16  # frames sampled, in temporal patches of 2


def test_a_generation_shows_each_step_before_its_first_token(tiny_qwen, monkeypatch):
    snaps = []  # every snapshot the generation makes (a reader polling them may skip some)
    update = vlm.session.Generation._update

    def recorded(self, **changes):
        update(self, **changes)
        snaps.append(self.snapshot())

    monkeypatch.setattr(vlm.session.Generation, "_update", recorded)
    manager = SessionManager(dtype="float32")
    conversation = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "video", "path": VIDEO},
                                                 {"type": "text", "text": "Hi"}]}]
    generation = manager.generate("qwen2_vl", tiny_qwen, conversation, max_new_tokens=6, fps=2.0)
    assert generation.join(30)
    steps = [snap.step for snap in snaps if snap.step is not None]
    steps = [step for i, step in enumerate(steps) if i == 0 or step != steps[i - 1]]  # a status change repeats one
    assert all(not snap.answer for snap in snaps if snap.step is not None)  # steps come before the answer
    streaming = [snap for snap in snaps if snap.answer and not snap.done]
    assert streaming and all(snap.stats.tokens >= 1 and snap.stats.seconds_to_first_token for snap in streaming)
    stages = [step.stage for step in steps]
    assert stages.index("images") < stages.index("video") < stages.index("encoding") < stages.index("prompt")
    assert [(s.done, s.total) for s in steps if s.stage == "encoding"] == [(1, 2), (2, 2)]  # the image, the video
    last = generation.snapshot()
    prompt = [s for s in steps if s.stage == "prompt"]
    assert prompt[-1].done == prompt[-1].total == last.stats.prompt_tokens == last.stats.prefilled_tokens
    assert last.step is None and last.stats.tokens == 6
def test_requests_wait_in_the_engine_queue_told_their_place_and_can_cancel_there(endless, tmp_path):
    """A KV budget that holds one request: the second waits in the engine's queue, its status says how many
    are ahead; it can be cancelled while waiting; another family is not held up."""
    manager = SessionManager(dtype="float32")
    pipe = manager.get("qwen2_vl", endless)
    one = pipe.model.cache_spec().nbytes(pipe.encode(TEXT)["input_ids"].shape[1] + 2000)
    pipe.engine_options["kv_budget_bytes"] = one + one // 2
    first = manager.generate("qwen2_vl", endless, TEXT, max_new_tokens=2000)
    for snap in first.updates(0.01):
        if snap.answer:
            break
    cancel = threading.Event()
    second = manager.generate("qwen2_vl", endless, TEXT, cancel, max_new_tokens=2000)  # does not fit beside it
    deadline = time.monotonic() + 120  # a bound on a hang, not a speed: the machine may be loaded
    while "1 request(s) ahead" not in second.snapshot().status:
        assert time.monotonic() < deadline, second.snapshot().status
        time.sleep(0.01)
    other = finish(manager.generate("glm4", str(vlm.tiny.write("glm4", tmp_path / "g")), TEXT, max_new_tokens=3))
    assert other.finish in ("stop", "length") and not first.snapshot().done and not second.snapshot().answer
    cancel.set()
    assert finish(second).finish == "cancelled" and not second.snapshot().answer
    first.cancel()
    assert finish(first).finish == "cancelled"


def test_the_visual_tokens_come_from_the_requests_own_inputs(tiny_qwen, monkeypatch):
    """The conversation is encoded once per answer (its video's frames are not decoded again for the stats)."""
    manager = SessionManager(dtype="float32")
    pipe = manager.get("qwen2_vl", tiny_qwen)
    encoded = []
    build = pipe.build_inputs
    monkeypatch.setattr(pipe, "build_inputs", lambda *a, **k: encoded.append(1) or build(*a, **k))
    conversation = [{"role": "user", "content": [{"type": "video", "path": VIDEO}, {"type": "text", "text": "Hi"}]}]
    last = finish(manager.generate("qwen2_vl", tiny_qwen, conversation, max_new_tokens=2, num_frames=4))
    assert last.error is None and last.stats.visual_tokens > 0 and len(encoded) == 1


def test_the_memory_estimate_reads_pytorch_bin_checkpoints(tiny_qwen, tmp_path):
    """Older hub repos ship pytorch_model.bin only: the demo's loader sizes them as vlm.load reads them."""
    copy = tmp_path / "bin"
    copy.mkdir()
    for file in Path(tiny_qwen).iterdir():
        if file.suffix != ".safetensors":
            (copy / file.name).write_bytes(file.read_bytes())
    torch.save(load_file(Path(tiny_qwen) / "model.safetensors"), copy / "pytorch_model.bin")
    manager = SessionManager(dtype="float32")
    manager.get("qwen2_vl", str(copy))
    assert manager.loaded()["qwen2_vl"].nbytes == weights_bytes(Path(tiny_qwen), torch.float32) > 0
    assert weights_bytes(Path(tiny_qwen), torch.bfloat16) * 2 == weights_bytes(Path(tiny_qwen), torch.float32)


def test_concurrency_and_kv_budget_settings():
    from vlm.ui import Settings

    settings = Settings.from_env({"VLM_CONCURRENCY": "3", "VLM_KV_BUDGET_GB": "2", "VLM_MEMORY_BUDGET_GB": "10"})
    assert settings.concurrency == 3 and settings.kv_budget_bytes == 2 * 2**30
    defaults = Settings.from_env({"VLM_MEMORY_BUDGET_GB": "10"})
    assert defaults.concurrency is None and defaults.kv_budget_bytes == 10 * 2**30 // 4  # what the budget holds


EXIT_CHILD = """
import sys, threading, torch
import vlm.session
from vlm.session import Generation, SessionManager

run = Generation._run_cancellable

def run_then_free_slowly(self):  # as a generation's thread still freeing its tensors after it is done
    run(self)
    if self._options.get("max_new_tokens") == 2:
        a = torch.randn(100_000)
        for _ in range(20_000):  # torch ops, each releasing the GIL: the abort if the interpreter finalizes now
            a = a + 1
        print("tail done", flush=True)

Generation._run_cancellable = run_then_free_slowly
manager = SessionManager()
answered = manager.generate("qwen2_vl", sys.argv[1], [{"role": "user", "content": "Hi"}], max_new_tokens=2)
*_, last = answered.updates(0.05)
assert last.error is None and last.stats.tokens == 2, last
print("answered", flush=True)
endless = manager.generate("qwen2_vl", sys.argv[1], [{"role": "user", "content": "Go on."}], max_new_tokens=100000)
for snap in endless.updates(0.05):
    if snap.stats is not None and snap.stats.tokens >= 2:
        break
print("exiting mid-answer", flush=True)
"""


def test_the_interpreter_exits_cleanly_after_and_during_a_generation(tmp_path):
    """updates() ends once the generation's thread is gone; at exit a running generation is cancelled and
    waited for (a daemon thread inside a torch op while the interpreter finalizes aborts the process)."""
    import subprocess
    import sys

    directory = endless_qwen2_vl(tmp_path / "q")
    out = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(directory)], capture_output=True, text=True,
                         timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["tail", "done", "answered", "exiting", "mid-answer"], out.stdout
