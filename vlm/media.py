"""Safe media input: image loading, video probing, lazy frame decoding (PyAV) and frame sampling.

Family-agnostic. Pixel conventions follow transformers (the reference): images become RGB with any
transparency composited on white, video frames are PyAV ``to_ndarray(format="rgb24")`` in decode order.
Untrusted input is bounded by `MediaLimits` before anything is decoded, and videos are probed and
decoded in a child process (vlm/safe_decode.py) with a deadline and a memory cap.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.nn import functional as F

from . import cancellation
from .childio import read_exact
from .errors import (CheckpointError, DamagedVideoError, EmptyFileError, ImageDecodeError, InputError, MediaError,
                     VideoDecodeError)

# Largest image (width * height) load_image decodes by default; larger files are refused before decoding.
MAX_IMAGE_PIXELS = 64_000_000
# Pillow format ids we decode ("JPEG" also opens the MPO JPEGs many cameras and phones write).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

ImageSource = Union[Image.Image, str, os.PathLike, bytes]


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on untrusted media, checked before decoding (the demo reads them from VLM_* settings)."""

    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_video_bytes: int = 2 * 2**30
    max_video_seconds: float = 2 * 3600.0
    max_video_pixels: int = 3840 * 2160  # per frame
    max_video_frames: int = 216_000  # frames in the file (2 hours at 30 fps)
    decode_seconds: float = 120.0  # wall-clock limit of one probe or one frame read
    decode_memory_bytes: int = 2**30  # the decoder's memory beyond the frames it returns


_limits = MediaLimits()


def configure(limits: MediaLimits) -> None:
    """Set the process-wide limits used when a call passes none (the demo does this at start)."""
    global _limits
    _limits = limits


def current_limits() -> MediaLimits:
    return _limits


# ----------------------------------------------------------------------------------------- images
# An image with more pixels than SHRINK_MARGIN times the size its consumer resizes to, and than
# SHRINK_FLOOR, is shrunk as it is decoded: the consumer's own resize still downsamples (at least 2x per
# side), so the result looks the same, and a huge image's memory is never spent on copies and conversions.
# Images up to SHRINK_FLOOR pixels (12 MB as RGB) always decode exactly as the reference decodes them.
SHRINK_MARGIN = 4
SHRINK_FLOOR = 1 << 22


def load_image(src: ImageSource, max_pixels: int | None = None, target_pixels: int | None = None) -> Image.Image:
    """Open an image (PIL image, path or bytes), apply EXIF orientation and return it as RGB.

    ``target_pixels`` is the most pixels the caller will resize the image to. An image with more than
    ``max(SHRINK_MARGIN * target_pixels, SHRINK_FLOOR)`` pixels is shrunk (aspect kept) to that many while
    it is decoded: a JPEG at a reduced DCT scale, other formats by a box reduction and a bicubic resize
    before any mode conversion. Smaller images come back exactly as decoded (the reference's pixels).

    Raises EmptyFileError (zero bytes), MediaError (missing path) or ImageDecodeError (unsupported
    format, corrupt or truncated data, more than ``max_pixels`` pixels; default: the configured limit).
    """
    limit = _limits.max_image_pixels if max_pixels is None else max_pixels
    budget = None if target_pixels is None else max(SHRINK_MARGIN * int(target_pixels), SHRINK_FLOOR)
    cancellation.check()
    decode = _blank_like if _dry_run.get() is not None else _decode
    if isinstance(src, Image.Image):
        return decode(src, "The image", limit, budget)
    with _opened(src) as (name, img):
        return decode(img, name, limit, budget)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header says, read without decoding its pixels."""

    width: int
    height: int
    mode: str
    format: str | None


def image_header(src: ImageSource) -> ImageHeader:
    """Size, mode and format of an image (PIL image, path or bytes) without decoding it; the same
    checks and errors as load_image, except the pixel limit."""
    if isinstance(src, Image.Image):
        return ImageHeader(src.width, src.height, src.mode, src.format)
    with _opened(src) as (_, img):
        return ImageHeader(img.width, img.height, img.mode, img.format)


@contextmanager
def _opened(src: ImageSource) -> Iterator[tuple[str, Image.Image]]:
    """(name, lazily opened image) of a path or bytes; only IMAGE_FORMATS are recognised."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, data = "The image", bytes(src)
        if not data:
            raise EmptyFileError("The image is empty (0 bytes); upload the file again.")
        fp: io.BufferedIOBase = io.BytesIO(data)
    elif isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        _check_local_file(name, "image")
        try:
            fp = open(name, "rb")
        except OSError as e:
            raise MediaError(f"The image file {name} cannot be read: {e}") from None
    else:
        raise InputError(f"An image must be a PIL image, a path or bytes, not {type(src).__name__}.")
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:  # Pillow's own hard limit (2x its MAX_IMAGE_PIXELS)
            raise ImageDecodeError(f"{name} is too large: {str(e).rstrip('.')}. Downscale the image and try "
                                   "again.") from None
        except UnidentifiedImageError:
            raise ImageDecodeError(f"{name} is not a supported image; use JPEG, PNG, WEBP, GIF or BMP.") from None
        except Exception as e:  # a recognised header that is broken
            raise ImageDecodeError(f"{name} cannot be decoded (corrupt or truncated): {e}") from e
        yield name, img


