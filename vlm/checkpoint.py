"""Checkpoint reading: config.json in flat or nested layout, safetensors weights, device and dtype."""

from __future__ import annotations

import json
import math
import mmap
from contextlib import contextmanager
import struct
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError, MissingTensorError, UnexpectedTensorError
from .layers.linear import PackedLinear, supported

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


MAX_JSON_BYTES = 16 << 20  # configs, tokenizer settings, vocabularies (real ones: a few KB to a few MB)


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """A UTF-8 text file of at most `max_bytes`; a CheckpointError naming the file otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size:,} bytes; files up to {max_bytes:,} bytes are read.")
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """A JSON object from a file of at most `max_bytes`, every failure (syntax, size, nesting too deep
    for the parser, not an object) a CheckpointError naming the file."""
    try:
        value = json.loads(read_text(path, max_bytes))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise CheckpointError(f"{path} nests its JSON too deeply to be read.") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(value).__name__}.")
    return value


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, validated (see validate_config)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json.")
    return validate_config(read_json(path), path)


def read_generation_config(directory: Path) -> dict[str, Any]:
    """generation_config.json of a checkpoint directory (validated), or {} when it has none."""
    path = Path(directory) / "generation_config.json"
    return validate_config(read_json(path), path) if path.is_file() else {}


def read_processor_configs(directory: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(image, video, top-level) processor settings, found where transformers looks for them.

    Images: processor_config.json["image_processor"], else preprocessor_config.json. Videos:
    processor_config.json["video_processor"], else video_preprocessor_config.json, else
    preprocessor_config.json. Top level: the rest of processor_config.json. Missing files give {}.
    """
    def optional(name: str) -> dict[str, Any]:
        path = Path(directory) / name
        return validate_config(read_json(path), path) if path.is_file() else {}

    top, legacy = optional("processor_config.json"), optional("preprocessor_config.json")
    image = top.get("image_processor") or legacy
    video = top.get("video_processor") or optional("video_preprocessor_config.json") or legacy
    return image, video, top


def sub_config(config: dict[str, Any], key: str) -> dict[str, Any]:
    """A nested sub-config (`text_config`, `vision_config`) or, in the flat hub layout, the top level.

    Top-level fields fill in what the nested dict lacks, so both layouts read the same.
    """
    nested = config.get(key)
    if not isinstance(nested, dict):
        return dict(config)
    merged = {k: v for k, v in config.items() if not isinstance(v, dict)}
    merged.update(nested)
    return merged


