"""Tokenizer (a `tokenizers` wrapper), chat template rendering and incremental detokenisation."""

from __future__ import annotations

import atexit
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import read_json, read_text
from .childio import read_exact
from .errors import CheckpointError, InputError

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class Tokenizer:
    """Text <-> ids for one checkpoint, with its special tokens and chat template."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.config = _tokenizer_config(directory)
        self._tok = _load_backend(directory)
        # A twin that treats special-token text as plain text, for what users type.
        self._plain = HFTokenizer.from_str(self._tok.to_str())
        self._plain.encode_special_tokens = True
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.special_strings = sorted((added[i].content for i in self.special_ids), key=len, reverse=True)
        self.template = ChatTemplate.find(directory, self.config, self.special_token_strings())

    def special_token_strings(self) -> dict[str, str]:
        """bos/eos/pad/unk token strings from tokenizer_config.json, as templates expect them."""
        out = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = self.config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value:
                out[key] = value
        return out

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Encode text in which special-token strings are special tokens (template output)."""
        with _rust_panics("encoding"):
            return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode text typed by a user: special-token strings stay plain text."""
        with _rust_panics("encoding"):
            return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        with _rust_panics("decoding"):
            return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_chat(self, messages: list[dict], **template_vars: Any) -> list[int]:
        """Render the chat template and encode it; user text can never produce special tokens.

        When no user text contains a special-token string this is exactly render + encode (the
        reference's behaviour); otherwise user text is encoded on its own as plain text.
        """
        texts = list(_user_texts(messages))
        if not any(s in t for t in texts for s in self.special_strings):
            return self.encode(self.template.render(messages, **template_vars))
        marked = _replace_user_texts(messages, iter(f"\ue000{i}\ue001" for i in range(len(texts))))
        rendered = self.template.render(marked, **template_vars)
        ids: list[int] = []
        pos = 0
        for match in _SENTINEL.finditer(rendered):
            ids += self.encode(rendered[pos:match.start()]) + self.encode_plain(texts[int(match.group(1))])
            pos = match.end()
        return ids + self.encode(rendered[pos:])


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


MAX_TOKENIZER_BYTES = 64 << 20  # tokenizer.json (real ones: 2-35 MB)
# Text a tokenizer must encode at load: runs of letters, spaces, digits, newlines and accents that a
# pre-tokenizer regex with nested repetition (a ReDoS pattern) fails on.
PROBE_TEXT = "a" * 256 + "!" + " " * 256 + "a" + "1" * 256 + "x" + "\n" * 64 + "é" * 128 + "?" + "ab " * 64 + "."


def _load_backend(directory: Path) -> HFTokenizer:
    """tokenizer.json, read (bounded in size) and tried on PROBE_TEXT."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no tokenizer.json.")
    text = read_text(path, MAX_TOKENIZER_BYTES)
    try:
        with _rust_panics(f"reading {path}"):
            backend = HFTokenizer.from_str(text)
    except CheckpointError:
        raise
    except Exception as exc:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(f"Cannot read {path}: {exc}") from exc
    with _rust_panics(f"trying {path} on plain text"):
        backend.encode(PROBE_TEXT, add_special_tokens=False)
    return backend


@contextmanager
def _rust_panics(what: str) -> Iterator[None]:
    """Turn a panic inside the tokenizers library (a pyo3 PanicException, which derives from
    BaseException: e.g. a pre-tokenizer regex over its backtracking limit) into a CheckpointError."""
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        raise CheckpointError(f"The tokenizer failed while {what} ({str(exc)[:200]}); its tokenizer.json is broken "
                              "or hostile.") from None


def _user_texts(messages: list[dict]):
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        else:
            for part in content or []:
                if part.get("type") == "text":
                    yield part["text"]


def _replace_user_texts(messages: list[dict], replacements) -> list[dict]:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            content = next(replacements)
        else:
            content = [{**p, "text": next(replacements)} if p.get("type") == "text" else p for p in content or []]
        out.append({**message, "content": content})
    return out


