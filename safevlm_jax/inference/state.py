"""The decode state: everything a decode step reads and writes, one pytree (MaxText's
`DecodeState`), rows = requests.

    state = new_state(config, rows=8, length=2048, mesh=mesh)   # every row free (done)
    state = programs.insert_program(prefix, keep, tokens, state, rows, ...)   # requests into rows
    state, tokens = programs.step_program(graphdef, params, state, eos, rows=8, length=2048)

Its arrays carry logical axes (`logical_axes`): on a mesh the rows follow `data` and the KV
cache's kv heads `tensor` (`sharding.RULE_SETS["inference"]`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.inference.logits import RowLogits
from safevlm_jax.inference.sampling import RowSampling
from safevlm_jax.models.kv_cache import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """cache: the KV cache, a row per request (each row's position is its index); tokens [B]
    int32: each row's last sampled token (or its prompt's last, not yet sampled after), the
    next step's input; steps [B] int32: tokens it sampled so far (its RNG counter); limit [B]
    int32: its max tokens; done [B] bool: nothing to decode (EOS, limit, released, or a free
    row); sampling: its rule; row_logits: its penalties and logprobs (`logits.RowLogits`);
    history [B, slots] int32: its answer tokens so far (the penalties' counts)."""

    cache: KVCache
    tokens: jax.Array
    steps: jax.Array
    limit: jax.Array
    done: jax.Array
    sampling: RowSampling
    row_logits: RowLogits
    history: jax.Array

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def view(self, rows: int, length: int) -> "DecodeState":
        """Rows 0..rows-1 and cache slots 0..length-1 (`KVCache.view`; an answer is shorter
        than its row's slots, so its history too)."""
        return jax.tree.map(lambda a: a[:rows], dataclasses.replace(self, cache=None, history=None)).replace(
            cache=self.cache.view(rows, length), history=self.history[:rows, :length])

    def merge_view(self, view: "DecodeState") -> "DecodeState":
        rows, length = view.history.shape
        merged = jax.tree.map(lambda a, b: a.at[:rows].set(b), dataclasses.replace(self, cache=None, history=None),
                              dataclasses.replace(view, cache=None, history=None))
        return merged.replace(cache=self.cache.merge_view(view.cache),
                              history=self.history.at[:rows, :length].set(view.history))

    def replace(self, **kw) -> "DecodeState":
        return dataclasses.replace(self, **kw)

    def logical_axes(self) -> "DecodeState":
        row = ("cache_batch",)
        return DecodeState(self.cache.logical_axes(), row, row, row, row, self.sampling.logical_axes(),
                           self.row_logits.logical_axes(), ("cache_batch", None))

    def constrain(self) -> "DecodeState":
        """Every array constrained to its logical axes (identity outside `sharding.use_rules`)."""
        return jax.tree.map(sharding.constrain, self, self.logical_axes())


def cache_dtype(config: ModelConfig, platform: str | None = None):
    """The KV cache's dtype for programs on `platform` ("cpu", "tpu", ...; default: JAX's
    default backend): the compute dtype, but f32 on CPU, where XLA has no fast bf16 batched
    dot and converted every layer's whole bf16 cache to f32 at every decode step; an f32
    cache is read as it lies (docs/performance.md). Decided by where the programs run, not by
    the host that traces them (an AOT compile for a TPU on a CPU host gets the TPU's)."""
    return jnp.float32 if (platform or jax.default_backend()) == "cpu" else config.compute_dtype


def empty_cache(config: ModelConfig, rows: int, length: int, merged: bool, platform: str | None = None) -> KVCache:
    """`merged`: [rows * kv_heads, ...] buffers, for one device (`models.kv_cache`);
    `platform`: where its programs run (`cache_dtype`)."""
    t = config.text
    return KVCache.init(t.num_hidden_layers, rows, t.num_key_value_heads, length, t.head_dim,
                        cache_dtype(config, platform), merged)


def new_state(config: ModelConfig, rows: int, length: int, mesh: Mesh | None = None,
              rules: str = "inference", device=None) -> DecodeState:
    """`rows` free rows of `length` cache slots, placed by `rules` on `mesh` (an axis it
    cannot divide is an error naming the sizes), else, its cache merged, on `device` (the
    model's: a state the programs hand back is committed there, so a fresh one must be too,
    or the second call compiles again)."""
    zeros = lambda: jnp.zeros(rows, jnp.int32)
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    state = DecodeState(empty_cache(config, rows, length, mesh is None, platform), zeros(), zeros(), zeros(),
                        jnp.ones(rows, jnp.bool_),
                        jax.tree.map(jnp.asarray, RowSampling.greedy(rows)),
                        jax.tree.map(jnp.asarray, RowLogits.plain(rows)), jnp.zeros((rows, length), jnp.int32))
    return place(state, mesh, rules, device)


def place(tree, mesh: Mesh | None, rules, device=None):
    """A DecodeState or KVCache on `mesh` by its logical axes under `rules` (a name or a
    mapping), or on `device`."""
    if mesh is not None:
        return jax.device_put(tree, sharding.array_shardings(tree, tree.logical_axes(), mesh, rules,
                                                             type(tree).__name__))
    return jax.device_put(tree, device) if device is not None else tree