def rope_config(text: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings from `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (hub)."""
    params = dict(text.get("rope_parameters") or {})
    scaling = text.get("rope_scaling") or {}
    merged = {**scaling, **params}
    merged.setdefault("rope_theta", text.get("rope_theta", 10000.0))
    kind = merged.get("rope_type", merged.get("type", "default"))
    merged["rope_type"] = "default" if kind == "mrope" else kind
    if "partial_rotary_factor" not in merged and "partial_rotary_factor" in text:
        merged["partial_rotary_factor"] = text["partial_rotary_factor"]
    return merged


# ------------------------------------------------------------------------------------------ validation
# Fields of config.json, the processor configs and generation_config.json (at any depth) that size what
# gets built or allocated, with the values accepted. Every family reads its config through them, so a
# hostile or broken file is refused here, before anything is built: a billion layers would take forever
# to build, zero heads divide by zero, a string or a float breaks the arithmetic.
_LAYERS, _WIDTH, _HEADS, _SIDE, _PIXELS = (1, 1024), (1, 1 << 16), (1, 1024), (1, 4096), (1, 1 << 27)
INT_FIELDS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22), "hidden_size": _WIDTH, "intermediate_size": (1, 1 << 18), "embed_dim": _WIDTH,
    "out_hidden_size": _WIDTH, "projection_dim": _WIDTH, "projection_intermediate_dim": (1, 1 << 18),
    "num_hidden_layers": _LAYERS, "depth": _LAYERS, "depths": _LAYERS,
    "num_attention_heads": _HEADS, "num_key_value_heads": _HEADS, "num_heads": _HEADS, "head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 24), "num_channels": (1, 64), "in_channels": (1, 64), "in_chans": (1, 64),
    "patch_size": (1, 1024), "temporal_patch_size": (1, 64), "spatial_merge_size": (1, 64), "merge_size": (1, 64),
    "num_group_tokens": (0, 4096), "num_output_groups": (1, 4096), "mrope_section": (0, 4096),
    "image_size": _SIDE, "crop_size": _SIDE, "size": _SIDE, "height": _SIDE, "width": _SIDE, "image_grid_pinpoints": _SIDE,
    "min_pixels": _PIXELS, "max_pixels": _PIXELS, "shortest_edge": _PIXELS, "longest_edge": _PIXELS,
    "num_frames": (1, 1 << 16), "min_frames": (1, 1 << 16), "max_frames": (1, 1 << 16),
    "max_new_tokens": (1, 1 << 24), "max_length": (1, 1 << 24),
}
OPTIONAL_FIELDS = {"head_dim", "num_key_value_heads", "num_frames", "max_new_tokens", "max_length"}  # may be null
FLOAT_FIELDS: dict[str, tuple[float, float]] = {
    "rms_norm_eps": (0.0, 1.0), "layer_norm_eps": (0.0, 1.0), "rope_theta": (0.0, 1e12),
    "partial_rotary_factor": (0.0, 1.0), "mlp_ratio": (0.0, 64.0), "fps": (0.0, 1000.0),
}
MAX_LIST = 1024  # entries in a list of sizes (depths per stage, pinpoints)


def validate_config(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """`config` (read from `path`) if its size fields are all in range (INT_FIELDS, FLOAT_FIELDS, at any
    depth) and its attention heads divide evenly; else a CheckpointError."""
    _validate(config, path, "")
    return config


def _validate(node: dict[str, Any], path: Path, where: str) -> None:
    for key, value in node.items():
        if isinstance(value, dict):
            _validate(value, path, f"{where}{key}.")
        elif key in INT_FIELDS and not (value is None and key in OPTIONAL_FIELDS):
            low, high = INT_FIELDS[key]
            if not all(isinstance(v, int) and not isinstance(v, bool) and low <= v <= high for v in _items(value)):
                raise CheckpointError(f"{path}: {where}{key} must be an integer from {low} to {high:,} (or a list "
                                      f"of them), not {_shown(value)}.")
        elif key in FLOAT_FIELDS:
            low, high = FLOAT_FIELDS[key]
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low < value <= high):
                raise CheckpointError(f"{path}: {where}{key} must be a number above {low:g} and at most {high:g}, "
                                      f"not {_shown(value)}.")
    heads, groups = node.get("num_attention_heads"), node.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(groups, int) and heads % groups:
        raise CheckpointError(f"{path}: {where}num_attention_heads ({heads}) must be a multiple of "
                              f"num_key_value_heads ({groups}).")


def _items(value: Any) -> list[Any]:
    """A size field's integers: the value, or the entries of a (nested) list of at most MAX_LIST."""
    if not isinstance(value, list):
        return [value]
    if not value or len(value) > MAX_LIST:
        return [None]
    return [item for entry in value for item in _items(entry)]


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_error(directory: Path, exc: Exception) -> CheckpointError:
    """A CheckpointError for an exception a family raised while reading its config and building its
    model: a field it needs is missing or has the wrong shape."""
    if isinstance(exc, KeyError):
        return CheckpointError(f"{directory}/config.json lacks {exc.args[0]!r}, which this model needs.")
    return CheckpointError(f"{directory}/config.json does not describe a model this package can build: "
                           f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`auto` picks CUDA when available."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA, on CPU the faster of fp32 and bf16 for a decode-sized matmul."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return _faster_cpu_dtype()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, not {dtype!r}")
    return DTYPES[dtype]


@lru_cache(maxsize=1)
def _faster_cpu_dtype() -> torch.dtype:
    """Time a matrix-vector product (the decode bottleneck) in fp32 and bf16, run as the model would run
    it (packed for oneDNN where supported); keep the faster."""
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        linear = nn.Linear(2048, 2048, bias=False, dtype=dtype).requires_grad_(False)
        layer = PackedLinear(linear) if supported(dtype, torch.device("cpu")) else linear
        x = torch.randn(1, 2048, dtype=dtype)
        with torch.inference_mode():
            layer(x)
            start = time.perf_counter()
            for _ in range(20):
                layer(x)
        timings[dtype] = time.perf_counter() - start
    return min(timings, key=timings.get)


# ---------------------------------------------------------------------------------------------- weights

_INITS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
          "trunc_normal_", "zeros_", "ones_", "constant_")


@contextmanager
def empty_weights():
    """Build modules on the meta device without running their initialisers (the weights come from
    the checkpoint, so initialising them is wasted work)."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name, init in saved.items():  # other threads building real tensors still get initialised
        setattr(nn.init, name, lambda tensor, *a, _init=init, **k: tensor if tensor.is_meta else _init(tensor, *a, **k))
    try:
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)



def weight_files(directory: Path) -> list[Path]:
    """Weight files of a checkpoint: safetensors (an index's shards, else every *.safetensors), else
    PyTorch pickles (pytorch_model.bin or its shards), which older hub repos still ship."""
    directory = Path(directory)
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model*.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else [None]
            if not all(isinstance(n, str) and n and Path(n).name == n and n != ".." for n in names):
                raise CheckpointError(f"{index} must map tensors to file names in its own directory.")
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"{index.name} names shards that are missing: {', '.join(missing)}")
            return [directory / n for n in names]
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{directory} holds no weights (*.safetensors or pytorch_model.bin).")


def _tensor_entries(file: Path) -> dict[str, Any]:
    """name -> safetensors header entry, or (for a .bin) the tensor itself, memory-mapped."""
    if file.suffix != ".bin":
        return read_safetensors_header(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # unpickling errors come in many types
        raise CheckpointError(f"{file} is not a readable PyTorch weights file: {exc}") from exc


class _WeightReader:
    """Reads tensors for `load_weights`. A tensor stored in the target dtype is memory-mapped (nothing is
    read until it is used, and the pages stay evictable file cache); one that needs a cast is read and
    cast chunk by chunk through reused buffers."""

    def __init__(self):
        self.buffers: dict[torch.dtype, torch.Tensor] = {}

    def read(self, file: Path, key: str, entry: Any, dtype: torch.dtype | None) -> torch.Tensor:
        if isinstance(entry, torch.Tensor):  # from a memory-mapped pytorch_model.bin
            cast = dtype is not None and entry.is_floating_point() and dtype.is_floating_point
            return entry.to(dtype) if cast else entry
        stored = SAFETENSORS_DTYPES[entry["dtype"]]
        if dtype is not None and dtype != stored and stored.is_floating_point and dtype.is_floating_point:
            return read_safetensors_tensor(file, key, entry, dtype, self.buffers)
        return map_safetensors_tensor(file, entry)


def load_weights(
    model: nn.Module,
    directory: Path,
    rename: Callable[[str], str | None],
    dtype: torch.dtype,
    device: torch.device,
    tied: dict[str, str] | None = None,
) -> None:
    """Read safetensors tensors straight into `model`'s (meta-device) parameters.

    `rename` maps a checkpoint name to the model's name (None drops the tensor on purpose).
    `tied` maps a parameter absent from the file to the one it shares storage with.
    Names are checked against the headers before any data is read; tensors are then memory-mapped, or
    read and cast one at a time, so peak memory stays at most near the weights' size.
    """
    expected = dict(_named_tensors(model))
    entries = [(file, key, rename(key), info) for file in weight_files(directory)
               for key, info in _tensor_entries(file).items()]
    entries = [e for e in entries if e[2] is not None]
    unexpected = sorted(key for _, key, name, _ in entries if name not in expected)
    if unexpected:
        raise UnexpectedTensorError(
            f"{directory} has {len(unexpected)} tensors this model does not use: {', '.join(unexpected[:20])}")
    present = {name for _, _, name, _ in entries}
    missing = sorted(n for n in set(expected) - present if not (tied and tied.get(n) in present))
    if missing:
        raise MissingTensorError(f"{directory} lacks {len(missing)} tensors: {', '.join(missing[:20])}")
    for _, _, name, info in entries:  # before anything is mapped or read
        shape = tuple(info.shape if isinstance(info, torch.Tensor) else info["shape"])
        if shape != tuple(expected[name].shape):
            raise CheckpointError(f"Tensor {name} has shape {shape}, the config implies {tuple(expected[name].shape)}.")
    reader = _WeightReader()
    for file, key, name, info in entries:
        target = expected[name]
        tensor = reader.read(file, key, info, dtype if target.is_floating_point() else None)
        _assign(model, name, tensor, device)
    for target, source in (tied or {}).items():
        if target in expected and target not in present:
            _set_tensor(model, target, _get_tensor(model, source))


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


MAX_HEADER_BYTES = 8 << 20  # a safetensors header (~100 bytes a tensor: 80,000 tensors in one file)
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in SAFETENSORS_DTYPES.items()}


def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """Tensor entries of a safetensors file (dtype, shape, data_offsets), validated against its size."""
    size = Path(file).stat().st_size
    try:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"header length {length:,} exceeds the file or {MAX_HEADER_BYTES:,} bytes")
            header = json.loads(f.read(length))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        for key, info in entries.items():
            begin, end = info["data_offsets"]
            shape = info["shape"]
            if not (isinstance(shape, list) and len(shape) <= 8 and all(isinstance(n, int) and n >= 0 for n in shape)
                    and isinstance(begin, int) and 0 <= begin <= end):
                raise ValueError(f"tensor {key} has an invalid shape or offsets")
            if end - begin != math.prod(shape) * _ITEMSIZE[info["dtype"]] or 8 + length + end > size:
                raise ValueError(f"tensor {key} has inconsistent offsets")
            info["data_start"] = 8 + length + begin
        return entries
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{file} is not a valid safetensors file: {type(exc).__name__}: {exc}") from exc


def weights_bytes(directory: Path, dtype: torch.dtype) -> int:
    """Memory of a checkpoint's weights once loaded: floating tensors in `dtype`, others as stored (from
    the headers alone)."""
    total = 0
    for file in weight_files(directory):
        for entry in _tensor_entries(file).values():
            stored = entry.dtype if isinstance(entry, torch.Tensor) else SAFETENSORS_DTYPES[entry["dtype"]]
            count = entry.numel() if isinstance(entry, torch.Tensor) else math.prod(entry["shape"])
            total += count * (dtype.itemsize if stored.is_floating_point else stored.itemsize)
    return total


def read_safetensors_tensor(file: Path, key: str, info: dict[str, Any], dtype: torch.dtype | None = None,
                            buffers: dict[torch.dtype, torch.Tensor] | None = None) -> torch.Tensor:
    """One tensor read with plain file reads into fresh memory of `dtype` (default: the stored dtype).

    A cast goes through a chunk buffer (kept in `buffers` for reuse across calls), so neither a full
    copy in the stored dtype nor a trail of freed temporaries (heap fragmentation) is left behind.
    """
    stored = SAFETENSORS_DTYPES[info["dtype"]]
    if dtype is None or not (stored.is_floating_point and dtype.is_floating_point):
        dtype = stored
    tensor = torch.empty(info["shape"], dtype=dtype)
    flat = tensor.view(-1)
    with open(file, "rb") as f:
        f.seek(info["data_start"])
        if dtype == stored:
            _read_exactly(f, flat, file, key)
            return tensor
        buffers = {} if buffers is None else buffers
        buffer = buffers.setdefault(stored, torch.empty(READ_CHUNK, dtype=stored))
        for begin in range(0, flat.numel(), READ_CHUNK):
            part = buffer[:min(READ_CHUNK, flat.numel() - begin)]
            _read_exactly(f, part, file, key)
            flat[begin:begin + part.numel()].copy_(part)
    return tensor


READ_CHUNK = 1 << 20  # elements per read when casting


def map_safetensors_tensor(file: Path, info: dict[str, Any]) -> torch.Tensor:
    """One tensor memory-mapped on its own: nothing is read until it is used, and its pages leave this
    process when the tensor is freed (a map of the whole file would keep every touched page resident)."""
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    if end == begin:
        return torch.empty(info["shape"], dtype=dtype)
    start = info["data_start"]
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(file, "rb") as f:  # a private (copy-on-write) map: the file is never written
            mapped = mmap.mmap(f.fileno(), start - base + end - begin, offset=base, access=mmap.ACCESS_COPY)
    except (OSError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{file}: a tensor of {end - begin:,} bytes cannot be mapped: {exc}") from exc
    return torch.frombuffer(mapped, dtype=dtype, count=math.prod(info["shape"]), offset=start - base).view(info["shape"])


def _read_exactly(f, flat: torch.Tensor, file: Path, key: str) -> None:
    if flat.numel() and f.readinto(flat.view(torch.uint8).numpy()) != flat.numel() * flat.element_size():
        raise CheckpointError(f"{file} ends inside tensor {key}.")


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    for name, buf in model.named_buffers(remove_duplicate=False):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf not in module._non_persistent_buffers_set:
            yield name, buf


def _assign(model, name, tensor, device):
    _set_tensor(model, name, tensor.to(device))


def _get_tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    return getattr(model.get_submodule(module_name) if module_name else model, leaf)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def prefix_renamer(table: list[tuple[str, str]]) -> Callable[[str], str]:
    """A rename function from a declared table of (checkpoint prefix, model prefix) pairs; first match wins."""

    def rename(key: str) -> str:
        for source, target in table:
            if key.startswith(source):
                return target + key[len(source):]
        return key

    return rename
