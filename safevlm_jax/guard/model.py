"""Guard mode: SafeVLM's safety verdict alone, without the LLM decoder layers.

    guard = Guard.from_checkpoint("ckpt/")                  # loads only what the verdict reads
    level_probs, type_probs = guard(pixel_values)           # [B, 4], [B, 7] float32 numpy

Why this is the model's own verdict (docs/safety_modules.md): the safety head is one
cross-attention whose keys/values are the safety tokens and the safety projector's output (a
function of the CLIP features alone) and whose query is the text embedding at the first real
position; its output at one query position depends only on that query. So the verdict is a function
of the image and of the first token's embedding (BOS) — not of the rest of the prompt, not of
any LLM layer. `VerdictModel` holds just those parts (CLIP up to its feature layer, the
safety projector, the head's safety tokens, the safety head, the token embedding table) and
computes with SafeVLM's own methods, so it cannot drift from the full model; its program is
the one every path's verdict runs (`inference.programs.verdict_program`).

The program is data-parallel: parameters are replicated (rule set "data") over a mesh of
the local devices and the batch is split over them; on several hosts each host runs its own
mesh on its own slice of the inputs.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from safevlm_jax import sharding
from safevlm_jax.checkpoint.io import path_str
from safevlm_jax.inference.buckets import pad_rows
from safevlm_jax.inference.programs import verdict_program
from safevlm_jax.models.safevlm import SafetyVerdict, SafeVLM
from safevlm_jax.safety.prompt import query_id
from safevlm_jax.safety.verdict import softmax

VERDICT_PARTS = ("vision_tower", "safety_projector", "safety_tokens_head", "safety_head",
                 "language_model/model/embed_tokens")


class VerdictModel(SafetyVerdict):
    """The parts of a SafeVLM its verdict reads (shared with the model, not copied); the
    verdict's code is `SafetyVerdict`'s, the same as the full model's."""

    def __init__(self, model: SafeVLM):
        if not model.has_safety:
            raise ValueError("this model has no safety modules, so it has no verdict to compute")
        self.config = model.config
        self.vision_tower = model.vision_tower
        self.safety_projector = model.safety_projector
        self.safety_tokens_head = model.safety_tokens_head
        self.safety_head = model.safety_head
        self.embed_tokens = model.token_embedding()

    def token_embedding(self) -> nnx.Module:
        return self.embed_tokens


def load_verdict_model(directory: str, mesh: Mesh | None = None,
                       rules: str = "data") -> VerdictModel:
    """Restores only the `VERDICT_PARTS` parameters of a checkpoint (never the LLM layers or
    the LM head), placed by `rules` on `mesh` (default: one device)."""
    from safevlm_jax.checkpoint.format import abstract_model, load_config, restore_params  # stands on models

    model = abstract_model(load_config(directory))
    wanted = [(p, v) for p, v in nnx.to_flat_state(nnx.state(model))
              if any(path_str(p).startswith(part) for part in VERDICT_PARTS)]
    if any(not isinstance(v, nnx.Param) for _, v in wanted):
        raise ValueError(f"{directory}: the verdict parts hold non-parameter state; load the "
                         f"whole model with checkpoint.load_checkpoint instead")
    abstract = nnx.from_flat_state(wanted)
    shardings = sharding.state_shardings(abstract, mesh, rules) if mesh is not None else None
    nnx.update(model, restore_params(directory, abstract, shardings))
    return VerdictModel(model)


class Guard:
    """The safety verdict alone (no LLM layer): `Guard.from_checkpoint(dir)(pixel_values)`
    -> level_probs [B, 4], type_probs [B, 7]. Runs `verdict_program` over a mesh of the
    local devices.

    model: a SafeVLM or VerdictModel; query_id: the head's query token (the tokenizer's BOS,
    `safety.prompt.query_id`); rules: the sharding rule set (default "data": replicate weights).
    """

    def __init__(self, model: SafeVLM | VerdictModel, *, query_id: int, mesh: Mesh | None = None,
                 rules: str = "data"):
        verdict = model if isinstance(model, VerdictModel) else VerdictModel(model)
        self.config = verdict.config
        self.mesh = mesh or sharding.make_mesh({"data": -1}, jax.local_devices())
        self.rules, self.query_id = rules, query_id
        self.graphdef, state = nnx.split(verdict)
        self.state = jax.device_put(state, sharding.state_shardings(state, self.mesh, rules))
        batch_axes = sharding.get_rules(rules).get("batch", ())
        self.batch_multiple = int(np.prod([self.mesh.shape[a] for a in batch_axes]))

    @classmethod
    def from_checkpoint(cls, directory: str, *, mesh: Mesh | None = None,
                        rules: str = "data") -> "Guard":
        """Loads the verdict parts of a checkpoint and its tokenizer's BOS (the query)."""
        import transformers

        mesh = mesh or sharding.make_mesh({"data": -1}, jax.local_devices())
        query = query_id(transformers.AutoTokenizer.from_pretrained(directory))
        return cls(load_verdict_model(directory, mesh, rules), query_id=query, mesh=mesh, rules=rules)

    def __call__(self, pixel_values: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """pixel_values [B, H, W, 3] f32 -> level_probs [B, 4] and type_probs [B, 7] as float32
        numpy (NaN rows where the head's output is not finite). The batch is padded
        (repeating row 0) to a multiple of the data-parallel devices, and to `pad_to` rows if
        given (one shape, one compile)."""
        b = pixel_values.shape[0]
        rows = max(b, pad_to or 0)
        rows = -(-rows // self.batch_multiple) * self.batch_multiple
        inputs = [pad_rows(np.asarray(pixel_values, np.float32), rows), np.full(rows, self.query_id, np.int32)]
        inputs = [jax.device_put(a, sharding.data_sharding(self.mesh, self.rules, a.ndim)) for a in inputs]
        _, level, kind = verdict_program(self.graphdef, self.state, *inputs, verdict=True, mesh=self.mesh,
                                         rules=self.rules)
        return tuple(softmax(np.asarray(a)[:b]).astype(np.float32) for a in (level, kind))
