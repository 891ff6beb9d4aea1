"""Uploads: only the media the app takes, bounded on disk, and usable only by the session that uploaded them.

Gradio stores an upload under its upload directory (GRADIO_TEMP_DIR) by content hash and returns the
path; requests then name that path. `UploadRoute` (ASGI middleware on Gradio's upload route) admits an
upload only while the server's uploads fit `UploadLimits.total_bytes` and only for image and video
files, and records each upload. The upload route does not say which session uploads, so the first
request that names a recorded upload claims that record for its session: another session can use the
same file only with an upload of its own (of the same content, which gives the same path). A session's
uploads are bounded by `session_bytes` and deleted when it ends (or its chat is cleared) and no other
session holds them; an upload no request claims is deleted after `unclaimed_seconds`. Files sent as URLs
are refused, never downloaded, and no path outside the upload directory is accepted. The files of the
page's examples are shared by every session and never deleted. `HiddenDirectory` keeps the upload
directory itself off the wire: clients see and send paths relative to it ("<hash>/<name>").
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from gradio_client.utils import is_http_url_like

from ..errors import InputError
from .server import Send, plain

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}  # the formats vlm.media decodes
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".ogv", ".mpg", ".mpeg", ".ts", ".flv"}
SWEEP_SECONDS = 5.0  # expired uploads are looked for at most this often


@dataclass(frozen=True)
class UploadLimits:
    file_bytes: int = 50 * 2**20  # one file (Gradio's max_file_size)
    session_bytes: int = 200 * 2**20  # the uploads one session uses
    total_bytes: int = 2 * 2**30  # every upload on the server's disk
    unclaimed_seconds: float = 600.0  # an upload no request used is deleted after this


def media_kind(path: str) -> str:
    """"image" or "video", from the file name (InputError for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in VIDEO_SUFFIXES:
        return "video"
    raise InputError(f"{Path(path).name} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) nor a video "
                     f"({', '.join(sorted(VIDEO_SUFFIXES))}).")


class Uploads:
    """The upload records, which session holds which file, and their deletion."""

    def __init__(self, limits: UploadLimits = UploadLimits(), directory: str | os.PathLike | None = None):
        from gradio.utils import get_upload_folder

        self.limits = limits
        self.directory = Path(os.path.realpath(directory or get_upload_folder()))
        self._lock = threading.Lock()
        self._records: dict[str, list[float]] = {}  # path -> times of uploads no session has claimed yet
        self._holders: dict[str, set[str]] = {}  # path -> sessions using it
        self._held: dict[str, set[str]] = {}  # session -> paths it uses
        self._sizes: dict[str, int] = {}  # path -> bytes, for every recorded or held file
        self._shared: set[str] = set()  # the examples' files
        self._reserved = 0  # bytes of uploads being received
        self._swept = time.monotonic()

    # -------------------------------------------------------------------------------- the upload route
    def reserve(self, nbytes: int) -> bool:
        """Make room for an upload of `nbytes` (False when the server's uploads would exceed the total)."""
        self.sweep()
        with self._lock:
            if sum(self._sizes.values()) + self._reserved + nbytes > self.limits.total_bytes:
                return False
            self._reserved += nbytes
            return True

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._reserved -= nbytes

    def received(self, paths: Iterable[str]) -> None:
        """Record files the upload route stored (each one a record a session can claim)."""
        now = time.monotonic()
        with self._lock:
            for path in map(os.path.realpath, paths):
                self._records.setdefault(path, []).append(now)
                self._sizes[path] = _size(path)

    def refuse(self, paths: Iterable[str]) -> None:
        """Delete files the upload route stored but that are refused (unless something else uses them)."""
        with self._lock:
            for path in map(os.path.realpath, paths):
                if self._unused(path):
                    self._delete(path)

    def share(self, paths: Iterable[str]) -> None:
        """Files every session may use and nothing deletes (the examples')."""
        with self._lock:
            self._shared.update(map(os.path.realpath, paths))

    # ------------------------------------------------------------------------------------ requests
    def use(self, session: str, file: Any, kinds: tuple[str, ...] = ("image", "video")) -> str:
        """The path of `file` (a FileData dict a request sent), claimed for `session`; InputError when it is
        not an upload of this session, not one of `kinds`, or over the session's total."""
        path = self._path(file)
        kind = media_kind(path)
        if kind not in kinds:
            raise InputError(f"{Path(path).name} is a{'n' if kind == 'image' else ''} {kind}; this takes "
                             f"{' or '.join(k + 's' for k in kinds)} only.")
        with self._lock:
            held = self._held.setdefault(session, set())
            if path in self._shared or path in held:
                return path
            if not self._records.get(path):
                if not held:
                    self._held.pop(session)
                raise InputError(f"{Path(path).name} is not an upload of this session: upload it again.")
            total = sum(self._sizes.get(p, 0) for p in held) + self._sizes.get(path, 0)
            if total > self.limits.session_bytes:
                raise InputError(f"This session's uploads would take {total / 2**20:.1f} MB; the server keeps at "
                                 f"most {self.limits.session_bytes / 2**20:.0f} MB per user. Clear the chat to "
                                 "free them.")
            self._records[path].pop(0)
            held.add(path)
            self._holders.setdefault(path, set()).add(session)
        return path

    def release(self, session: str, paths: Iterable[str] | None = None) -> None:
        """`session` no longer uses `paths` (None: any of its files, it ended); unused files are deleted."""
        with self._lock:
            held = self._held.get(session, set())
            released = set(held) if paths is None else held & set(map(os.path.realpath, paths))
            held -= released
            if not held:
                self._held.pop(session, None)
            for path in released:
                self._holders.get(path, set()).discard(session)
                if self._unused(path):
                    self._delete(path)

    def sweep(self) -> None:
        """Delete uploads no request claimed within `unclaimed_seconds` (at most every SWEEP_SECONDS)."""
        now = time.monotonic()
        if now - self._swept < SWEEP_SECONDS:
            return
        self._swept = now
        with self._lock:
            for path, times in list(self._records.items()):
                times[:] = [t for t in times if now - t < self.limits.unclaimed_seconds]
                if self._unused(path) or not os.path.exists(path):
                    self._delete(path)

    def disk_bytes(self) -> int:
        """Bytes of the uploads the server keeps."""
        with self._lock:
            return sum(self._sizes.values())

    # ----------------------------------------------------------------------------------------- helpers
    def _path(self, file: Any) -> str:
        """The real path of an uploaded file a request names, relative to the upload directory (the request
        is changed to name it in full, as Gradio reads it); InputError unless it is in the upload directory."""
        if not isinstance(file, dict) or not isinstance(file.get("path"), str):
            raise InputError('Each file must be {"path": <what the upload route returned>, '
                             '"meta": {"_type": "gradio.FileData"}}.')
        path = file["path"]
        if is_http_url_like(path):
            raise InputError("URLs are not fetched: upload the file instead.")
        name = Path(path).name
        real = os.path.realpath(self.directory / path) if "\0" not in path else ""
        if not real or not Path(real).is_relative_to(self.directory) or not os.path.isfile(real):
            raise InputError(f"{name} was not uploaded to this server: upload it first.")
        file["path"] = real
        return real

    def _unused(self, path: str) -> bool:
        return not self._holders.get(path) and not self._records.get(path) and path not in self._shared

    def _delete(self, path: str) -> None:
        self._records.pop(path, None)
        self._holders.pop(path, None)
        self._sizes.pop(path, None)
        try:
            os.unlink(path)
            parent = Path(path).parent
            if parent != self.directory and parent.is_relative_to(self.directory):
                parent.rmdir()  # the upload's hash directory, when it holds nothing else
        except OSError:
            pass


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# ----------------------------------------------------------------------------------- the upload route
class UploadRoute:
    """ASGI middleware on Gradio's upload route: admits uploads that fit the server's total and are images
    or videos, and records them in `uploads`."""

    def __init__(self, app: Any, uploads: Uploads, path: str = "/gradio_api/upload"):
        self.app, self.uploads, self.path = app, uploads, path

    async def __call__(self, scope: dict, receive: Any, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != self.path:
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            return await plain(send, 411, "An upload needs a Content-Length.")
        nbytes = int(length)
        if not self.uploads.reserve(nbytes):
            return await plain(send, 507, "The server's upload space is full right now; try again in a few minutes.")
        messages: list[dict] = []

        async def hold(message: dict) -> None:
            messages.append(message)

        try:
            await self.app(scope, receive, hold)
        finally:
            self.uploads.unreserve(nbytes)
        start, body = messages[0], b"".join(m.get("body", b"") for m in messages[1:])
        if start.get("status") == 200:
            paths = json.loads(body)
            refused = [Path(p).name for p in paths if Path(p).suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES]
            if refused:
                self.uploads.refuse(paths)
                return await plain(send, 415, f"Only images and videos can be uploaded, not {', '.join(refused)}.")
            self.uploads.received(paths)
        for message in messages:
            await send(message)


FILE_ROUTE = "/gradio_api/file="


class HiddenDirectory:
    """ASGI middleware: the upload directory's own path never leaves the server. Text responses (JSON, the
    page, server-sent events) name files relative to it, and the file route reads a relative path as one
    under it (Gradio's own checks then apply to the full path)."""

    def __init__(self, app: Any, directory: str | os.PathLike):
        self.app = app
        full = os.path.realpath(directory) + "/"
        self.prefixes = [full.encode(), quote(full, safe="/").encode()]  # as paths, and as file URLs quote them

    async def __call__(self, scope: dict, receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(FILE_ROUTE) and not path[len(FILE_ROUTE):].startswith("/"):
            full = FILE_ROUTE + self.prefixes[0].decode() + path[len(FILE_ROUTE):]
            scope = {**scope, "path": full, "raw_path": quote(full, safe="/=").encode()}
        text = False

        async def relative(message: dict) -> None:
            nonlocal text
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                text = headers.get(b"content-type", b"").startswith((b"application/json", b"text/"))
                if text:  # the body gets shorter: sent without a length
                    message = {**message, "headers": [(k, v) for k, v in message.get("headers", [])
                                                      if k.lower() != b"content-length"]}
            elif message["type"] == "http.response.body" and text:
                body = message.get("body", b"")
                for prefix in self.prefixes:
                    body = body.replace(prefix, b"")
                message = {**message, "body": body}
            await send(message)

        await self.app(scope, receive, relative)
