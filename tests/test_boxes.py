"""vlm.boxes: GLM and Qwen2-VL box markup and Qwen2.5-VL JSON boxes and points parsed into image-relative
boxes (from a 0..1000 grid or pixels of the resized image); malformed boxes are skipped."""

from __future__ import annotations

import pytest

from vlm.boxes import Box, parse_boxes, strip_markup


def _coords(boxes):
    return [(b.x1, b.y1, b.x2, b.y2, b.label) for b in boxes]


@pytest.mark.parametrize("body", ["[100, 200, 300, 400]", "[[100,200,300,400]]", "(100, 200, 300, 400)",
                                  "<100 200 300 400>", "[100.0,200,300,400.0]", " 100,200 , 300,400 "])
def test_glm_bracket_styles(body):
    text = f"The cat is at <|begin_of_box|>{body}<|end_of_box|>."
    (box,) = parse_boxes(text)
    assert _coords([box]) == [(0.1, 0.2, 0.3, 0.4, None)]
    assert text[box.start:box.end] == f"<|begin_of_box|>{body}<|end_of_box|>"
    assert box.pixels(1000, 500) == (100, 100, 300, 200)


def test_glm_several_boxes_in_one_markup_and_in_order():
    text = ("<|begin_of_box|>[[0,0,500,500],[500,500,1000,1000]]<|end_of_box|> and "
            "<|begin_of_box|>[10,10,20,20]<|end_of_box|>")
    assert _coords(parse_boxes(text)) == [(0, 0, 0.5, 0.5, None), (0.5, 0.5, 1, 1, None),
                                          (0.01, 0.01, 0.02, 0.02, None)]


def test_qwen_boxes_with_and_without_labels():
    text = ("<|object_ref_start|>the man<|object_ref_end|><|box_start|>(120,330),(560,980)<|box_end|> irons; "
            "<|box_start|>(0,0),(1000,1000)<|box_end|>")
    assert _coords(parse_boxes(text)) == [(0.12, 0.33, 0.56, 0.98, "the man"), (0, 0, 1, 1, None)]


def test_mixed_markups_sorted_by_position():
    text = "<|box_start|>(1,1),(2,2)<|box_end|> <|begin_of_box|>[3,3,4,4]<|end_of_box|>"
    assert [b.x1 for b in parse_boxes(text)] == [0.001, 0.003]


@pytest.mark.parametrize("text", [
    "<|begin_of_box|>B<|end_of_box|>",  # GLM also boxes final answers that are not coordinates
    "<|begin_of_box|>[1, 2, 3]<|end_of_box|>",
    "<|begin_of_box|>[1, 2, 3, 4, 5]<|end_of_box|>",
    "<|begin_of_box|>[300, 200, 100, 400]<|end_of_box|>",  # corners swapped
    "<|begin_of_box|>[100, 200, 300, 2000]<|end_of_box|>",  # beyond the 0..1000 scale
    "<|begin_of_box|>[-5, 200, 300, 400]<|end_of_box|>",
    "<|begin_of_box|>[100, 200, 100, 400]<|end_of_box|>",  # empty
    "<|begin_of_box|>[100, 200, 300, 400]",  # never closed
    "[100, 200, 300, 400]<|end_of_box|>",
    "<|box_start|>(1,2),(3<|box_end|>",
    "<|object_ref_start|>dog<|object_ref_end|>",
    "", "no boxes here", "<|begin_of_box|><|end_of_box|>",
])
def test_malformed_boxes_are_skipped(text):
    assert parse_boxes(text) == []


def test_a_malformed_box_does_not_hide_a_good_one():
    text = "<|begin_of_box|>[1,2,3]<|end_of_box|><|begin_of_box|>[[1,2,3,4],[9,9,1,1]]<|end_of_box|>"
    assert _coords(parse_boxes(text)) == [(0.001, 0.002, 0.003, 0.004, None)]
    text = "<|begin_of_box|>[1,2,<|begin_of_box|>[5,6,7,8]<|end_of_box|>"  # an unclosed box before a good one
    assert _coords(parse_boxes(text)) == [(0.005, 0.006, 0.007, 0.008, None)]


def test_strip_markup_keeps_coordinates_and_labels():
    text = ("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(1,2),(3,4)<|box_end|> "
            "<|begin_of_box|>[1,2,3,4]<|end_of_box|>")
    assert strip_markup(text) == "cat(1,2),(3,4) [1,2,3,4]"


def test_box_is_a_value():
    assert Box(0.1, 0.2, 0.3, 0.4) == Box(0.1, 0.2, 0.3, 0.4)


# Qwen2.5-VL answers (formats of its grounding cookbook): pixels of the image as resized for the model.
FENCED = """```json
[
\t{"bbox_2d": [135, 114, 1016, 672], "label": "person"},
\t{"bbox_2d": [ 30, 0, 200, 80 ], "label": "umbrella"}
]
```"""


def test_json_boxes_in_a_fence_mapped_from_the_resized_image():
    boxes = parse_boxes(FENCED, frame=(1120, 840))  # e.g. a 4000x3000 photo resized to 1120x840
    assert _coords(boxes) == [(135 / 1120, 114 / 840, 1016 / 1120, 672 / 840, "person"),
                              (30 / 1120, 0, 200 / 1120, 80 / 840, "umbrella")]
    assert boxes[0].pixels(4000, 3000) == (482, 407, 3629, 2400)
    assert FENCED[boxes[1].start:boxes[1].end] == '{"bbox_2d": [ 30, 0, 200, 80 ], "label": "umbrella"}'


@pytest.mark.parametrize("text", [
    '[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]',  # no fence
    'The cat: {"bbox_2d": [10, 20, 30, 40], "label": "cat"}.',  # one object in prose
    '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"bbox_2d": [10, 20',  # a list cut short
])
def test_json_box_variants(text):
    assert _coords(parse_boxes(text, frame=(100, 200))) == [(0.1, 0.1, 0.3, 0.2, "cat")]


def test_json_points_and_boxes_without_labels():
    text = '[{"point_2d": [50, 100], "label": "nose"}, {"point_2d": [0, 0]}, {"bbox_2d": [0, 0, 100, 200]}]'
    boxes = parse_boxes(text, frame=(100, 200))
    assert _coords(boxes) == [(0.5, 0.5, 0.5, 0.5, "nose"), (0, 0, 0, 0, None), (0, 0, 1, 1, None)]
    assert [b.is_point for b in boxes] == [True, True, False]


@pytest.mark.parametrize("text", [
    '{"bbox_2d": [10, 20, 30]}', '{"bbox_2d": [30, 20, 10, 40]}', '{"bbox_2d": [10, 20, 300, 40]}',
    '{"bbox_2d": ["10", 20, 30, 40]}', '{"bbox_2d": [true, 20, 30, 40]}', '{"point_2d": [10]}',
    '{"point_2d": [-1, 5]}', '{"label": "cat"}', '{bbox_2d: [1, 2, 3, 4]}', '{"bbox_2d": [1, 2, 3, 4]',
])
def test_malformed_json_boxes_are_skipped(text):
    assert parse_boxes(text, frame=(100, 100)) == []


def test_the_frame_decides_the_scale():
    text = '{"bbox_2d": [100, 100, 200, 200]}'
    assert _coords(parse_boxes(text)) == [(0.1, 0.1, 0.2, 0.2, None)]  # the 0..1000 grid by default
    assert _coords(parse_boxes(text, frame=(400, 200))) == [(0.25, 0.5, 0.5, 1, None)]
