"""Zero-shot semantic segmentation with GroupViT: an image and a list of words in, a label map out.

Choices:
- Prompts: each label is put into every template and its embedding is the mean of the prompts'
  embeddings, renormalised (NVlabs' `build_text_embedding`); the default template is the one NVlabs'
  segmentation evaluation uses ("simple").
- Whole image, no centre crop: the image is resized as CLIP's processor does (shortest edge) but not
  cropped; model-sized windows slide over it with half-window overlap and their logits are averaged
  (NVlabs evaluates with sliding windows too). A square image is one window: exactly the reference's
  input. The label map is the logits resized to the image's own size, so it covers every pixel.
- Background: a pixel is background when the label probability of the group holding it is below
  `threshold` (NVlabs' test; 0.95 in its VOC and COCO evaluations).
- Image-level scores: the reference's zero-shot classification of CLIP's centre crop."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

from ...errors import InputError
from .model import GroupViT, ImageFeatures, segmentation_logits
from .processor import ClipTokenizer, ImageProcessor
from .segmentation import Segmentation, label_map

if TYPE_CHECKING:
    from ...media import ImageSource

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_THRESHOLD = 0.95
# The label map and the overlay are drawn at the image's own size, which load_image caps at 4 Mpx
# (media.SHRINK_MARGIN times this): both cost memory per pixel, the model itself sees a short side of ~224.
LABEL_MAP_PIXELS = 1 << 20
PROMPTS_PER_BATCH = 256
WINDOWS_PER_BATCH = 8


class GroupViTPipeline:
    family = "groupvit"

    def __init__(self, model: GroupViT, tokenizer: ClipTokenizer, image_processor: ImageProcessor,
                 device: torch.device, dtype: torch.dtype):
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        self.device, self.dtype = device, dtype

    @torch.no_grad()
    def segment(self, image: ImageSource, labels: Iterable[str] | str, templates: Iterable[str] | str | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> Segmentation:
        """Label every pixel of `image` (PIL image, path or bytes) with one of `labels` (plain words; a
        string is split on commas) or background; `templates` are prompts with a `{}` for the label."""
        from ...media import load_image

        labels, templates = clean_labels(labels), clean_templates(templates)
        if not 0.0 <= threshold <= 1.0:
            raise InputError(f"threshold must be between 0 and 1 (0 = no background), not {threshold}.")
        image = load_image(image, target_pixels=LABEL_MAP_PIXELS)
        text = self.embed_labels(labels, templates)
        processor = self.image_processor
        resized = processor.resize(image)
        logits, confidence, per_image = self.run(processor.normalize(resized),
                                                 processor.normalize(processor.center_crop(resized)), text)
        mask = label_map(logits, confidence, threshold, (image.height, image.width))
        return Segmentation(image, labels, logits, confidence, mask, per_image, threshold)

    def embed_labels(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> torch.Tensor:
        """(L, D) unit vectors: the mean of each label's prompt embeddings, renormalised."""
        prompts = [template.replace("{}", label) for label in labels for template in templates]
        embeds = torch.cat([
            self.model.encode_text(self.tokenizer(prompts[i:i + PROMPTS_PER_BATCH]).to(self.device)).float()
            for i in range(0, len(prompts), PROMPTS_PER_BATCH)
        ])
        return F.normalize(embeds.view(len(labels), len(templates), -1).mean(dim=1), dim=-1)

    def run(self, pixels: torch.Tensor, crop: torch.Tensor,
            text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segmentation logits (L, h, w) and confidence (h, w) of the (3, h, w) image, averaged over
        model-sized windows where they overlap, and the image-text logits (L,) of the centre `crop` (the
        reference's classification input); on the CPU in float32."""
        height, width = self.model.config.vision.image_size
        _, h, w = pixels.shape  # load() checked that h >= height and w >= width
        boxes = [(top, left) for top in window_starts(h, height) for left in window_starts(w, width)]
        inputs = [pixels[:, top:top + height, left:left + width] for top, left in boxes] + [crop]
        scale = self.model.logit_scale.exp().float()
        outputs = []
        for i in range(0, len(inputs), WINDOWS_PER_BATCH):
            feats = self.model.encode_image(torch.stack(inputs[i:i + WINDOWS_PER_BATCH]).to(self.device, self.dtype))
            outputs += zip(segmentation_logits(feats, text, scale).cpu(), group_confidence(feats, text, scale).cpu(),
                           (scale * feats.image_embeds @ text.T).cpu())
        logits, confidence, count = torch.zeros(len(text), h, w), torch.zeros(h, w), torch.zeros(h, w)
        for (top, left), (window_logits, window_confidence, _) in zip(boxes, outputs):
            logits[:, top:top + height, left:left + width] += window_logits
            confidence[top:top + height, left:left + width] += window_confidence
            count[top:top + height, left:left + width] += 1
        return logits / count, confidence / count, outputs[-1][2]


def group_confidence(image: ImageFeatures, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B, H, W): the highest label probability of the group holding the largest share of each pixel."""
    probs = (scale * image.group_embeds @ text.T).softmax(-1).amax(-1)  # (B, G)
    main_group = image.grouping.argmax(1)  # (B, H, W)
    return probs.gather(1, main_group.flatten(1)).view_as(main_group)


def window_starts(length: int, window: int) -> list[int]:
    """Offsets of windows covering `length` with half-window strides, the last one flush with the end."""
    stride = max(window // 2, 1)
    count = (max(length - window, 0) + stride - 1) // stride + 1
    return sorted({min(i * stride, length - window) for i in range(count)})


def clean_labels(labels: Iterable[str] | str) -> tuple[str, ...]:
    """Whitespace collapsed; empty labels and duplicates (as CLIP reads them: NFC, lower-cased) dropped;
    first spelling and order kept. A string is a comma-separated list."""
    if isinstance(labels, str):
        labels = labels.split(",")
    if not isinstance(labels, Iterable):
        raise InputError(f"Labels must be a list of words or a comma-separated string, not {type(labels).__name__}.")
    kept: dict[str, str] = {}
    for label in labels:
        if not isinstance(label, str):
            raise InputError(f"Labels must be strings, got {type(label).__name__}.")
        label = " ".join(label.split())
        kept.setdefault(unicodedata.normalize("NFC", label).lower(), label)
    kept.pop("", None)
    if not kept:
        raise InputError("Give at least one label: words separated by commas, e.g. cat, dog, grass.")
    return tuple(kept.values())


def clean_templates(templates: Iterable[str] | str | None) -> tuple[str, ...]:
    """Prompt templates, each with a `{}` where the label goes."""
    if templates is None:
        return DEFAULT_TEMPLATES
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    bad = [t for t in templates if not isinstance(t, str) or "{}" not in t]
    if bad or not templates:
        raise InputError(f"Each template needs a '{{}}' where the label goes, e.g. 'a photo of a {{}}.'; got {bad}.")
    return templates
