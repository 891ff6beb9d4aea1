"""The llama.cpp peer benchmark: GGUF export of the language model, our decode worker, and (where llama.cpp's
tools are built) the whole interleaved run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlm.tiny
from vlm.bench.checkpoints import build_checkpoint
from vlm.bench.gguf_export import export_gguf
from vlm.checkpoint import read_safetensors_header, read_safetensors_tensor, weight_files

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit("RESULT ", 1)[1])


@pytest.mark.parametrize("family, prefix", [("qwen2_vl", "model."), ("llava_onevision", "language_model.model.")])
def test_gguf_holds_the_language_model_under_llama_cpp_names(tmp_path, family, prefix):
    checkpoint = vlm.tiny.write(family, tmp_path / family)
    target = export_gguf(checkpoint, tmp_path / "model-bf16.gguf")
    reader = gguf.GGUFReader(str(target))
    tensors = {t.name: t for t in reader.tensors}
    (file,) = weight_files(checkpoint)
    header = read_safetensors_header(file)
    stored = {k: read_safetensors_tensor(file, k, header[k]) for k in header if k.startswith(prefix)}
    layers = {k.removeprefix(prefix + "layers.").split(".")[0] for k in stored if k.startswith(prefix + "layers.")}
    pairs = {"token_embd.weight": prefix + "embed_tokens.weight", "output_norm.weight": prefix + "norm.weight",
             "blk.1.attn_q.weight": prefix + "layers.1.self_attn.q_proj.weight",
             "blk.1.attn_k.bias": prefix + "layers.1.self_attn.k_proj.bias",
             "blk.0.ffn_down.weight": prefix + "layers.0.mlp.down_proj.weight",
             "blk.0.ffn_norm.weight": prefix + "layers.0.post_attention_layernorm.weight"}
    for name, key in pairs.items():
        values = torch.from_numpy(gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type).copy())
        expected = stored[key]
        kind = "BF16" if expected.ndim == 2 else "F32"
        assert tensors[name].tensor_type.name == kind
        assert torch.equal(values.view(expected.shape), expected.to(torch.bfloat16).float() if kind == "BF16"
                           else expected.float()), name
    language = [k for k in stored if not k.endswith("rotary.inv_freq")]
    assert len(tensors) == len(language)  # every language tensor once (tied head: none of its own)
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "qwen2"
    assert fields["qwen2.block_count"].contents() == len(layers)
    assert fields["tokenizer.ggml.model"].contents() == "none"


def test_decode_worker_times_prompt_and_steps(tmp_path):
    checkpoint = build_checkpoint("qwen2_vl_tiny", tmp_path, "bfloat16")
    result = _run("vlm.bench.decode_worker", str(checkpoint), "--threads", "1", "--prompt", "32", "--gen", "8",
                  "--quantization", "int8")
    assert len(result["pp_tok_s"]) == len(result["decode_tok_s"]) == 2
    assert all(v > 0 for v in result["pp_tok_s"] + result["decode_tok_s"]) and result["decode_bytes"] > 0


def _llama_bench() -> str | None:
    return os.environ.get("VLM_LLAMA_BENCH") or shutil.which("llama-bench")


@pytest.mark.skipif(_llama_bench() is None, reason="llama.cpp's llama-bench is not built (set VLM_LLAMA_BENCH)")
def test_peer_benchmark_runs_both_sides_interleaved(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "vlm.bench", "--peer", "llama.cpp", "--llama-bench", _llama_bench(),
                           "--models", "qwen2_vl_tiny", "--rounds", "2", "--prompt", "32", "--gen", "8",
                           "--cache", str(tmp_path), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "results-peer.json").read_text())
    assert [r["precision"] for r in report["rows"]] == ["bfloat16", "int8", "int4"]
    assert len(report["bandwidth_samples_gb_s"]) == 2
    for row in report["rows"]:
        assert len(row["samples"]["ours"]) == len(row["samples"]["llama"]) == 2
        assert row["ours_decode_tok_s"] > 0 and row["llama_decode_tok_s"] > 0 and row["llama_pp_tok_s"] > 0
    assert report["rows"][0]["reference_decode_tok_s"] > 0
    quality = report["quality"]["qwen2_vl_tiny"]
    assert set(quality) == {"float32", "int8", "int4", "Q8_0", "Q4_0"}
    table = (tmp_path / "out" / "results-peer.md").read_text()
    assert "| qwen2_vl_tiny | int4 (Q4_0" in table and "llama.cpp Q8_0" in table


@pytest.mark.skipif(_llama_bench() is None, reason="llama.cpp's llama-bench is not built (set VLM_LLAMA_BENCH)")
def test_a_failing_quality_worker_costs_only_its_quality_rows(tmp_path):
    """A quality worker that dies (one holding float32 copies of a 3B model was killed for memory) leaves the
    speed figures and says why the quality rows are missing."""
    from vlm.bench.__main__ import _run, measure_bandwidth
    from vlm.bench.peer import run_peer, to_markdown

    def run(command):
        if "vlm.bench.quality_worker" in command:
            return _run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
        return _run(command)

    args = argparse.Namespace(llama_bench=_llama_bench(), cache=str(tmp_path), precisions="bfloat16,int8",
                              models="qwen2_vl_tiny", rounds=1, threads=2, prompt=16, gen=4, skip_reference=True)
    report = run_peer(args, run, lambda: measure_bandwidth(1 << 26, 2))
    assert [r["precision"] for r in report["rows"]] == ["bfloat16", "int8"]
    assert all(r["ours_decode_tok_s"] > 0 and r["llama_decode_tok_s"] > 0 for r in report["rows"])
    assert report["quality"] == {}
    reason = report["quality_not_measured"]["qwen2_vl_tiny"]
    assert "exit code -9 (killed, e.g. for memory)" in reason
    report.update(machine="test", load="0", date="today")
    assert f"| qwen2_vl_tiny | not measured: {reason} | - | - |" in to_markdown(report)
