"""How far each quantized format's logits land from bf16's, on the same weights and the same tokens (run in
its own process by the peer benchmark; needs the `gguf` package).

Teacher-forced over one sequence of random token ids: this project's formats as they run (bf16 activations),
and llama.cpp's files of the same size as their weights compute in float32 (dequantized with the `gguf`
package, embeddings and head as llama.cpp stored them). llama.cpp also rounds activations to 8 bits in its
quantized dot products; that error is left out, so its figures are, if anything, flattering.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import scenarios as s
from ..model import run_prompt
from .gguf_export import gguf_names

TOKENS = 256


@torch.inference_mode()
def teacher_forced_logits(pipe, ids: torch.Tensor) -> torch.Tensor:
    """Logits (L, vocab) of ids (L,) run as one prompt."""
    model = pipe.model
    return model.logits(run_prompt(model, model.embed_tokens(ids), torch.arange(ids.shape[0])[None])).float()


def load_with_gguf_weights(checkpoint: Path, gguf_file: Path):
    """The float32 model with every language-model matrix replaced by `gguf_file`'s, dequantized."""
    import gguf

    from ..checkpoint import read_config
    from ..families import detect_family
    from ..layers.linear import fuse_linears, pack_linears

    config = read_config(checkpoint)
    pipe = detect_family(config).load(checkpoint, config, torch.device("cpu"), torch.float32)
    parameters = dict(pipe.model.named_parameters(remove_duplicate=False))
    tensors = {t.name: t for t in gguf.GGUFReader(str(gguf_file)).tensors}
    names = gguf_names(list(parameters))
    if "output.weight" not in tensors:  # tied head: llama.cpp's token_embd serves as both
        names.update({name: "token_embd.weight" for name in parameters if name.endswith("lm_head.weight")})
    for name, gguf_name in names.items():
        tensor = tensors[gguf_name]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        parameters[name].data = values.view(parameters[name].shape).float()
    fuse_linears(pipe.model)
    pack_linears(pipe.model)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--ours", default="int8,int4", help="our quantization methods")
    parser.add_argument("--gguf", nargs="*", default=[], help="llama.cpp files as LABEL=PATH")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import vlm

    ids = torch.randint(0, 400, (TOKENS,), generator=torch.Generator().manual_seed(0))
    plain = teacher_forced_logits(vlm.load(args.checkpoint, device="cpu", dtype="bfloat16"), ids)
    candidates = {"float32": lambda: vlm.load(args.checkpoint, device="cpu", dtype="float32")}
    candidates.update({m: (lambda m=m: vlm.load(args.checkpoint, device="cpu", dtype="bfloat16", quantization=m))
                       for m in args.ours.split(",") if m})
    for label, path in (item.split("=", 1) for item in args.gguf):
        candidates[label] = lambda path=path: load_with_gguf_weights(Path(args.checkpoint), Path(path))
    rms = plain.pow(2).mean().sqrt()
    result = {}
    for label, load in candidates.items():
        logits = teacher_forced_logits(load(), ids)
        result[label] = {"logit_error": ((logits - plain).pow(2).mean().sqrt() / rms).item(),
                         "top1_agreement": (logits.argmax(-1) == plain.argmax(-1)).float().mean().item()}
    s.emit(result)


if __name__ == "__main__":
    main()
