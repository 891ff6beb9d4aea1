"""Qwen2-VL pixel preprocessing vs transformers (Qwen2VLImageProcessorPil, Qwen2VLVideoProcessor).

Measured on transformers 5.23 / torch 2.14.1 CPU: images and videos match the reference bit for bit
(max abs difference 0.0); the tests allow 1e-6.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
from transformers.video_utils import VideoMetadata, load_video

from vlm.errors import InputError, VideoDecodeError
from vlm.processing.qwen_vl import (
    VideoSettings,
    VisionSettings,
    preprocess_frames,
    preprocess_images,
    preprocess_video,
    smart_resize,
)
from vlm.media import load_image

MEDIA = Path(__file__).resolve().parents[3] / "shared" / "media"  # ../shared/media, read in place
PANCAKE = MEDIA / "video" / "flipping_a_pancake.mkv"
ATOL = 1e-6

pytestmark = pytest.mark.skipif(not MEDIA.is_dir(), reason="../shared/media is not present")

IMAGE_SETTINGS = [
    {},  # reference defaults: patch 14, merge 2, temporal 2
    {"patch_size": 16, "resample": 2},
    {"patch_size": 8, "merge_size": 3, "min_pixels": 24 * 24 * 4, "max_pixels": 24 * 24 * 40},
]
VIDEO_SETTINGS = [
    {},
    {"patch_size": 16, "min_pixels": 32 * 32 * 20, "max_pixels": 32 * 32 * 60},
    {"patch_size": 8, "merge_size": 3, "temporal_patch_size": 3, "min_pixels": 24 * 24 * 4,
     "max_pixels": 24 * 24 * 40, "cap_pixels_per_frame": True, "max_video_tokens": 200},
]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    photos = [load_image(p) for p in sorted(MEDIA.glob("*.jpg"))]
    coco, water = load_image(MEDIA / "coco.jpg"), load_image(MEDIA / "waterview.jpg")
    odd = [coco.resize((30, 200)), coco.resize((200, 30)), water.resize((1500, 10)), water.resize((3000, 2000)),
           coco.resize((5, 7)), water.resize((333, 517))]
    rgba = water.resize((97, 61)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((97, 61)))  # given as RGBA: processor converts
    return photos + odd + [rgba, coco.convert("L")]


def _reference_images(images, **kw):
    ref = Qwen2VLImageProcessorPil(**kw)
    out = ref(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _assert_same(ours, ref):
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw", IMAGE_SETTINGS, ids=["default", "p16-bilinear", "p8-m3-small"])
def test_images_match_the_pillow_reference(images, kw):
    settings = VisionSettings.from_dict(kw)
    for image in images:  # one at a time: each image's own grid and rows
        pv, grid = preprocess_images([image], settings)
        ref_pv, ref_grid = _reference_images([image], **kw)
        assert torch.equal(grid, ref_grid) and grid.dtype == torch.long
        _assert_same(pv, ref_pv)
    pv, grid = preprocess_images(images, settings)  # batched: rows concatenated in order
    ref_pv, ref_grid = _reference_images(images, **kw)
    assert torch.equal(grid, ref_grid)
    _assert_same(pv, ref_pv)


def test_image_pixel_overrides_match_reference_size(images):
    settings = VisionSettings()
    for lo, hi in [(28 * 28 * 4, 28 * 28 * 16), (28 * 28 * 100, 28 * 28 * 400)]:
        pv, grid = preprocess_images(images[:4], settings, min_pixels=lo, max_pixels=hi)
        out = Qwen2VLImageProcessorPil()(images=images[:4], size={"shortest_edge": lo, "longest_edge": hi},
                                         return_tensors="pt")
        assert torch.equal(grid, out["image_grid_thw"])
        _assert_same(pv, out["pixel_values"])
        assert not torch.equal(grid, preprocess_images(images[:4], settings)[1])  # the override took effect


def test_smart_resize_matches_reference():
    sizes = [(1, 1), (5, 7), (30, 200), (240, 426), (899, 1024), (2000, 3000), (10, 1500), (56, 56), (4000, 20)]
    for factor, lo, hi in [(28, 56 * 56, 28 * 28 * 1280), (32, 32 * 32 * 4, 32 * 32 * 100), (24, 1152, 11520)]:
        for h, w in sizes:
            assert smart_resize(h, w, factor, lo, hi) == ref_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    with pytest.raises(ValueError):
        ref_smart_resize(10, 2010)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 56 * 56, 28 * 28 * 1280)
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_images([Image.new("RGB", (2010, 10))], VisionSettings())


# ---------------------------------------------------------------------------------------- settings
def _assert_settings_equal(ours, ref) -> None:
    assert (ours.patch_size, ours.temporal_patch_size, ours.merge_size) == (
        ref.patch_size, ref.temporal_patch_size, ref.merge_size)
    assert (ours.min_pixels, ours.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    assert ours.image_mean == pytest.approx(ref.image_mean) and ours.image_std == pytest.approx(ref.image_std)
    assert ours.rescale_factor == ref.rescale_factor and ours.resample == int(ref.resample)
    if isinstance(ours, VideoSettings):
        assert (ours.fps, ours.num_frames, ours.min_frames, ours.max_frames, ours.do_sample_frames) == (
            ref.fps, ref.num_frames, ref.min_frames, ref.max_frames, ref.do_sample_frames)
        assert ours.cap_pixels_per_frame == bool(ref.cap_pixels_per_frame)
        assert ours.max_video_tokens == ref.max_video_tokens


def _reference_from_dir(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Qwen2VLImageProcessorPil.from_pretrained(directory), Qwen2VLVideoProcessor.from_pretrained(directory)


def test_settings_from_nested_processor_config(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    vocab = {"<unk>": 0, "<|image_pad|>": 1, "<|video_pad|>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")))
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, min_pixels=1000, max_pixels=50000),
        video_processor=Qwen2VLVideoProcessor(fps=1.5, do_sample_frames=True, max_pixels=40000, max_frames=64),
        tokenizer=tokenizer,
    ).save_pretrained(tmp_path)
    assert "image_processor" in json.loads((tmp_path / "processor_config.json").read_text())
    ours = VisionSettings.from_dir(tmp_path)
    ref_image, ref_video = _reference_from_dir(tmp_path)
    _assert_settings_equal(ours, ref_image)
    _assert_settings_equal(ours.video, ref_video)
    assert (ours.patch_size, ours.video.fps, ours.video.max_pixels) == (16, 1.5, 40000)


@pytest.mark.parametrize("layout", ["min_max_keys", "size_dict", "separate_video_file", "empty"])
def test_settings_from_flat_hub_files(tmp_path, layout):
    flat = {  # Qwen/Qwen2-VL-2B-Instruct preprocessor_config.json
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    }
    if layout == "size_dict":
        flat.pop("min_pixels"), flat.pop("max_pixels")
        flat["size"] = {"shortest_edge": 6272, "longest_edge": 401408}
    if layout != "empty":
        (tmp_path / "preprocessor_config.json").write_text(json.dumps(flat))
    else:
        (tmp_path / "preprocessor_config.json").write_text("{}")
    if layout == "separate_video_file":
        video = {**flat, "min_pixels": 128 * 28 * 28, "max_pixels": 28 * 28 * 256, "fps": 2.0,
                 "do_sample_frames": True, "video_processor_type": "Qwen2VLVideoProcessor"}
        (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    ours = VisionSettings.from_dir(tmp_path)
    ref_image, ref_video = _reference_from_dir(tmp_path)
    _assert_settings_equal(ours, ref_image)
    _assert_settings_equal(ours.video, ref_video)


# ------------------------------------------------------------------------------------------- video
@pytest.fixture(scope="module")
def all_frames() -> np.ndarray:
    """Every frame of the Matroska test video, decoded by the reference's PyAV loader."""
    frames, _ = load_video(str(PANCAKE), backend="pyav", sample_indices_fn=lambda metadata, **_: np.arange(310))
    assert frames.shape == (310, 240, 426, 3)
    return frames


