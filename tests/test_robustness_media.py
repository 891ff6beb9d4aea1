"""Hostile and unusual media (issue #8): every file either gives a correct result or a specific
vlm.errors exception, with memory and time bounded, and nothing outside the file is ever read.

Every hostile file is made here, in tmp dirs. Cases test_media.py already covers (truncated JPEG, text
renamed .png, zero bytes, 16-bit greyscale, CMYK, palette and alpha, EXIF orientation 6, audio-only and
corrupted videos) are not repeated.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import psutil
import pytest
from PIL import Image

import vlm.media
from vlm.errors import ImageDecodeError, MediaError, VideoDecodeError
from vlm.media import MediaLimits, load_image, probe_video, read_frames, sample_frames_bounded

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def no_decoder_left_behind():
    yield
    decoders = [p for p in psutil.Process().children(recursive=True) if "safe_decode" in " ".join(p.cmdline())]
    assert not decoders, "a decoder child process outlived its call"  # (the chat-template child stays)


# -------------------------------------------------------------------------------------------- helpers
def make_video(path: Path, pts: list[int] | int = 5, size: tuple[int, int] = (32, 24), codec: str = "mpeg4",
               time_base: Fraction = Fraction(1, 1000), rate: Fraction | int = 10, options: dict | None = None) -> Path:
    """A video whose frame i is grey level 20 * i (frame index readable from any pixel)."""
    width, height = size
    stamps = [round(i * 1000 / rate) for i in range(pts)] if isinstance(pts, int) else pts
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.time_base = time_base
        for i, stamp in enumerate(stamps):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 20 * i % 256, np.uint8), format="rgb24")
            frame.pts, frame.time_base = stamp, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def assert_frames(frames: np.ndarray, indices: list[int]) -> None:
    """`frames` are make_video's frames `indices` (grey level 20 * i, give or take the codec's loss)."""
    assert len(frames) == len(indices)
    levels = [float(f.mean()) for f in frames]
    assert all(abs(level - 20 * i % 256) < 5 for level, i in zip(levels, indices)), (levels, indices)


def image_bytes(fmt: str, size=(16, 16), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, RED).convert(mode).save(buf, format=fmt, **save)
    return buf.getvalue()


def claim_size(fmt: str, width: int, height: int) -> bytes:
    """A small valid file of format `fmt` whose header claims width x height (a decompression bomb)."""
    if fmt == "PNG":
        data = bytearray(image_bytes("PNG", mode="L"))
        ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
        data[16:29] = ihdr
        data[29:33] = struct.pack(">I", __import__("zlib").crc32(b"IHDR" + ihdr))
    elif fmt == "JPEG":
        data = bytearray(image_bytes("JPEG"))
        sof = data.index(b"\xff\xc0")
        data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    elif fmt == "GIF":
        data = bytearray(image_bytes("GIF", mode="P"))
        data[6:10] = struct.pack("<HH", width, height)
    elif fmt == "BMP":
        data = bytearray(image_bytes("BMP"))
        data[18:26] = struct.pack("<ii", width, height)
    else:  # WEBP: the extended header's canvas size (24 bits each, minus one)
        data = bytearray(image_bytes("WEBP", exif=Image.Exif().tobytes()))
        assert data[12:16] == b"VP8X"
        data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


# --------------------------------------------------------------------------------------------- images
PEAK_RSS_CHILD = """
import json, sys
from vlm.errors import ImageDecodeError
from vlm.media import load_image
def peak_kb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size to the current one
before = peak_kb()
outcome = {}
for path in sys.argv[1:]:
    try:
        outcome[path] = list(load_image(path).size)
    except ImageDecodeError as e:
        outcome[path] = "ImageDecodeError: " + str(e)