def _decode(img: Image.Image, name: str, limit: int, budget: int | None) -> Image.Image:
    """Check the size, decode the pixels (shrunk to `budget` pixels if larger), apply EXIF orientation
    and convert to RGB."""
    if img.width * img.height > limit:
        raise ImageDecodeError(
            f"{name} is too large ({img.width}x{img.height} pixels; the limit is {limit:,} pixels). "
            "Downscale the image and try again."
        )
    try:
        if budget is not None and img.width * img.height > budget:
            img = _shrink(img, budget)
        else:
            img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageDecodeError(f"{name} cannot be decoded (corrupt or truncated): {e}") from e


def _blank_like(img: Image.Image, name: str, limit: int, budget: int | None) -> Image.Image:
    """A black RGB image of the size `_decode` would return (shrunk, EXIF orientation applied), without
    decoding."""
    if img.width * img.height > limit:
        return _decode(img, name, limit, budget)  # the same refusal
    size = _shrunk_size(img.width, img.height, budget) if budget is not None and img.width * img.height > budget \
        else img.size
    turned = img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8)
    blank = Image.new("RGB", size[::-1] if turned else size)
    _dry_run.get().append(Seen("image", blank.width, blank.height))
    return blank


def _shrunk_size(width: int, height: int, budget: int) -> tuple[int, int]:
    """The size, aspect kept, of a `width` x `height` image shrunk to at most `budget` pixels."""
    scale = math.sqrt(budget / (width * height))
    return max(1, int(width * scale)), max(1, int(height * scale))


