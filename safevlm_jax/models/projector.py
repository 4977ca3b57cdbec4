"""LLaVA multimodal projector (HF `LlavaMultiModalProjector`): Linear -> GELU (erf) -> Linear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.models.layers import Dense, activation


class MultiModalProjector(nnx.Module):
    """Maps CLIP features [batch, patches, vision_hidden] to LLM embeddings [batch, patches,
    text_hidden]. `linear_1` kernel [vision_hidden, text_hidden] (axes embed, mlp), `linear_2`
    kernel [text_hidden, text_hidden] (axes mlp, embed): the hidden is split like an MLP's."""

    def __init__(self, vision_hidden: int, text_hidden: int, act: str = "gelu",
                 use_bias: bool = True, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(vision_hidden, text_hidden, ("embed", "mlp"), **kw)
        self.act = activation(act)
        self.linear_2 = Dense(text_hidden, text_hidden, ("mlp", "embed"), **kw)

    def __call__(self, image_features: jax.Array) -> jax.Array:
        """[batch, patches, vision_hidden] -> [batch, patches, text_hidden] in `dtype`."""
        h = self.act(self.linear_1(image_features))
        return sharding.constrain(self.linear_2(h), ("batch", "length", "embed"))
