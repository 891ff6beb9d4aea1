"""`python -m vlm.bench` end to end on the tests' tiny config: both sides measured, concurrent streams through
the engine and one at a time, a table and JSON written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"load_s", "load_peak_rss", "ttft_image_s", "decode_tok_s", "ttft_turn2_s", "video16_ttft_s"}


def test_bench_measures_both_sides_and_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "vlm.bench", "--models", "qwen2_vl_tiny", "--cache", str(tmp_path),
                           "--out", str(tmp_path / "out"), "--streams", "1,2"], capture_output=True, text=True, env=env,
                          cwd=tmp_path,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    (row,) = report["rows"]
    assert report["bandwidth_gb_s"] > 0 and row["model"] == "qwen2_vl_tiny"
    assert METRICS <= set(row["reference"]) and METRICS | {"decode_bytes"} <= set(row["ours"])
    assert all(row["ours"][m] > 0 and row["reference"][m] > 0 for m in METRICS - {"load_peak_rss"})
    assert set(row["speedup"]) == {"load", "ttft_image", "decode", "ttft_turn2", "video16"}
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| qwen2_vl_tiny | decode tokens/s (batch 1) |" in table and "decode / roofline" in table
    concurrency = row["concurrency"]
    assert {f"{kind}/{n}/{path}" for kind in ("text", "image") for n in (1, 2) for path in ("engine", "one_at_a_time")} \
        <= set(concurrency)
    assert all(v["aggregate_tok_s"] > 0 and 0 < v["ttft_p50_s"] <= v["ttft_p95_s"] for k, v in concurrency.items()
               if k != "prefill_interference")
    assert concurrency["prefill_interference"]["stream_tok_s_during_image_prefill"] > 0
    assert "| qwen2_vl_tiny | text | 2 |" in table and "keep" in table


def test_decode_bytes_count_the_weights_the_kernels_read(tmp_path):
    """Plain weights kept for the kernels are not parameters; the roofline must still count them: every
    language-model tensor of the checkpoint but the embedding table (which a tied head is), in bf16."""
    import math

    from safetensors import safe_open

    import vlm
    import vlm.tiny
    from vlm.bench.worker import decode_weight_bytes

    directory = vlm.tiny.write("qwen2_vl", tmp_path)
    with safe_open(str(directory / "model.safetensors"), "pt") as weights:
        sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()}
    tied = not any("lm_head" in name for name in sizes)
    expected = sum(n for name, n in sizes.items() if "visual" not in name and ("embed_tokens" not in name or tied))
    pipe = vlm.load(directory, dtype="bfloat16")
    pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)  # linears prepared on first use
    assert decode_weight_bytes(pipe.model) == 2 * expected