def _shrink(img: Image.Image, budget: int) -> Image.Image:
    """`img` decoded and resized, aspect kept, to at most `budget` pixels, with as little memory as possible."""
    size = _shrunk_size(img.width, img.height, budget)
    img.draft(None, size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale, never below `size` (others: no-op)
    img.load()
    if img.mode in ("P", "PA"):  # palette indices cannot be averaged
        img = img.convert("RGBA" if img.mode == "PA" or img.info.get("transparency") is not None else "RGB")
    elif img.mode == "1" or img.mode in _SIXTEEN_BIT_MODES:  # 16-bit: scaled to 8 bits as to_rgb does
        img = to_rgb(img)
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as transformers does: transparency composited on white.

    16-bit greyscale ("I;16*", and "I" holding values above 255) is scaled to 8 bits, where a plain
    Pillow convert would clip everything above 255 to white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(image)
        if image.mode != "I" or arr.max(initial=0) > 255:  # round(x / 257) in integers, in place
            arr = np.clip(arr, 0, 65535).astype(np.uint32)
            arr *= 2
            arr += 257
            arr //= 514
        image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_local_file(path: str, kind: str) -> None:
    """Raise MediaError unless ``path`` is an existing regular file, EmptyFileError if it is empty."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"The {kind} file {path} does not exist.") from None
    except (OSError, ValueError) as e:  # permissions, a NUL byte or an over-long name
        raise MediaError(f"The {kind} file {path!r} cannot be read: {e}") from None
    if not stat.S_ISREG(info.st_mode):  # directories, FIFOs and devices could block or mislead decoders
        raise MediaError(f"{path} is not a regular file; give the path of a {kind} file.")
    if info.st_size == 0:
        raise EmptyFileError(f"The {kind} file {path} is empty (0 bytes); upload it again.")


def _video_path(path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"A video must be given as a file path, not {type(path).__name__}.")
    return os.fspath(path)


# ----------------------------------------------------------------------------------------- video
@dataclass(frozen=True)
class VideoInfo:
    """What probe_video learned about a file's first video stream (width and height as stored, before
    any display rotation)."""

    path: str
    width: int
    height: int
    fps: float | None          # stream average_rate (frames per second), None if unknown
    num_frames: int            # exact unless num_frames_source == "estimated"
    duration: float            # seconds
    num_frames_source: str     # "stream" (header), "packets" (counted by demuxing), "estimated", or "decodable"
                               # (a damaged video's frames before the damage, inside partial_videos())
    container: str = ""        # FFmpeg demuxer, e.g. "matroska,webm"
    codec: str = ""            # FFmpeg decoder, e.g. "h264"


@dataclass(frozen=True)
class VideoSample:
    """Frames chosen from a video: the probe result plus the sampled frame indices."""

    info: VideoInfo
    indices: tuple[int, ...]

    @property
    def timestamps(self) -> list[float]:
        """Time of each sampled frame in seconds (index / fps), as transformers' VideoMetadata."""
        fps = self.info.fps or 24.0
        return [i / fps for i in self.indices]

    @property
    def sampled_fps(self) -> float:
        """Frames per second of the sampled clip, as transformers' VideoMetadata.sampled_fps."""
        if not self.info.fps or not self.info.num_frames:
            return self.info.fps or 24.0
        return len(self.indices) / self.info.num_frames * self.info.fps


def probe_video(path: str | os.PathLike, limits: MediaLimits | None = None) -> VideoInfo:
    """Read a video's container, size, frame rate, frame count and duration without decoding a frame.

    Runs in a decoder child (see vlm.safe_decode) and refuses, with VideoDecodeError, files over the
    limits (default: those set by `configure`): size in bytes, duration, pixels per frame, frames.
    The frame count comes from the stream header, else from counting the stream's packets (demuxing
    only), else from duration * fps. Results are cached per file version.
    """
    limits = limits or _limits
    name = _video_path(path)
    _check_local_file(name, "video")
    version = os.stat(name)
    if version.st_size > limits.max_video_bytes:
        raise VideoDecodeError(f"{name} is {_size(version.st_size)}; videos up to "
                               f"{_size(limits.max_video_bytes)} are accepted.")
    key = _file_version(name, version)
    info = _probe(name, key[1:], limits.max_video_frames, limits.decode_seconds, limits.decode_memory_bytes)
    if info.duration > limits.max_video_seconds:
        raise VideoDecodeError(f"{name} lasts {_clock(info.duration)}; videos up to {_clock(limits.max_video_seconds)} "
                               "are accepted. Trim it and try again.")
    if info.width * info.height > limits.max_video_pixels:
        raise VideoDecodeError(f"{name} is {info.width}x{info.height}; frames up to {limits.max_video_pixels:,} pixels "
                               "are accepted (e.g. 3840x2160). Downscale it and try again.")
    if info.num_frames > limits.max_video_frames:
        raise VideoDecodeError(f"{name} has {'more than ' if info.num_frames_source == 'packets' else ''}"
                               f"{min(info.num_frames, limits.max_video_frames):,} frames; videos up to "
                               f"{limits.max_video_frames:,} frames are accepted.")
    partial = _partial_videos.get()
    decodable = _damaged.get(key) if partial is not None else None
    return partial.prefix(info, decodable) if decodable else info


