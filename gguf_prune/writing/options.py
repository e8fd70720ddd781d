"""The writing stage's choices, named once: the type a pruned model is quantized to by default, and the types a
checkpoint is converted to before it is cut. Standard library only: the CLI and the planner read them."""

DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp users run most; `prune --quant`, `run --quant`, the planner's size estimate
NO_QUANT = "NONE"  # `--quant none`: the cut file (F16/BF16/F32) is the result
OUTTYPES = ("f16", "bf16", "f32")  # what convert_hf_to_gguf writes for the cut
DEFAULT_OUTTYPE = "f16"
