"""A checkpoint's language model as a GGUF file (llama.cpp's "qwen2" architecture), for the llama.cpp peer.

Bench only: it needs the `gguf` package (requirements-dev.txt). Text positions make M-RoPE equal to plain
RoPE, so Qwen2-VL's and LLaVA-OneVision's decoders are both Qwen2 decoders to llama.cpp. Matrices are
written in bf16 as stored; norms and biases in float32, as llama.cpp's own converter writes them. The file
has no tokenizer ("none", with the vocabulary size): llama-bench feeds random token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..checkpoint import read_config, read_safetensors_header, read_safetensors_tensor, sub_config, weight_files
from ..layers.decoder import DecoderConfig

# our per-layer tensor names (after "layers.N.") -> llama.cpp's (after "blk.N.")
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def decoder_config(checkpoint: Path) -> DecoderConfig:
    return DecoderConfig.from_dict(sub_config(read_config(checkpoint), "text_config"))


def gguf_names(keys: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> GGUF name, for the language model's tensors among `keys`."""
    (embed,) = [k for k in keys if k.endswith("embed_tokens.weight")]
    prefix = embed.removesuffix("embed_tokens.weight")  # "model." (Qwen2-VL), "language_model.model." (LLaVA)
    names = {embed: "token_embd.weight", prefix + "norm.weight": "output_norm.weight"}
    head = [k for k in keys if k.endswith("lm_head.weight")]
    if head:
        names[head[0]] = "output.weight"
    for key in keys:
        if key.startswith(prefix + "layers."):
            layer, _, rest = key.removeprefix(prefix + "layers.").partition(".")
            names[key] = f"blk.{layer}.{LAYER_NAMES[rest]}"
    return names


def language_tensors(checkpoint: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor as stored) for every language-model tensor of `checkpoint`."""
    for file in weight_files(checkpoint):
        header = read_safetensors_header(file)
        names = gguf_names([k for k in header if k != "__metadata__"])
        for key, name in names.items():
            if key in header:
                yield name, read_safetensors_tensor(file, key, header[key])


def export_gguf(checkpoint: Path, target: Path) -> Path:
    """Write `checkpoint`'s language model to `target` in bf16 (once; kept while it is complete)."""
    import gguf

    if target.exists():
        return target
    cfg = decoder_config(checkpoint)
    partial = target.with_suffix(".partial")
    writer = gguf.GGUFWriter(str(partial), "qwen2")
    writer.add_name(checkpoint.name)
    writer.add_context_length(32768)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("none")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for name, tensor in language_tensors(checkpoint):
        if tensor.ndim == 1:
            writer.add_tensor(name, tensor.float().numpy())
        else:
            bits = tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            writer.add_tensor(name, bits, raw_dtype=gguf.GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(target)
    return target
