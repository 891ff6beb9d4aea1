"""Input components that take uploads only: a file given as a URL is refused, never downloaded (Gradio
would fetch it), and Gradio never decodes an uploaded image (vlm.media does, within its limits).

The components are Gradio's own with two methods replaced on the instance: subclassing a Gradio
component makes Gradio write a .pyi stub next to the module that defines it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import gradio as gr
from gradio_client.utils import is_http_url_like

Input = TypeVar("Input", bound=gr.components.Component)


def uploads_only(component: Input) -> Input:
    """`component` (an input) with its files checked before Gradio caches them: URLs are refused."""
    move, async_move = component.move_resource_to_block_cache, component.async_move_resource_to_block_cache

    async def async_move_local(path: Any) -> str | None:
        return await async_move(local_only(path))

    component.move_resource_to_block_cache = lambda path: move(local_only(path))  # type: ignore[method-assign]
    component.async_move_resource_to_block_cache = async_move_local  # type: ignore[method-assign]
    return component


def local_only(path: Any) -> Any:
    if isinstance(path, str) and is_http_url_like(path):
        raise gr.Error("URLs are not fetched: upload the file instead.")
    return path


def image_path(**options: Any) -> gr.Image:
    """An image input handed over as the uploaded file's path, never opened by Gradio (which would
    decode it with every Pillow format)."""
    image = uploads_only(gr.Image(type="filepath", **options))
    image.preprocess = lambda payload: payload.path if payload is not None and payload.path else None  # type: ignore[method-assign]
    return image
