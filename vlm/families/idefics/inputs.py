"""Conversations -> IDEFICS model inputs: the instruct prompt, images, and which image each token sees.

The instruct checkpoints were tuned on `User: ...<end_of_utterance>\\nAssistant: ...<end_of_utterance>`
turns; an image is `<fake_token_around_image><image><fake_token_around_image>` at its place in the text
(two adjacent images share the fake token between them), and the prompt starts with the BOS token, as the
reference processor writes them. The template below maps chat messages to that form:

- every message on a line of its own; `User:` / `Assistant:` (system messages have no prefix);
- a text part right after the prefix follows a space, one after another text part a newline, one after
  an image nothing; user and assistant messages end with `<end_of_utterance>`;
- the generation prompt is `\\nAssistant:`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...conversation import as_parts, left_pad, media_items, template_view
from ...errors import InputError
from ...media import load_image
from ...tokenizer import Tokenizer
from .processor import ImageSettings, preprocess_image

FAKE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %}{{ '\\n' }}{% endif -%}"
    "{%- if message['role'] == 'user' %}User:{% elif message['role'] == 'assistant' %}Assistant:{% endif -%}"
    "{%- set ns = namespace(previous='prefix') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{%- if ns.previous != 'image' %}<fake_token_around_image>{% endif %}<image><fake_token_around_image>"
    "{%- set ns.previous = 'image' -%}"
    "{%- else -%}"
    "{%- if ns.previous == 'prefix' and message['role'] != 'system' %} {% elif ns.previous == 'text' %}"
    "{{ '\\n' }}{% endif -%}"
    "{{- part['text'] -}}"
    "{%- set ns.previous = 'text' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if message['role'] != 'system' %}<end_of_utterance>{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '\\n' }}Assistant:{% endif -%}"
)


@dataclass
class TokenIds:
    image: int
    eos: int | None  # a token after an end of sequence sees no image until the next one
    pad: int


class IdeficsInputs:
    """Builds `input_ids`, `attention_mask`, `positions`, `next_position`, `image_attention_mask` (B, L, images)
    and, with images, `pixel_values` (B, images, 3, S, S), laid out as the reference's (zero-padded).

    No media option applies (images are always resized to the tower's square); videos are refused.
    """

    def __init__(self, tokenizer: Tokenizer, settings: ImageSettings, ids: TokenIds):
        self.tokenizer, self.settings, self.ids = tokenizer, settings, ids

    def __call__(self, conversations: list[list[dict]], add_generation_prompt: bool = True,
                 **media_options: Any) -> dict[str, Any]:
        rows, masks, images = [], [], []
        for messages in conversations:
            media = media_items(messages)
            if any(m.kind == "video" for m in media):
                raise InputError("IDEFICS reads images and text, not videos; send frames as images instead.")
            ids = self.tokenizer.encode_chat(as_parts(template_view(messages)),
                                             add_generation_prompt=add_generation_prompt)
            if ids.count(self.ids.image) != len(media):
                raise InputError(f"The prompt has {ids.count(self.ids.image)} image placeholders for {len(media)} "
                                 "images.")
            rows.append(ids)
            masks.append(self.attended_image(ids))
            images.append([preprocess_image(load_image(m.source), self.settings) for m in media])
        input_ids, attention_mask = left_pad(rows, self.ids.pad)
        count = max(1, max(len(row) for row in images))
        seen = torch.full(input_ids.shape, -1, dtype=torch.long)
        for row, mask in enumerate(masks):
            seen[row, seen.shape[1] - len(mask):] = mask
        image_mask = torch.nn.functional.one_hot(seen.clamp(min=0), count) * (seen >= 0)[..., None]
        out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                               "image_attention_mask": image_mask}
        if any(images):
            side = self.settings.image_size
            pixels = torch.zeros(len(rows), count, 3, side, side)
            for row, row_images in enumerate(images):
                if row_images:
                    pixels[row, :len(row_images)] = torch.stack(row_images)
            out["pixel_values"] = pixels
        # 1-D positions as transformers' generate derives them: count of real tokens so far, padding at 0.
        out["positions"] = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[None]
        out["next_position"] = attention_mask.sum(-1)
        return out

    def visual_tokens(self, inputs: dict[str, Any]) -> dict[str, list[int]]:
        """Placeholder tokens of each image of one conversation's `inputs` (for cost estimates): one `<image>`
        token each (the cross-attention reads the image's states, not tokens in the sequence)."""
        return {"image": [1] * int((inputs["input_ids"][0] == self.ids.image).sum()), "video": []}

    def attended_image(self, ids: list[int]) -> torch.Tensor:
        """Per token, the index of the most recent image up to it, or -1: before the first image, and after
        an end-of-sequence token until the next image (the reference's image_attention_mask)."""
        t = torch.tensor(ids, dtype=torch.long)
        index = torch.arange(len(ids))
        is_image = t == self.ids.image
        last_image = torch.where(is_image, index, -1).cummax(0).values
        eos_before = torch.full_like(t, -1)
        if self.ids.eos is not None and len(ids) > 1:
            eos_before[1:] = torch.where(t == self.ids.eos, index, -1).cummax(0).values[:-1]
        seen = is_image.cumsum(0) - 1
        return seen.masked_fill((last_image < 0) | (eos_before > last_image), -1)
