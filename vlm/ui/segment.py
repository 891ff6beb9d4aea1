"""The segmentation tab: an image and labels in, GroupViT's labelled overlay out (PNG, with a legend).

Opacity, region names and the labels shown are redrawn from the last result kept in the session,
without running the model again. Also registers the `/segment` API endpoint. Every input is registered
with its check (vlm/ui/validation.py) and the events get the raw, checked values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import InputError, VLMError
from ..families import FAMILIES
from ..session import SessionManager
from . import validation as check
from .checkpoints import Catalog
from .logs import record, refusal
from .turns import error_text
from .uploads import Uploads
from .validation import Gate
from .zerogpu import gpu

MAX_LABELS = 32  # labels per request: time and memory grow with their number
MAX_LABELS_CHARS = 1000

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = [
    ("cat.png", "cat, sofa, wall"),
    ("street.png", "car, tree, road, sky, grass, sun"),
    ("shapes.png", "circle, square, triangle, table"),
]


class SegmentTab:
    def __init__(self, manager: SessionManager, catalog: Catalog, families: list[str], gate: Gate, uploads: Uploads):
        self.manager, self.catalog, self.families = manager, catalog, families
        self.gate, self.uploads = gate, uploads
        self.run = gpu(self._run)

    def build(self) -> gr.Examples:
        """Lay out the tab inside the current Blocks and wire its events; returns its examples."""
        first, gate = self.families[0], self.gate
        result = gr.State(None)  # the last Segmentation of this session
        with gr.Row():
            with gr.Column():
                image = gate.field(gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                            elem_id="seg-image"), check.media_file(self.uploads, ("image",)))
                labels = gate.field(gr.Textbox(label="Labels", placeholder="Comma-separated, e.g. cat, sofa, wall",
                                               elem_id="seg-labels-input"), label_list)
                family = gate.field(gr.Dropdown(self.families, value=first, label="Model family",
                                                visible=len(self.families) > 1), check.one_of(self.families))
                checkpoint = gate.field(gr.Dropdown(self.catalog.choices(first), value=self.catalog.default(first),
                                                    label="Checkpoint",
                                                    allow_custom_value=self.catalog.settings.custom_checkpoints),
                                        check.checkpoint(self.catalog, family))
                threshold = gate.slider(0, 1, FAMILIES[first].module.DEFAULT_THRESHOLD, 0.01,
                                        "Background below this confidence (0: every pixel gets a label)",
                                        elem_id="seg-threshold")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                examples = gr.Examples([[str(ASSETS / name), text] for name, text in EXAMPLES], inputs=[image, labels],
                                       label="Examples (made by assets/make_assets.py)")
                gate.field(examples.dataset, check.example(len(EXAMPLES)))
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="Overlay (PNG)", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id="seg-overlay")
                opacity = gate.slider(0, 1, 0.5, 0.05, "Opacity")
                names = gate.field(gr.Checkbox(True, label="Names on the regions"), check.flag)
                shown = gate.field(gr.CheckboxGroup(label="Labels shown (share of the image)", elem_id="seg-labels"),
                                   check.strings(MAX_LABELS, MAX_LABELS_CHARS))
        areas = gr.JSON(label="Share of the image per label, in percent", visible=False)  # for API clients

        family.change(lambda f: gr.Dropdown(choices=self.catalog.choices(f), value=self.catalog.default(f)),
                      family, checkpoint, api_visibility="private", preprocess=False)
        run.click(self.segment, [image, labels, family, checkpoint, threshold, opacity, names],
                  [overlay, shown, areas, result], preprocess=False,
                  api_name="segment", concurrency_id="segment", concurrency_limit=self.manager.concurrency)
        for control in (opacity, names, shown):
            control.input(self.redraw, [result, opacity, names, shown], overlay, api_visibility="private",
                          preprocess=False)
        return examples

    def segment(self, image: dict[str, Any] | None, labels: str, family: str, checkpoint: str, threshold: float,
                opacity: float, names: bool, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Segment the image into the labels: the overlay, the label toggles, the areas and the result."""
        if not image:
            raise refusal("Upload an image first.")
        source = self.catalog.source(family, checkpoint)
        try:
            self.manager.get(family, source, lambda done, message: progress(done, desc=message))
            seg = self.run(family, source, os.path.realpath(image["path"]), labels, threshold)
        except VLMError as exc:
            record(exc)
            raise gr.Error(error_text(exc), print_exception=False) from None
        percent = {name: round(100 * float(area), 1) for name, area in zip(seg.labels, seg.areas)}
        toggles = gr.CheckboxGroup(choices=[(f"{name} · {share:.1f}%", name) for name, share in percent.items()],
                                   value=list(seg.labels),
                                   info=f"Background (no label confident enough): {100 * seg.background_area:.1f}%")
        percent["background"] = round(100 * seg.background_area, 1)
        return seg.overlay(opacity=opacity, show_labels=names), toggles, percent, seg

    def redraw(self, seg: Any, opacity: float, names: bool, shown: list[str]):
        if seg is None:
            return gr.update()
        return seg.overlay(opacity=opacity, show_labels=names, only=shown)

    def _run(self, family: str, source: str, image: str, labels: str, threshold: float) -> Any:
        return self.manager.segment(family, source, image, labels, threshold=threshold)


def label_list(label: str, value: Any, request: check.Request) -> None:
    """The Labels box: text of at most MAX_LABELS_CHARS characters naming at most MAX_LABELS labels."""
    check.text(MAX_LABELS_CHARS)(label, value, request)
    count = sum(1 for name in value.split(",") if name.strip())
    if count > MAX_LABELS:
        raise InputError(f"{label} names {count} labels; this server segments into at most {MAX_LABELS}.")