print(json.dumps({"outcome": outcome, "grew_kb": peak_kb() - before}))
"""


def peak_rss_loading(*paths: Path) -> dict:
    """Load `paths` in a fresh interpreter: each outcome, and how much its peak RSS grew (KiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, *map(str, paths)], capture_output=True, text=True,
                         timeout=90, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_decompression_bombs_in_every_format_are_refused_before_allocating(tmp_path):
    bombs = []
    for fmt, (width, height) in {"PNG": (60000, 60000), "JPEG": (60000, 60000), "GIF": (60000, 60000),
                                 "BMP": (60000, 60000), "WEBP": (16384, 16384)}.items():
        bombs.append(tmp_path / f"bomb.{fmt.lower()}")
        bombs[-1].write_bytes(claim_size(fmt, width, height))
        assert bombs[-1].stat().st_size < 2000
    sneaky = tmp_path / "sneaky.bmp"  # 121 Mpx: over our 64 Mpx limit, under Pillow's own hard limit
    sneaky.write_bytes(claim_size("BMP", 11000, 11000))
    result = peak_rss_loading(*bombs, sneaky)
    for path in (*bombs, sneaky):
        assert result["outcome"][str(path)].startswith("ImageDecodeError"), result["outcome"][str(path)]
    assert "too large (11000x11000" in result["outcome"][str(sneaky)]
    assert result["grew_kb"] < 30_000, result  # nothing was decoded

    # the measurement sees a real decode: a 4000 x 3000 PNG (36 MB as RGB) makes the peak grow
    real = tmp_path / "real.png"
    Image.new("RGB", (4000, 3000), BLUE).save(real)
    grown = peak_rss_loading(real)
    assert grown["outcome"][str(real)] == [4000, 3000] and grown["grew_kb"] > 30_000, grown


def test_other_formats_renamed_png_are_refused_without_running_their_decoders(tmp_path, monkeypatch):
    fits = b"".join(card.ljust(80).encode() for card in
                    ("SIMPLE  = T", "BITPIX  = 8", "NAXIS   = 2", "NAXIS1  = 4", "NAXIS2  = 4", "END")).ljust(2880)
    files = {
        "eps": image_bytes("EPS"),  # Pillow would run Ghostscript to decode it
        "pdf": image_bytes("PDF"),
        "fits": fits + bytes(2880),
        "tiff": image_bytes("TIFF"),
        "ico": image_bytes("ICO"),
        "tga": image_bytes("TGA"),
        "psd_like": b"8BPS\x00\x01" + bytes(40),
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><image href="file:///etc/passwd"/></svg>',
    }
    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: calls.append(a) or pytest.fail("a program was run"))
    for kind, data in files.items():
        path = tmp_path / f"{kind}.png"
        path.write_bytes(data)
        with pytest.raises(ImageDecodeError, match=f"{kind}.png is not a supported image"):
            load_image(path)
        with pytest.raises(ImageDecodeError, match="not a supported image"):
            load_image(data)
    assert calls == []


