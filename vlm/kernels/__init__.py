"""Compiled CPU kernels (C++ with AVX512 or AVX2), built on first use: linears for a few input rows
(`linear.cpp`) and a whole decoder layer's decode step (`decode_layer.cpp`), both over `matvec.h`.

`available()` builds them once per machine with `torch.utils.cpp_extension` (about a minute; cached in
torch's extensions directory) for the best instruction set this CPU has: AVX512 with VNNI (dense bfloat16
weights also need AVX512-BF16, `bf16_supported`), else AVX2 with FMA and F16C. It is False where they cannot
run or be built: neither set, no C++ compiler or ninja, a failed build, or `VLM_KERNELS=0`. Callers then keep
their PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

# instruction set -> the CPU flags it needs and the compiler's flags for it, best first
INSTRUCTION_SETS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"),
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"]),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
}
SOURCES = ("linear.cpp", "decode_layer.cpp")
HEADERS = ("matvec.h",)
# -fopenmp: at::parallel_for is inline code that splits work over torch's OpenMP threads only when the extension
# itself is compiled with OpenMP (without it every loop runs on one thread); libgomp is the one torch loaded.
BASE_FLAGS = ["-O3", "-fopenmp"]
LINK_FLAGS = ["-fopenmp"]
_BUILD = threading.Lock()
_state: dict[str, bool] = {}
log = logging.getLogger(__name__)


@functools.cache
def _cpu_flags() -> set[str]:
    """This CPU's feature flags (from /proc/cpuinfo; none where it cannot be read)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(flags.split(":", 1)[1].split())


def instruction_set() -> str | None:
    """The best instruction set of `INSTRUCTION_SETS` this CPU has, or None."""
    return next((name for name, (needs, _) in INSTRUCTION_SETS.items() if set(needs) <= _cpu_flags()), None)


def cpu_supported() -> bool:
    """Whether this CPU has the instructions of one of the kernels' builds."""
    return instruction_set() is not None


def bf16_supported() -> bool:
    """Whether the kernels take dense bfloat16 weights here: they are available, built for AVX2 (bfloat16 widened
    to float32) or for AVX512 on a CPU with AVX512-BF16."""
    return available() and (instruction_set() == "avx2" or "avx512_bf16" in _cpu_flags())


def compile_flags() -> list[str]:
    """The compiler's flags for this CPU's build."""
    return BASE_FLAGS + INSTRUCTION_SETS[instruction_set()][1]


def available() -> bool:
    """Whether `torch.ops.vlm_kernels` can be used here, building it on the first call."""
    with _BUILD:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def _build() -> bool:
    if os.environ.get("VLM_KERNELS", "1") == "0" or not cpu_supported():
        return False
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=_build_name(), sources=[str(Path(__file__).with_name(source)) for source in SOURCES],
                           extra_cflags=compile_flags(), extra_ldflags=LINK_FLAGS, is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch path stays
        log.warning("vlm kernels not built (%s: %s); using PyTorch's kernels", type(exc).__name__, exc)
        return False
    return hasattr(torch.ops.vlm_kernels, "int8_linear")


def _build_name() -> str:
    """The extension's name, with a digest of its sources and flags: each version builds in its own directory,
    so checkouts of different versions never rebuild or load each other's."""
    digest = hashlib.sha256(" ".join(compile_flags() + LINK_FLAGS).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + Path(__file__).with_name(name).read_bytes())
    return f"vlm_kernels_{digest.hexdigest()[:12]}"
