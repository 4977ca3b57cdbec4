"""Logical axis names -> mesh axes (the only place that knows mesh axis names).

Model code annotates parameters (`out_sharding` metadata of `nnx.Param`) and activations
(`constrain(x, ("batch", "length", "embed"))`) with *logical* names. A rule set maps each
logical name to zero, one or several mesh axes (`data`, `fsdp`, `tensor`), as in MaxText's
`logical_axis_rules`. Activation constraints are active only inside `use_rules(mesh, rules)`,
so the same model code runs unsharded on one device and sharded on a mesh.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# the tensor-parallel split: attention heads, MLP and vocabulary over `tensor`
_TENSOR = {"mlp": ("tensor",), "heads": ("tensor",), "kv": ("tensor",), "vocab": ("tensor",),
           "act_heads": ("tensor",)}

# name -> mesh axes. A logical name missing from a rule set is replicated.
RULE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "replicated": {},
    "data": {"batch": ("data",)},
    # lora_rank: a LoRA factor's rank axis, so that the factor whose other axis is not
    # `embed` (lora_b of q/k/v/gate/up, lora_a of o/down) is sharded too.
    "fsdp": {"batch": ("data", "fsdp"), "embed": ("fsdp",), "lora_rank": ("fsdp",)},
    "fsdp_tensor": {"batch": ("data", "fsdp"), "embed": ("fsdp",), "lora_rank": ("fsdp",), **_TENSOR},
    # sampling and serving: weights as fsdp_tensor's; the decode batch, and the KV cache's
    # rows, over `data` only (a prompt's prefill is one row); the cache's kv heads over `tensor`
    "inference": {"batch": ("data",), "embed": ("fsdp",), "lora_rank": ("fsdp",), **_TENSOR,
                  "cache_batch": ("data",), "cache_kv": ("tensor",)},
}

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("safevlm_sharding", default=None)


def get_rules(rules: str | Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """A rule set by name (see RULE_SETS) or given as a mapping."""
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ValueError(f"unknown sharding rule set {rules!r}; known: {sorted(RULE_SETS)}")
        return RULE_SETS[rules]
    return {k: tuple([v] if isinstance(v, str) else v) for k, v in rules.items()}


def parse_mesh(text: str) -> dict[str, int]:
    """A `--mesh` flag: 'fsdp=64' / 'data=2,tensor=4' -> {'fsdp': 64} / {'data': 2, 'tensor': 4}."""
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(",") if part)}
    except ValueError as e:
        raise ValueError(f"--mesh {text!r}: expected AXIS=SIZE[,AXIS=SIZE...]") from e


def without(rules: str | Mapping[str, Sequence[str]], names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """A rule set with the logical axes `names` replicated (e.g. a prompt's own batch of one)."""
    return {k: v for k, v in get_rules(rules).items() if k not in set(names)}


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh; axes not given are 1, one axis may be -1 (the rest)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = dict(shape or {"fsdp": -1})
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} "
                         f"devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


FALLBACKS = ("error", "replicate")  # what to do with an axis the mesh axes do not divide


