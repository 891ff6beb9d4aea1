"""ChatPipeline: one loaded chat model with its tokenizer and processor; generate, stream, chat, all
answered by the model's engine."""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from . import cancellation, progress
from .boxes import Box, FrameRule, parse_boxes, relative_frame
from .checkpoint import read_config
from .conversation import is_batch, normalize
from .engine import Engine, Handle, Request
from .errors import (Cancelled, CheckpointError, ContextLengthError, GenerationError, InputError, OutOfMemoryError,
                     VLMError)
from .generation import GenerationOutput, LogitsProcessor, Sampling
from .media import retrying_damaged_videos
from .model import ChatModel
from .reasoning import (ANSWER, Delta, ReasoningParser, Report, ThinkingBudget, ThinkingFormat, opens_thinking,
                        split_reasoning)
from .tokenizer import IncrementalDetokenizer, Tokenizer

MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")
REASONING_OPTIONS = ("thinking_budget", "enable_thinking")


class ChatPipeline:
    """A vision-language chat model ready to answer conversations (see DESIGN.md for the API).

    Thinking families pass `thinking` (their reasoning tags): outputs then carry the reasoning
    apart from the answer, stream deltas are `reasoning.Delta`s with a `kind`, earlier turns'
    reasoning is dropped from the prompt, and `thinking_budget` / `enable_thinking` are accepted.
    `markup` names special tokens kept in the decoded text (e.g. box tokens a UI draws); `stop_tokens` end
    an answer besides the checkpoint's end-of-sequence ids, and `banned_tokens` are never generated;
    `box_frame` gives what the family's box numbers are measured in for an image of a given size (see
    `vlm.boxes`).
    """

    def __init__(self, family: str, model: ChatModel, tokenizer: Tokenizer,
                 build_inputs: Callable[..., dict[str, Any]], generation_config: dict[str, Any],
                 device: torch.device, directory: Path, max_context: int,
                 thinking: ThinkingFormat | None = None, markup: Sequence[str] = (),
                 stop_tokens: Sequence[str] = (), banned_tokens: Sequence[str] = (),
                 box_frame: FrameRule = relative_frame):
        self.family = family
        self.box_frame = box_frame
        self.thinking = thinking
        self.markup = tuple(markup)
        self.decoder = _MarkupDecoder(tokenizer, (*(thinking.tags if thinking else ()), *markup))
        self.model = model
        self.tokenizer = tokenizer
        self.build_inputs = build_inputs
        self.device = device
        self.directory = directory
        self.max_context = max_context
        self.defaults = Sampling.from_generation_config(generation_config)
        self.stop_ids = stop_ids(generation_config, tokenizer) | _token_ids(tokenizer, stop_tokens)
        self.banned = BanTokens(sorted(_token_ids(tokenizer, banned_tokens))) if banned_tokens else None
        self.engine_options: dict[str, Any] = {}  # Engine settings, read when the first request starts it
        self._engine: Engine | None = None
        self._engine_lock = threading.Lock()

    @property
    def engine(self) -> Engine:
        """The engine that answers every request to this model (started on first use)."""
        with self._engine_lock:
            if self._engine is None:
                self._engine = Engine(self.model, **self.engine_options)
            return self._engine

    @property
    def thinks(self) -> bool:
        """Whether this checkpoint reasons before it answers: its template opens the reasoning (GLM-Z1) or
        its vocabulary has the open tag as a token of its own (GLM-4.1V-Thinking); GLM-4-0414 does not."""
        if self.thinking is None:
            return False
        template = self.tokenizer.template
        return self.thinking.open in self.tokenizer.added_strings or (
            template is not None and self.thinking.open in template.source)

    def encode(self, conversation: Any, enable_thinking: bool | None = None, **media_options: Any) -> dict[str, Any]:
        """Model inputs for one conversation or a batch: input_ids, attention_mask, vision tensors, positions."""
        unknown = set(media_options) - set(MEDIA_OPTIONS)
        if unknown:
            raise InputError(f"Unknown options: {', '.join(sorted(unknown))}")
        conversations = [normalize(c) for c in (conversation if is_batch(conversation) else [conversation])]
        if self.thinking is not None:
            conversations = [[self._without_reasoning(m) for m in c] for c in conversations]
        if enable_thinking is not None:
            template = self.tokenizer.template
            if template is None or "enable_thinking" not in template.source:
                raise InputError(f"This {self.family} checkpoint has no switch to turn thinking on or off; "
                                 "pass thinking_budget=0 to make it answer right away.")
            media_options["template_vars"] = {"enable_thinking": bool(enable_thinking)}
        return retrying_damaged_videos(lambda: self.build_inputs(conversations, **media_options))

    def generate(self, conversations: Any, cancel: threading.Event | None = None, deadline: float | None = None,
                 **options: Any) -> list[GenerationOutput]:
        """Answer one conversation or a list of them (all at once, in the engine); one GenerationOutput each.

        `deadline` (time.monotonic()) ends the answers still running then with finish_reason "timeout".
        """
        sampling, media, reasoning = self._split(options)
        batch = conversations if is_batch(conversations) else [conversations]
        try:
            with cancellation.scope(cancel):
                prepared = [self._request(c, sampling, media, reasoning, cancel, deadline) for c in batch]
        except Cancelled:  # while reading the media
            return [GenerationOutput("", [], "cancelled") for _ in batch]
        handles: list[Handle] = []
        try:
            for request, _ in prepared:
                handles.append(self.engine.submit(request))
            tokens = [list(_tokens(handle)) for handle in handles]
        finally:
            for handle in handles:
                handle.cancel()  # only matters when another one failed
        return [self._output(ids, handle.finish_reason, opened)
                for ids, handle, (_, opened) in zip(tokens, handles, prepared)]

    def stream(self, conversation: Any, cancel: threading.Event | None = None, deadline: float | None = None,
               on_queue: Callable[[int], None] | None = None, **options: Any) -> Iterator[Delta]:
        """Yield text deltas as the engine generates them.

        Each delta is a `str` with a `kind`: "answer", or "thinking" for a thinking model's reasoning, and
        `tokens`, the tokens generated so far. The first token always sends a delta, empty when its text is
        not complete yet (part of a character, or a tag), so its arrival can be timed. The last delta is
        empty and reports the request (`Delta.report`): why it finished ("stop" at an end-of-sequence
        token, "length" at the token budget, None when cancelled or out of time), the prompt's tokens and
        its image and video tokens; a request cancelled while its media are read yields nothing. Setting
        `cancel` (or closing the iterator) stops the generation within one step; `on_queue(place)` hears
        the request's place in the engine's queue while it waits (0 once it runs).
        """
        sampling, media, reasoning = self._split(options)
        if is_batch(conversation):
            raise InputError("stream() takes one conversation; use generate() for a batch.")
        try:
            with cancellation.scope(cancel):
                request, opened = self._request(conversation, sampling, media, reasoning, cancel, deadline, on_queue)
        except Cancelled:  # while reading the media: nothing to say
            return
        handle = self.engine.submit(request)
        detok = IncrementalDetokenizer(self.decoder)
        parser = ReasoningParser(self.thinking, opened) if self.thinking else None
        split = parser.feed if parser else (lambda text: [Delta(text, ANSWER)] if text else [])
        count = 0

        def counted(deltas: list[Delta]) -> list[Delta]:
            for delta in deltas:
                delta.tokens = count
            return deltas

        try:
            for token in _tokens(handle):
                if token in self.stop_ids:
                    break
                count += 1
                deltas = split(detok.add(token))
                if count == 1 and not deltas:  # announce the first token: empty, in the section it opened
                    deltas = [Delta("", parser.kind if parser else ANSWER)]
                yield from counted(deltas)
        finally:
            handle.cancel()  # a closed stream leaves the batch within a step
        yield from counted(split(detok.flush()))
        if parser:
            yield from counted(parser.flush())
        finish = handle.finish_reason if handle.finish_reason in ("stop", "length") else None
        report = Report(finish, request.inputs["input_ids"].shape[1], handle.visual_tokens)
        yield from counted([Delta("", parser.kind if parser else ANSWER, report=report)])

    def boxes(self, text: str, image_size: tuple[int, int], **media_options: Any) -> list[Box]:
        """The boxes and points of an answer about an image of `image_size` (width, height), as fractions of
        it; `media_options` as the request's (`max_pixels` changes the frame of pixel coordinates)."""
        return parse_boxes(text, self.box_frame(*image_size, **media_options))

    @functools.cached_property
    def visual_ids(self) -> set[int]:
        """The ids of the image and video placeholder tokens (config.json)."""
        config = read_config(self.directory)
        keys = ("image_token_id", "video_token_id", "image_token_index", "video_token_index")
        return {config[k] for k in keys if isinstance(config.get(k), int)}

    def clear_caches(self) -> None:
        """Forget reusable KV caches and vision features (memory pressure, or to time a cold request)."""
        self.model.features.clear()
        if self._engine is not None:
            self._engine.clear()

    def chat(self, conversation: Any, **options: Any) -> str:
        """The whole answer to one conversation as a string."""
        return self.generate(conversation, **options)[0].text

    # ------------------------------------------------------------------------------------------

    def _split(self, options: dict[str, Any]) -> tuple[Sampling, dict[str, Any], dict[str, Any]]:
        media = {k: options.pop(k) for k in MEDIA_OPTIONS if k in options}
        reasoning = {k: options.pop(k) for k in REASONING_OPTIONS if options.get(k) is not None}
        if reasoning.get("thinking_budget") is not None:
            budget = reasoning["thinking_budget"]
            if self.thinking is None:
                raise InputError(f"thinking_budget applies to thinking models; {self.family} does not think.")
            if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
                raise InputError(f"thinking_budget must be a non-negative integer, not {budget!r}")
        options = {k: v for k, v in options.items() if k not in REASONING_OPTIONS}
        return self.defaults.override(**options), {k: v for k, v in media.items() if v is not None}, reasoning

    def _request(self, conversation: Any, sampling: Sampling, media: dict[str, Any], reasoning: dict[str, Any],
                 cancel: threading.Event | None, deadline: float | None,
                 on_queue: Callable[[int], None] | None = None) -> tuple[Request, bool]:
        """The engine request for one conversation (encoded, on the device, its token budget cut to what the
        context holds), and whether its prompt opens the reasoning."""
        inputs = self.encode(conversation, enable_thinking=reasoning.get("enable_thinking"), **media)
        length = inputs["input_ids"].shape[1]
        if length + 1 > self.max_context:
            raise ContextLengthError(
                f"The prompt has {length} tokens; this model's context holds {self.max_context}. "
                "Shorten the conversation, use fewer or smaller images, or fewer video frames.")
        sampling = replace(sampling, max_new_tokens=min(sampling.max_new_tokens, self.max_context - length))
        inputs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        opened = self._opened(inputs["input_ids"][0])
        request = Request(inputs, sampling, frozenset(self.stop_ids), self._processors(reasoning, opened), cancel,
                          deadline, on_queue, progress.forwarder("prompt"))
        return request, opened

    def _output(self, ids: list[int], reason: str, thinking: bool) -> GenerationOutput:
        text = self.decoder.decode(ids[:-1] if reason == "stop" else ids)
        if self.thinking is None:
            return GenerationOutput(text, ids, reason)
        split = split_reasoning(text, self.thinking, thinking)
        return GenerationOutput(split.answer, ids, reason, split.reasoning)

    def _opened(self, ids: torch.Tensor) -> bool:
        """Does the prompt end inside an open think tag (a template that starts the reasoning)?"""
        return self.thinking is not None and opens_thinking(self.decoder.decode(ids[-16:].tolist()), self.thinking)

    def _processors(self, reasoning: dict[str, Any], opened: bool) -> list[LogitsProcessor]:
        processors: list[LogitsProcessor] = [self.banned] if self.banned else []
        budget = reasoning.get("thinking_budget")
        if budget is None:
            return processors
        forced = self.tokenizer.encode(self.thinking.force_answer)
        return processors + [ThinkingBudget(budget, self.thinking, forced, lambda: IncrementalDetokenizer(self.decoder),
                                            [opened])]

    def _without_reasoning(self, message: dict[str, Any]) -> dict[str, Any]:
        """An earlier assistant turn as the official GLM demo sends it back: answer only, tags removed."""
        if message["role"] != "assistant":
            return message

        def clean(text: str) -> str:
            text = split_reasoning(text, self.thinking).answer
            for token in self.markup:
                text = text.replace(token, "")
            return text

        content = message["content"]
        if isinstance(content, str):
            return {**message, "content": clean(content)}
        return {**message, "content": [{**p, "text": clean(p["text"])} if p["type"] == "text" else p for p in content]}


