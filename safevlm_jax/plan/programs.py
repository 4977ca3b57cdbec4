"""The programs a plan compiles, from abstract inputs with their shardings (nothing allocated).

    train    the train step (`train.step`): state + one global batch, `accumulation` microbatches
    encode   the image encode + safety verdict of a batch (`inference.programs.verdict_program`)
    prefill  one prompt of a length bucket into a prefix cache (`inference.programs.prefill_program`)
    decode   one decode step of every row of a DecodeState (`inference.programs.step_program`)

Each is lowered under `sharding.use_rules(mesh, rules)` (activation constraints and splash
attention's `shard_map` follow the rules) and compiled for the mesh's devices: compile-only
TPU devices give the TPU compiler's program. The serving programs read the model in its
compute dtype (bf16 weights at 7B) and a KV cache of `inference.state.cache_dtype` for the
mesh's platform, placed by its logical axes (rows over `data`, kv heads over `tensor` under
the `inference` rules).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from safevlm_jax import sharding
from safevlm_jax.config import ModelConfig
from safevlm_jax.plan import analytic

PROGRAMS = ("train", "encode", "prefill", "decode")


@dataclasses.dataclass
class Program:
    """lowered: the program lowered for the mesh (`.compile()` runs the target's compiler);
    inputs: per-device bytes of its named inputs;
    analytic_flops: `analytic`'s count for the whole program (all devices); model_flops: the
    FLOPs MFU counts (training: `train.metrics.step_flops`; serving: `analytic_flops`);
    shape: what one execution processes, in words."""

    lowered: jax.stages.Lowered
    inputs: dict[str, int]
    analytic_flops: float
    model_flops: float
    shape: str


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def _with(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _replicated(mesh: Mesh, tree):
    return _with(tree, jax.tree.map(lambda _: NamedSharding(mesh, P()), tree))


def train(cfg, mesh: Mesh, rules: str) -> Program:
    """The train step of training config `cfg` (batch_per_device x devices x accumulation rows
    of `data.max_length` tokens)."""
    from safevlm_jax.train.loop import model_factory
    from safevlm_jax.train.metrics import step_flops
    from safevlm_jax.train.optimizer import make_optimizer
    from safevlm_jax.train.state import abstract_state
    from safevlm_jax.train.step import batch_shardings, jit_train_step, make_train_step

    mcfg = ModelConfig.from_dict(cfg.model)
    optimizer, schedule = make_optimizer(cfg.optimizer, 1000)
    graphdef, abstract = abstract_state(model_factory(mcfg, cfg.seed), cfg, optimizer)
    rows = cfg.batch_per_device * mesh.size * cfg.accumulation
    t, size = cfg.data.max_length, mcfg.vision.image_size
    batch = {k: jax.ShapeDtypeStruct((rows, t), np.int32) for k in ("input_ids", "labels", "attention_mask")}
    batch["pixel_values"] = jax.ShapeDtypeStruct((rows, size, size, 3), np.float32)
    batch.update({k: jax.ShapeDtypeStruct((rows,), np.int32) for k in ("safe_level", "safe_type")})
    step = make_train_step(graphdef, optimizer, schedule, accumulation=cfg.accumulation,
                           head_weight=cfg.head_weight)
    fn, state_sh, _ = jit_train_step(step, abstract, batch, mesh, rules, cfg.sharding_fallback)
    state_in = _with(abstract, state_sh)
    batch_in = _with(batch, batch_shardings(batch, mesh, rules))
    lowered = fn.lower(state_in, batch_in)
    trained_llm = sum(v.get_value().size for p, v in nnx.to_flat_state(abstract.trainable)
                      if p[0] == "language_model")
    return Program(
        lowered,
        {"trainable params": per_device_bytes(state_in.trainable), "frozen params": per_device_bytes(state_in.frozen),
         "optimizer state": per_device_bytes(state_in.opt_state), "batch": per_device_bytes(batch_in)},
        analytic.train_step(mcfg, rows, t, trained_llm),
        step_flops(abstract.trainable, abstract.frozen, rows * t, rows, mcfg.vision.num_patches),
        f"batch {cfg.batch_per_device}/device x {mesh.size} devices x accumulation {cfg.accumulation}, length {t}")


def serving_model(cfg) -> ModelConfig:
    """The model a server holds: the training config's, with weights in the compute dtype and
    its layers unrolled, no remat: the KV cache is one buffer per layer, which a scanned stack
    would stack and unstack at every step (copies of the whole cache)."""
    mcfg = ModelConfig.from_dict(cfg.model)
    return mcfg.replace(param_dtype=mcfg.dtype, scan_layers=False, remat_policy="none")


def _model_state(mcfg: ModelConfig, mesh: Mesh, rules: str, fallback: str):
    from safevlm_jax.models.safevlm import SafeVLM

    model = nnx.eval_shape(lambda: SafeVLM(mcfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    return graphdef, _with(state, sharding.state_shardings(state, mesh, rules, fallback))


def encode(cfg, mesh: Mesh, rules: str, batch: int) -> Program:
    """CLIP features and the safety verdict of `batch` images (`verdict_program`)."""
    from safevlm_jax.inference import programs

    mcfg = serving_model(cfg)
    graphdef, state = _model_state(mcfg, mesh, rules, cfg.sharding_fallback)
    size = mcfg.vision.image_size
    pixels = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=sharding.data_sharding(mesh, rules, 4))
    query = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.data_sharding(mesh, rules, 1))
    lowered = programs.verdict_program.lower(graphdef, state, pixels, query, verdict=True, mesh=mesh, rules=rules)
    flops = analytic.vision_forward(mcfg, batch)
    return Program(lowered, {"params": per_device_bytes(state), "images": per_device_bytes(pixels)},
                   flops, flops, f"{batch} images of {size} px")


def _placed(tree, mesh: Mesh, rules):
    """Abstract arrays of a DecodeState / KVCache placed by their logical axes."""
    return _with(tree, sharding.array_shardings(tree, tree.logical_axes(), mesh, rules, type(tree).__name__))


def prefill(cfg, mesh: Mesh, rules: str, length: int) -> Program:
    """One prompt of `length` tokens (a bucket) with its image into an empty one-row prefix
    cache of `length` slots (`prefill_program`; `insert_program` then copies it into a row)."""
    from safevlm_jax.inference import programs
    from safevlm_jax.inference.sampling import RowSampling
    from safevlm_jax.inference.state import empty_cache

    mcfg = serving_model(cfg)
    graphdef, state = _model_state(mcfg, mesh, rules, cfg.sharding_fallback)
    platform = mesh.devices.flat[0].platform
    prefix = _placed(jax.eval_shape(lambda: empty_cache(mcfg, 1, length, False, platform)), mesh,
                     sharding.without(rules, programs.ROWS))  # a prompt's rows stay whole, as the runner's
    rep = lambda shape, dtype: _replicated(mesh, jax.ShapeDtypeStruct(shape, dtype))  # noqa: E731
    features = (rep((1, mcfg.num_image_features, mcfg.vision.hidden_size), mcfg.compute_dtype),)
    sampling = _replicated(mesh, jax.eval_shape(lambda: jax.tree.map(jnp.asarray, RowSampling.greedy(1))))
    lowered = programs.prefill_program.lower(graphdef, state, prefix, rep((1, length), jnp.int32),
                                             rep((1,), jnp.int32), rep((1,), jnp.int32), features, sampling,
                                             use_safety=True, mesh=mesh, rules=rules)
    flops = analytic.llm_forward(mcfg, 1, length, (length + 1) / 2, 1)
    return Program(lowered, {"params": per_device_bytes(state), "kv cache": per_device_bytes(prefix)},
                   flops, flops, f"1 prompt of {length} tokens into a {length}-slot prefix cache")


def decode(cfg, mesh: Mesh, rules: str, slots: int, max_len: int) -> Program:
    """One decode step (`step_program`) of a `slots`-row DecodeState of `max_len` cache
    slots, every row reading all of them."""
    from safevlm_jax.inference import programs
    from safevlm_jax.inference.state import new_state

    mcfg = serving_model(cfg)
    graphdef, state = _model_state(mcfg, mesh, rules, cfg.sharding_fallback)
    decode_state = _placed(jax.eval_shape(lambda: new_state(mcfg, slots, max_len, mesh, rules)), mesh, rules)
    eos = _replicated(mesh, jax.ShapeDtypeStruct((), jnp.int32))
    lowered = programs.step_program.lower(graphdef, state, decode_state, eos, rows=slots, length=max_len,
                                          mesh=mesh, rules=rules)
    flops = analytic.llm_forward(mcfg, slots, 1, max_len, 1)
    return Program(lowered, {"params": per_device_bytes(state), "kv cache": per_device_bytes(decode_state.cache)},
                   flops, flops, f"1 token for each of {slots} rows of a {max_len}-slot cache")