def _file_version(name: str, version: os.stat_result) -> tuple[str, int, int, int]:
    """A file's identity as the caches here key it: name, inode, size, modification time."""
    return name, version.st_ino, version.st_size, version.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _probe(name: str, version: tuple[int, int, int], max_frames: int, timeout: float, memory: int) -> VideoInfo:
    """probe_video's child call, cached per file version (inode, size, mtime) and limits."""
    with _DecoderChild({"op": "probe", "path": name, "max_frames": max_frames}, timeout, memory) as child:
        return VideoInfo(**child.message()["info"])


FrameSize = Callable[[int, int], tuple[int, int]]  # (height, width) of the frames -> (height, width) to use


def read_frames(path: str | os.PathLike, indices: Sequence[int], limits: MediaLimits | None = None,
                resize: FrameSize | None = None, mode: str = "bicubic") -> np.ndarray:
    """Decode the frames at ``indices`` (decode order, like transformers' PyAV loader) as uint8 RGB.

    Returns (len(indices), H, W, 3), in the order given. The file is probed first (limits apply);
    decoding runs in a child process with a deadline and a memory cap, stops at the last requested
    frame and sends each frame as soon as it is decoded. Frames are turned upright by the stream's
    display rotation (the reference ignores it). ``resize`` maps the frames' (height, width) to the size
    the caller will use: each frame is resized to it on arrival (``mode`` interpolation, antialiased, as
    torchvision's resize runs on CPU; the same pixels as resizing the whole clip at once), so only one
    frame at full size is ever held. A frame that cannot be decoded (corrupt data, index past the end
    of the stream), a crash, a timeout or too little memory raises VideoDecodeError; the request's
    cancellation (vlm.cancellation) kills the child and raises Cancelled.
    """
    limits = limits or _limits
    name = _video_path(path)
    wanted = [int(i) for i in indices]
    if not wanted or min(wanted) < 0:
        raise InputError(f"Frame indices must be a non-empty list of non-negative ints, got {indices!r}.")
    info = probe_video(name, limits)
    seen = _dry_run.get()
    if seen is not None:  # as stored: a display rotation would swap height and width, which changes no count
        seen.append(Seen("video", info.width, info.height, len(wanted)))
        return np.zeros((len(wanted), *(resize(info.height, info.width) if resize else (info.height, info.width)), 3),
                        np.uint8)
    positions: dict[int, list[int]] = {}
    for position, index in enumerate(wanted):
        positions.setdefault(index, []).append(position)
    order = sorted(positions)
    request = {"op": "frames", "path": name, "indices": order, "max_pixels": limits.max_video_pixels}
    frame_bytes = limits.max_video_pixels * 3
    memory = info.width * info.height * 3 + limits.decode_memory_bytes  # one frame at a time
    out, shape = None, None
    try:
        with _DecoderChild(request, limits.decode_seconds, memory) as child:
            for index in order:
                header = child.message()
                if header.get("index") != index or not _frame_shape(header.get("shape"), frame_bytes) or (
                        shape is not None and header["shape"] != shape):
                    raise child.stopped()
                shape = header["shape"]
                frame = np.frombuffer(child.payload(math.prod(shape)), np.uint8).reshape(shape)
                if out is None:
                    size = resize(shape[0], shape[1]) if resize else shape[:2]
                    out = np.empty((len(wanted), *size, 3), np.uint8)
                out[positions[index]] = _resized(frame, out.shape[1:3], mode)
    except DamagedVideoError as exc:
        with _damaged_lock:
            _damaged[_file_version(name, os.stat(name))] = exc.decodable
            while len(_damaged) > DAMAGED_CACHE:
                _damaged.popitem(last=False)
        raise DamagedVideoError(_damage_message(name, exc.decodable, info.fps, exc.cause), name, exc.decodable,
                                exc.cause) from None
    return out


