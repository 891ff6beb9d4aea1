"""Chat messages as the model cards write them: validation, media extraction, template view."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import InputError

ROLES = ("system", "user", "assistant")
MEDIA_KEYS = {"image": ("image", "path", "url", "image_url"), "video": ("video", "path", "url")}


@dataclass
class Media:
    """One image or video of a conversation, in order of appearance."""

    kind: str  # "image" | "video"
    source: Any  # PIL image, path, or bytes
    options: dict[str, Any] = field(default_factory=dict)  # per-item settings, e.g. {"fps": 1.0}


def is_batch(conversations: Any) -> bool:
    """A list of conversations (each a list of messages) rather than one conversation."""
    return isinstance(conversations, (list, tuple)) and bool(conversations) and isinstance(conversations[0], (list, tuple))


def normalize(conversation: Any) -> list[dict[str, Any]]:
    """Validate a conversation; plain-string content stays a string, parts get an explicit type."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise InputError("A conversation is a non-empty list of {'role': ..., 'content': ...} messages.")
    out = []
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise InputError(f"Message {i} is not a dict with a 'role'.")
        role = message["role"]
        if role not in ROLES:
            raise InputError(f"Message {i} has role {role!r}; use one of {', '.join(ROLES)}.")
        content = message.get("content")
        if content is None:
            content = ""
        if isinstance(content, str):
            content = _clean_text(content)
        else:
            if not isinstance(content, (list, tuple)):
                raise InputError(f"Message {i}: content must be a string or a list of parts.")
            content = [_normalize_part(part, i) for part in content]
        out.append({**message, "content": content})
    if not any(_has_input(m) for m in out if m["role"] == "user"):
        raise InputError("The conversation has no user text, image or video.")
    return out


def _normalize_part(part: Any, index: int) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise InputError(f"Message {index}: each content part must be a dict, not {type(part).__name__}.")
    kind = part.get("type") or next((k for k in ("text", "image", "video") if k in part), None)
    if kind == "image_url":
        kind = "image"
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"Message {index}: a text part needs a string 'text'.")
        return {**part, "type": "text", "text": _clean_text(text)}
    if kind in MEDIA_KEYS:
        source = next((part[k] for k in MEDIA_KEYS[kind] if part.get(k) is not None), None)
        if isinstance(source, dict):  # {"image_url": {"url": ...}}
            source = source.get("url")
        if source is None:
            raise InputError(f"Message {index}: an {kind} part needs one of {', '.join(MEDIA_KEYS[kind])}.")
        if isinstance(source, str) and source.split(":", 1)[0].lower() in ("http", "https", "ftp", "data"):
            raise InputError(f"Message {index}: URLs are not fetched; download the {kind} and pass its path.")
        return {**part, "type": kind, kind: source}
    raise InputError(f"Message {index}: unknown content part type {part.get('type')!r} (use text, image or video).")


def _clean_text(text: str) -> str:
    """Replace lone surrogates (invalid UTF-8) so the tokenizer never sees them."""
    return text.encode("utf-8", "replace").decode("utf-8") if any("\ud800" <= c <= "\udfff" for c in text) else text


def drop_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest exchange (the first user message and what follows it up to
    the next user message); system messages stay. None when only one user message is left."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if len(users) < 2:
        return None
    first, second = users[0], users[1]
    return messages[:first] + [m for m in messages[first:second] if m.get("role") == "system"] + messages[second:]


def _has_input(message: dict[str, Any]) -> bool:
    content = message["content"]
    if isinstance(content, str):
        return bool(content.strip())
    return any(p["type"] != "text" or p["text"].strip() for p in content)


def media_items(messages: list[dict[str, Any]]) -> list[Media]:
    """Every image and video in order of appearance."""
    items = []
    for message in messages:
        if isinstance(message["content"], str):
            continue
        for part in message["content"]:
            if part["type"] in MEDIA_KEYS:
                options = {k: v for k, v in part.items() if k not in ("type", *MEDIA_KEYS[part["type"]])}
                items.append(Media(part["type"], part[part["type"]], options))
    return items


def template_view(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the chat template sees them: media parts reduced to {"type": kind}."""
    out = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": p["type"]} if p["type"] in MEDIA_KEYS else p for p in content]
        out.append({"role": message["role"], "content": content})
    return out


def as_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """String content as one text part, for templates that render only typed parts."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def left_pad(rows: list[list[int]], pad_id: int):
    """Left-pad token rows into (ids, attention_mask) LongTensors."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask

