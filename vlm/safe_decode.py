"""The video decoder child: FFmpeg (PyAV) reads untrusted files in a process of its own.

A crash, a hang or a memory blow-up inside FFmpeg must not take the server down, so `vlm.media` runs
this file as a script (`python -I safe_decode.py`) for every probe and every frame read, with a
wall-clock deadline. The child caps its own address space, CPU time and file writes, then answers one
JSON request read from stdin:

    {"op": "probe", "path": ..., "max_frames": int, "memory": bytes, "cpu_seconds": int}
    {"op": "frames", "path": ..., "indices": [int, ...], "max_pixels": int, "memory": bytes, "cpu_seconds": int}

Replies on stdout are messages: an 8-byte little-endian length, then a JSON header. "probe" answers
{"ok": true, "info": {...}}; "frames" sends each requested frame as soon as it is decoded, in decode
order, as {"ok": true, "index": i, "shape": [H, W, 3]} followed by its raw uint8 pixels, so neither
side holds more than a frame at full size. A refusal, possibly after some frames, is {"ok": false,
"kind": ..., "message": ...}. Only the standard library, numpy and av are imported so the child
starts in a fraction of a second.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Any, BinaryIO, Iterable

import av
import numpy as np

# Demuxers we accept (FFmpeg copies the list to nested demuxers): no playlists (hls, concat), no
# image2 patterns, no devices. Files are read through the "file" protocol only.
FORMATS = "mov,mp4,matroska,webm,avi,ogg,mpegts,mpeg,flv"
OPEN_OPTIONS = {"protocol_whitelist": "file", "format_whitelist": FORMATS}
DECODE_ERRORS = (av.FFmpegError, OSError, ValueError, EOFError)


class Refused(Exception):
    """The file cannot be used; the message is meant for the user."""

    def __init__(self, message: str, kind: str = "decode", **details: Any):
        super().__init__(message)
        self.kind = kind  # "decode" | "memory" | "damaged" (details: decodable frames, cause)
        self.details = details


# ------------------------------------------------------------------------------------------- decoding
def open_video(path: str):
    """Open a local file with the allowed demuxers; it must hold a video stream."""
    try:
        container = av.open(path, options=dict(OPEN_OPTIONS), metadata_errors="replace")
    except DECODE_ERRORS as e:
        raise Refused(f"{path} cannot be opened as a video (MP4/MOV, MKV/WebM, AVI, OGG or MPEG): {e}") from e
    if not container.streams.video:
        container.close()
        raise Refused(f"{path} has no video stream.")
    return container


def probe(path: str, max_frames: int) -> dict[str, Any]:
    """Container, size, frame rate, frame count and duration of the first video stream, without decoding.

    The frame count comes from the stream header, else from counting packets (demuxing only; counting
    stops past `max_frames`), else from duration * fps.
    """
    container = open_video(path)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        duration = stream_duration(stream, container)
        num_frames, source = int(stream.frames or 0), "stream"
        if num_frames <= 0:
            num_frames, source = count_packets(container, stream, max_frames), "packets"
            if num_frames <= 0 and duration and fps:
                num_frames, source = max(1, round(duration * fps)), "estimated"
        if num_frames <= 0:
            raise Refused(f"{path} has a video stream without any frame.")
        if not duration:
            duration = num_frames / fps if fps else 0.0
        if not math.isfinite(duration) or duration < 0:
            raise Refused(f"{path} declares an invalid duration ({duration}).")
        return {"path": path, "width": int(stream.width), "height": int(stream.height), "fps": fps,
                "num_frames": num_frames, "duration": float(duration), "num_frames_source": source,
                "container": container.format.name, "codec": getattr(stream.codec_context, "name", "") or ""}
    finally:
        container.close()


def count_packets(container, stream, limit: int) -> int:
    """Packets with data in `stream`, counting no further than limit + 1; 0 if demuxing fails."""
    count = 0
    try:
        for packet in container.demux(stream):
            count += bool(packet.size)
            if count > limit:
                break
    except DECODE_ERRORS:
        return 0
    return count


def stream_duration(stream, container) -> float | None:
    """Seconds: the stream's, else its DURATION tag (Matroska), else the container's."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag:
        try:  # "HH:MM:SS.nnnnnnnnn"
            h, m, s = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(s)
        except ValueError:
            pass
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def send_frames(path: str, indices: list[int], out: BinaryIO, max_pixels: int | None = None) -> None:
    """Reply with the frames at `indices` (decode order, like transformers' PyAV loader), each once, as
    uint8 (H, W, 3), in increasing index order.

    Frames are turned upright by the stream's display rotation (a multiple of 90 degrees), which the
    reference ignores. Decoding stops at the last requested frame. A frame missing (truncated file),
    undecodable, larger than `max_pixels` or of another size than the first one raises Refused.
    """
    wanted = set(indices)
    last = max(wanted)
    shape: tuple[int, ...] | None = None
    sent, decoded = 0, 0
    container = open_video(path)
    try:
        container.seek(0)
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                if max_pixels is not None and frame.width * frame.height > max_pixels:
                    raise Refused(f"{path} has a {frame.width}x{frame.height} frame, more than {max_pixels:,} pixels.")
                pixels = upright(frame.to_ndarray(format="rgb24"), getattr(frame, "rotation", 0))
                if shape is None:
                    shape = pixels.shape
                elif pixels.shape != shape:
                    raise Refused(f"{path} changes its frame size mid-stream ({shape[1]}x{shape[0]} "
                                  f"to {pixels.shape[1]}x{pixels.shape[0]}); re-encode it.")
                data = memoryview(np.ascontiguousarray(pixels)).cast("B")
                reply(out, {"ok": True, "index": i, "shape": list(pixels.shape)}, [data])
                sent += 1
            if i >= last:
                break
    except MemoryError:
        raise Refused(f"{path} needs more memory to decode than this server allows.", "memory") from None
    except DECODE_ERRORS as e:
        raise Refused(f"{path} is corrupt: decoding failed after {decoded} frame(s), before frame {last}: {e}",
                      "damaged", decodable=decoded, cause=getattr(e, "strerror", None) or str(e)) from e
    finally:
        container.close()
    if sent < len(wanted):
        raise Refused(f"{path} ended after {decoded} frame(s); frame {last} was requested. The file may be truncated.")


