"""What a question will cost before it is sent, without running the model.

`estimate` counts the visual tokens of each image and video, the prompt's length and the context left,
from the family's own processor run on blank pixels of the right sizes (`media.dry_run`: images' headers
are read and videos probed, nothing is decoded), so the counts are those the answer's prompt will have.
With a measured prefill rate (`PrefillRate`, prompt tokens per second to the first token on this
machine) it also estimates the time to the first token. `fit` lowers max pixels and video frames until
the prompt fits a token budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conversation import media_items, normalize
from .errors import InputError, VLMError
from .media import dry_run

MIN_PIXELS = 56 * 56  # fit never asks for smaller images or frames (Qwen2-VL's own minimum)
MIN_FRAMES = 2  # ... nor fewer frames (one temporal patch)


@dataclass(frozen=True)
class MediaCost:
    """One image or video: its visual tokens, and what the processor was given."""

    kind: str  # "image" | "video"
    name: str  # file name, or "image 1" for an in-memory image
    tokens: int
    width: int
    height: int
    frames: int = 1  # a video's sampled frames


@dataclass(frozen=True)
class Cost:
    media: tuple[MediaCost, ...]
    prompt_tokens: int  # text and visual tokens of the whole prompt
    context: int  # the model's context
    seconds_to_first_token: float | None = None  # estimated from a measured prefill rate, when one is given

    @property
    def visual_tokens(self) -> int:
        return sum(m.tokens for m in self.media)

    @property
    def context_left(self) -> int:
        """Tokens the answer can still take."""
        return self.context - self.prompt_tokens


class PrefillRate:
    """Prompt tokens per second to the first token, measured on answers (the mean of the last `window`)."""

    def __init__(self, window: int = 8):
        self.window, self.rates = window, []

    def add(self, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens > 0 and seconds > 0:
            self.rates = [*self.rates, prompt_tokens / seconds][-self.window:]

    @property
    def value(self) -> float | None:
        return sum(self.rates) / len(self.rates) if self.rates else None


def estimate(pipe: Any, conversation: Any, prefill_rate: float | None = None, **media_options: Any) -> Cost:
    """The cost of answering one `conversation` with `pipe` (a chat pipeline) under `media_options`
    (min_pixels, max_pixels, fps, num_frames), as `pipe.encode` would build its prompt."""
    if not hasattr(pipe, "encode"):
        raise InputError(f"{pipe.family} does not chat; only chat models have a prompt to estimate.")
    messages = normalize(conversation)
    with dry_run() as seen:
        inputs = pipe.encode(messages, **{k: v for k, v in media_options.items() if v is not None})
    counts = getattr(pipe.build_inputs, "visual_tokens", lambda _: {"image": [], "video": []})(inputs)
    items = media_items(messages)
    given = {kind: iter([s for s in seen if s.kind == kind]) for kind in ("image", "video")}
    tokens = {kind: iter(counts[kind]) for kind in ("image", "video")}
    media = []
    for number, item in enumerate(items, 1):
        size = next(given[item.kind])
        name = Path(item.source).name if isinstance(item.source, (str, Path)) else f"{item.kind} {number}"
        media.append(MediaCost(item.kind, name, next(tokens[item.kind]), size.width, size.height, size.frames))
    prompt = int(inputs["input_ids"].shape[1])
    seconds = prompt / prefill_rate if prefill_rate else None
    return Cost(tuple(media), prompt, pipe.max_context, seconds)


def fit(pipe: Any, conversation: Any, budget: int, steps: int = 10,
        **media_options: Any) -> tuple[dict[str, Any], Cost]:
    """Media options, no larger than `media_options`, under which the prompt takes at most `budget` tokens,
    and the cost then: max_pixels and the videos' frame count scaled down together (the largest scale
    found by bisection). Raises InputError when even the smallest settings do not fit."""
    cost = estimate(pipe, conversation, **media_options)
    if cost.prompt_tokens <= budget:
        return dict(media_options), cost
    pixels = max((m.width * m.height for m in cost.media), default=0)
    if media_options.get("max_pixels"):
        pixels = min(pixels, media_options["max_pixels"])
    frames = min((m.frames for m in cost.media if m.kind == "video"), default=0)

    def scaled(scale: float) -> dict[str, Any]:
        options = dict(media_options)
        if pixels:
            options["max_pixels"] = max(MIN_PIXELS, int(pixels * scale))
        if frames:
            options["num_frames"], options["fps"] = max(MIN_FRAMES, int(frames * scale)), None
        return options

    def fits(scale: float) -> Cost | None:
        try:
            found = estimate(pipe, conversation, **scaled(scale))
        except VLMError:  # settings the processor refuses do not fit
            return None
        return found if found.prompt_tokens <= budget else None

    best = fits(0.0)
    if best is None:
        raise InputError(f"The prompt takes {cost.prompt_tokens} tokens and still more than {budget} with the "
                         "smallest images and fewest frames; shorten the conversation or send fewer images.")
    low, high = 0.0, 1.0  # `low` fits, `high` does not
    for _ in range(steps):
        middle = (low + high) / 2
        found = fits(middle)
        if found is not None:
            low, best = middle, found
        else:
            high = middle
    return scaled(low), best
