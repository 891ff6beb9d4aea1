"""The demo's settings, read from environment variables (all optional).

VLM_MODEL_<FAMILY>      hub repo id or local directory for a family, e.g.
                        VLM_MODEL_QWEN2_VL=Qwen/Qwen2-VL-7B-Instruct or VLM_MODEL_GROUPVIT=/models/groupvit
VLM_TINY=1              serve every family without a VLM_MODEL_* from a tiny random checkpoint (no download)
VLM_FAMILIES            comma-separated families to serve, e.g. qwen2_vl,groupvit (default: all)
VLM_CACHE_DIR           where tiny checkpoints are written (default: $HF_HOME/vlm-tiny)
VLM_DEVICE, VLM_DTYPE   as vlm.load (default "auto")
VLM_MEMORY_BUDGET_GB    weights kept loaded at once (default: 90% of GPU memory, else 70% of RAM)
VLM_QUEUE_SIZE          requests waiting in Gradio's queue (default 32)
VLM_CONCURRENCY         requests served at once per family (default 1)
VLM_SESSION_CAPACITY, VLM_SESSION_MEMORY
                        browser or API sessions kept, and the memory of their state (default 1000, "512mb");
                        beyond either, empty and then long-unused sessions are dropped (see vlm/ui/sessions.py)
VLM_SESSION_IDLE_MINUTES  a session unused this long is closed, its uploads deleted (default 60)
VLM_SESSION_KEEP_MINUTES  a session used this recently is never dropped for a new one (default 10)
VLM_MAX_NEW_TOKENS, VLM_MAX_IMAGES, VLM_MAX_FRAMES, VLM_MAX_SECONDS
                        per-request caps (default 2048 tokens, 8 images, 64 video frames, 300 s)
VLM_MAX_MESSAGE_CHARS, VLM_MAX_CONVERSATION_CHARS
                        text of one message (or system prompt) and of a whole conversation (default 16000, 100000)
VLM_MAX_FILE_SIZE       largest upload, and largest video file decoded (default "50mb")
VLM_SESSION_UPLOADS, VLM_UPLOADS_TOTAL
                        uploads one session may use, and uploads kept on the server's disk (default "200mb", "2gb")
VLM_MAX_REQUEST_SIZE    largest request body other than an upload (default "1mb")
VLM_MAX_CONNECTIONS     open connections; beyond it the oldest connection without a request is closed (default 500)
VLM_HEADER_SECONDS, VLM_KEEPALIVE_SECONDS
                        time to send a request's headers, and to keep an idle connection open (default 10, 5)
VLM_MAX_IMAGE_PIXELS    largest image decoded, width x height (default 64000000)
VLM_MAX_VIDEO_SECONDS, VLM_MAX_VIDEO_RESOLUTION, VLM_MAX_VIDEO_FRAMES
                        longest video, largest frame ("3840x2160" or a pixel count) and most frames in a
                        video file, checked before decoding (default 7200 s, 3840x2160, 216000)
VLM_DECODE_SECONDS      time limit of one video probe or decode, in a child process (default 120)
VLM_CONTEXT_OVERFLOW    a prompt longer than the model's context: "truncate" the oldest exchanges
                        (default) or "error"
VLM_CUSTOM_CHECKPOINTS=1  let users type any hub id or local directory in the checkpoint box
VLM_API_KEY             when set, the OpenAI-compatible /v1 routes need "Authorization: Bearer <key>"
VLM_API_ALLOWED_HOSTS   comma-separated hosts whose http(s) image/video URLs the API fetches (default: none)
VLM_API_MAX_REQUEST_SIZE  largest API request body (default "100mb")
VLM_REMOTE_<FAMILY>     serve a family from an OpenAI-compatible server, e.g. http://gpu-box:8000/v1, with
                        VLM_REMOTE_<FAMILY>_API_KEY, VLM_REMOTE_<FAMILY>_MODEL and VLM_REMOTE_TIMEOUT (120 s)
VLM_REMOTE_CONCURRENCY  requests a remote family streams at once (default 8; the server batches them)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from ..api import ApiSettings
from ..api_request import Bounds
from ..families import FAMILIES
from ..media import MediaLimits
from ..remote import RemoteServer, servers_from_env
from ..session import Limits
from .server import ServerLimits
from .sessions import SessionLimits
from .uploads import UploadLimits


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
    concurrency: int
    limits: Limits
    custom_checkpoints: bool
    media: MediaLimits = MediaLimits()
    sessions: SessionLimits = SessionLimits()
    uploads: UploadLimits = UploadLimits()
    server: ServerLimits = ServerLimits()
    api: ApiSettings = ApiSettings()
    remote: dict[str, RemoteServer] = field(default_factory=dict)  # families served by another server
    remote_concurrency: int = 8

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "Settings":
        def number(name: str, default: float) -> float:
            value = env.get(name, "").strip()
            try:
                return float(value) if value else default
            except ValueError:
                raise ValueError(f"{name}={value!r} is not a number.") from None

        budget_gb = number("VLM_MEMORY_BUDGET_GB", 0.0)
        overflow = env.get("VLM_CONTEXT_OVERFLOW", "truncate").strip().lower()
        if overflow not in ("truncate", "error"):
            raise ValueError(f"VLM_CONTEXT_OVERFLOW={overflow!r}; use truncate or error.")

        def size(name: str, default: int) -> int:
            value = env.get(name, "").strip()
            return file_size(value, name) if value else default

        defaults = MediaLimits()
        device = env.get("VLM_DEVICE", "auto")
        return cls(
            models={k[len("VLM_MODEL_"):].lower(): v for k, v in env.items() if k.startswith("VLM_MODEL_") and v},
            families=tuple(f.strip() for f in env["VLM_FAMILIES"].split(",") if f.strip())
            if env.get("VLM_FAMILIES", "").strip() else None,
            tiny=flag(env.get("VLM_TINY")),
            cache_dir=Path(env.get("VLM_CACHE_DIR") or default_cache_dir(env)),
            device=device,
            dtype=env.get("VLM_DTYPE", "auto"),
            memory_budget_bytes=int(budget_gb * 2**30) if budget_gb > 0 else default_budget(device),
            queue_size=int(number("VLM_QUEUE_SIZE", 32)),
            concurrency=int(number("VLM_CONCURRENCY", 1)),
            limits=Limits(
                max_new_tokens=int(number("VLM_MAX_NEW_TOKENS", Limits.max_new_tokens)),
                max_images=int(number("VLM_MAX_IMAGES", Limits.max_images)),
                max_frames=int(number("VLM_MAX_FRAMES", Limits.max_frames)),
                max_seconds=number("VLM_MAX_SECONDS", Limits.max_seconds),
                max_message_chars=int(number("VLM_MAX_MESSAGE_CHARS", Limits.max_message_chars)),
                max_conversation_chars=int(number("VLM_MAX_CONVERSATION_CHARS", Limits.max_conversation_chars)),
                context_overflow=overflow,
            ),
            custom_checkpoints=flag(env.get("VLM_CUSTOM_CHECKPOINTS")),
            sessions=SessionLimits(
                capacity=int(number("VLM_SESSION_CAPACITY", SessionLimits.capacity)),
                memory_bytes=size("VLM_SESSION_MEMORY", SessionLimits.memory_bytes),
                idle_seconds=60 * number("VLM_SESSION_IDLE_MINUTES", SessionLimits.idle_seconds / 60),
                keep_seconds=60 * number("VLM_SESSION_KEEP_MINUTES", SessionLimits.keep_seconds / 60),
            ),
            uploads=UploadLimits(
                file_bytes=size("VLM_MAX_FILE_SIZE", UploadLimits.file_bytes),
                session_bytes=size("VLM_SESSION_UPLOADS", UploadLimits.session_bytes),
                total_bytes=size("VLM_UPLOADS_TOTAL", UploadLimits.total_bytes),
            ),
            server=ServerLimits(
                request_bytes=size("VLM_MAX_REQUEST_SIZE", ServerLimits.request_bytes),
                connections=int(number("VLM_MAX_CONNECTIONS", ServerLimits.connections)),
                header_seconds=number("VLM_HEADER_SECONDS", ServerLimits.header_seconds),
                keepalive_seconds=number("VLM_KEEPALIVE_SECONDS", ServerLimits.keepalive_seconds),
            ),
            media=MediaLimits(
                max_image_pixels=int(number("VLM_MAX_IMAGE_PIXELS", defaults.max_image_pixels)),
                max_video_bytes=size("VLM_MAX_FILE_SIZE", UploadLimits.file_bytes),
                max_video_seconds=number("VLM_MAX_VIDEO_SECONDS", defaults.max_video_seconds),
                max_video_pixels=resolution(env.get("VLM_MAX_VIDEO_RESOLUTION", ""), defaults.max_video_pixels),
                max_video_frames=int(number("VLM_MAX_VIDEO_FRAMES", defaults.max_video_frames)),
                decode_seconds=number("VLM_DECODE_SECONDS", defaults.decode_seconds),
            ),
            api=ApiSettings(
                key=env.get("VLM_API_KEY") or None,
                allowed_hosts=tuple(h.strip() for h in env.get("VLM_API_ALLOWED_HOSTS", "").split(",") if h.strip()),
                max_request_bytes=file_size(env.get("VLM_API_MAX_REQUEST_SIZE", "100mb"), "VLM_API_MAX_REQUEST_SIZE"),
            ),
            remote=servers_from_env(env, FAMILIES),
            remote_concurrency=int(number("VLM_REMOTE_CONCURRENCY", 8)),
        )

    def request_bounds(self) -> Bounds:
        """What an API request is checked against: the chat tab's caps and upload limits."""
        return Bounds(self.limits.max_new_tokens, self.limits.max_images, self.limits.max_frames,
                      self.media.max_video_bytes, self.media.max_image_pixels, self.api.allowed_hosts)


def file_size(value: str, name: str = "VLM_MAX_FILE_SIZE") -> int:
    """Bytes in a size as Gradio's max_file_size reads it: "50mb" -> 52428800 (units b, kb, mb, gb, tb)."""
    text = value.strip().lower().replace(" ", "")
    digits = len(text) - len(text.lstrip("0123456789"))
    units = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
    if not digits or text[digits:] not in units:
        raise ValueError(f"{name}={value!r} is not a size like 50mb.")
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
