"""Flax NNX modules: CLIP tower, projector, LLaMA decoder, LoRA, safety modules, SafeVLM."""
