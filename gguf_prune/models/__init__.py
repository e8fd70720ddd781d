"""Model families and checkpoints: which architectures gguf-prune knows, how a Hugging Face checkpoint is
read, checked and fingerprinted, and how a plan's cuts are applied to it in PyTorch.
"""
