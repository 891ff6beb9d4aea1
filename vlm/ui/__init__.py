"""The Gradio demo: a chat tab and a segmentation tab sharing one SessionManager, and the OpenAI-compatible
API (vlm.api) over the same manager.

`build(settings)` returns the Blocks (queue configured, every request checked by the Gate, its API as
`demo.openai_api`); `launch(demo, settings)` serves both on one port with the security defaults: uploads
only (images and videos, bounded per file, per session and on disk), no `allowed_paths`, no flagging,
Gradio's own error messages hidden, bounded sessions (vlm/ui/sessions.py) and a hardened HTTP server
(vlm/ui/server.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

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
from .server import BodyLimit, hardened
from .sessions import Sessions
from .settings import Settings
from .uploads import HiddenDirectory, UploadRoute, Uploads
from .validation import Gate

__all__ = ["Settings", "build", "launch"]


@dataclass(frozen=True)
class Defences:
    """What guards a built demo (kept on it as `demo.defences`)."""

    gate: Gate
    uploads: Uploads
    sessions: Sessions

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
            manager.get(name, catalog.default_source(name))
    gate, uploads = Gate(), Uploads(settings.uploads)
    sessions = Sessions(settings.sessions, on_end=uploads.release)
    examples = []
    with gr.Blocks(title="VLM demo", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO.format(families=", ".join(served)))
        banner = catalog.banner()
        gr.Markdown(banner, visible=bool(banner), elem_id="banner")
        with gr.Tabs():
            if chat:
                with gr.Tab("Chat", id="chat"):
                    examples.append(ChatTab(manager, catalog, chat, gate, uploads).build(demo))
            if segmentation:
                with gr.Tab("Segmentation", id="segmentation"):
                    examples.append(SegmentTab(manager, catalog, segmentation, gate, uploads).build())

        def end_session(request: gr.Request) -> None:  # the tab was closed
            sessions.end(request.session_hash)

        demo.unload(end_session)
    demo.queue(max_size=settings.queue_size, default_concurrency_limit=settings.concurrency)
    uploads.share(path for example in examples for path in example_files(example))
    gate.install(demo)
    demo.defences = Defences(gate, uploads, sessions)
    demo.openai_api = OpenAIApi(manager, api_models(catalog, chat), settings.api, settings.request_bounds(),
                                max_requests=settings.queue_size)
    return demo


def launch(demo: gr.Blocks, settings: Settings, **options: Any) -> None:
    """Serve on GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (default 127.0.0.1:7860), with the OpenAI-compatible
    routes on the same FastAPI app (not on ZeroGPU, whose GPU leases belong to Gradio's queue); `options` go
    to `Blocks.launch` (tests pass prevent_thread_lock)."""
    defences: Defences = demo.defences
    routes = [] if zerogpu.active() else demo.openai_api.routes()
    block = not options.pop("prevent_thread_lock", False)
    middleware = [Middleware(HiddenDirectory, directory=defences.uploads.directory),
                  Middleware(BodyLimit, limit=settings.server.request_bytes),
                  Middleware(UploadRoute, uploads=defences.uploads)]
    with hardened(settings.server):
        demo.launch(max_file_size=settings.uploads.file_bytes, show_error=False, ssr_mode=False,
                    footer_links=["api", "gradio"], app_kwargs={"middleware": middleware, "routes": routes},
                    prevent_thread_lock=True, **options)
    defences.sessions.install(demo.state_holder)
    defences.gate.sessions = defences.sessions
    if block:
        demo.block_thread()


def example_files(examples: gr.Examples) -> list[str]:
    """Paths of the files the page's examples show (Gradio copied them into its cache)."""
    found: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            if isinstance(value.get("path"), str):
                found.append(value["path"])
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    collect([sample for _, sample in examples.non_none_processed_examples.items()])
    return found


def api_models(catalog: Catalog, families: list[str]) -> list[ServedModel]:
    """The API's models: each chat family by name, and its checkpoint by hub id or tiny name (a local
    directory or a remote server is not listed by its path)."""
    models = [ServedModel(name, name, catalog.default_source(name)) for name in families]
    return models + [ServedModel(m.source, m.family, m.source) for m in models
                     if not is_remote(m.source) and not os.path.isabs(m.source) and not os.path.exists(m.source)]


def is_segmentation(family: str) -> bool:
    """A family whose pipeline segments (its package exports a Segmentation result) rather than chats."""
    return "Segmentation" in getattr(FAMILIES[family].module, "__all__", ())
