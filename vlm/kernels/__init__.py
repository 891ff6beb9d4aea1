"""Compiled CPU kernels (C++ with AVX512-VNNI and -BF16), built on first use: linears for a few input rows
(`linear.cpp`) and a whole decoder layer's decode step (`decode_layer.cpp`), both over `matvec.h`.

`available()` builds them once per machine with `torch.utils.cpp_extension` (about a minute; cached in
torch's extensions directory) and is False where they cannot run or be built: no AVX512-VNNI, no C++
compiler or ninja, a failed build, or `VLM_KERNELS=0`. Callers then keep their PyTorch path. Dense bfloat16
weights also need AVX512-BF16 (`bf16_supported`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
SOURCES = ("linear.cpp", "decode_layer.cpp")
HEADERS = ("matvec.h",)
# -fopenmp: at::parallel_for is inline code that splits work over torch's OpenMP threads only when the extension
# itself is compiled with OpenMP (without it every loop runs on one thread); libgomp is the one torch loaded.
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c", "-fopenmp"]
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


def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernels use."""
    return set(REQUIRED_FLAGS) <= _cpu_flags()


def bf16_supported() -> bool:
    """Whether the kernels take dense bfloat16 weights here (they are available and the CPU has AVX512-BF16)."""
    return "avx512_bf16" in _cpu_flags() and available()


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
                           extra_cflags=COMPILE_FLAGS, extra_ldflags=LINK_FLAGS, is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch path stays
        log.warning("vlm kernels not built (%s: %s); using PyTorch's kernels", type(exc).__name__, exc)
        return False
    return hasattr(torch.ops.vlm_kernels, "int8_linear")


def _build_name() -> str:
    """The extension's name, with a digest of its sources and flags: each version builds in its own directory,
    so checkouts of different versions never rebuild or load each other's."""
    digest = hashlib.sha256(" ".join(COMPILE_FLAGS + LINK_FLAGS).encode())
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + Path(__file__).with_name(name).read_bytes())
    return f"vlm_kernels_{digest.hexdigest()[:12]}"
