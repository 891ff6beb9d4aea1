"""`python -m vlm.bench --peer llama.cpp`: this project's language model against llama.cpp's on the same weights.

Per model and precision, our decode worker and llama-bench run in turn, `rounds` times (interleaved, so
both see the same load); the read bandwidth is measured before each round. Every figure is the median of
its samples. A quality worker then compares each quantized format's logits with bf16's.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from . import llama_cpp
from .checkpoints import MODELS, build_checkpoint
from .gguf_export import export_gguf

PEER_MODELS = "llava_onevision_0.5b,qwen2_vl_2b,decoder_2048x5632x6,decoder_3584x18944x2"
PRECISIONS = {"bfloat16": None, "int8": "int8", "int4": "int4"}  # ours: precision -> quantization


def run_peer(args, run, measure_bandwidth) -> dict:
    """The peer report; `run` runs a worker command and returns its RESULT, `measure_bandwidth` bytes/s."""
    bench_tool = llama_cpp.find_tool("llama-bench", args.llama_bench)
    quantize_tool = llama_cpp.find_tool("llama-quantize", args.llama_bench)
    cache = Path(args.cache)
    (cache / "gguf").mkdir(parents=True, exist_ok=True)
    precisions = args.precisions.split(",")
    rows, bandwidths, qualities, unmeasured = [], [], {}, {}
    for name in args.models.split(","):
        checkpoint = build_checkpoint(name, cache, "bfloat16")
        bf16 = export_gguf(checkpoint, cache / "gguf" / f"{name}-bf16.gguf")
        files = {p: llama_cpp.quantized(bf16, llama_cpp.FILE_TYPES[p], quantize_tool) for p in precisions}
        samples = {p: {"ours": [], "llama": []} for p in precisions}
        for _ in range(args.rounds):
            bandwidths.append(measure_bandwidth())
            for precision in precisions:
                quantization = PRECISIONS[precision]
                samples[precision]["ours"].append(run([
                    sys.executable, "-m", "vlm.bench.decode_worker", str(checkpoint), "--threads", str(args.threads),
                    "--prompt", str(args.prompt), "--gen", str(args.gen),
                    *(["--quantization", quantization] if quantization else [])]))
                samples[precision]["llama"].append(llama_cpp.llama_bench(
                    bench_tool, files[precision], args.threads, args.prompt, args.gen, repetitions=2))
        reference = None if args.skip_reference else run([
            sys.executable, str(Path(__file__).resolve().parents[2] / "bench" / "reference_worker.py"), str(checkpoint),
            "--family", MODELS[name].family, "--threads", str(args.threads), "--decode-only", "--gen", str(args.gen)])
        try:
            qualities[name] = run([sys.executable, "-m", "vlm.bench.quality_worker", str(checkpoint), "--threads",
                           str(args.threads), "--ours", ",".join(PRECISIONS[p] for p in precisions if PRECISIONS[p]),
                           "--gguf", *(f"{llama_cpp.FILE_TYPES[p]}={files[p]}" for p in precisions if PRECISIONS[p])])
        except SystemExit as failure:  # e.g. killed for memory (float32 copies of a 3B): the speed figures stand
            unmeasured[name] = str(failure).splitlines()[0]
        for precision in precisions:
            rows.append(_row(name, precision, samples[precision], files[precision], reference))
    bandwidth = statistics.median(bandwidths)
    for row in rows:
        row["ours_roofline_fraction"] = row["ours_decode_tok_s"] * row["ours_decode_bytes"] / bandwidth
        row["llama_roofline_fraction"] = row["llama_decode_tok_s"] * row["llama_decode_bytes"] / bandwidth
    return {"bandwidth_gb_s": bandwidth / 1e9, "bandwidth_samples_gb_s": [b / 1e9 for b in bandwidths],
            "prompt_tokens": args.prompt, "decode_tokens": args.gen, "rows": rows, "quality": qualities,
            "quality_not_measured": unmeasured}


def _median(results: list[dict], key: str) -> float:
    return statistics.median(v for result in results for v in result[key])


def _row(name: str, precision: str, samples: dict, gguf_file: Path, reference: dict | None) -> dict:
    ours, llama = samples["ours"], samples["llama"]
    file_type = llama_cpp.FILE_TYPES[precision]
    types = llama_cpp.tensor_types(gguf_file)
    row = {
        "model": name, "precision": precision, "llama_type": file_type,
        "ours_decode_tok_s": _median(ours, "decode_tok_s"), "llama_decode_tok_s": _median(llama, "decode_tok_s"),
        "ours_pp_tok_s": _median(ours, "pp_tok_s"), "llama_pp_tok_s": _median(llama, "pp_tok_s"),
        "ours_decode_bytes": ours[0]["decode_bytes"],
        "llama_decode_bytes": _gguf_decode_bytes(gguf_file),
        "llama_head_type": types.get("output.weight", types["token_embd.weight"]),
        "samples": samples,
    }
    if precision == "bfloat16" and reference:
        row["reference_decode_tok_s"] = statistics.median(reference["decode_tok_s"])
    return row


def _gguf_decode_bytes(gguf_file: Path) -> int:
    """Bytes llama.cpp reads per decode step: every tensor but the embedding table, whose rows are gathered
    (when tied, the table is the head and is read whole)."""
    import gguf

    tensors = gguf.GGUFReader(str(gguf_file)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)


def to_markdown(report: dict) -> str:
    samples = ", ".join(f"{b:.0f}" for b in report["bandwidth_samples_gb_s"])
    lines = [f"Machine: {report['machine']}; load average {report['load']} at the start; read bandwidth "
             f"{report['bandwidth_gb_s']:.1f} GB/s (median of {samples}); {report['date']}. Batch 1, medians of "
             "interleaved runs; roofline = decode tok/s x bytes read per token / bandwidth.", "",
             "| model | precision (llama.cpp type, its head) | decode tok/s: ours | llama.cpp | ours / llama.cpp | "
             f"transformers (bf16) | roofline: ours | llama.cpp | prompt {report['prompt_tokens']} tok/s: ours | llama.cpp | "
             "ours / llama.cpp |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        reference = f"{r['reference_decode_tok_s']:.1f}" if "reference_decode_tok_s" in r else "-"
        lines.append(
            f"| {r['model']} | {r['precision']} ({r['llama_type']}, {r['llama_head_type']}) | "
            f"{r['ours_decode_tok_s']:.1f} | {r['llama_decode_tok_s']:.1f} | "
            f"{r['ours_decode_tok_s'] / r['llama_decode_tok_s']:.2f}x | {reference} | "
            f"{r['ours_roofline_fraction']:.0%} | {r['llama_roofline_fraction']:.0%} | {r['ours_pp_tok_s']:.0f} | "
            f"{r['llama_pp_tok_s']:.0f} | {r['ours_pp_tok_s'] / r['llama_pp_tok_s']:.2f}x |")
    lines += ["", "Quality against bf16 on the same weights (teacher-forced over 256 random tokens: logit RMS error "
              "relative to bf16's logits, top-1 agreement; float32 shows how far bf16 itself is):", "",
              "| model | format | logit error | top-1 agreement |", "|---|---|---|---|"]
    for model, quality in report["quality"].items():
        for label, q in quality.items():
            label = label if label in PRECISIONS or label == "float32" else f"llama.cpp {label}"
            lines.append(f"| {model} | {label} | {q['logit_error']:.1%} | {q['top1_agreement']:.0%} |")
    for model, reason in report["quality_not_measured"].items():
        lines.append(f"| {model} | not measured: {reason} | - | - |")
    return "\n".join(lines) + "\n"
