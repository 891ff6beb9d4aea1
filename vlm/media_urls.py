"""Media carried by URLs in OpenAI-style requests, both ways.

Server side: a `data:` URL is size-checked from its length, then base64-decoded a chunk at a time into a
file of the request's own temporary directory; an `http(s)://` URL is fetched only from hosts a setting
allows, without redirects, and cut off beyond the size limit. Client side (vlm.remote): an image or a
video file becomes a data URL.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .errors import InputError, MediaError

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)(?:;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)
_CHUNK = 4 * 2**20  # base64 characters decoded at a time (a multiple of 4)
FETCH_SECONDS = 20.0  # time limit of one download from an allowed host

# The file suffix written for each media type (the decoders read the content, not the name).
SUFFIXES = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png", "image/webp": ".webp",
            "image/gif": ".gif", "image/bmp": ".bmp", "video/mp4": ".mp4", "video/webm": ".webm",
            "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/x-msvideo": ".avi", "video/avi": ".avi",
            "video/ogg": ".ogv", "video/mpeg": ".mpg", "video/mp2t": ".ts", "video/x-flv": ".flv"}
MIME_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", **{v: k for k, v in SUFFIXES.items() if k != "image/jpg"}}


class TooLargeError(InputError):
    """A media item is larger than the server accepts (HTTP 413)."""


@dataclass(frozen=True)
class DataUrl:
    mime: str  # lower case, e.g. "image/png"
    payload: str  # the base64 text

    @property
    def size(self) -> int:
        """Bytes once decoded, from the text's length (not decoded)."""
        return len(self.payload) // 4 * 3 - self.payload[-2:].count("=")


def parse_data_url(url: str, where: str) -> DataUrl:
    """The media type and base64 text of `url` (InputError when it is not a base64 data URL)."""
    match = _DATA_URL.match(url)
    if match is None:
        raise InputError(f"{where}: a data URL must look like data:<type>/<subtype>;base64,<data>.")
    return DataUrl(match["mime"].lower(), url[match.end():])


def write_data_url(data: DataUrl, path: Path, where: str) -> None:
    """Decode `data` into `path` without holding a second copy of it (InputError when not valid base64)."""
    if len(data.payload) % 4:
        raise InputError(f"{where}: the data URL's base64 text is cut short (its length is not a multiple of 4).")
    with open(path, "wb") as out:
        for start in range(0, len(data.payload), _CHUNK):
            try:
                out.write(base64.b64decode(data.payload[start:start + _CHUNK], validate=True))
            except (binascii.Error, ValueError):
                raise InputError(f"{where}: the data URL is not valid base64.") from None


def allowed_host(url: str, hosts: tuple[str, ...]) -> bool:
    """True when `url` is http(s) on one of `hosts` (exact names, case-insensitive), without credentials."""
    parts = urlsplit(url)
    return (parts.scheme in ("http", "https") and parts.hostname is not None and parts.username is None
            and parts.hostname.lower() in {h.lower() for h in hosts})


def fetch(url: str, path: Path, max_bytes: int, where: str) -> str:
    """Download `url` into `path`, refusing redirects, error statuses and more than `max_bytes`; its media type."""
    import httpx

    try:
        with httpx.stream("GET", url, follow_redirects=False, timeout=FETCH_SECONDS, trust_env=False) as response:
            if response.status_code != 200:
                raise MediaError(f"{where}: {url} answered HTTP {response.status_code}; give a data URL instead.")
            size = 0
            with open(path, "wb") as out:
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise TooLargeError(f"{where}: {url} is larger than {max_bytes:,} bytes, the limit.")
                    out.write(chunk)
            return response.headers.get("content-type", "").split(";")[0].strip().lower()
    except httpx.HTTPError as exc:
        raise MediaError(f"{where}: {url} could not be downloaded ({type(exc).__name__}).") from None


# ------------------------------------------------------------------------------------------- client side
def image_data_url(image) -> str:
    """A PIL image as a PNG data URL (lossless: the server sees the pixels the demo checked)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_data_url(path: str) -> str:
    """A video file as a data URL, its media type from its suffix (video/mp4 when unknown)."""
    mime = MIME_TYPES.get(Path(path).suffix.lower(), "video/mp4")
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
