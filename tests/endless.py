"""A tiny Qwen2-VL that never stops by itself, for tests that need an answer still running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import vlm.tiny


def endless_qwen2_vl(directory: Path, **overrides: Any) -> Path:
    """The tiny Qwen2-VL (with `overrides`) whose end-of-sequence id is out of its vocabulary: answers run to
    max_new_tokens."""
    vlm.tiny.write("qwen2_vl", directory, generation={"eos_token_id": [99999]}, **overrides)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token"] = None
    config_path.write_text(json.dumps(config))
    return directory
