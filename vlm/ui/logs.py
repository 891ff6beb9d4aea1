"""What the demo writes to its log: a refused request is one line, a real fault a traceback."""

from __future__ import annotations

import logging

import gradio as gr

from ..errors import VLMError

log = logging.getLogger("vlm.ui")


def refusal(message: str) -> gr.Error:
    """The error to raise for a request that was refused: shown to its user, one line in the log."""
    log.info("refused: %s", one_line(message))
    return gr.Error(message, print_exception=False)


def record(exc: BaseException) -> None:
    """Log an answer's failure: a vlm error (bad input, a file that cannot be read) in one line, anything
    else with its traceback."""
    if isinstance(exc, VLMError):
        log.info("failed: %s: %s", type(exc).__name__, one_line(str(exc)))
    else:
        log.error("failed: %s: %s", type(exc).__name__, one_line(str(exc)), exc_info=exc)


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line (a request cannot add lines to the log) and at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
