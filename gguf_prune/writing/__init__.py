"""Stage 3, `gguf-prune rewrite` / `prune`: plan + GGUF → a pruned GGUF that stock llama.cpp loads, then
quantized by llama.cpp.

- gguf_format.py: what the reader and writer agree on (value encodings, sliceable types, padding, chunk size)
- gguf_read.py: open a GGUF with clear errors (header, metadata, tensor table) and read rows of a tensor
- gguf_write.py: write a GGUF in phases, one tensor at a time, copying bytes kernel to kernel
- gguf_names.py: the gguf_prune.* metadata keys
- jobs.py: plan a rewrite: how each kept layer is written and one job per output tensor
- rewrite.py: `rewrite`: check the inputs, plan the jobs, write the metadata, stream the tensors
- quantize.py: llama-quantize and llama-imatrix, with the fallbacks they report
- prune.py: `prune`: convert (cached), cut, quantize, check the result loads
- options.py: the default quant type and the converted types, named once (the CLI and the planner read them)
"""