def test_sixteen_bit_colour_and_other_modes_convert_like_the_reference(tmp_path):
    from transformers.image_utils import load_image as reference

    rgb48 = tmp_path / "rgb48.png"  # 16 bits per channel, written by hand (Pillow cannot)
    pixels = np.array([[[0, 32768, 65535], [65535, 0, 257]]], dtype=">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", __import__("zlib").crc32(kind + body))
    rgb48.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 1, 16, 2, 0, 0, 0))
                      + chunk(b"IDAT", __import__("zlib").compress(raw)) + chunk(b"IEND", b""))
    out = np.asarray(load_image(rgb48))
    np.testing.assert_array_equal(out, np.asarray(reference(str(rgb48))))
    assert out.shape == (1, 2, 3) and tuple(out[0, 0]) == (0, 128, 255)

    for mode in ("1", "PA", "LA", "RGBa", "La", "YCbCr", "I;16B", "F", "LAB", "HSV"):
        try:
            rgb = load_image(Image.new(mode, (5, 3)))
        except ImageDecodeError:
            assert mode in ("La", "LAB", "HSV")  # Pillow has no conversion to RGB for these: a clear error
            continue
        assert rgb.mode == "RGB" and rgb.size == (5, 3)
    palette_alpha = tmp_path / "palette_alpha.png"  # a palette whose entries have their own alpha (tRNS)
    palette = Image.new("P", (4, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    palette.putdata([0, 1, 2, 3])
    palette.save(palette_alpha, transparency=bytes([0, 128, 255, 64]))
    from transformers.image_transforms import convert_to_rgb  # the processors' conversion: alpha over white

    np.testing.assert_array_equal(np.asarray(load_image(palette_alpha)),
                                  convert_to_rgb(Image.open(palette_alpha), return_numpy=True))
    assert tuple(np.asarray(load_image(palette_alpha))[0, 0]) == (255, 255, 255)  # transparent red: white


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 7, 8, 0, 9, 65535])
def test_every_exif_orientation_and_invalid_ones(tmp_path, orientation):
    from transformers.image_utils import load_image as reference

    img = Image.new("RGB", (40, 20), BLUE)
    img.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "oriented.jpg"
    img.save(path, quality=95, exif=exif)
    ours = load_image(path)
    expected_size = (20, 40) if orientation in (5, 6, 7, 8) else (40, 20)
    assert ours.size == expected_size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference(str(path))))


def test_malformed_exif_is_ignored_or_refused():
    good = image_bytes("JPEG", size=(20, 10), exif=b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00"
                                                    b"\x03\x00\x00\x00\x01\x00\x06\x00\x00")
    assert load_image(good).size == (10, 20)  # the premise: a valid orientation-6 block
    for cut in (14, 18, 20, 24):  # counts, types and offsets overwritten: entries pointing past the end
        data = bytearray(good)
        start = data.index(b"Exif\x00\x00")
        data[start + cut:start + cut + 4] = b"\xff\xff\xff\xff"
        try:
            assert load_image(bytes(data)).mode == "RGB"
        except ImageDecodeError:
            pass


# --------------------------------------------------------------------------------------------- videos
def test_playlists_and_concat_lists_cannot_make_ffmpeg_read_other_files(tmp_path):
    secret = make_video(tmp_path / "secret.mp4")
    (tmp_path / "secret").write_bytes(secret.read_bytes())
    playlist = ("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
                "#EXTINF:10.0,\n{}\n#EXT-X-ENDLIST\n")
    hostile = {
        "hls.avi": playlist.format(f"file://{secret}"),  # the known attack: a playlist named .avi
        "passwd.avi": playlist.format("file:///etc/passwd"),
        "hls.m3u8": playlist.format(f"file://{secret}"),
        "hls_relative.m3u8": playlist.format("secret.mp4"),
        "concat.ffconcat": "ffconcat version 1.0\nfile secret.mp4\n",
        "concat.avi": "ffconcat version 1.0\nfile secret.mp4\n",
        "concat.mkv": "ffconcat version 1.0\nfile secret\n",
    }
    leaked = []
    for name, text in hostile.items():
        path = tmp_path / name
        path.write_text(text)
        try:  # the threat is real: FFmpeg's defaults (even file-only protocols) follow some of them
            with av.open(str(path), options={"protocol_whitelist": "file"}) as c:
                leaked.append((name, sum(1 for _ in c.decode(video=0))))
        except (av.FFmpegError, OSError):
            pass
        with pytest.raises(VideoDecodeError, match="cannot be opened as a video") as info:
            probe_video(path)
        assert "root:" not in str(info.value)
        with pytest.raises(VideoDecodeError, match="cannot be opened as a video"):
            read_frames(path, [0])
    assert ("hls.m3u8", 5) in leaked and ("concat.avi", 5) in leaked, leaked


