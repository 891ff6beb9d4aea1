"""GroupViT inputs: CLIP's BPE tokenizer and CLIP's image preprocessing (as transformers' Pillow backend)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ...checkpoint import read_json, read_text, validate_config
from ...errors import CheckpointError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word split: special tokens, English contractions, letter runs, single digits, other symbol runs.
WORD_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
MAX_SIDE = 4096  # the processor's shortest edge, in pixels
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipTokenizer:
    """Lower-cased byte-level BPE whose words end in `</w>`; a text is <|startoftext|> ... <|endoftext|>."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int = 77,
                 bos: str = BOS, eos: str = EOS):
        missing = [t for t in (bos, eos) if t not in vocab]
        if missing:
            raise CheckpointError(f"The tokenizer vocabulary lacks {', '.join(missing)}.")
        self.backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=eos, end_of_word_suffix=END_OF_WORD,
                                     continuing_subword_prefix="", fuse_unk=False))
        self.backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        self.backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        self.backend.add_special_tokens([AddedToken(bos, special=True), AddedToken(eos, special=True)])
        self.bos_id, self.eos_id = vocab[bos], vocab[eos]
        self.max_length = max_length

    @classmethod
    def from_directory(cls, directory: Path, max_length: int = 77) -> "ClipTokenizer":
        """Read tokenizer.json, else vocab.json + merges.txt; special tokens from tokenizer_config.json."""
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            model = read_json(directory / "tokenizer.json").get("model", {})
            vocab, merges = model.get("vocab"), [_merge(m) for m in model.get("merges", [])]
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            vocab = read_json(directory / "vocab.json")
            lines = read_text(directory / "merges.txt").splitlines()
            merges = [_merge(line) for line in lines if line.strip() and not line.startswith("#version")]
        else:
            raise CheckpointError(f"{directory} has neither tokenizer.json nor vocab.json + merges.txt.")
        if not isinstance(vocab, dict):
            raise CheckpointError(f"{directory}: the tokenizer is not a BPE vocabulary.")
        config = _tokenizer_config(directory)
        return cls(vocab, merges, max_length, _special(config, "bos_token", BOS), _special(config, "eos_token", EOS))

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, cut to `max_length` including the start and end tokens."""
        ids = self.backend.encode(text, add_special_tokens=False).ids[: self.max_length - 2]
        return [self.bos_id, *ids, self.eos_id]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(N, S) ids, right-padded with the end token (the text tower reads each text's first one)."""
        rows = [self.encode(t) for t in texts]
        width = max(map(len, rows))
        return torch.tensor([row + [self.eos_id] * (width - len(row)) for row in rows])


def _merge(merge: str | list[str]) -> tuple[str, str]:
    left, right = merge.split(" ") if isinstance(merge, str) else merge
    return left, right


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            config.update(read_json(directory / name))
    return config


def _special(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get(key) or default
    return value.get("content", default) if isinstance(value, dict) else str(value)


@dataclass(frozen=True)
class ImageProcessor:
    """CLIP preprocessing: resize the shortest edge (bicubic), centre crop, rescale to [0, 1], normalise."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255

    @classmethod
    def from_directory(cls, directory: Path) -> "ImageProcessor":
        """preprocessor_config.json (hub) or processor_config.json's `image_processor` (transformers 5);
        CLIP's defaults when neither exists."""
        found = [Path(directory) / n for n in ("preprocessor_config.json", "processor_config.json")]
        path = next((f for f in found if f.is_file()), None)
        if path is None:
            return cls()
        config = validate_config(read_json(path), path)
        if path.name == "processor_config.json":
            config = config.get("image_processor", {})
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        shortest_edge = int(size["shortest_edge"] if isinstance(size, dict) else size)
        if not 1 <= shortest_edge <= MAX_SIDE:
            raise CheckpointError(f"{path}: size must be a side of 1 to {MAX_SIDE} pixels, not {shortest_edge}.")
        return cls(
            shortest_edge=shortest_edge,
            crop_size=(int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop)),
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
        )

    def resize(self, image: Image.Image) -> Image.Image:
        """Shortest edge to `shortest_edge`, aspect ratio kept (the long edge rounds down)."""
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        size = (new_short, new_long) if width <= height else (new_long, new_short)
        return image.resize(size, resample=self.resample)

    def center_crop(self, image: Image.Image) -> Image.Image:
        """Crop the centre `crop_size`; a smaller image is padded with black."""
        height, width = self.crop_size
        top, left = (image.height - height) // 2, (image.width - width) // 2
        return image.crop((left, top, left + width, top + height))

    def normalize(self, image: Image.Image) -> torch.Tensor:
        """RGB image -> (3, H, W) float32, rescaled in float64 then normalised in float32 (as transformers)."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        pixels = (pixels.double() * self.rescale_factor).float()
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The model input transformers' CLIPImageProcessor builds: (3, crop height, crop width)."""
        return self.normalize(self.center_crop(self.resize(image)))
