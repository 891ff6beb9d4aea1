"""The demo's settings, read from environment variables (all optional).

VLM_MODEL_<FAMILY>      hub repo id or local directory for a family, e.g.
                        VLM_MODEL_QWEN2_VL=Qwen/Qwen2-VL-7B-Instruct or VLM_MODEL_GROUPVIT=/models/groupvit
VLM_TINY=1              serve every family without a VLM_MODEL_* from a tiny random checkpoint (no download)
VLM_FAMILIES            comma-separated families to serve, e.g. qwen2_vl,groupvit (default: all)
VLM_CACHE_DIR           where tiny checkpoints are written (default: $HF_HOME/vlm-tiny)
VLM_DEVICE, VLM_DTYPE   as vlm.load (default "auto")
VLM_MEMORY_BUDGET_GB    weights kept loaded at once (default: 90% of GPU memory, else 70% of RAM)
VLM_QUEUE_SIZE          requests waiting in Gradio's queue (default 32)
VLM_CONCURRENCY         requests in a family's batch, answered at once (default: as many as its KV budget holds)
VLM_KV_BUDGET_GB        KV cache memory of a family's requests, running and kept for follow-ups (default: a
                        quarter of the memory budget); a request that does not fit waits, told its place
VLM_SESSION_CAPACITY    browser or API sessions whose state Gradio keeps; the oldest are dropped (default 1000)
VLM_MAX_NEW_TOKENS, VLM_MAX_IMAGES, VLM_MAX_FRAMES, VLM_MAX_SECONDS
                        per-request caps (default 2048 tokens, 8 images, 64 video frames, 300 s)
VLM_MAX_FILE_SIZE       largest upload, and largest video file decoded (default "50mb")
VLM_MAX_IMAGE_PIXELS    largest image decoded, width x height (default 64000000)
VLM_MAX_VIDEO_SECONDS, VLM_MAX_VIDEO_RESOLUTION, VLM_MAX_VIDEO_FRAMES
                        longest video, largest frame ("3840x2160" or a pixel count) and most frames in a
                        video file, checked before decoding (default 7200 s, 3840x2160, 216000)
VLM_DECODE_SECONDS      time limit of one video probe or decode, in a child process (default 120)
VLM_CONTEXT_OVERFLOW    a prompt longer than the model's context: "truncate" the oldest exchanges
                        (default) or "error"
VLM_CUSTOM_CHECKPOINTS=1  let users type any hub id or local directory in the checkpoint box
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..media import MediaLimits
from ..session import Limits


@dataclass(frozen=True)
class Settings:
    models: dict[str, str]  # family -> hub id or directory, from VLM_MODEL_<FAMILY>
    families: tuple[str, ...] | None  # None: every registered family
    tiny: bool
    cache_dir: Path
    device: str
    dtype: str
    memory_budget_bytes: int | None
    queue_size: int
    concurrency: int | None  # None: as many as the KV budget holds
    limits: Limits
    max_file_size: str
    custom_checkpoints: bool
    media: MediaLimits = MediaLimits()
    session_capacity: int = 1000
    kv_budget_bytes: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def number(name: str, default: float) -> float:
            value = env.get(name, "").strip()
            try:
                return float(value) if value else default
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number.") from None

        device = env.get("VLM_DEVICE", "auto")
        budget_gb, kv_gb = number("VLM_MEMORY_BUDGET_GB", 0.0), number("VLM_KV_BUDGET_GB", 0.0)
        memory_budget = int(budget_gb * 2**30) if budget_gb > 0 else default_budget(device)
        kv_budget = int(kv_gb * 2**30) if kv_gb > 0 else (memory_budget // 4 if memory_budget else None)
        overflow = env.get("VLM_CONTEXT_OVERFLOW", "truncate").strip().lower()
        if overflow not in ("truncate", "error"):
            raise ValueError(f"VLM_CONTEXT_OVERFLOW={overflow!r}; use truncate or error.")
        max_file_size = env.get("VLM_MAX_FILE_SIZE", "50mb")
        defaults = MediaLimits()
        return cls(
            models={k[len("VLM_MODEL_"):].lower(): v for k, v in env.items() if k.startswith("VLM_MODEL_") and v},
            families=tuple(f.strip() for f in env["VLM_FAMILIES"].split(",") if f.strip())
            if env.get("VLM_FAMILIES", "").strip() else None,
            tiny=flag(env.get("VLM_TINY")),
            cache_dir=Path(env.get("VLM_CACHE_DIR") or default_cache_dir(env)),
            device=device,
            dtype=env.get("VLM_DTYPE", "auto"),
            memory_budget_bytes=memory_budget,
            kv_budget_bytes=kv_budget,
            queue_size=int(number("VLM_QUEUE_SIZE", 32)),
            concurrency=int(number("VLM_CONCURRENCY", 0)) or None,
            limits=Limits(
                max_new_tokens=int(number("VLM_MAX_NEW_TOKENS", Limits.max_new_tokens)),
                max_images=int(number("VLM_MAX_IMAGES", Limits.max_images)),
                max_frames=int(number("VLM_MAX_FRAMES", Limits.max_frames)),
                max_seconds=number("VLM_MAX_SECONDS", Limits.max_seconds),
                context_overflow=overflow,
            ),
            max_file_size=max_file_size,
            custom_checkpoints=flag(env.get("VLM_CUSTOM_CHECKPOINTS")),
            session_capacity=int(number("VLM_SESSION_CAPACITY", 1000)),
            media=MediaLimits(
                max_image_pixels=int(number("VLM_MAX_IMAGE_PIXELS", defaults.max_image_pixels)),
                max_video_bytes=file_size(max_file_size),
                max_video_seconds=number("VLM_MAX_VIDEO_SECONDS", defaults.max_video_seconds),
                max_video_pixels=resolution(env.get("VLM_MAX_VIDEO_RESOLUTION", ""), defaults.max_video_pixels),
                max_video_frames=int(number("VLM_MAX_VIDEO_FRAMES", defaults.max_video_frames)),
                decode_seconds=number("VLM_DECODE_SECONDS", defaults.decode_seconds),
            ),
        )


def file_size(value: str) -> int:
    """Bytes in a size as Gradio's max_file_size reads it: "50mb" -> 52428800 (units b, kb, mb, gb, tb)."""
    text = value.strip().lower().replace(" ", "")
    digits = len(text) - len(text.lstrip("0123456789"))
    units = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
    if not digits or text[digits:] not in units:
        raise ValueError(f"VLM_MAX_FILE_SIZE={value!r} is not a size like 50mb.")
    return int(text[:digits]) * units[text[digits:]]


def resolution(value: str, default: int) -> int:
    """Pixels in "3840x2160" or a plain pixel count ("" gives `default`)."""
    text = value.strip().lower()
    try:
        if "x" in text:
            width, height = text.split("x")
            return int(width) * int(height)
        return int(text) if text else default
    except ValueError:
        raise ValueError(f"VLM_MAX_VIDEO_RESOLUTION={value!r}; use e.g. 3840x2160.") from None


def flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def default_cache_dir(env: Mapping[str, str]) -> Path:
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return Path(home) / "vlm-tiny"


def default_budget(device: str) -> int | None:
    """90% of the GPU's memory on CUDA, else 70% of the machine's RAM (None when unknown)."""
    import torch

    try:
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return int(0.9 * torch.cuda.get_device_properties(0).total_memory)
        return int(0.7 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (RuntimeError, ValueError, OSError, AttributeError):  # no such device / no sysconf
        return None
