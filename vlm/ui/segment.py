"""The segmentation tab: an image and labels in, GroupViT's labelled overlay out (PNG, with a legend).

Opacity, region names and the labels shown are redrawn from the last result kept in the session,
without running the model again. Also registers the `/segment` API endpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import VLMError
from ..families import FAMILIES
from ..session import SessionManager
from .checkpoints import Catalog
from .turns import error_text
from .uploads import image_path
from .zerogpu import gpu

ASSETS = Path(__file__).resolve().parents[2] / "assets"
EXAMPLES = [
    ("cat.png", "cat, sofa, wall"),
    ("street.png", "car, tree, road, sky, grass, sun"),
    ("shapes.png", "circle, square, triangle, table"),
]


class SegmentTab:
    def __init__(self, manager: SessionManager, catalog: Catalog, families: list[str]):
        self.manager, self.catalog, self.families = manager, catalog, families
        self.run = gpu(self._run)

    def build(self) -> None:
        """Lay out the tab inside the current Blocks and wire its events."""
        first = self.families[0]
        result = gr.State(None)  # the last Segmentation of this session
        with gr.Row():
            with gr.Column():
                image = image_path(sources=["upload", "clipboard"], label="Image", elem_id="seg-image")
                labels = gr.Textbox(label="Labels", placeholder="Comma-separated, e.g. cat, sofa, wall",
                                    elem_id="seg-labels-input")
                family = gr.Dropdown(self.families, value=first, label="Model family",
                                     visible=len(self.families) > 1)
                checkpoint = gr.Dropdown(self.catalog.choices(first), value=self.catalog.default(first),
                                         label="Checkpoint",
                                         allow_custom_value=self.catalog.settings.custom_checkpoints)
                threshold = gr.Slider(0, 1, value=FAMILIES[first].module.DEFAULT_THRESHOLD, step=0.01,
                                      label="Background below this confidence (0: every pixel gets a label)",
                                      elem_id="seg-threshold")
                run = gr.Button("Segment", variant="primary", elem_id="segment")
                gr.Examples([[str(ASSETS / name), text] for name, text in EXAMPLES], inputs=[image, labels],
                            label="Examples (made by assets/make_assets.py)")
            with gr.Column():
                overlay = gr.Image(type="pil", format="png", label="Overlay (PNG)", interactive=False,
                                   buttons=["download", "fullscreen"], elem_id="seg-overlay")
                opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="Opacity")
                names = gr.Checkbox(True, label="Names on the regions")
                shown = gr.CheckboxGroup(label="Labels shown (share of the image)", elem_id="seg-labels")
        areas = gr.JSON(label="Share of the image per label, in percent", visible=False)  # for API clients

        family.change(lambda f: gr.Dropdown(choices=self.catalog.choices(f), value=self.catalog.default(f)),
                      family, checkpoint, api_visibility="private")
        run.click(self.segment, [image, labels, family, checkpoint, threshold, opacity, names],
                  [overlay, shown, areas, result],
                  api_name="segment", concurrency_id="segment", concurrency_limit=self.manager.concurrency or 1)
        for control in (opacity, names, shown):
            control.input(self.redraw, [result, opacity, names, shown], overlay, api_visibility="private")

    def segment(self, image: str | None, labels: str, family: str, checkpoint: str, threshold: float, opacity: float,
                names: bool, progress: gr.Progress = gr.Progress(track_tqdm=True)):
        """Segment the image into the labels: the overlay, the label toggles, the areas and the result."""
        if not image:
            raise gr.Error("Upload an image first.")
        try:
            self.manager.get(family, checkpoint, lambda done, message: progress(done, desc=message))
            seg = self.run(family, checkpoint, image, labels, threshold)
        except VLMError as exc:
            raise gr.Error(error_text(exc)) from None
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

    def _run(self, family: str, checkpoint: str, image: str, labels: str, threshold: float) -> Any:
        return self.manager.segment(family, checkpoint, image, labels, threshold=threshold)
