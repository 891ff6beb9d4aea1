"""A damaged video (../shared/media/video/corrupted.mp4: 50 frames at 10 fps, decoding fails after frame 28):
an error saying what to do, or inside `partial_videos()` an answer from the frames before the damage, said so."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vlm
import vlm.tiny
from vlm.errors import DamagedVideoError
from vlm.processing.qwen_vl import VisionSettings, preprocess_frames
from vlm.media import partial_videos, read_frames, retrying_damaged_videos
from vlm.session import SessionManager

ROOT = Path(__file__).resolve().parents[1]
CORRUPTED = ROOT.parent / "shared" / "media" / "video" / "corrupted.mp4"
DECODABLE = 28

needs_media = pytest.mark.skipif(not CORRUPTED.is_file(), reason="../shared/media is not present")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return vlm.tiny.write("qwen2_vl", tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def pipe(tiny):
    return vlm.load(tiny, dtype="float32")


def video_question(path=CORRUPTED):
    return [{"role": "user", "content": [{"type": "video", "path": str(path)}, {"type": "text", "text": "What?"}]}]


@needs_media
def test_the_library_refuses_a_damaged_video_and_says_what_can_be_done(pipe):
    with pytest.raises(DamagedVideoError) as caught:
        pipe.encode(video_question(), num_frames=4)  # frames 0, 12, 25, 37: the last is past the damage
    assert caught.value.decodable == DECODABLE
    message = str(caught.value)
    assert "first 28 frames (2.8 s)" in message and "Re-encode or trim" in message and "partial_videos" in message
    assert "Errno" not in message  # FFmpeg's reason, not its error number


@needs_media
def test_inside_partial_videos_the_frames_before_the_damage_are_sampled_and_noted(pipe, tiny):
    with partial_videos() as partial:
        inputs = pipe.encode(video_question(), num_frames=4)
    # the 4 frames are spread over the 28 that decode: 0, 7, 14, 21
    expected, _ = preprocess_frames(read_frames(CORRUPTED, [0, 7, 14, 21]), VisionSettings.from_dir(tiny))
    torch.testing.assert_close(inputs["pixel_values_videos"], expected, rtol=0, atol=0)
    (video,) = partial
    assert (video.used, video.total, video.seconds) == (DECODABLE, 50, pytest.approx(2.8))
    assert video.message == "corrupted.mp4 is damaged after 2.8 s: the answer uses its first 28 of its 50 frames."
    with pytest.raises(DamagedVideoError):  # outside, the library's behaviour is unchanged
        pipe.encode(video_question(), num_frames=4)


def test_a_video_damaged_at_its_first_frame_stays_an_error():
    def build():
        raise DamagedVideoError("bad.mp4 is damaged from its first frame", "bad.mp4", decodable=0)

    with partial_videos(), pytest.raises(DamagedVideoError, match="first frame"):
        retrying_damaged_videos(build)
    calls = []

    def damaged_then_fine():  # a damage met once is retried once; met again, it stands
        calls.append(1)
        raise DamagedVideoError("cut.mp4 is damaged", "cut.mp4", decodable=3)

    with partial_videos(), pytest.raises(DamagedVideoError):
        retrying_damaged_videos(damaged_then_fine)
    assert len(calls) == 2


@needs_media
@pytest.mark.timeout(300)
def test_the_demo_answers_from_the_frames_before_the_damage_and_says_so(tiny):
    manager = SessionManager(dtype="float32")
    generation = manager.generate("qwen2_vl", str(tiny), video_question(), max_new_tokens=4, num_frames=4)
    *_, last = generation.updates()
    assert last.error is None and last.stats.tokens > 0
    assert last.stats.notes == ("corrupted.mp4 is damaged after 2.8 s: the answer uses its first 28 of its 50 "
                                "frames.",)
    assert last.stats.visual_tokens == 2 * 32  # 4 frames of 1280x720 at the tiny model's pixel bounds


@needs_media
@pytest.mark.timeout(300)
def test_the_cli_answers_and_notes_it_on_stderr(tiny):
    run = subprocess.run([sys.executable, "-m", "vlm", "chat", str(tiny), "What?", "--video", str(CORRUPTED),
                          "--num-frames", "4", "--max-new-tokens", "3", "--dtype", "float32"],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert "note: corrupted.mp4 is damaged after 2.8 s: the answer uses its first 28 of its 50 frames." in run.stderr
    assert run.stdout.strip()


def damaged_video(path: Path, frames: int = 40) -> Path:
    """An H.264 MP4 of random frames with 3,000 bytes in its middle zeroed."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            pixels = np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 3000] = bytes(3000)
    path.write_bytes(bytes(data))
    return path


def test_the_frames_before_a_damage_are_the_ones_that_decode(tmp_path, pipe):
    path = damaged_video(tmp_path / "cut.mp4")
    with pytest.raises(DamagedVideoError) as caught:
        read_frames(path, list(range(40)))
    decodable = caught.value.decodable
    assert 0 < decodable < 40
    assert read_frames(path, list(range(decodable))).shape[0] == decodable  # every one of them decodes
    with pytest.raises(DamagedVideoError):
        read_frames(path, [decodable])
    with partial_videos() as partial:  # a pipeline asking for every frame gets those
        inputs = pipe.encode(video_question(path), num_frames=decodable - decodable % 2)
    assert [(v.used, v.total) for v in partial] == [(decodable, 40)]
    assert int(inputs["video_grid_thw"][0, 0]) == decodable // 2
