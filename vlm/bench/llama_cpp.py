"""llama.cpp's tools as the benchmark's peer: quantize a GGUF file, run `llama-bench` on it.

llama.cpp is not a dependency: build it once outside the project, e.g.
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llama-src   # its source, vendor/llama.cpp
    cmake -S .../vendor/llama.cpp -B /tmp/llama-build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build /tmp/llama-build --target llama-bench llama-quantize -j2
and pass `--llama-bench /tmp/llama-build/bin/llama-bench` (llama-quantize is looked for beside it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

# our precision -> llama.cpp's file type of the same size class
FILE_TYPES = {"bfloat16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}


def find_tool(name: str, llama_bench: str | None) -> Path:
    """`name` beside the given llama-bench, else on PATH; a clear exit with how to build it otherwise."""
    candidates = [Path(llama_bench).with_name(name)] if llama_bench else []
    found = shutil.which(name)
    candidates += [Path(found)] if found else []
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit(f"{name} not found: build llama.cpp (see vlm/bench/llama_cpp.py) and pass --llama-bench PATH.")


def quantized(bf16: Path, file_type: str, llama_quantize: Path) -> Path:
    """`bf16` quantized to `file_type` with llama.cpp's default choices (once; the bf16 file itself for BF16)."""
    if file_type == "BF16":
        return bf16
    target = bf16.with_name(bf16.name.replace("-bf16.", f"-{file_type.lower()}."))
    if not target.exists():
        partial = target.with_suffix(".partial")
        done = subprocess.run([str(llama_quantize), str(bf16), str(partial), file_type], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"llama-quantize failed:\n{done.stderr[-2000:]}")
        partial.rename(target)
    return target


def tensor_types(gguf_file: Path) -> dict[str, str]:
    """GGUF tensor name -> its type name (e.g. "Q8_0"), read with the `gguf` package."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(gguf_file)).tensors}


def llama_bench(tool: Path, model: Path, threads: int, prompt: int, gen: int, repetitions: int) -> dict:
    """llama-bench's per-repetition tokens/s: {"pp_tok_s": [...], "decode_tok_s": [...]} (one model per call)."""
    command = [str(tool), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
               "-r", str(repetitions), "-o", "json"]
    done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode:
        raise SystemExit(f"llama-bench failed on {model.name}:\n{done.stderr[-2000:]}")
    out = {}
    for test in json.loads(done.stdout):
        out["pp_tok_s" if test["n_prompt"] else "decode_tok_s"] = test["samples_ts"]
    return out