def upright(pixels: np.ndarray, rotation: float | None) -> np.ndarray:
    """Apply a display rotation (FFmpeg's convention: degrees counter-clockwise) rounded to 90 degrees."""
    turns = round((rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels


# ---------------------------------------------------------------------------------------- the child
def limit_resources(memory: int | None, cpu_seconds: int | None) -> None:
    """Cap this process: address space (what is mapped now + `memory`), CPU time, no file writes."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the parent's deadline still applies
        return
    if memory is not None and os.path.exists("/proc/self/statm"):  # Linux (elsewhere RLIMIT_AS is not enforced)
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))
    if cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def reply(out: BinaryIO, header: dict[str, Any], payload: Iterable[memoryview] = ()) -> None:
    data = json.dumps(header).encode()
    out.write(struct.pack("<Q", len(data)) + data)
    for chunk in payload:
        out.write(chunk)
    out.flush()


def serve(request: dict[str, Any], out: BinaryIO) -> None:
    """Answer one request (see the module docstring)."""
    try:
        limit_resources(request.get("memory"), request.get("cpu_seconds"))
        path = request["path"]
        if request["op"] == "probe":
            reply(out, {"ok": True, "info": probe(path, int(request["max_frames"]))})
        else:
            send_frames(path, [int(i) for i in request["indices"]], out, request.get("max_pixels"))
    except Refused as e:
        reply(out, {"ok": False, "kind": e.kind, "message": str(e), **e.details})
    except MemoryError:
        reply(out, {"ok": False, "kind": "memory", "message": f"{request.get('path')} needs more memory to decode "
                                                                "than this server allows."})
    except Exception as e:  # anything else PyAV raises on a hostile file
        reply(out, {"ok": False, "kind": "decode", "message": f"{request.get('path')} cannot be decoded: "
                                                                f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    av.logging.set_level(None)
    serve(json.loads(sys.stdin.buffer.read()), sys.stdout.buffer)
