"""Weight conversion between HF/PyTorch (LLaVA, the authors' safety modules, peft LoRA) and
`safevlm_jax` checkpoints. Each tool is a function plus a thin `python -m` CLI."""
