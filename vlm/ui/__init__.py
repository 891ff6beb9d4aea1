"""The Gradio demo: a chat tab and a segmentation tab sharing one SessionManager, and the OpenAI-compatible
API (vlm.api) over the same manager.

`build(settings)` returns the Blocks (queue configured, its API as `demo.openai_api`); `launch(demo,
settings)` serves both on one port, with the security defaults (uploads only, `max_file_size`, no
`allowed_paths`, no flagging, a bounded number of sessions kept: every Gradio API call is a session of
its own and Gradio keeps ~50 KB for each).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from .. import media
from ..api import OpenAIApi
from ..api_request import ServedModel
from ..families import FAMILIES
from ..remote import RemotePipeline
from ..session import SessionManager
from . import zerogpu
from .chat import ChatTab
from .checkpoints import Catalog, is_remote
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
    served = catalog.families
    segmentation = [name for name in served if is_segmentation(name)]
    chat = [name for name in served if name not in segmentation]
    for name in settings.remote:
        if name not in chat:
            raise ValueError(f"VLM_REMOTE_{name.upper()} is set, but {name} is not a chat family this demo serves.")
    manager = SessionManager(settings.memory_budget_bytes, settings.limits, settings.concurrency, settings.device,
                             settings.dtype, resolve=catalog.resolve,
                             remote={name: partial(RemotePipeline.connect, name, server)
                                     for name, server in settings.remote.items()},
                             remote_concurrency=settings.remote_concurrency)
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
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    demo.openai_api = OpenAIApi(manager, api_models(catalog, chat), settings.api, settings.request_bounds(),
                                max_requests=settings.queue_size)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **options: Any) -> None:
    """Serve on GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860), with the OpenAI-compatible
    routes on the same FastAPI app (not on ZeroGPU, whose GPU leases belong to Gradio's queue); `options` go
    to `Blocks.launch` (tests pass prevent_thread_lock)."""
    routes = [] if zerogpu.active() else demo.openai_api.routes()
    demo.launch(max_file_size=settings.max_file_size, show_error=True, ssr_mode=False,
                footer_links=["api", "gradio"], state_session_capacity=settings.session_capacity,
                app_kwargs={"routes": routes}, **options)


def api_models(catalog: Catalog, families: list[str]) -> list[ServedModel]:
    """The API's models: each chat family by name, and its checkpoint by hub id or tiny name (a local
    directory or a remote server is not listed by its path)."""
    models = [ServedModel(name, name, catalog.default(name)) for name in families]
    return models + [ServedModel(m.source, m.family, m.source) for m in models
                     if not is_remote(m.source) and not os.path.isabs(m.source) and not os.path.exists(m.source)]


def is_segmentation(family: str) -> bool:
    """A family whose pipeline segments (its package exports a Segmentation result) rather than chats."""
    return "Segmentation" in getattr(FAMILIES[family].module, "__all__", ())
