"""`python -m vlm.bench`: build random-weight checkpoints with real models' shapes, run this project and the
reference (transformers, eager, same dtype and threads) in the same run, and print a table of ratios."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from .. import hugepages
from ..quantize import METHODS
from .checkpoints import MODELS, build_checkpoint, weight_bytes
from .peer import PEER_MODELS, PRECISIONS, run_peer
from .peer import to_markdown as peer_markdown
from .media import make_image, make_video

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_MODELS = "qwen2_vl_2b,llava_onevision_0.5b"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m vlm.bench", description=__doc__)
    parser.add_argument("--models", help=f"comma-separated, from {', '.join(MODELS)} (default: {SCENARIO_MODELS}; "
                                         f"with --peer: {PEER_MODELS})")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/vlm-bench"), help="checkpoints are kept here")
    parser.add_argument("--out", default="bench_results", help="where results.md and results.json go")
    parser.add_argument("--skip-reference", action="store_true", help="measure this project only")
    parser.add_argument("--quantization", choices=sorted(METHODS), help="quantize this project's language model")
    parser.add_argument("--streams", default="1,2,4,8", help="concurrent streams to measure (empty: none)")
    parser.add_argument("--kinds", default="text,image", help="what the concurrent streams ask: text, image")
    peer = parser.add_argument_group("peer", "the language model against llama.cpp's on the same weights")
    peer.add_argument("--peer", choices=["llama.cpp"], help="run the peer benchmark instead of the scenarios")
    peer.add_argument("--llama-bench", help="path of llama-bench (llama-quantize is looked for beside it; "
                                            "default: on PATH)")
    peer.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated, from %(default)s")
    peer.add_argument("--rounds", type=int, default=3, help="interleaved rounds per model and precision")
    peer.add_argument("--prompt", type=int, default=512, help="prompt tokens (llama-bench -p)")
    peer.add_argument("--gen", type=int, default=128, help="decoded tokens (llama-bench -n)")
    args = parser.parse_args()
    args.models = args.models or (PEER_MODELS if args.peer else SCENARIO_MODELS)

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.peer:
        report, render, stem = run_peer(args, _run, measure_bandwidth), peer_markdown, "results-peer"
    else:
        report, render, stem = scenarios(args), scenarios_markdown, "results"
    report = {"machine": _machine(args.threads), "load": _load_average(), "date": time.strftime("%Y-%m-%d"), **report}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render(report)
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def scenarios(args) -> dict:
    """Ours against the reference on the image, decode, second-turn and video scenarios of each model."""
    cache = Path(args.cache)
    image, video = make_image(cache / "bench.png"), make_video(cache / "bench.mp4")
    bandwidth = measure_bandwidth()
    rows = []
    for name in args.models.split(","):
        checkpoint = build_checkpoint(name, cache, args.dtype)
        common = [str(checkpoint), "--image", str(image), "--video", str(video), "--dtype", args.dtype,
                  "--threads", str(args.threads)]
        quantized = ["--quantization", args.quantization] if args.quantization else []
        warm_page_cache(checkpoint)
        ours = _run([sys.executable, "-m", "vlm.bench.worker", *common, *quantized])
        ref = None if args.skip_reference else _run(
            [sys.executable, str(ROOT / "bench" / "reference_worker.py"), *common, "--family", MODELS[name].family])
        rows.append(_row(name, checkpoint, ours, ref, bandwidth))
        if args.streams:
            rows[-1]["concurrency"] = _run([sys.executable, "-m", "vlm.bench.concurrency", str(checkpoint), "--media",
                                            str(cache), "--dtype", args.dtype, "--threads", str(args.threads),
                                            "--streams", args.streams, "--kinds", args.kinds])
    return {"dtype": args.dtype, "quantization": args.quantization, "bandwidth_gb_s": bandwidth / 1e9, "rows": rows}


def warm_page_cache(directory: Path, chunk: int = 1 << 24) -> None:
    """Read every file of `directory` once, so both sides load from memory rather than one paying for the disk."""
    for file in sorted(directory.iterdir()):
        with open(file, "rb") as stream:
            while stream.read(chunk):
                pass


def measure_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Sustained read bandwidth in bytes/s: the median of a few full reductions over a 1 GiB tensor (it
    varies from run to run on a shared machine: measure it next to what it is compared with). The tensor is on
    huge pages, as the kernels' weights are (`vlm.hugepages`), so the roofline is what the memory can give."""
    data = hugepages.empty((size_bytes // 4,), torch.float32).fill_(1)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return size_bytes / statistics.median(seconds)


def _run(command: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        killed = " (killed, e.g. for memory)" if done.returncode == -signal.SIGKILL else ""
        raise SystemExit(f"{' '.join(command[:3])} failed with exit code {done.returncode}{killed}:\n"
                         f"{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _row(name, checkpoint, ours, ref, bandwidth) -> dict:
    weights = weight_bytes(checkpoint)
    roofline = bandwidth / ours["decode_bytes"]
    row = {"model": name, "weights_gb": weights / 1e9, "roofline_tok_s": roofline, "ours": ours, "reference": ref,
           "ours_load_rss_x_weights": ours["load_peak_rss"] / weights,
           "ours_decode_roofline_fraction": ours["decode_tok_s"] / roofline}
    if ref:
        row["reference_load_rss_x_weights"] = ref["load_peak_rss"] / weights
        row["speedup"] = {
            "load": ref["load_s"] / ours["load_s"], "ttft_image": ref["ttft_image_s"] / ours["ttft_image_s"],
            "decode": ours["decode_tok_s"] / ref["decode_tok_s"], "ttft_turn2": ref["ttft_turn2_s"] / ours["ttft_turn2_s"],
            "video16": ref["video16_ttft_s"] / ours["video16_ttft_s"],
        }
    return row


def to_markdown(report: dict) -> str:
    quantized = f" (this project: {report['quantization']} weights)" if report["quantization"] else ""
    lines = [f"Machine: {report['machine']}; load average {report['load']}; dtype {report['dtype']}{quantized}; measured read bandwidth "
             f"{report['bandwidth_gb_s']:.1f} GB/s; {report['date']}.", "",
             "| model | metric | ours | reference | ours vs reference |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        ours, ref, speed = row["ours"], row["reference"] or {}, row.get("speedup", {})

        def line(metric, key, fmt, ratio=None):
            theirs = format(ref[key], fmt) if key in ref else "-"
            lines.append(f"| {row['model']} | {metric} | {format(ours[key], fmt)} | {theirs} | "
                         f"{'-' if ratio is None else f'{ratio:.2f}x'} |")

        line("load time (s)", "load_s", ".2f", speed.get("load"))
        lines.append(f"| {row['model']} | peak RSS while loading / weights | {row['ours_load_rss_x_weights']:.2f} | "
                     f"{row.get('reference_load_rss_x_weights', float('nan')):.2f} | - |")
        line("time to first token, image (s)", "ttft_image_s", ".2f", speed.get("ttft_image"))
        line("decode tokens/s (batch 1)", "decode_tok_s", ".2f", speed.get("decode"))
        line("time to first token, 2nd turn (s)", "ttft_turn2_s", ".2f", speed.get("ttft_turn2"))
        line("time to first token, 16-frame video (s)", "video16_ttft_s", ".2f", speed.get("video16"))
        lines.append(f"| {row['model']} | decode / roofline ({row['roofline_tok_s']:.2f} tok/s) | "
                     f"{row['ours_decode_roofline_fraction']:.0%} | - | - |")
        if "top1_vs_plain" in ours:
            lines.append(f"| {row['model']} | top-1 agreement with {report['dtype']} (teacher-forced answer; "
                         f"{report['dtype']} vs float32: {ours['top1_plain_vs_float32']:.0%}) | "
                         f"{ours['top1_vs_plain']:.0%} | - | - |")
    return "\n".join(lines) + "\n\nTimes: lower is better; 'ours vs reference' > 1 means this project is faster.\n"


def scenarios_markdown(report: dict) -> str:
    return to_markdown(report) + concurrency_markdown(report)


def concurrency_markdown(report: dict) -> str:
    """The concurrent-streams table (engine vs one request at a time) and the issue's targets, as ratios."""
    rows = [row for row in report["rows"] if row.get("concurrency")]
    if not rows:
        return ""
    lines = ["", "Concurrent streams (each forced to 128 tokens, arriving 0.5 s apart; 'one at a time': each waits "
             "for the one before, as with one generation per family):", "",
             "| model | ask | streams | aggregate decode tok/s (streams decoding at once) | vs 1 stream | per-stream tok/s | "
             "TTFT p50 / p95 (s) | one at a time: tok/s, TTFT p50 / p95 (s) |", "|---|---|---|---|---|---|---|---|"]
    targets = []
    for row in rows:
        results = row["concurrency"]
        for key, engine in results.items():
            if not key.endswith("/engine"):
                continue
            kind, n, _ = key.split("/")
            solo, serial = results.get(f"{kind}/1/engine"), results[f"{kind}/{n}/one_at_a_time"]
            ratio = f"{engine['aggregate_tok_s'] / solo['aggregate_tok_s']:.2f}x" if solo else "-"
            lines.append(f"| {row['model']} | {kind} | {n} | {engine['aggregate_tok_s']:.1f} ({engine['together']} at once) | {ratio} | "
                         f"{engine['per_stream_tok_s']:.1f} | {engine['ttft_p50_s']:.2f} / {engine['ttft_p95_s']:.2f} | "
                         f"{serial['aggregate_tok_s']:.1f}, {serial['ttft_p50_s']:.2f} / {serial['ttft_p95_s']:.2f} |")
        prefill = results["prefill_interference"]
        kept = prefill["stream_tok_s_during_image_prefill"] / prefill["stream_tok_s_before"]
        targets.append(f"- {row['model']}: two running streams keep {kept:.0%} of their rate while a third user's "
                       f"image prompt is read ({prefill['image_prefill_s']:.1f} s; target >= 50%)")
        for n, goal in (("4", 3.0), ("8", 4.5)):
            if f"text/{n}/engine" in results and "text/1/engine" in results:
                gain = results[f"text/{n}/engine"]["aggregate_tok_s"] / results["text/1/engine"]["aggregate_tok_s"]
                targets.append(f"- {row['model']}: aggregate decode at {n} text streams = {gain:.2f}x one stream "
                               f"(target >= {goal}x)")
        if "text/4/engine" in results and "text/1/engine" in results:
            lone = results["text/1/engine"]["ttft_p50_s"]
            targets.append(f"- {row['model']}: TTFT p95 of 4 staggered text users = "
                           f"{results['text/4/engine']['ttft_p95_s'] / lone:.2f}x a lone user's ({lone:.2f} s; "
                           "target <= 2x plus one chunk)")
    return "\n".join(lines + ["", *targets]) + "\n"


def _load_average() -> str:
    """The 1/5/15-minute load averages as the benchmark starts (other processes share the cores)."""
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def _machine(threads: int) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores ({threads} threads), torch {torch.__version__}"


if __name__ == "__main__":
    main()
