"""The command line on a tiny checkpoint, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = os.path.join(ROOT, "assets", "cat.png")


def _run(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vlm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_tiny_then_chat_streams_an_answer(tmp_path, media_dir):
    out = tmp_path / "tiny"
    made = _run("tiny", "qwen2_vl", str(out))
    assert made.returncode == 0 and (out / "config.json").exists()
    chat = _run("chat", str(out), "What happens here?", "--image", f"{media_dir}/coco.jpg",
                "--video", f"{media_dir}/video/flipping_a_pancake.mkv", "--max-new-tokens", "5", "--dtype", "float32",
                "--num-frames", "4")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()


def test_errors_are_one_line_and_exit_2(tmp_path):
    result = _run("chat", str(tmp_path / "missing"), "hi")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert _run("tiny", "nonexistent_family", str(tmp_path / "x")).returncode == 2


def test_a_checkpoint_of_the_other_kind_is_a_one_line_error(tmp_path):
    chat, groupvit = tmp_path / "chat", tmp_path / "groupvit"
    assert _run("tiny", "qwen2_vl", str(chat)).returncode == 0 and _run("tiny", "groupvit", str(groupvit)).returncode == 0
    for args, message in [(("segment", str(chat), "--image", IMAGE, "--labels", "cat", "--out", str(tmp_path / "o.png")),
                           "is a qwen2_vl checkpoint, which `segment` cannot use: try `python -m vlm chat`"),
                          (("chat", str(groupvit), "hi"), "is a groupvit checkpoint, which `chat` cannot use")]:
        result = _run(*args, "--dtype", "float32")
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_what_it_cannot_serve_in_one_line(tmp_path):
    import pytest

    import vlm.tiny
    from vlm.errors import InputError
    from vlm.serve import serve

    result = _run("serve", str(vlm.tiny.write("groupvit", tmp_path / "g")), "--port", "9")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "segmentation model; the API serves chat models" in result.stderr
    with pytest.raises(InputError, match="Two checkpoints of qwen2_vl were given"):
        serve([str(vlm.tiny.write("qwen2_vl", tmp_path / n)) for n in ("a", "b")])
