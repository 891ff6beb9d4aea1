"""The Gradio demo: a chat tab and a segmentation tab sharing one SessionManager.

`build(settings)` returns the Blocks (queue configured); `launch(demo, settings)` serves it with the
security defaults (uploads only, `max_file_size`, no `allowed_paths`, no flagging, a bounded number of
sessions kept: every API call is a session of its own and Gradio keeps ~50 KB for each).
"""

from __future__ import annotations

from typing import Any

import gradio as gr
from PIL import Image

from .. import media
from ..families import FAMILIES
from ..session import SessionManager
from . import zerogpu
from .chat import ChatTab
from .checkpoints import Catalog
from .segment import SegmentTab
from .settings import Settings

__all__ = ["Settings", "build", "launch"]

INTRO = ("# Vision-language models in plain PyTorch\n"
         "Chat about images and videos, or segment an image into the words you give. Families: {families}.")


def build(settings: Settings) -> gr.Blocks:
    media.configure(settings.media)
    # Defence in depth: any image decoded outside vlm.media (by Gradio or a library) meets the same limit.
    Image.MAX_IMAGE_PIXELS = settings.media.max_image_pixels // 2
    catalog = Catalog.discover(settings)
    manager = SessionManager(settings.memory_budget_bytes, settings.limits, settings.concurrency, settings.device,
                             settings.dtype, resolve=catalog.resolve, kv_budget_bytes=settings.kv_budget_bytes)
    served = catalog.families
    segmentation = [name for name in served if is_segmentation(name)]
    chat = [name for name in served if name not in segmentation]
    if zerogpu.active():  # a GPU process cannot keep what it loads: load every default model up front
        for name in served:
            manager.get(name, catalog.default(name))
    with gr.Blocks(title="VLM demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO.format(families=", ".join(served)))
        banner = catalog.banner()
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Tabs():
            if chat:
                with gr.Tab("Chat", id="chat"):
                    ChatTab(manager, catalog, chat).build(demo)
            if segmentation:
                with gr.Tab("Segmentation", id="segmentation"):
                    SegmentTab(manager, catalog, segmentation).build()
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency or 1)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **options: Any) -> None:
    """Serve on GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860); `options` go to
    `Blocks.launch` (tests pass prevent_thread_lock)."""
    demo.launch(max_file_size=settings.max_file_size, show_error=True, ssr_mode=False,
                footer_links=["api", "gradio"], state_session_capacity=settings.session_capacity, **options)


def is_segmentation(family: str) -> bool:
    """A family whose pipeline segments (its package exports a Segmentation result) rather than chats."""
    return "Segmentation" in getattr(FAMILIES[family].module, "__all__", ())
