"""Stop, Clear and the time cap reach every stage of reading a request (issue #14): probing a video,
decoding its frames (the decoder child is killed), reading images, the vision encoders and the prompt.
The cancel event is set from inside a stage, so each test shows exactly where the work stopped; the
session test stops a 4K video as a user would.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image
from torch import nn

import vlm
import vlm.media
import vlm.tiny
from vlm import cancellation
from vlm.errors import Cancelled
from vlm.media import probe_video, read_frames
from vlm.session import SessionManager

from tests import big_media
from tests.big_media import where  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
VIDEO = str(ROOT / "assets" / "bouncing_ball.mp4")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def no_decoder_left_behind():
    yield
    assert not [p for p in psutil.Process().children(recursive=True) if "safe_decode" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    return {family: vlm.load(vlm.tiny.write(family, tmp_path_factory.mktemp(family)), dtype="float32")
            for family in ("qwen2_vl", "glm4v", "llava_onevision")}


def cancelled_after(seconds: float) -> threading.Event:
    event = threading.Event()
    threading.Timer(seconds, event.set).start()
    return event


# ------------------------------------------------------------------------------------------- media
def test_probing_stops_within_a_second_and_the_child_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(vlm.media, "decoder_command", lambda: [sys.executable, "-c", "import time; time.sleep(60)"])
    video = tmp_path / "clip.mp4"
    video.write_bytes(Path(VIDEO).read_bytes())  # a file of its own: probe results are cached per file
    event = cancelled_after(0.3)
    start = time.monotonic()
    with cancellation.scope(event), pytest.raises(Cancelled):  # main: waits for the deadline (120 s)
        probe_video(video)
    assert time.monotonic() - start < 1.3


def test_frame_decoding_stops_at_the_next_frame_and_the_child_is_killed(where, monkeypatch):
    video = big_media.video_4k(where)
    probe_video(video)
    arrived, event = [], threading.Event()
    resize = vlm.media._resized

    def counting(frame, size, mode):
        arrived.append(time.monotonic())
        if len(arrived) == 2:
            event.set()
        return resize(frame, size, mode)

    monkeypatch.setattr(vlm.media, "_resized", counting)
    with cancellation.scope(event), pytest.raises(Cancelled):
        read_frames(video, list(range(64)), resize=lambda h, w: (224, 392))
    assert len(arrived) == 2 and time.monotonic() - arrived[-1] < 1.0  # main: all 64 frames, then the reply


def test_reading_images_stops_between_images(pipes, monkeypatch):
    decoded, event = [], threading.Event()
    decode = vlm.media._decode

    def counting(*args):
        decoded.append(1)
        if len(decoded) == 2:
            event.set()
        return decode(*args)

    monkeypatch.setattr(vlm.media, "_decode", counting)
    images = [{"type": "image", "image": Image.new("RGB", (64, 48), (i * 40, 0, 0))} for i in range(5)]
    conversation = [{"role": "user", "content": [*images, {"type": "text", "text": "Compare them."}]}]
    out = pipes["qwen2_vl"].generate(conversation, cancel=event, max_new_tokens=4)[0]
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert len(decoded) == 2  # main: all five, then the vision encoder and the prompt


# ------------------------------------------------------------------------------------------- model
class Counted(nn.Module):
    """A block that counts its calls and cancels the request on the `stop_at`-th."""

    def __init__(self, block: nn.Module, calls: list, stop_at: int, event: threading.Event):
        super().__init__()
        self.block, self.calls, self.stop_at, self.event = block, calls, stop_at, event

    def forward(self, *args, **kwargs):
        self.calls.append(1)
        if len(self.calls) == self.stop_at:
            self.event.set()
        return self.block(*args, **kwargs)


def count_blocks(holder: nn.Module, name: str, stop_at: int, monkeypatch) -> tuple[list, threading.Event]:
    calls, event = [], threading.Event()
    blocks = getattr(holder, name)
    monkeypatch.setattr(holder, name, nn.ModuleList(Counted(b, calls, stop_at, event) for b in blocks))
    return calls, event


@pytest.mark.parametrize("family", ["qwen2_vl", "glm4v", "llava_onevision"])
def test_the_vision_encoder_stops_between_blocks(pipes, family, monkeypatch):
    pipe = pipes[family]
    tower = {"qwen2_vl": lambda m: m.visual, "glm4v": lambda m: m.visual,
             "llava_onevision": lambda m: m.vision_tower.vision_model.encoder}[family](pipe.model)
    name = "layers" if family == "llava_onevision" else "blocks"
    assert len(getattr(tower, name)) >= 2
    pipe.clear_caches()  # no vision features from an earlier test
    calls, event = count_blocks(tower, name, 1, monkeypatch)
    picture = Image.new("RGB", (96, 64), (10, 200, 30))
    conversation = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}]}]
    out = pipe.generate(conversation, cancel=event, max_new_tokens=4)[0]
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert len(calls) == 1  # main: every block, then the prompt


def test_the_prompt_stops_between_decoder_layers(pipes, monkeypatch):
    pipe = pipes["qwen2_vl"]
    calls, event = count_blocks(pipe.model.model, "layers", 1, monkeypatch)
    out = pipe.generate([{"role": "user", "content": "Tell me a long story."}], cancel=event, max_new_tokens=4)[0]
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert len(calls) == 1  # main: every layer of the prompt


def test_a_stream_cancelled_while_reading_ends_without_a_delta(pipes, monkeypatch):
    event = threading.Event()
    decode = vlm.media._decode
    monkeypatch.setattr(vlm.media, "_decode", lambda *args: (event.set(), decode(*args))[1])
    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (64, 64))},
                                                 {"type": "image", "image": Image.new("RGB", (64, 64))}]}]
    assert list(pipes["qwen2_vl"].stream(conversation, cancel=event, max_new_tokens=4)) == []


# ----------------------------------------------------------------------------------------- session
def test_stop_during_a_4k_video_frees_the_slot_within_a_second(where, tmp_path, monkeypatch):
    video = big_media.video_4k(where)
    manager = SessionManager()
    directory = str(vlm.tiny.write("qwen2_vl", tmp_path / "q"))
    manager.get("qwen2_vl", directory)
    decoding, resize = threading.Event(), vlm.media._resized
    frames = []

    def counting(frame, size, mode):
        frames.append(1)
        if len(frames) == 4:
            decoding.set()
        return resize(frame, size, mode)

    monkeypatch.setattr(vlm.media, "_resized", counting)
    conversation = [{"role": "user", "content": [{"type": "video", "path": video}, {"type": "text", "text": "?"}]}]
    generation = manager.generate("qwen2_vl", directory, conversation, num_frames=64, max_new_tokens=4)
    assert decoding.wait(120), generation.snapshot()  # 4 of the 64 frames read: Stop as a user would now
    stopped = time.monotonic()
    generation.cancel()
    assert generation.join(2.0), "still reading the video 2 s after Stop"  # main: until all 64 frames are read
    assert time.monotonic() - stopped < 2.0  # 1 s target; margin for a loaded machine
    assert generation.snapshot().finish == "cancelled" and len(frames) < 64
    with manager.slot("qwen2_vl") as acquired:  # the family's only slot is free again
        assert acquired
