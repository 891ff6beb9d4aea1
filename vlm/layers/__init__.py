"""Building blocks shared by the families: norms, rotary embeddings, attention with a KV cache, MLPs."""