def _tokens(handle: Handle) -> Iterator[int]:
    """The handle's tokens; a failure in the model becomes a vlm error (vlm errors stay as they are)."""
    try:
        yield from handle
    except VLMError:
        raise
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise OutOfMemoryError("Out of memory while answering: use fewer or smaller images, fewer video frames, "
                               "fewer new tokens or a shorter conversation.") from exc
    except Exception as exc:
        raise GenerationError(f"Generation failed: {type(exc).__name__}: {exc}") from exc


class _MarkupDecoder:
    """Decodes like the tokenizer (special tokens skipped) except for the `keep` tokens, which stay in the text."""

    def __init__(self, tokenizer: Tokenizer, keep: Sequence[str]):
        kept = {tokenizer.token_id(t) for t in keep} - {None}
        self.tokenizer, self.dropped = tokenizer, tokenizer.special_ids - kept
        self.byte_ids, self.skipped_ids = tokenizer.byte_ids, self.dropped
        self.keep_any = bool(kept & tokenizer.special_ids)

    def decode(self, ids: list[int]) -> str:
        if not self.keep_any:
            return self.tokenizer.decode(ids)
        return self.tokenizer.decode([i for i in ids if i not in self.dropped], skip_special_tokens=False)


class BanTokens:
    """Logits processor: the given ids are never sampled (transformers' single-token `bad_words_ids`)."""

    def __init__(self, ids: Sequence[int]):
        self.ids = torch.tensor(list(ids), dtype=torch.long)  # a list index would be rebuilt at every step

    def __call__(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return logits.index_fill(-1, self.ids.to(logits.device), float("-inf"))


def _token_ids(tokenizer: Tokenizer, tokens: Sequence[str]) -> set[int]:
    """Ids of named special tokens; each must exist."""
    ids = {token: tokenizer.token_id(token) for token in tokens}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise CheckpointError(f"The tokenizer lacks the tokens {', '.join(missing)}.")
    return set(ids.values())


def stop_ids(generation_config: dict[str, Any], tokenizer: Tokenizer) -> set[int]:
    """End-of-sequence ids from generation_config.json and the tokenizer's eos token."""
    eos = generation_config.get("eos_token_id")
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    token = tokenizer.token_id(tokenizer.special_token_strings().get("eos_token"))
    if token is not None:
        ids.add(token)
    if not ids:
        raise InputError("The checkpoint names no end-of-sequence token (generation_config.json / tokenizer).")
    return ids


def pad_id(generation_config: dict[str, Any], tokenizer: Tokenizer) -> int:
    """The padding id: generation_config.json's, else the tokenizer's pad token, else an eos id."""
    pad = generation_config.get("pad_token_id")
    if pad is None:
        pad = tokenizer.token_id(tokenizer.special_token_strings().get("pad_token"))
    return pad if pad is not None else min(stop_ids(generation_config, tokenizer))
