"""Safe media input: image loading, video probing, lazy frame decoding (PyAV) and frame sampling.

Family-agnostic. Pixel conventions follow transformers (the reference): images become RGB with any
transparency composited on white, video frames are PyAV ``to_ndarray(format="rgb24")`` in decode order.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EmptyFileError, ImageDecodeError, InputError, MediaError, VideoDecodeError

# Largest image (width * height) load_image decodes; larger files are refused before decoding.
MAX_IMAGE_PIXELS = 64_000_000
# Pillow format ids we decode ("JPEG" also opens the MPO JPEGs many cameras and phones write).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

ImageSource = Union[Image.Image, str, os.PathLike, bytes]


# ----------------------------------------------------------------------------------------- images
def load_image(src: ImageSource, max_pixels: int | None = None) -> Image.Image:
    """Open an image (PIL image, path or bytes), apply EXIF orientation and return it as RGB.

    Raises EmptyFileError (zero bytes), MediaError (missing path) or ImageDecodeError (unsupported
    format, corrupt or truncated data, more than ``max_pixels`` pixels; default MAX_IMAGE_PIXELS).
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(src, Image.Image):
        return _decode(src, "The image", limit)
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, data = "The image", bytes(src)
        if not data:
            raise EmptyFileError("The image is empty (0 bytes); upload the file again.")
        fp: io.BufferedIOBase = io.BytesIO(data)
    elif isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        _check_local_file(name, "image")
        fp = open(name, "rb")
    else:
        raise InputError(f"An image must be a PIL image, a path or bytes, not {type(src).__name__}.")
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img = Image.open(fp, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:  # Pillow's own hard limit (2x its MAX_IMAGE_PIXELS)
            raise ImageDecodeError(f"{name} is too large: {e}. Downscale the image and try again.") from None
        except UnidentifiedImageError:
            raise ImageDecodeError(f"{name} is not a supported image; use JPEG, PNG, WEBP, GIF or BMP.") from None
        except Exception as e:  # a recognised header that is broken
            raise ImageDecodeError(f"{name} cannot be decoded (corrupt or truncated): {e}") from e
        return _decode(img, name, limit)


def _decode(img: Image.Image, name: str, limit: int) -> Image.Image:
    """Check the size, decode the pixels, apply EXIF orientation and convert to RGB."""
    if img.width * img.height > limit:
        raise ImageDecodeError(
            f"{name} is too large ({img.width}x{img.height} pixels; the limit is {limit:,} pixels). "
            "Downscale the image and try again."
        )
    try:
        img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageDecodeError(f"{name} cannot be decoded (corrupt or truncated): {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB as transformers does: transparency composited on white.

    16-bit greyscale ("I;16*", and "I" holding values above 255) is scaled to 8 bits, where a plain
    Pillow convert would clip everything above 255 to white.
    """
    if image.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(image).astype(np.float64)
        if image.mode != "I" or arr.max(initial=0) > 255:
            arr = np.clip(arr, 0, 65535) / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _check_local_file(path: str, kind: str) -> None:
    """Raise MediaError unless ``path`` is an existing regular file, EmptyFileError if it is empty."""
    if not os.path.exists(path):
        raise MediaError(f"The {kind} file {path} does not exist.")
    if not os.path.isfile(path):  # directories, FIFOs and devices could block or mislead decoders
        raise MediaError(f"{path} is not a regular file; give the path of a {kind} file.")
    if os.path.getsize(path) == 0:
        raise EmptyFileError(f"The {kind} file {path} is empty (0 bytes); upload it again.")


# ----------------------------------------------------------------------------------------- video
@dataclass(frozen=True)
class VideoInfo:
    """What probe_video learned about a file's first video stream."""

    path: str
    width: int
    height: int
    fps: float | None          # stream average_rate (frames per second), None if unknown
    num_frames: int            # exact unless num_frames_source == "estimated"
    duration: float            # seconds
    num_frames_source: str     # "stream" (header), "packets" (counted by demuxing) or "estimated"


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


def _open_video(path: str | os.PathLike):
    """Open a local video file with PyAV, local files only; raises the vlm media errors."""
    name = os.fspath(path)
    _check_local_file(name, "video")
    try:
        container = av.open(
            name, options={"protocol_whitelist": "file"}, metadata_errors="replace"
        )
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(f"{name} cannot be opened as a video: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{name} has no video stream.")
    return container


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, frame rate, frame count and duration without decoding any frame.

    The frame count comes from the stream header, else from counting the stream's packets (demuxing
    only), else from duration * fps. The duration comes from the stream, else its DURATION tag, else
    the container, else num_frames / fps.
    """
    name = os.fspath(path)
    container = _open_video(name)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        duration = _stream_duration(stream, container)
        num_frames, source = int(stream.frames or 0), "stream"
        if num_frames <= 0:
            try:
                num_frames = sum(1 for p in container.demux(stream) if p.size)
                source = "packets"
            except (av.FFmpegError, OSError, ValueError):
                num_frames = 0
            if num_frames <= 0 and duration and fps:
                num_frames, source = max(1, round(duration * fps)), "estimated"
        if num_frames <= 0:
            raise VideoDecodeError(f"{name} has a video stream without any frame.")
        if not duration:
            duration = num_frames / fps if fps else 0.0
        return VideoInfo(name, stream.width, stream.height, fps, num_frames, float(duration), source)
    finally:
        container.close()


def _stream_duration(stream, container) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag:
        try:  # Matroska: "HH:MM:SS.nnnnnnnnn"
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            pass
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def read_frames(path: str | os.PathLike, indices: Sequence[int]) -> np.ndarray:
    """Decode the frames at ``indices`` (decode order, like transformers' PyAV loader) as uint8 RGB.

    Returns (len(indices), H, W, 3), in the order given. Decoding stops at the last requested frame
    and only requested frames are kept. Any requested frame that cannot be decoded (corrupt data,
    index past the end of the stream) raises VideoDecodeError.
    """
    name = os.fspath(path)
    wanted = {int(i) for i in indices}
    if not wanted or min(wanted) < 0:
        raise InputError(f"Frame indices must be a non-empty list of non-negative ints, got {indices!r}.")
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    container = _open_video(name)
    try:
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            decoded = i + 1
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoDecodeError(
            f"{name} is corrupt: decoding failed after {decoded} frame(s), before frame {last}: {e}"
        ) from e
    finally:
        container.close()
    if len(frames) < len(wanted):
        raise VideoDecodeError(
            f"{name} ended after {decoded} frame(s); frame {last} was requested. "
            "The file may be truncated."
        )
    return np.stack([frames[int(i)] for i in indices])


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
