"""ChatPipeline: one loaded chat model with its tokenizer and processor; generate, stream, chat."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .conversation import is_batch, normalize
from .errors import ContextLengthError, InputError
from .generation import GenerationOutput, Sampling, generate_tokens, run_in_thread
from .tokenizer import IncrementalDetokenizer, Tokenizer

MEDIA_OPTIONS = ("min_pixels", "max_pixels", "fps", "num_frames")


class ChatPipeline:
    """A vision-language chat model ready to answer conversations (see DESIGN.md for the API)."""

    def __init__(self, family: str, model: torch.nn.Module, tokenizer: Tokenizer,
                 build_inputs: Callable[..., dict[str, Any]], generation_config: dict[str, Any],
                 device: torch.device, directory: Path, max_context: int):
        self.family = family
        self.model = model
        self.tokenizer = tokenizer
        self.build_inputs = build_inputs
        self.device = device
        self.directory = directory
        self.max_context = max_context
        self.defaults = Sampling.from_generation_config(generation_config)
        self.stop_ids = stop_ids(generation_config, tokenizer)
        self.pad_id = pad_id(generation_config, tokenizer)

    def encode(self, conversation: Any, **media_options: Any) -> dict[str, Any]:
        """Model inputs for one conversation or a batch: input_ids, attention_mask, vision tensors, positions."""
        unknown = set(media_options) - set(MEDIA_OPTIONS)
        if unknown:
            raise InputError(f"Unknown options: {', '.join(sorted(unknown))}")
        conversations = conversation if is_batch(conversation) else [conversation]
        return self.build_inputs([normalize(c) for c in conversations], **media_options)

    def generate(self, conversations: Any, cancel: threading.Event | None = None,
                 **options: Any) -> list[GenerationOutput]:
        """Answer one conversation or a batch (left-padded); one GenerationOutput per conversation."""
        sampling, media = self._split(options)
        inputs = self._prepare(conversations, sampling, media)
        batch = inputs["input_ids"].shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in generate_tokens(self.model, inputs, sampling, self.stop_ids, self.pad_id, cancel):
            for row, token in enumerate(step.tolist()):
                if not done[row]:
                    tokens[row].append(token)
                    done[row] = token in self.stop_ids
        cancelled = cancel is not None and cancel.is_set()
        return [self._output(ids, finished, cancelled) for ids, finished in zip(tokens, done)]

    def stream(self, conversation: Any, cancel: threading.Event | None = None, **options: Any) -> Iterator[str]:
        """Yield text deltas of the answer as they are generated (in a background thread).

        Setting `cancel` (or closing the iterator) stops the generation within one step.
        """
        sampling, media = self._split(options)
        if is_batch(conversation):
            raise InputError("stream() takes one conversation; use generate() for a batch.")
        inputs = self._prepare(conversation, sampling, media)
        cancel = cancel or threading.Event()

        def produce(stop_event: threading.Event) -> Iterator[str]:
            detok = IncrementalDetokenizer(self.tokenizer)
            for step in generate_tokens(self.model, inputs, sampling, self.stop_ids, self.pad_id, stop_event):
                token = int(step[0])
                if token in self.stop_ids:
                    break
                delta = detok.add(token)
                if delta:
                    yield delta
            rest = detok.flush()
            if rest:
                yield rest

        yield from run_in_thread(produce, cancel)

    def chat(self, conversation: Any, **options: Any) -> str:
        """The whole answer to one conversation as a string."""
        return self.generate(conversation, **options)[0].text

    # ------------------------------------------------------------------------------------------

    def _split(self, options: dict[str, Any]) -> tuple[Sampling, dict[str, Any]]:
        media = {k: options.pop(k) for k in MEDIA_OPTIONS if k in options}
        return self.defaults.override(**options), {k: v for k, v in media.items() if v is not None}

    def _prepare(self, conversations: Any, sampling: Sampling, media: dict[str, Any]) -> dict[str, Any]:
        inputs = self.encode(conversations, **media)
        length = inputs["input_ids"].shape[1]
        if length + 1 > self.max_context:
            raise ContextLengthError(
                f"The prompt has {length} tokens; this model's context holds {self.max_context}. "
                "Shorten the conversation, use fewer or smaller images, or fewer video frames.")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def _output(self, ids: list[int], stopped: bool, cancelled: bool) -> GenerationOutput:
        text_ids = ids[:-1] if stopped else ids
        reason = "stop" if stopped else ("cancelled" if cancelled else "length")
        return GenerationOutput(self.tokenizer.decode(text_ids), ids, reason)


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
