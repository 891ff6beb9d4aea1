"""One user's chat: the turns as the model sees them, and their rendering as Chatbot messages.

No Gradio import: messages are the plain dicts `gr.Chatbot` takes.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..boxes import FrameRule, parse_boxes, relative_frame, strip_markup
from ..errors import InputError, error_text
from ..media import load_image
from ..session import Snapshot, Stats, text_chars
from .uploads import media_kind

Message = dict[str, Any]


@dataclass
class Turn:
    user: Message  # the user message as the model sees it (media parts with local paths)
    shown_at: int  # index in the chatbot's messages where this turn's answer starts
    answer: str | None = None  # None until answered; a failed turn stays None and is left out


class ChatState:
    """Per-user state kept in the Gradio session: gr.State(ChatState()) deep-copies it into a fresh one."""

    def __init__(self) -> None:
        self.key = secrets.token_hex(8)  # the page keeps it: a page whose key differs lost its session
        self.turns: list[Turn] = []
        self.shown: list[Message] = []  # the chatbot's messages
        self.cancel = threading.Event()  # the answer being written stops when it is set (Stop / Clear)
        self.busy = False  # an answer is being written

    def __deepcopy__(self, memo: dict) -> "ChatState":
        return ChatState()

    @property
    def nbytes(self) -> int:
        """Estimated memory of the chat: its text as the model sees it and as shown, and a little per message."""
        text = sum(text_chars(t.user) + len(t.answer or "") for t in self.turns) + sum(map(text_chars, self.shown))
        return text + 256 * (len(self.turns) + len(self.shown))

    def conversation(self, system: str, question: Message | None = None) -> list[Message]:
        """System prompt, earlier answered turns, and the last user message (`question` after every turn,
        else the last turn's)."""
        messages = [{"role": "system", "content": system.strip()}] if system.strip() else []
        for turn in self.turns if question is not None else self.turns[:-1]:
            if turn.answer is not None:
                messages += [turn.user, {"role": "assistant", "content": turn.answer}]
        return messages + [question if question is not None else self.turns[-1].user]

    def images(self) -> list[str]:
        """Paths of every image in the chat, oldest first."""
        return [p["path"] for t in self.turns for p in t.user["content"] if p["type"] == "image"]

    def paths(self) -> list[str]:
        """Paths of every image and video in the chat."""
        return [p["path"] for t in self.turns for p in t.user["content"] if "path" in p]


def user_turn(text: str, files: list[str]) -> tuple[Message, list[Message]]:
    """The model's user message and the chatbot messages showing it (each file previewed)."""
    parts: list[dict[str, Any]] = [{"type": media_kind(f), "path": f} for f in files]
    if text.strip():
        parts.append({"type": "text", "text": text.strip()})
    if not parts:
        raise InputError("Type a question or add an image or a video.")
    shown = [{"role": "user", "content": {"path": f}} for f in files]
    if text.strip():
        shown.append({"role": "user", "content": text.strip()})
    return {"role": "user", "content": parts}, shown


def answer_messages(snap: Snapshot, attachments: tuple[Any, ...] = ()) -> list[Message]:
    """Chatbot messages of an answer in progress: a collapsible "Thinking" block, the answer with its
    stats once done, then `attachments` (e.g. the image with the answer's boxes) and any error."""
    out: list[Message] = []
    if snap.thinking:
        thinking_done = bool(snap.answer) or snap.done
        out.append({"role": "assistant", "content": strip_markup(snap.thinking),
                    "metadata": {"title": "Thinking", "status": "done" if thinking_done else "pending"}})
    text = strip_markup(snap.answer)
    if not snap.done:
        if text or not snap.thinking:
            out.append({"role": "assistant", "content": text or f"*{snap.status}*"})
        return out
    footer = stats_line(snap.stats, snap.finish)
    if snap.error is None or text:
        out.append({"role": "assistant", "content": f"{text or '*(no text)*'}\n\n<sub>{footer}</sub>"})
    out += [{"role": "assistant", "content": item} for item in attachments]
    if snap.error is not None:
        out.append({"role": "assistant", "content": f"⚠️ **Error:** {error_text(snap.error)}"})
    return out


def stats_line(stats: Stats | None, finish: str | None) -> str:
    """E.g. "0.21 s to first token · 31.5 tokens/s · 300 prompt tokens · 256 visual tokens · stopped"."""
    parts = []
    if stats is not None:
        if stats.seconds_to_first_token is not None:
            parts.append(f"{stats.seconds_to_first_token:.2f} s to first token")
        if stats.tokens_per_second is not None:
            parts.append(f"{stats.tokens_per_second:.1f} tokens/s")
        if stats.prompt_tokens is not None:
            parts.append(f"{stats.prompt_tokens} prompt tokens")
        if stats.visual_tokens is not None:
            parts.append(f"{stats.visual_tokens} visual tokens")
        if stats.dropped_turns:
            parts.append(f"{stats.dropped_turns} oldest exchange(s) left out to fit the context")
        parts += [f"⚠️ {note}" for note in stats.notes]
    parts += {"cancelled": ["stopped"], "timeout": ["time limit reached"], "length": ["token limit reached"]}.get(
        finish or "", [])
    return " · ".join(parts)


def draw_boxes(answer: str, image_path: str, frame: FrameRule = relative_frame) -> Image.Image | None:
    """The image with the answer's boxes and points (and their labels) drawn; None when the answer has none.

    `frame` gives what the answer's numbers are measured in for an image of this size (a pipeline's
    `box_frame`: a 0..1000 grid, or Qwen2.5-VL's pixels of the resized image).
    """
    image = load_image(image_path)
    boxes = parse_boxes(answer, frame(*image.size))
    if not boxes:
        return None
    draw = ImageDraw.Draw(image)
    width = max(2, round(min(image.size) / 150))
    font = ImageFont.load_default(size=max(12, round(min(image.size) / 30)))
    for i, box in enumerate(boxes):
        color = PALETTE[i % len(PALETTE)]
        left, top, right, bottom = box.pixels(*image.size)
        if box.is_point:
            radius = 2 * width
            draw.ellipse([left - radius, top - radius, left + radius, top + radius], fill=color, outline="white")
            left, top = left + radius, top + radius
        else:
            draw.rectangle([left, top, right, bottom], outline=color, width=width)
        if box.label:
            x0, y0, x1, y1 = draw.textbbox((left, top), box.label, font=font)
            draw.rectangle([x0 - 2, y0 - 2, x1 + 2, y1 + 2], fill=color)
            draw.text((left, top), box.label, fill="white", font=font)
    return image


PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7", "#F0E442"]