def test_video_limits_are_enforced_at_probe_time(tmp_path):
    video = make_video(tmp_path / "clip.mp4", 20, size=(64, 48))  # 2 s at 10 fps
    info = probe_video(video)
    assert (info.width, info.height, info.num_frames, info.container.split(",")[0], info.codec) == (
        64, 48, 20, "mov", "mpeg4")
    cases = {
        MediaLimits(max_video_seconds=1.5): r"clip.mp4 lasts 2.0 s; videos up to 1.5 s",
        MediaLimits(max_video_pixels=64 * 47): r"clip.mp4 is 64x48; frames up to 3,008 pixels",
        MediaLimits(max_video_frames=19): r"clip.mp4 has 19 frames; videos up to 19 frames",
        MediaLimits(max_video_bytes=1000): r"clip.mp4 is \d\.\d KB; videos up to 1000 B",
    }
    for limits, message in cases.items():
        with pytest.raises(VideoDecodeError, match=message):
            probe_video(video, limits)
        with pytest.raises(VideoDecodeError, match=message):
            read_frames(video, [0], limits)
    old = vlm.media.current_limits()
    try:  # the process-wide limits (the demo sets them from its settings) apply when a call gives none
        vlm.media.configure(MediaLimits(max_video_frames=10))
        with pytest.raises(VideoDecodeError, match="more than 10 frames|has 10 frames"):
            probe_video(make_video(tmp_path / "noheader.mkv", 20))  # counted by demuxing, stopped past the limit
    finally:
        vlm.media.configure(old)
    assert probe_video(video).num_frames == 20


def test_a_crashing_or_hanging_decoder_is_an_error_not_a_crash(tmp_path, monkeypatch):
    video = make_video(tmp_path / "clip.mp4")
    crash = "import os, signal, sys; sys.stdin.read(); os.kill(os.getpid(), signal.SIGSEGV)"
    hang = "import time; time.sleep(60)"
    garbage = "import sys; sys.stdout.buffer.write(b'\\xff' * 64)"
    for program, message in ((crash, r"decoder stopped \(signal SIGSEGV\)"), (hang, "longer than 1 s"),
                             (garbage, "decoder stopped")):
        monkeypatch.setattr(vlm.media, "decoder_command", lambda program=program: [sys.executable, "-c", program])
        start = time.monotonic()
        with pytest.raises(VideoDecodeError, match=message):
            read_frames(video, [0], MediaLimits(decode_seconds=1.0))
        assert time.monotonic() - start < 5
    monkeypatch.undo()
    assert_frames(read_frames(video, [4, 0]), [4, 0])


def test_the_decoder_memory_cap_holds(tmp_path):
    video = make_video(tmp_path / "big.mkv", 3, size=(1280, 720))
    with pytest.raises(VideoDecodeError, match="memory"):
        read_frames(video, [0, 1, 2], MediaLimits(decode_memory_bytes=1 << 20))
    assert read_frames(video, [2]).shape == (1, 720, 1280, 3)  # the default cap is enough


