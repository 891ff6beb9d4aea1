"""Compiled CPU kernels (C++ with AVX512-VNNI, `quantized_linear.cpp`), built on first use.

`available()` builds them once per machine with `torch.utils.cpp_extension` (about a minute; cached in
torch's extensions directory) and is False where they cannot run or be built: no AVX512-VNNI, no C++
compiler or ninja, a failed build, or `VLM_KERNELS=0`. Callers then keep their PyTorch path.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
COMPILE_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"]
_BUILD = threading.Lock()
_state: dict[str, bool] = {}
log = logging.getLogger(__name__)


def cpu_supported() -> bool:
    """Whether this CPU has the instructions the kernels use (read from /proc/cpuinfo; False elsewhere)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(REQUIRED_FLAGS) <= set(flags.split(":", 1)[1].split())


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

        cpp_extension.load(name="vlm_kernels", sources=[str(Path(__file__).with_name("quantized_linear.cpp"))],
                           extra_cflags=COMPILE_FLAGS, is_python_module=False, verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the PyTorch path stays
        log.warning("vlm kernels not built (%s: %s); using PyTorch's kernels", type(exc).__name__, exc)
        return False
    return hasattr(torch.ops.vlm_kernels, "int8_linear")
