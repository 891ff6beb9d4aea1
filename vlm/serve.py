"""`python -m vlm serve MODEL [MODEL...]`: the OpenAI-compatible API alone, without the web page.

Each MODEL (a hub id or a local checkpoint directory) is found and loaded at start, and served under its
name (a directory: its folder name) and its family's name. Caps, limits, memory budget, device, dtype and
the API settings come from the same VLM_* environment variables as the demo (vlm/ui/settings.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .api import OpenAIApi
from .api_request import ServedModel
from .errors import InputError


def serve(models: Sequence[str], host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          dtype: str | None = None) -> None:
    """Load `models` and serve them on http://host:port/v1 until interrupted."""
    import uvicorn
    from fastapi import FastAPI

    from .checkpoint import read_config
    from .families import detect_family
    from .hub import resolve
    from .session import SessionManager
    from .ui import is_segmentation
    from .ui.settings import Settings

    settings = Settings.from_env()
    directories = {source: resolve(source) for source in models}
    served: list[ServedModel] = []
    for source, directory in directories.items():
        family = detect_family(read_config(directory)).name
        if is_segmentation(family):
            raise InputError(f"{source} is a {family} segmentation model; the API serves chat models.")
        if family in {m.family for m in served}:
            raise InputError(f"Two checkpoints of {family} were given; serve one checkpoint per family.")
        name = Path(source).name if os.path.isdir(source) else source
        served.append(ServedModel(name, family, source))
        if name != family:
            served.append(ServedModel(family, family, source))
    manager = SessionManager(settings.memory_budget_bytes, settings.limits, settings.concurrency,
                             device or settings.device, dtype or settings.dtype, resolve=directories.__getitem__)
    for family, source in {m.family: m.source for m in served}.items():
        print(f"loading {source} ({family})…", flush=True)
        manager.get(family, source)
    api = OpenAIApi(manager, served, settings.api, settings.request_bounds(), max_requests=settings.queue_size)
    names = ", ".join(m.id for m in served)
    print(f"serving {names} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(FastAPI(routes=api.routes(), docs_url=None, redoc_url=None, openapi_url=None), host=host, port=port,
                log_level="warning", timeout_keep_alive=5, timeout_graceful_shutdown=5)
