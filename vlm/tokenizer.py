"""Tokenizer (a `tokenizers` wrapper), chat template rendering and incremental detokenisation."""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from .checkpoint import read_json
from .errors import CheckpointError, InputError

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


class Tokenizer:
    """Text <-> ids for one checkpoint, with its special tokens and chat template."""

    def __init__(self, directory: Path):
        directory = Path(directory)
        self.config = _tokenizer_config(directory)
        self._tok = _load_backend(directory, self.config)
        # A twin that treats special-token text as plain text, for what users type.
        serialized = self._tok.to_str()
        self._plain = HFTokenizer.from_str(serialized)
        self._plain.encode_special_tokens = True
        self.byte_ids = _byte_fallback_ids(json.loads(serialized)["model"])
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.skipped_ids = self.special_ids  # what `decode` leaves out
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
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_plain(self, text: str) -> list[int]:
        """Encode text typed by a user: special-token strings stay plain text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
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


def _byte_fallback_ids(model: dict[str, Any]) -> frozenset[int]:
    """Ids of the <0xNN> tokens of a byte-fallback BPE (Llama), which decode only as a whole run."""
    if not model.get("byte_fallback"):
        return frozenset()
    vocab = model.get("vocab") or {}
    return frozenset(i for token, i in vocab.items() if _BYTE_TOKEN.fullmatch(token))


_BYTE_TOKEN = re.compile("<0x[0-9A-F]{2}>")


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return read_json(path) if path.is_file() else {}


def _load_backend(directory: Path, config: dict[str, Any]) -> HFTokenizer:
    path = directory / "tokenizer.json"
    try:
        if path.is_file() and config.get("tokenizer_class") in LLAMA_CLASSES:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("model", {}).get("type") == "BPE":
                return HFTokenizer.from_str(json.dumps(_as_llama_builds_it(data, config)))
        if path.is_file():
            return HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception on malformed files
        raise CheckpointError(f"Cannot read {path}: {exc}") from exc
    raise CheckpointError(f"{directory} has no tokenizer.json.")


LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _as_llama_builds_it(data: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A Llama tokenizer.json with the pipeline transformers 5's LlamaTokenizer gives it, whatever the file
    says: its vocabulary and merges, byte fallback, no normaliser, a Metaspace pre-tokenizer that adds the
    prefix space at the start only (everywhere with `legacy`; never without `add_prefix_space`). Older hub
    files (a normaliser that prefixes every piece of text, e.g. after each special token) read otherwise."""
    prefix = config.get("add_prefix_space")
    prefix = True if prefix is None else bool(prefix)
    scheme = ("always" if config.get("legacy", False) else "first") if prefix else "never"
    decoders = [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}] if prefix else [])
    model = {**data["model"], "unk_token": None, "fuse_unk": True, "byte_fallback": True, "dropout": None,
             "ignore_merges": False, "continuing_subword_prefix": None, "end_of_word_suffix": None}
    return {**data, "model": model, "normalizer": None, "decoder": {"type": "Sequence", "decoders": decoders},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": scheme, "split": False}}


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


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox with the helpers hub templates use."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise CheckpointError(f"The chat template does not parse: {exc}") from exc
        self.source = source
        self.special_tokens = special_tokens or {}

    @classmethod
    def find(cls, directory: Path, tokenizer_config: dict[str, Any], special_tokens: dict[str, str]) -> "ChatTemplate | None":
        """The template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
        jinja_file, json_file = directory / "chat_template.jinja", directory / "chat_template.json"
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        elif json_file.is_file():
            source = read_json(json_file).get("chat_template")
        else:
            source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default") or next(iter(named.values()), None)
        return cls(source, special_tokens) if source else None

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens, **variables)
        except TemplateInputError as exc:
            raise InputError(f"The chat template rejected the conversation: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise InputError(f"The chat template failed on this conversation: {exc}") from exc


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks) renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class TemplateInputError(Exception):
    """raise_exception() called by a template."""


def _raise_exception(message: str):
    raise TemplateInputError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---------------------------------------------------------------------------------------------- streaming


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never end inside a UTF-8 character.

    Decodes a small window (from `prefix` to the end) and emits only what is new since `read`, and only
    once the window no longer ends in U+FFFD (an incomplete byte sequence). A byte-fallback tokenizer
    decodes a run of <0xNN> tokens as a whole (all of it U+FFFD when it is not valid UTF-8), so nothing is
    emitted while a run may still grow.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        if self._in_byte_run():
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return window[len(before):]

    def _in_byte_run(self) -> bool:
        """Whether the last token the decoding keeps (skipped special tokens do not part a run) is a byte."""
        for token in reversed(self.ids[self.read:]):
            if token not in self.tokenizer.skipped_ids:
                return token in self.tokenizer.byte_ids
        return False

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return window[len(before):]
