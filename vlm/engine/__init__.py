"""One engine per loaded chat model: every request is served by it, at once.

- `Engine.submit(request) -> Handle`: a `Request` is one conversation's model inputs plus its own
  sampling, stop ids, logits processors (e.g. a thinking budget), cancel event and deadline; the handle
  yields its token ids. The prompt is embedded in the submitting thread (vision towers take turns with
  the running steps, `turns.Turns`); a scheduler thread does the rest and ends when idle.
- Each step admits waiting requests in order while the batch (`max_batch`) and the KV memory budget
  (bytes, running caches plus those kept for reuse) have room; a request that does not fit waits,
  told its place in the queue. Then one forward runs one row for every decoding request and, once the
  decode steps have earned it, a chunk of a waiting prompt (chunked prefill, paced by `pace.Pace` so
  running answers keep 1 / (1 + prefill_ratio) of their pace while prompts are read; a prompt's first chunk
  is read at once, before those begun, and repaid by the next ones), with each request's own
  positions (M-RoPE included). The model's linears run once over all rows; attention runs per request
  over its own KV cache (`layers.attention.Rows`: ragged, nothing padded to the longest).
- A finished request's cache goes to the prefix pool; a follow-up turn sharing its beginning (same
  tokens, positions and media contents) reuses it, and the model's feature cache spares re-encoding its
  media. Stop, a closed tab or a deadline remove a request within one step.
The engine knows no family: models implement `vlm.model.ChatModel`.
"""

from .engine import Engine, Handle, Request, default_kv_budget

__all__ = ["Engine", "Handle", "Request", "default_kv_budget"]
