"""vlm.progress: what a request reports while it works (video frames decoded, images loaded, images and
videos encoded, prompt tokens read), from the thread doing the work (the engine's for the prompt); the
prompt read in chunks gives the reference's tokens."""

from __future__ import annotations

import threading

import pytest

import vlm
import vlm.media
import vlm.tiny
from tests.parity import assert_same_greedy, image_conv, opened, reference_greedy, reference_pair
from tests.test_robustness_media import make_video
from vlm import progress

IMAGE = "assets/shapes.png"
LONG = " ".join(f"word{i}" for i in range(200))  # text of over two prefill chunks
CHUNK = 256  # prompt rows per engine step (fixed here; measured by default)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    directory = vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))
    pipe = vlm.load(directory, dtype="float32")
    pipe.engine_options["chunk_tokens"] = CHUNK
    return directory, pipe


def heard(work) -> list[tuple[str, int, int | None, str]]:
    """The reports `work()` makes: (stage, done, total, thread name)."""
    reports = []
    with progress.reporting(lambda *report: reports.append((*report, threading.current_thread().name))):
        work()
    return reports


def test_a_video_question_reports_each_stage_in_order_with_its_numbers(qwen, tmp_path):
    _, pipe = qwen
    video = make_video(tmp_path / "clip.mp4", 40, size=(64, 48))  # 4 s at 10 fps: 8 frames sampled at 2 fps
    conversation = [{"role": "user", "content": [{"type": "image", "path": IMAGE}, {"type": "video", "path": str(video)},
                                                 {"type": "text", "text": LONG}]}]
    reports = heard(lambda: list(pipe.stream(conversation, max_new_tokens=2)))
    stages = [stage for stage, *_ in reports]
    assert stages == sorted(stages, key=["images", "video", "encoding", "prompt"].index)  # never back
    assert [r[:3] for r in reports if r[0] == "images"] == [("images", 1, 1)]
    assert [r[:3] for r in reports if r[0] == "video"] == [("video", n, 8) for n in range(1, 9)]
    assert [r[:3] for r in reports if r[0] == "encoding"] == [("encoding", 1, None), ("encoding", 1, None)]
    prompt = [r for r in reports if r[0] == "prompt"]
    length = int(pipe.encode(conversation)["input_ids"].shape[1])
    assert length > 2 * CHUNK
    assert [r[1:3] for r in prompt] == [(n, length) for n in [0, *range(CHUNK, length, CHUNK), length]]
    assert all(r[3] == "vlm-engine" for r in prompt)  # heard in the engine's thread, by the request's listener
    outside = []
    with progress.reporting(lambda *report: outside.append(report)):
        progress.report("prompt", 1, 2)
    progress.report("prompt", 2, 2)  # after the block: nobody listens
    assert outside == [("prompt", 1, 2)]


def test_reports_of_a_follow_up_start_at_the_reused_prefix(qwen):
    _, pipe = qwen
    first = image_conv([IMAGE], "What is it?")
    answer = pipe.chat(first, max_new_tokens=4)
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    prompt = [r for r in heard(lambda: pipe.chat(follow_up, max_new_tokens=2)) if r[0] == "prompt"]
    start, length = prompt[0][1:3]
    assert 0 < start < length and prompt[-1][1:3] == (length, length)  # only the new tokens are read


def test_each_distinct_frame_is_reported_as_it_arrives_from_the_decoder_child(tmp_path):
    video = make_video(tmp_path / "clip.mp4", 12)
    reports = heard(lambda: vlm.media.read_frames(video, [0, 3, 3, 9]))
    assert [r[:3] for r in reports] == [("video", 1, 3), ("video", 2, 3), ("video", 3, 3)]


def test_a_prompt_read_in_chunks_gives_the_references_tokens(qwen):
    pytest.importorskip("transformers")
    directory, pipe = qwen
    conversation = image_conv([IMAGE], LONG)
    model, processor = reference_pair("Qwen2VLForConditionalGeneration", directory)
    inputs = processor.apply_chat_template(opened(conversation), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["input_ids"].shape[1] > 2 * CHUNK
    theirs, gaps = reference_greedy(model, inputs, 12, repetition_penalty=1.0)
    ours = pipe.generate(conversation, max_new_tokens=12, do_sample=False, repetition_penalty=1.0)[0]
    assert_same_greedy(ours.token_ids, theirs[0], gaps[0], pipe.stop_ids)