# ---------------------------------------------------------------------------------------------- template
SAFE_RENDER = Path(__file__).with_name("safe_render.py")
TEMPLATE_SECONDS = 5.0  # one render (real templates take milliseconds)
TEMPLATE_START_SECONDS = 30.0  # starting the child and compiling a template
TEMPLATE_MEMORY = 512 << 20  # the child's memory beyond what it maps at start
# A render may write this many times the characters of its input, plus this many: a template only lays
# out the conversation, so more is a broken or hostile one.
TEMPLATE_OUTPUT_FACTOR, TEMPLATE_OUTPUT_EXTRA = 4, 1 << 20
_MAX_TEMPLATE_BYTES = 1 << 20


class ChatTemplate:
    """A checkpoint's Jinja chat template, rendered in Jinja's sandbox inside a child process (see
    vlm/safe_render.py) with a deadline, a memory cap and an output cap."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        if not isinstance(source, str) or len(source) > _MAX_TEMPLATE_BYTES:
            raise CheckpointError(f"The chat template must be a string of at most {_MAX_TEMPLATE_BYTES:,} characters.")
        self.source = source
        self.special_tokens = special_tokens or {}
        _renderer.call({"op": "compile", "source": source}, TEMPLATE_START_SECONDS)

    @classmethod
    def find(cls, directory: Path, tokenizer_config: dict[str, Any], special_tokens: dict[str, str]) -> "ChatTemplate | None":
        """The template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
        jinja_file, json_file = directory / "chat_template.jinja", directory / "chat_template.json"
        if jinja_file.is_file():
            source = read_text(jinja_file, _MAX_TEMPLATE_BYTES)
        elif json_file.is_file():
            source = read_json(json_file).get("chat_template")
        else:
            source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        return cls(source, special_tokens) if source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        values = {"messages": messages, "add_generation_prompt": add_generation_prompt, **self.special_tokens,
                  **variables}
        size = len(json.dumps(values, default=str))
        request = {"op": "render", "source": self.source, "variables": values,
                   "max_chars": TEMPLATE_OUTPUT_FACTOR * size + TEMPLATE_OUTPUT_EXTRA}
        return _renderer.call(request, TEMPLATE_SECONDS)["text"]


class _TemplateChild:
    """The process-wide template child (vlm/safe_render.py): started on first use, one request at a
    time, killed past a deadline or when it misbehaves and started again for the next request."""

    def __init__(self):
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The child's reply; its refusals and failures become vlm.errors exceptions."""
        with self._lock:
            if self._child is None or self._child.poll() is not None:
                self._child = subprocess.Popen([sys.executable, "-I", str(SAFE_RENDER), str(TEMPLATE_MEMORY)],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                               stderr=subprocess.DEVNULL, bufsize=0, env=_child_env())
                timeout = max(timeout, TEMPLATE_START_SECONDS)
            try:
                reply = self._exchange(request, time.monotonic() + timeout)
            except (TimeoutError, EOFError, OSError, ValueError) as exc:
                self.close()
                what = f"took longer than {timeout:g} s" if isinstance(exc, TimeoutError) else "crashed"
                raise CheckpointError(f"The chat template {what} (it may loop or need more memory than this server "
                                      "allows); the checkpoint's template is broken or hostile.") from None
        if reply.get("ok"):
            return reply
        error = InputError if reply.get("kind") == "input" else CheckpointError
        raise error(str(reply.get("message")))

    def _exchange(self, request: dict[str, Any], deadline: float) -> dict[str, Any]:
        data = json.dumps(request, default=str).encode()
        self._child.stdin.write(struct.pack("<Q", len(data)) + data)
        (size,) = struct.unpack("<Q", read_exact(self._child.stdout, 8, deadline))
        reply = json.loads(read_exact(self._child.stdout, size, deadline))
        if not isinstance(reply, dict):
            raise ValueError("not a reply")
        return reply

    def close(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child.stdin.close()
            self._child.stdout.close()
            self._child = None


def _child_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("PATH", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}


_renderer = _TemplateChild()
atexit.register(_renderer.close)


# ---------------------------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never end inside a UTF-8 character.

    Decodes a small window (from `prefix` to the end) and emits only what is new since `read`, and only
    once the window no longer ends in U+FFFD (an incomplete byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return window[len(before):]