def _reference_video(all_frames, video_kw, **call):
    ref = Qwen2VLVideoProcessor(**video_kw)
    call.setdefault("cap_pixels_per_frame", video_kw.get("cap_pixels_per_frame", False))
    out = ref(videos=[all_frames], video_metadata=VideoMetadata(total_num_frames=310, fps=30.0),
              return_metadata=True, return_tensors="pt", **call)
    indices = out["video_metadata"][0].frames_indices
    indices = list(range(310)) if indices is None else [int(i) for i in indices]
    return out["pixel_values_videos"], out["video_grid_thw"], indices


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kw", VIDEO_SETTINGS, ids=["default", "p16", "p8-m3-t3-capped"])
@pytest.mark.parametrize("sampling", [{"fps": 2}, {"num_frames": 8}, {"fps": 0.5}])
def test_video_matches_reference(all_frames, kw, sampling):
    settings = VisionSettings(video=VideoSettings.from_dict(kw))
    pv, grid, sample = preprocess_video(PANCAKE, settings, **sampling)
    ref_pv, ref_grid, ref_indices = _reference_video(all_frames, kw, do_sample_frames=True, **sampling)
    assert list(sample.indices) == ref_indices
    assert sample.info.num_frames == 310
    assert torch.equal(grid, ref_grid)
    _assert_same(pv, ref_pv)


