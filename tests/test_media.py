"""vlm.media: safe image loading, video probing / lazy decoding and frame sampling vs transformers."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb as ref_convert_to_rgb
from transformers.image_utils import load_image as ref_load_image
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata, default_sample_indices_fn, load_video

from vlm.errors import DamagedVideoError, EmptyFileError, ImageDecodeError, InputError, MediaError, VideoDecodeError
from vlm.media import (
    load_image,
    probe_video,
    read_frames,
    sample_frames_bounded,
    sample_frames_uniform,
    to_rgb,
)

MEDIA = Path(__file__).resolve().parents[2] / "shared" / "media"  # ../shared/media, read in place
PANCAKE = MEDIA / "video" / "flipping_a_pancake.mkv"
CORRUPTED = MEDIA / "video" / "corrupted.mp4"
PHOTOS = {  # name -> (width, height) from the media README
    "coco.jpg": (448, 448), "ctx.jpg": (448, 448), "voc.jpg": (448, 448),
    "llava_v1_5_radar.jpg": (1024, 899), "extreme_ironing.jpg": (570, 380), "waterview.jpg": (1000, 667),
}
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

pytestmark = pytest.mark.skipif(not MEDIA.is_dir(), reason="../shared/media is not present")


# ------------------------------------------------------------------------------------------ images
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_real_photos_load_like_the_reference(name):
    path = MEDIA / name
    img = load_image(path)
    assert img.mode == "RGB" and img.size == PHOTOS[name]
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ref_load_image(str(path))))
    # the three kinds of source give the same pixels
    np.testing.assert_array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(img))
    np.testing.assert_array_equal(np.asarray(load_image(Image.open(path))), np.asarray(img))


def _two_colour(width=40, height=20) -> Image.Image:
    """Left half red, right half blue."""
    img = Image.new("RGB", (width, height), BLUE)
    img.paste(RED, (0, 0, width // 2, height))
    return img


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    _two_colour().save(path, quality=95, exif=exif)
    img = load_image(path)
    assert img.size == (20, 40)  # portrait after rotation
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels[2, 10] - RED).max() < 40  # the stored left (red) half is now on top
    assert np.abs(pixels[-3, 10] - BLUE).max() < 40
    np.testing.assert_array_equal(pixels, np.asarray(ref_load_image(str(path))))


def test_rgba_and_palette_transparency_composited_on_white_like_the_reference():
    rgba = Image.new("RGBA", (8, 4), (0, 0, 0, 0))  # transparent black
    rgba.paste((255, 0, 0, 128), (0, 0, 4, 4))       # half-transparent red
    palette = Image.new("P", (8, 4), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 4, 4))
    palette.info["transparency"] = 0
    for img in (rgba, palette, rgba.convert("LA")):
        ours = np.asarray(load_image(img))
        np.testing.assert_array_equal(ours, ref_convert_to_rgb(img, return_numpy=True))
        assert tuple(ours[0, -1]) == WHITE  # fully transparent -> white, not the black underneath
    assert tuple(np.asarray(load_image(rgba))[0, 0]) == (255, 127, 127)


def test_cmyk_and_greyscale_convert(tmp_path):
    cmyk = Image.new("CMYK", (6, 6), (0, 255, 255, 0))  # red in CMYK
    path = tmp_path / "cmyk.jpg"
    cmyk.save(path, quality=100)
    img = load_image(path)
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.asarray(ref_load_image(str(path))))
    assert np.abs(np.asarray(img).astype(int)[3, 3] - RED).max() < 10
    grey = load_image(Image.new("L", (3, 3), 77))
    assert grey.mode == "RGB" and tuple(np.asarray(grey)[1, 1]) == (77, 77, 77)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path, mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32))
    assert img.mode == mode
    sources = [img]
    if mode == "I;16":  # a 16-bit greyscale PNG opens as I;16
        sources.append(tmp_path / "sixteen.png")
        img.save(sources[-1])
        assert Image.open(sources[-1]).mode == "I;16"
    for src in sources:
        out = np.asarray(load_image(src))
        np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
        assert (out[..., 0] == out[..., 2]).all()
    # Pillow's plain convert clips everything above 255 to white: we must not.
    assert not np.array_equal(np.asarray(img.convert("RGB")), np.asarray(load_image(img)))


def test_gif_first_frame_webp_bmp(tmp_path):
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (10, 10), RED), Image.new("RGB", (10, 10), BLUE)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert tuple(np.asarray(load_image(gif))[5, 5]) == RED
    for ext in ("webp", "bmp", "png"):
        path = tmp_path / f"img.{ext}"
        _two_colour().save(path, **({"lossless": True} if ext == "webp" else {}))
        np.testing.assert_array_equal(np.asarray(load_image(path)), np.asarray(_two_colour()))


def test_unsupported_format_is_refused(tmp_path):
    path = tmp_path / "img.tiff"
    _two_colour().save(path)
    with pytest.raises(ImageDecodeError, match="img.tiff is not a supported image"):
        load_image(path)


def test_empty_missing_and_directory(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError, match="empty.jpg"):
        load_image(empty)
    with pytest.raises(EmptyFileError):
        load_image(b"")
    with pytest.raises(MediaError, match="does not exist") as info:
        load_image(tmp_path / "missing.jpg")
    assert type(info.value) is MediaError
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(tmp_path)


def test_truncated_jpeg_and_text_renamed_png(tmp_path):
    data = (MEDIA / "coco.jpg").read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(ImageDecodeError):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError):  # a lazily opened PIL image decodes inside load_image too
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageDecodeError, match="notes.png"):
        load_image(text)


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height (a decompression-bomb header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bombs_are_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(9000, 8000))  # 72 Mpx: over our 64 Mpx default, under Pillow's limit
    with pytest.raises(ImageDecodeError, match=r"bomb.png is too large \(9000x8000"):
        load_image(bomb)
    with pytest.raises(ImageDecodeError, match="too large"):  # over Pillow's own hard limit
        load_image(_png_claiming(20000, 20000))
    img = _two_colour(100, 100)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        load_image(buf.getvalue(), max_pixels=9_999)
    assert load_image(buf.getvalue(), max_pixels=10_000).size == (100, 100)


def test_to_rgb_keeps_rgb_pixels():
    img = _two_colour()
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.asarray(img))


# ------------------------------------------------------------------------------------------- video
def _reference_frames(path: Path, indices: list[int]) -> np.ndarray:
    frames, _ = load_video(str(path), backend="pyav", sample_indices_fn=lambda metadata, **_: np.array(indices))
    return frames


@pytest.mark.timeout(60)
def test_probe_finds_frame_count_the_stream_does_not_report():
    with av.open(str(PANCAKE)) as c:  # the premise: no frame count in the stream header
        assert c.streams.video[0].frames == 0
    info = probe_video(PANCAKE)
    assert (info.width, info.height, info.fps) == (426, 240, 30.0)
    assert info.num_frames == 310 and info.num_frames_source == "packets"
    assert info.duration == pytest.approx(10.333, abs=1e-3)  # the stream's DURATION tag
    corrupted = probe_video(CORRUPTED)
    assert (corrupted.num_frames, corrupted.num_frames_source, corrupted.fps) == (50, "stream", 10.0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("indices", [[0], [0, 15, 31, 46, 62, 77, 93, 108, 124, 139, 155, 170, 186, 201, 217, 232,
                                          248, 263, 279, 294], [3, 100, 309]])
def test_read_frames_identical_to_reference(indices):
    ours = read_frames(PANCAKE, indices)
    assert ours.dtype == np.uint8 and ours.shape == (len(indices), 240, 426, 3)
    np.testing.assert_array_equal(ours, _reference_frames(PANCAKE, indices))


@pytest.mark.timeout(60)
def test_read_frames_order_and_end_of_stream():
    a, b = read_frames(PANCAKE, [200, 5])
    np.testing.assert_array_equal(np.stack([b, a]), read_frames(PANCAKE, [5, 200]))
    assert not np.array_equal(a, b)
    with pytest.raises(VideoDecodeError, match="flipping_a_pancake.mkv ended after 310 frame"):
        read_frames(PANCAKE, [0, 310])
    with pytest.raises(InputError):
        read_frames(PANCAKE, [])


@pytest.mark.timeout(60)
def test_corrupted_video_raises_but_frames_before_the_damage_decode():
    with pytest.raises(DamagedVideoError, match="corrupted.mp4 is damaged: decoding fails after its first 28 "
                                                "frames") as caught:
        read_frames(CORRUPTED, list(range(0, 50, 5)))
    assert caught.value.decodable == 28
    # decoding stops at the last requested frame, so frames before the damage are fine
    early = read_frames(CORRUPTED, [0, 10, 20])
    assert early.shape == (3, 720, 1280, 3)
    np.testing.assert_array_equal(early, _reference_frames(CORRUPTED, [0, 10, 20]))


@pytest.mark.timeout(60)
def test_audio_only_empty_and_non_video_files(tmp_path):
    audio = tmp_path / "audio_only.mp4"
    with av.open(str(audio), "w") as c:
        stream = c.add_stream("aac", rate=16000, layout="mono")
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                c.mux(packet)
        for packet in stream.encode(None):
            c.mux(packet)
    with pytest.raises(VideoDecodeError, match="audio_only.mp4 has no video stream"):
        probe_video(audio)
    with pytest.raises(VideoDecodeError, match="no video stream"):
        read_frames(audio, [0])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(EmptyFileError):
        probe_video(empty)
    text = tmp_path / "text.mp4"
    text.write_text("not a video\n" * 100)
    with pytest.raises(VideoDecodeError, match="text.mp4"):
        probe_video(text)
    with pytest.raises(MediaError, match="does not exist"):
        read_frames(tmp_path / "missing.mp4", [0])


# ---------------------------------------------------------------------------------------- sampling
def _reference_or_error(fn):
    try:
        return [int(i) for i in fn()]
    except (ValueError, ZeroDivisionError) as e:
        return type(e)


@pytest.mark.parametrize("total, video_fps", [(310, 30.0), (17, 29.97), (1000, 24.0), (5, 60.0), (1, 30.0)])
def test_bounded_sampling_matches_qwen2_vl(total, video_fps):
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    cases = [dict(fps=f) for f in (0.5, 1, 2, 4, 30)] + [dict(num_frames=n) for n in (2, 4, 7, 8, 16, 31)]
    cases += [dict(fps=2, min_frames=8, max_frames=12), dict(fps=2, temporal_patch_size=3), dict(num_frames=9,
              temporal_patch_size=3), dict(fps=1, temporal_patch_size=1, max_frames=7)]
    compared = 0
    for kw in cases:
        ref = _reference_or_error(lambda: Qwen2VLVideoProcessor().sample_frames(metadata, **kw))
        ours_kw = {k: v for k, v in kw.items() if k != "temporal_patch_size"}
        multiple = kw.get("temporal_patch_size", 2)
        if ref is ZeroDivisionError:  # documented deviation: we take min(multiple, total) frames
            assert sample_frames_bounded(total, video_fps, multiple=multiple, **ours_kw) == list(
                range(min(multiple, total)))
        elif ref is ValueError:
            with pytest.raises(InputError):
                sample_frames_bounded(total, video_fps, multiple=multiple, **ours_kw)
        else:
            assert sample_frames_bounded(total, video_fps, multiple=multiple, **ours_kw) == ref, kw
            compared += 1
    assert compared >= (5 if total >= 17 else 1)  # the comparisons are not all skipped
    # neither fps nor num_frames: every frame (the reference raises TypeError here)
    assert sample_frames_bounded(total, video_fps) == list(range(total))


@pytest.mark.parametrize("total, video_fps", [(310, 30.0), (17, 29.97), (1000, 24.0), (5, 60.0)])
def test_uniform_sampling_matches_the_base_video_processor(total, video_fps):
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    for kw in [dict(fps=f) for f in (0.5, 1, 2, 24)] + [dict(num_frames=n) for n in (1, 3, 8, 16)] + [{}]:
        ref = _reference_or_error(lambda: default_sample_indices_fn(metadata, **kw))
        if ref is ValueError:
            with pytest.raises(InputError):
                sample_frames_uniform(total, video_fps, **kw)
        else:
            assert sample_frames_uniform(total, video_fps, **kw) == ref, kw


def test_sampling_argument_errors():
    with pytest.raises(InputError, match="not both"):
        sample_frames_bounded(310, 30.0, num_frames=8, fps=2)
    with pytest.raises(InputError, match="frame rate"):
        sample_frames_bounded(310, None, fps=2)
    with pytest.raises(InputError, match="only 310"):
        sample_frames_bounded(310, 30.0, num_frames=400)
    with pytest.raises(InputError, match="not both"):
        sample_frames_uniform(310, 30.0, num_frames=8, fps=2)