def test_truncated_and_corrupted_streams_give_frames_or_an_error(tmp_path):
    rng = np.random.default_rng(8)
    sources = [make_video(tmp_path / "plain.mp4", 12, size=(48, 32)),
               make_video(tmp_path / "faststart.mp4", 12, size=(48, 32), options={"movflags": "faststart"}),
               make_video(tmp_path / "plain.mkv", 12, size=(48, 32))]
    outcomes = []
    for source in sources:
        data = source.read_bytes()
        variants = {f"cut{n}": data[: len(data) * n // 4] for n in (1, 2, 3)}
        for k in range(3):
            flipped = bytearray(data)
            for at in rng.integers(len(data) // 8, len(data), 12):
                flipped[at] ^= 0xFF
            variants[f"flip{k}"] = bytes(flipped)
        for name, content in variants.items():
            path = tmp_path / f"{source.stem}_{name}{source.suffix}"
            path.write_bytes(content)
            try:
                info = probe_video(path)
                indices = sample_frames_bounded(info.num_frames, info.fps, num_frames=min(4, info.num_frames))
                frames = read_frames(path, indices)
                assert frames.shape[0] == len(indices) and frames.dtype == np.uint8
                outcomes.append("frames")
            except VideoDecodeError:
                outcomes.append("error")
    assert "error" in outcomes and "frames" in outcomes, outcomes  # both kinds of damage were met


def test_zero_and_one_frame_videos(tmp_path):
    for suffix, message in ((".avi", "has a video stream without any frame"), (".mp4", "has no video stream"),
                            (".mkv", "cannot be opened as a video")):
        empty = tmp_path / f"no_frames{suffix}"
        with av.open(str(empty), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
            container.start_encoding()  # the header, then no packet
        assert empty.stat().st_size > 0
        with pytest.raises(VideoDecodeError, match=message):
            probe_video(empty)
    single = make_video(tmp_path / "one.mp4", 1)
    info = probe_video(single)
    assert info.num_frames == 1
    assert sample_frames_bounded(1, info.fps, fps=2.0) == [0]
    assert read_frames(single, [0]).shape == (1, 24, 32, 3)
    with pytest.raises(VideoDecodeError, match="ended after 1 frame"):
        read_frames(single, [0, 1])


def test_variable_frame_rate_samples_the_right_frames(tmp_path):
    stamps = [0, 40, 50, 300, 310, 900, 1000, 1001, 2500, 2600]  # milliseconds, irregular
    for name in ("vfr.mkv", "vfr.mp4"):
        video = make_video(tmp_path / name, stamps, codec="mjpeg" if name.endswith("mkv") else "mpeg4")
        info = probe_video(video)
        assert info.num_frames == 10 and 2.5 < info.duration < 2.8
        assert_frames(read_frames(video, [9, 3, 0, 7]), [9, 3, 0, 7])


def test_rotation_metadata_turns_frames_upright(tmp_path):
    stored = np.zeros((24, 32, 3), np.uint8)
    stored[:, :16] = RED  # left half red, right half blue
    stored[:, 16:] = BLUE
    path = tmp_path / "portrait.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for packet in [*stream.encode(av.VideoFrame.from_ndarray(stored, format="rgb24")), *stream.encode(None)]:
            container.mux(packet)
    data = bytearray(path.read_bytes())
    matrix = data.index(b"tkhd") - 4 + 48  # version-0 track header: the display matrix, as phones write it
    data[matrix:matrix + 36] = struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000)
    path.write_bytes(data)
    with av.open(str(path)) as c:  # the premise: a 90 degree display rotation
        assert next(c.decode(video=0)).rotation in (90, -90)
    frame = read_frames(path, [0])[0].astype(int)
    assert frame.shape == (32, 24, 3)  # portrait
    assert np.abs(frame[2, 12] - RED).max() < 60 and np.abs(frame[-3, 12] - BLUE).max() < 60  # red on top


def test_hour_long_sparse_video_is_sampled_or_refused_by_its_duration(tmp_path):
    video = make_video(tmp_path / "sparse.mkv", [i * 60_000 for i in range(60)], codec="mjpeg")  # 1 frame/minute
    start = time.monotonic()
    info = probe_video(video)
    assert info.num_frames == 60 and 3500 < info.duration < 3700
    indices = sample_frames_bounded(info.num_frames, info.fps, fps=2.0)
    assert len(indices) >= 4
    assert_frames(read_frames(video, indices), indices)
    assert time.monotonic() - start < 30
    with pytest.raises(VideoDecodeError, match="lasts 0:59:00; videos up to 0:30:00"):
        probe_video(video, MediaLimits(max_video_seconds=1800))


def test_special_files_never_reach_the_decoder(tmp_path):
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it would block forever
    with pytest.raises(MediaError, match="not a regular file"):
        probe_video(fifo)
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(fifo)
    with pytest.raises(MediaError, match="cannot be read"):
        load_image("bad\x00name.png")
    with pytest.raises(vlm.errors.InputError, match="file path"):
        probe_video(b"\x00\x00")  # bytes are not a path here