def logical_to_spec(names: Iterable[str | None], rules: Mapping[str, Sequence[str]],
                    mesh: Mesh | None = None, shape: Sequence[int] | None = None, *,
                    fallback: str = "error", what: str = "array") -> P:
    """PartitionSpec for logical `names`; a mesh axis is used at most once per array.

    A dimension whose size the mesh axes its rule names do not divide (e.g. 8 kv heads over
    tensor=16) is an error naming `what`, the logical axis and the sizes (MaxText refuses
    such layouts too), unless `fallback="replicate"` was chosen: then that dimension is
    replicated and a warning says so.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"sharding fallback must be one of {FALLBACKS}, got {fallback!r}")
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
        if mesh is not None:
            axes = tuple(a for a in axes if mesh.shape[a] > 1)
            ways = int(np.prod([mesh.shape[a] for a in axes]))
            if shape is not None and axes and shape[i] % ways:
                detail = (f"{what}: dimension {i} ({name!r}, size {shape[i]}) does not divide over mesh "
                          f"axes {axes} of total size {ways} (mesh {dict(mesh.shape)})")
                if fallback == "error":
                    raise ValueError(f"{detail}; choose a mesh or rule set that divides it, or the "
                                     f"explicit fallback 'replicate' (config: sharding_fallback)")
                logging.warning("%s: replicated instead (sharding_fallback='replicate')", detail)
                axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Mapping[str, Sequence[str]], fallback: str = "error"):
    """Activates activation constraints (while tracing) for `mesh` under `rules`; `fallback`
    as in `logical_to_spec`."""
    token = _ACTIVE.set((mesh, get_rules(rules), fallback))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names; identity outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules, fallback = active
    spec = logical_to_spec(names, rules, mesh, x.shape, fallback=fallback,
                           what=f"activation {tuple(names)} of shape {tuple(x.shape)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def shard_map(fn, in_names: Sequence[Sequence[str | None]], *args):
    """`fn(*args)` run on each device's shards when a mesh is active (`use_rules`): argument i
    is split along the mesh axes its logical `in_names[i]` map to, and the output (one array)
    is put together as the first argument is split. Outside `use_rules`, just `fn(*args)`.
    For kernels that take local arrays (Pallas); model code names only logical axes.
    A logical name must split every argument that has it alike (a kernel pairing query and
    key heads needs both cut the same way): otherwise an error names the sizes."""
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules, fallback = active
    specs = tuple(logical_to_spec(names, rules, mesh, x.shape, fallback=fallback,
                                  what=f"shard_map argument {tuple(names)} of shape {tuple(x.shape)}")
                  for names, x in zip(in_names, args))
    seen: dict[str, tuple] = {}
    for names, spec, x in zip(in_names, specs, args):
        for name, axes, size in zip(names, spec, x.shape):
            if name is not None and seen.setdefault(name, (axes, size))[0] != axes:
                raise ValueError(f"shard_map: logical axis {name!r} splits as {seen[name][0]} for size "
                                 f"{seen[name][1]} but as {axes} for size {size} (mesh {dict(mesh.shape)}); "
                                 f"choose a mesh or rule set that divides both")
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=specs[0], check_vma=False)(*args)


def state_shardings(tree, mesh: Mesh, rules: str | Mapping[str, Sequence[str]], fallback: str = "error"):
    """NamedShardings for a tree of nnx Variables (an nnx State, abstract or not), sharded by
    their logical axes, possibly mixed with plain arrays, which are replicated (e.g. a train
    state: Adam moments are Variables and follow their parameters; step and RNG replicate).
    An axis the mesh cannot divide is an error naming the parameter (`logical_to_spec`)."""
    rules = get_rules(rules)

    def one(path, x):
        if not isinstance(x, nnx.Variable):
            return NamedSharding(mesh, P())
        shape = x.get_value().shape
        names = x.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = logical_to_spec(names, rules, mesh, shape, fallback=fallback,
                               what=f"parameter {jax.tree_util.keystr(path, simple=True, separator='/')}")
        return x.replace(NamedSharding(mesh, spec))

    return jax.tree.map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def array_shardings(tree, axes, mesh: Mesh, rules: str | Mapping[str, Sequence[str]], what: str = "array"):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) from a tree of the same
    structure whose leaves are their logical axis names (e.g. `KVCache.logical_axes()`); an
    axis the mesh cannot divide is an error naming `what`, the axis and the sizes."""
    rules = get_rules(rules)
    return jax.tree.map(lambda x, names: NamedSharding(mesh, logical_to_spec(
        names, rules, mesh, x.shape, what=f"{what} of shape {tuple(x.shape)}")), tree, axes)


def data_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the rule set's batch axes."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), get_rules(rules), mesh))
