"""Processing shared by the Qwen-style families (Qwen2-VL, Qwen2.5-VL, GLM-4.1V): smart resize and patch
rows (`images`), placeholder expansion and 3-D M-RoPE positions (`prompt`), and the processor both Qwen VL
generations use (`qwen_vl`). Each family passes only what differs (factor, resize rule, time step)."""