def _frame_shape(shape: object, max_bytes: int) -> bool:
    """Is `shape` an (H, W, 3) frame of at most `max_bytes`?"""
    return (isinstance(shape, list) and len(shape) == 3 and shape[2] == 3
            and all(isinstance(n, int) and n > 0 for n in shape) and math.prod(shape) <= max_bytes)


_INTERPOLATE_MODES = {2: "bilinear", 3: "bicubic"}  # PIL resample id -> F.interpolate mode


def resample_mode(resample: int) -> str:
    """The F.interpolate mode of a processor's PIL `resample` id, for frames (as torchvision maps it)."""
    if resample not in _INTERPOLATE_MODES:
        raise CheckpointError(f"Video resample={resample} is not supported; use 2 (bilinear) or 3 (bicubic).")
    return _INTERPOLATE_MODES[resample]


def _resized(frame: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """An (H, W, 3) uint8 frame resized to `size` as processors resize clips (F.interpolate, antialiased)."""
    if tuple(size) == frame.shape[:2]:
        return frame
    x = torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous()
    x = F.interpolate(x, size=tuple(size), mode=mode, align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def _damage_message(name: str, decodable: int, fps: float | None, cause: str) -> str:
    if not decodable:
        return f"{name} is damaged from its first frame ({cause}); re-encode it or use another file."
    length = f" ({decodable / fps:.1f} s)" if fps else ""
    return (f"{name} is damaged: decoding fails after its first {decodable} frames{length} ({cause}). Re-encode "
            "or trim the file, or answer from those frames (inside vlm.media.partial_videos(), as the demo and the "
            "CLI do).")


# ------------------------------------------------------------------------------ damaged videos, dry runs
DAMAGED_CACHE = 256
_damaged: OrderedDict[tuple, int] = OrderedDict()  # file version -> frames that decode before its damage
_damaged_lock = threading.Lock()
T = TypeVar("T")


@dataclass(frozen=True)
class PartialVideo:
    """A damaged video read as the frames before its damage."""

    path: str
    used: int  # frames before the damage
    total: int  # frames the file declares
    seconds: float  # length of the part used

    @property
    def message(self) -> str:
        return (f"{Path(self.path).name} is damaged after {self.seconds:.1f} s: the answer uses its first "
                f"{self.used} of its {self.total} frames.")


class _PartialVideos:
    def __init__(self) -> None:
        self.read: list[PartialVideo] = []
        self.retried: set[str] = set()

    def prefix(self, info: VideoInfo, decodable: int) -> VideoInfo:
        """`info` cut to its first `decodable` frames, noted."""
        seconds = decodable / info.fps if info.fps else info.duration * decodable / info.num_frames
        if all(p.path != info.path for p in self.read):
            self.read.append(PartialVideo(info.path, decodable, info.num_frames, seconds))
        return replace(info, num_frames=decodable, duration=seconds, num_frames_source="decodable")


_partial_videos: ContextVar[_PartialVideos | None] = ContextVar("vlm_partial_videos", default=None)
_dry_run: ContextVar[list["Seen"] | None] = ContextVar("vlm_media_dry_run", default=None)


@dataclass(frozen=True)
class Seen:
    """An image or video as a dry run handed it to a processor."""

    kind: str  # "image" | "video"
    width: int
    height: int
    frames: int = 1  # a video's sampled frames


@contextmanager
def partial_videos() -> Iterator[list[PartialVideo]]:
    """Inside, a video found damaged is read as its frames before the damage (a pipeline samples them anew)
    instead of raising DamagedVideoError; yields the list of the videos read so, filled as they are met.
    Outside, the error stands. One damaged at its first frame is an error either way."""
    token = _partial_videos.set(_PartialVideos())
    try:
        yield _partial_videos.get().read
    finally:
        _partial_videos.reset(token)


def retrying_damaged_videos(build: Callable[[], T]) -> T:
    """`build()`, which reads videos; inside partial_videos(), run again when it meets a damaged video (now
    probed as its frames before the damage), once per video."""
    partial = _partial_videos.get()
    while True:
        try:
            return build()
        except DamagedVideoError as exc:
            if partial is None or not exc.decodable or exc.path in partial.retried:
                raise
            partial.retried.add(exc.path)


@contextmanager
def dry_run() -> Iterator[list[Seen]]:
    """Inside, load_image and read_frames return black pixels of the right size without decoding anything
    (videos are probed): a processor then builds inputs of the right shapes, to count tokens. Yields the
    list of what they handed out, in order."""
    token = _dry_run.set([])
    try:
        yield _dry_run.get()
    finally:
        _dry_run.reset(token)


# --------------------------------------------------------------------------------- decoder child
SAFE_DECODE = Path(__file__).with_name("safe_decode.py")
# The child's environment: no secrets (tokens) of the server's, single-threaded numpy, few malloc arenas.
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "TMPDIR", "SYSTEMROOT")
_HEADER_BYTES = 1 << 20


def decoder_command() -> list[str]:
    """The decoder child's command line (isolated mode: no user site, no current directory on the path)."""
    return [sys.executable, "-I", str(SAFE_DECODE)]


class _DecoderChild:
    """A fresh decoder child answering one request within `timeout` seconds and `memory` bytes beyond
    what it maps at start (see vlm/safe_decode.py for the messages).

    The child's refusals become VideoDecodeError; so do a crash, a deadline passed, an early exit or a
    malformed message. Cancelling the request kills the child at once (Cancelled); so does leaving
    the `with` block early.
    """

    def __init__(self, request: dict, timeout: float, memory: int):
        self.name, self.timeout = request["path"], timeout
        request = {**request, "memory": memory, "cpu_seconds": math.ceil(timeout * (os.cpu_count() or 1)) + 5}
        env = {**{k: os.environ[k] for k in _INHERITED_ENV if k in os.environ}, **_CHILD_ENV}
        self.deadline = time.monotonic() + timeout
        self.child = subprocess.Popen(decoder_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, bufsize=0, env=env)
        try:
            self.child.stdin.write(json.dumps(request).encode())
            self.child.stdin.close()
        except OSError:  # the child died at once; its exit code says why
            pass

    def __enter__(self) -> "_DecoderChild":
        return self

    def __exit__(self, *exc) -> None:
        if self.child.poll() is None:
            self.child.kill()
        self.child.wait()
        self.child.stdout.close()

    def message(self) -> dict:
        """The next message's header; a refusal raises VideoDecodeError (DamagedVideoError for a file that
        decodes up to some frame)."""
        (size,) = struct.unpack("<Q", self._read(8))
        if size > _HEADER_BYTES:
            raise self.stopped()
        try:
            header = json.loads(self._read(size))
        except ValueError:
            raise self.stopped() from None
        if not isinstance(header, dict):
            raise self.stopped()
        if not header.get("ok"):
            if header.get("kind") == "damaged":
                raise DamagedVideoError(header["message"], self.name, int(header["decodable"]),
                                        str(header.get("cause", "")))
            raise VideoDecodeError(header.get("message") or f"{self.name} cannot be decoded.")
        return header

    def payload(self, size: int) -> bytearray:
        """The `size` bytes that follow a frame's header."""
        return self._read(size)

    def stopped(self) -> VideoDecodeError:
        """The error for a child that died or answered nonsense (it is killed first)."""
        if self.child.poll() is None:
            self.child.kill()
        return VideoDecodeError(f"{self.name}: the video decoder stopped ({_exit_reason(self.child.wait())}); the "
                                "file is probably damaged or needs more memory than this server allows.")

    def _read(self, size: int) -> bytearray:
        """`size` bytes from the child before the deadline, looking at the request's cancellation meanwhile."""
        try:
            return read_exact(self.child.stdout, size, self.deadline, cancellation.check)
        except TimeoutError:
            raise VideoDecodeError(f"{self.name}: decoding took longer than {self.timeout:g} s; the file may be "
                                   "damaged or too long. Try a shorter clip.") from None
        except (EOFError, OSError):
            raise self.stopped() from None


def _exit_reason(code: int) -> str:
    """-11 -> "signal SIGSEGV", 1 -> "exit code 1"."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


def _size(n: int) -> str:
    """2048 -> "2.0 KB"."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def _clock(seconds: float) -> str:
    """12.5 -> "12.5 s", 3725.5 -> "1:02:06"."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# -------------------------------------------------------------------------------- frame sampling
def sample_frames_uniform(
    total_frames: int, video_fps: float | None, num_frames: int | None = None, fps: float | None = None
) -> list[int]:
    """Frame indices as transformers' ``BaseVideoProcessor.sample_frames`` (default_sample_indices_fn).

    ``num_frames`` evenly spaced frames, or ``total/video_fps*fps`` frames when only ``fps`` is given,
    or every frame when neither is given.
    """
    if num_frames is not None and fps is not None:
        raise InputError("Give either num_frames or fps for video sampling, not both.")
    if num_frames is None and fps is not None:
        if not video_fps:
            raise InputError("Sampling by fps needs the video's frame rate, which is unknown; use num_frames.")
        num_frames = max(1, int(total_frames / video_fps * fps))
    if num_frames is None:
        return list(range(total_frames))
    if num_frames > total_frames:
        raise InputError(f"Asked for {num_frames} frames but the video has only {total_frames}.")
    return (np.arange(num_frames, dtype=int) * total_frames // num_frames).tolist()


def sample_frames_bounded(
    total_frames: int,
    video_fps: float | None,
    num_frames: int | None = None,
    fps: float | None = None,
    min_frames: int = 4,
    max_frames: int = 768,
    multiple: int = 2,
) -> list[int]:
    """Frame indices as transformers' ``Qwen2VLVideoProcessor.sample_frames``.

    ``num_frames`` is rounded to a multiple of ``multiple`` (the temporal patch size); with ``fps`` the
    count is ``total/video_fps*fps`` clamped to [min_frames, max_frames] and to the video, then floored
    to a multiple. Neither given: every frame. Deviation: where the reference divides by zero (a
    count that rounds to 0, e.g. a 1-frame video), we take min(multiple, total) frames instead.
    """
    if num_frames is not None and fps is not None:
        raise InputError("Give either num_frames or fps for video sampling, not both.")
    if num_frames is not None:
        num_frames = round(num_frames / multiple) * multiple
    elif fps is not None:
        if not video_fps:
            raise InputError("Sampling by fps needs the video's frame rate, which is unknown; use num_frames.")
        max_frames = math.floor(min(max_frames, total_frames) / multiple) * multiple
        count = total_frames / video_fps * fps
        count = min(max(count, min_frames), max_frames, total_frames)
        num_frames = math.floor(count / multiple) * multiple
    else:
        return list(range(total_frames))
    if num_frames > total_frames:
        raise InputError(
            f"Asked for {num_frames} frames but the video has only {total_frames}; ask for fewer frames."
        )
    if num_frames < 1:
        num_frames = min(multiple, total_frames)
    return torch.arange(0, total_frames, total_frames / num_frames).int().tolist()