@pytest.mark.timeout(120)
def test_video_sampling_from_settings_and_pixel_overrides(all_frames):
    kw = {"do_sample_frames": True, "fps": 1.0, "min_frames": 6}
    settings = VisionSettings(video=VideoSettings.from_dict(kw))
    pv, grid, sample = preprocess_video(PANCAKE, settings, min_pixels=28 * 28 * 10, max_pixels=28 * 28 * 30)
    ref_pv, ref_grid, ref_indices = _reference_video(
        all_frames, kw, size={"shortest_edge": 28 * 28 * 10, "longest_edge": 28 * 28 * 30})
    assert list(sample.indices) == ref_indices and len(ref_indices) == 10
    assert torch.equal(grid, ref_grid)
    _assert_same(pv, ref_pv)
    assert sample.sampled_fps == pytest.approx(10 / 310 * 30)


@pytest.mark.timeout(180)
def test_video_without_sampling_takes_every_frame_like_the_reference(all_frames):
    pv, grid, sample = preprocess_video(PANCAKE, VisionSettings())
    ref_pv, ref_grid, ref_indices = _reference_video(all_frames, {}, do_sample_frames=False)
    assert list(sample.indices) == ref_indices == list(range(310))
    assert torch.equal(grid, ref_grid)
    _assert_same(pv, ref_pv)
    with pytest.raises(InputError, match="pass fps"):
        preprocess_video(PANCAKE, VisionSettings(video=VideoSettings(max_frames=100)))


@pytest.mark.parametrize("count", [1, 5, 6])
def test_frames_padded_to_temporal_patch_like_reference(all_frames, count):
    frames = all_frames[40:40 + count]
    pv, grid = preprocess_frames(frames, VisionSettings())
    out = Qwen2VLVideoProcessor()(videos=[frames], do_sample_frames=False, cap_pixels_per_frame=False,
                                  return_tensors="pt")
    assert torch.equal(grid, out["video_grid_thw"]) and grid[0, 0] == (count + 1) // 2
    _assert_same(pv, out["pixel_values_videos"])


def test_image_equals_a_two_frame_still_video():
    """An image is one frame repeated over the temporal patch: same rows as a still 2-frame video."""
    image = load_image(MEDIA / "extreme_ironing.jpg").resize((252, 168))  # already a multiple of 28
    settings = VisionSettings(video=VideoSettings(min_pixels=56 * 56, max_pixels=28 * 28 * 1280))
    image_pv, image_grid = preprocess_images([image], settings)
    video_pv, video_grid = preprocess_frames(np.stack([np.asarray(image)] * 2), settings)
    assert torch.equal(image_grid, video_grid)
    _assert_same(image_pv, video_pv)  # no resize happened, so the float paths agree to rounding


@pytest.mark.timeout(60)
def test_corrupted_video_raises():
    with pytest.raises(VideoDecodeError, match="corrupted.mp4"):
        preprocess_video(MEDIA / "video" / "corrupted.mp4", VisionSettings(), fps=2)
