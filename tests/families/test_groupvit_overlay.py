"""The GroupViT overlay: tint at the set opacity, outlines, every label named inside the image, legend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm.errors import InputError
from vlm.families.groupvit.overlay import (OKABE_ITO, TOL_MUTED, boundary, legend_rows, palette, place_labels,
                                           render, text_color)
from vlm.families.groupvit.segmentation import BACKGROUND, Segmentation

ASSETS = Path(__file__).resolve().parents[2] / "assets"
LABELS = ("cat", "dog", "grass", "kite", "unicorn")  # "unicorn" has no pixels


def make_segmentation(image: Image.Image, labels=LABELS, mask: np.ndarray | None = None) -> Segmentation:
    if mask is None:
        mask = layout(image.height, image.width)
    n = len(labels)
    return Segmentation(image, tuple(labels), torch.zeros(n, 4, 4), torch.zeros(4, 4), torch.from_numpy(mask),
                        torch.zeros(n), 0.5)


def layout(height: int, width: int) -> np.ndarray:
    """Background; a left band (cat); a disc (dog); a bottom-right block touching two image edges (grass);
    a 4x4 speck in the top-right corner (kite)."""
    mask = np.full((height, width), BACKGROUND, dtype=np.int64)
    mask[:, : width // 4] = 0
    ys, xs = np.mgrid[:height, :width]
    mask[(ys - height * 0.4) ** 2 + (xs - width * 0.55) ** 2 < (min(height, width) * 0.2) ** 2] = 1
    mask[int(height * 0.75):, int(width * 0.6):] = 2
    mask[:4, -4:] = 3
    return mask


@pytest.fixture(scope="module")
def seg() -> Segmentation:
    return make_segmentation(Image.open(ASSETS / "cat.png").convert("RGB").resize((448, 448)))


def blend(seg: Segmentation, opacity: float) -> np.ndarray:
    original = np.asarray(seg.image, dtype=np.float64)
    colors = np.array(seg.colors, dtype=np.float64)
    mask = seg.mask.numpy()
    expected = original.copy()
    labelled = mask >= 0
    expected[labelled] = (1 - opacity) * original[labelled] + opacity * colors[mask[labelled]]
    return expected


@pytest.mark.parametrize("opacity", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_each_label_colour_covers_its_mask_at_the_opacity(seg, opacity):
    out = np.asarray(render(seg, opacity, show_labels=False, legend=False, contours=False), dtype=np.float64)
    assert out.shape == (seg.image.height, seg.image.width, 3)
    assert np.abs(out - blend(seg, opacity)).max() <= 0.5 + 1e-6  # rounding only
    background = seg.mask.numpy() == BACKGROUND
    assert np.array_equal(out[background], np.asarray(seg.image)[background])


def test_default_overlay_adds_outlines_names_and_legend_and_keeps_the_tint_elsewhere(seg):
    plain = np.asarray(render(seg, 0.5, show_labels=False, legend=False, contours=False))
    full = np.asarray(seg.overlay(opacity=0.5))
    height, width = plain.shape[:2]
    assert full.shape[0] > height and full.shape[1] >= width  # the legend sits below the image
    full = full[:height, :width]
    mask = seg.mask.numpy()
    edge = boundary(mask, 1) & (mask >= 0)
    names = np.zeros_like(edge)
    for box in place_labels(seg):
        left, top, right, bottom = box.box
        names[top:bottom, left:right] = True
    colors = np.array(seg.colors)
    outline = edge & ~names
    assert np.array_equal(full[outline], colors[mask[outline]])
    elsewhere = ~edge & ~names
    assert np.array_equal(full[elsewhere], plain[elsewhere])
    for label in range(3):  # (the kite speck is under its name)
        assert (outline & (mask == label)).any()


def test_every_label_is_named_inside_the_image_at_a_point_of_its_region(seg):
    boxes = place_labels(seg)
    mask = seg.mask.numpy()
    height, width = mask.shape
    assert sorted(b.label for b in boxes) == [0, 1, 2, 3]  # every label with pixels, not only one
    unnamed = np.asarray(render(seg, show_labels=False, legend=False))
    named = np.asarray(render(seg, legend=False))
    for box in boxes:
        left, top, right, bottom = box.box
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        x, y = box.anchor
        assert mask[y, x] == box.label and box.text == LABELS[box.label]
        if box.label != 3:  # the corner speck is smaller than its name: the box is moved inside the image
            assert left <= x < right and top <= y < bottom
        inside = named[top:bottom, left:right]
        assert not np.array_equal(inside, unnamed[top:bottom, left:right])
        ink = np.all(inside == text_color(seg.colors[box.label]), axis=-1)
        assert ink.sum() >= 10  # the letters, not only the box
    for a in boxes:
        for b in boxes:
            if a is not b:
                assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]


def test_names_of_neighbouring_regions_do_not_cover_each_other():
    image = Image.new("RGB", (800, 400), "grey")
    mask = np.full((400, 800), BACKGROUND)
    mask[190:204] = 0  # two long thin bands, one above the other: their deepest points are 14 px apart,
    mask[204:218] = 1  # closer than the names are tall
    a, b = place_labels(make_segmentation(image, ("rail", "track"), mask))
    assert a.box[2] <= b.box[0] or b.box[2] <= a.box[0] or a.box[3] <= b.box[1] or b.box[3] <= a.box[1]
    assert mask[a.anchor[1], a.anchor[0]] == a.label and mask[b.anchor[1], b.anchor[0]] == b.label


def test_a_region_on_the_image_border_is_named_inside_the_image():
    image = Image.new("RGB", (300, 200), (40, 90, 160))
    mask = np.full((200, 300), BACKGROUND)
    mask[:, -3:] = 0  # a 3-pixel strip on the right edge
    mask[190:, :] = 1  # a strip along the bottom
    for box in place_labels(make_segmentation(image, ("pole", "floor"), mask)):
        assert 0 <= box.box[0] and box.box[2] <= 300 and 0 <= box.box[1] and box.box[3] <= 200
        assert mask[box.anchor[1], box.anchor[0]] == box.label


def test_a_long_name_is_shrunk_or_shortened_to_fit_a_small_image():
    image = Image.new("RGB", (60, 40), "white")
    label = "an extraordinarily long label that cannot fit"
    (box,) = place_labels(make_segmentation(image, (label,), np.zeros((40, 60), dtype=np.int64)))
    assert box.box[0] >= 0 and box.box[2] <= 60 and box.box[1] >= 0 and box.box[3] <= 40
    assert box.text.endswith("…") and label.startswith(box.text[:-1])


def test_legend_lists_every_label_and_the_background_with_shares_summing_to_100(seg):
    rows = legend_rows(seg)
    assert [r.name for r in rows] == [*LABELS, "background"]
    assert round(sum(r.percent for r in rows), 6) == 100.0
    mask = seg.mask.numpy()
    for row, label in zip(rows, range(len(LABELS))):
        assert abs(row.percent - 100 * (mask == label).mean()) <= 0.1
    assert rows[4].percent == 0.0 and rows[-1].color is None
    legend = np.asarray(seg.overlay())[seg.image.height:]
    for row in rows[:-1]:  # each label's swatch is drawn in its colour
        assert np.all(legend == row.color, axis=-1).sum() >= 50


@pytest.mark.parametrize("seed", range(25))
def test_legend_shares_always_sum_to_100(seed):
    rng = np.random.default_rng(seed)
    labels = tuple(f"l{i}" for i in range(rng.integers(1, 12)))
    mask = rng.integers(-1, len(labels), size=(rng.integers(1, 60), rng.integers(1, 60)))
    rows = legend_rows(make_segmentation(Image.new("RGB", mask.shape[::-1]), labels, mask))
    assert round(sum(r.percent for r in rows), 6) == 100.0
    shares = {r.name: r.percent for r in rows}
    for i, label in enumerate(labels):
        assert abs(shares[label] - 100 * (mask == i).mean()) < 0.1 + 1e-9


def test_background_row_is_renamed_when_a_label_is_called_background():
    mask = np.array([[0, BACKGROUND]])
    rows = legend_rows(make_segmentation(Image.new("RGB", (2, 1)), ("Background",), mask))
    assert [r.name for r in rows] == ["Background", "(no label)"]


def test_palette_is_distinct_colour_blind_safe_first_and_names_are_legible():
    colors = palette(40)
    assert len(set(colors)) == 40
    assert [f"#{r:02X}{g:02X}{b:02X}" for r, g, b in colors[:16]] == OKABE_ITO + TOL_MUTED

    def luminance(c):
        linear = [(v / 255) / 12.92 if v <= 10 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    for color in colors:
        lighter, darker = sorted([luminance(color), luminance(text_color(color))], reverse=True)
        assert (lighter + 0.05) / (darker + 0.05) >= 4.5  # WCAG AA for the name on its box


def test_only_restricts_the_drawing_to_some_labels(seg):
    out = np.asarray(seg.overlay(only=["dog"], legend=False, show_labels=False, contours=False))
    mask = seg.mask.numpy()
    original = np.asarray(seg.image)
    assert np.array_equal(out[mask != 1], original[mask != 1])
    assert not np.array_equal(out[mask == 1], original[mask == 1])
    assert [b.label for b in place_labels(seg, shown=[1])] == [1]
    with pytest.raises(InputError):
        seg.overlay(only=["horse"])
    with pytest.raises(InputError):
        seg.overlay(opacity=1.5)


def test_label_masks_and_areas(seg):
    masks = seg.label_masks()
    assert list(masks) == list(LABELS)
    assert all(m.dtype == bool and m.shape == seg.mask.shape for m in masks.values())
    assert not masks["unicorn"].any()
    total = sum(m.sum() for m in masks.values()) + (seg.mask == BACKGROUND).sum().item()
    assert total == seg.mask.numel()
    assert abs(float(seg.areas.sum()) + seg.background_area - 1) < 1e-12


def test_overlay_of_a_real_segmentation_saves_as_png(tmp_path):
    from vlm.checkpoint import read_config
    from vlm.families.groupvit import load, write_tiny

    directory = write_tiny(tmp_path / "tiny")
    pipe = load(directory, read_config(directory), torch.device("cpu"), torch.float32)
    wide = tmp_path / "wide.png"  # GroupViT slides windows over an image wider than it is tall
    Image.open(ASSETS / "street.png").convert("RGB").resize((1000, 667)).save(wide)
    result = pipe.segment(wide, ["sky", "water", "tree"])
    result.overlay().save(tmp_path / "overlay.png")
    saved = Image.open(tmp_path / "overlay.png")
    assert saved.width >= 1000 and saved.height > 667
