"""SafeVLM in JAX/Flax NNX."""
