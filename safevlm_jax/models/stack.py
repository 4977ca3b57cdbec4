"""A stack of identical layers: a Python list, or one module with a leading `layers` axis
that `nnx.scan` runs (so 32/40-layer models compile one layer, not all of them).

`stack_state` turns per-layer parameters into the scanned layout (the checkpoint reader
converts stored layouts itself, in `safevlm_jax/checkpoint/io.py`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from safevlm_jax.config import LAYER_INPUT, REMAT_POLICIES

LAYER_AXIS = "layers"



def make_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, scan: bool,
                rngs: nnx.Rngs):
    """`num_layers` layers from `make_layer(rngs)`: an `nnx.List`, or (scan) one module whose
    parameters have a leading [num_layers] axis named `layers`."""
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
    def create(r):
        return make_layer(r)

    return create(rngs)


def apply_layers(layers, carry, xs, body: Callable, *, scan: bool, remat_policy: str = "none",
                 num_layers: int | None = None):
    """Runs `body(layer, carry, x_i) -> (carry, y_i)` over the first `num_layers` layers.

    `xs` is None, a pytree whose leaves have a leading layer axis, or a Python list with one
    pytree per layer (e.g. a KV cache kept as one buffer per layer, so an unrolled stack reads
    each where it lies); `ys` come back in the same form. Remat (jax.checkpoint) wraps each
    layer when `remat_policy` is not "none".
    """
    per_layer = isinstance(xs, list)
    fn = body
    if remat_policy != "none":
        def named(layer, c, x):  # the input by name, which a policy may save elsewhere (offload)
            return body(layer, jax.tree.map(lambda a: checkpoint_name(a, LAYER_INPUT), c), x)

        fn = nnx.remat(named, policy=REMAT_POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        if num_layers is not None:
            layers = _first_layers(layers, num_layers)

        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0),
                  transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
        def step(layer, c, x):
            return fn(layer, c, x)

        carry, ys = step(layers, carry, _stack(xs) if per_layer else xs)
        if per_layer and ys is not None:
            ys = [jax.tree.map(lambda a: a[i], ys) for i in range(len(xs))]
        return carry, ys
    ys = []
    for i, layer in enumerate(list(layers)[:num_layers]):
        x = xs[i] if per_layer else None if xs is None else jax.tree.map(lambda a: a[i], xs)
        carry, y = fn(layer, carry, x)
        ys.append(y)
    if all(y is None for y in ys):
        return carry, None
    return carry, ys if per_layer else _stack(ys)


def _stack(trees: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _first_layers(stacked, n: int):
    """The first `n` layers of a scanned stack, as a scanned stack (a view for tracing)."""
    graphdef, state = nnx.split(stacked)
    state = jax.tree.map(lambda v: v[:n], state)
    return nnx.merge(graphdef, state)


def stack_state(flat: dict[tuple, Any], list_name: str = "layers") -> dict[tuple, Any]:
    """Unscanned flat params {(..., 'layers', i, *rest): a} -> scanned {(..., 'layers', *rest): stack}."""
    groups: dict[tuple, dict[int, Any]] = {}
    out = {}
    for path, value in flat.items():
        idx = _layer_index(path, list_name)
        if idx is None:
            out[path] = value
            continue
        key = path[:idx + 1] + path[idx + 2:]
        groups.setdefault(key, {})[path[idx + 1]] = value
    for key, per_layer in groups.items():
        n = len(per_layer)
        if sorted(per_layer) != list(range(n)):
            raise ValueError(f"layers of {'/'.join(map(str, key))} are not 0..{n - 1}: {sorted(per_layer)}")
        out[key] = jnp.stack([per_layer[i] for i in range(n)])
    return out


def _layer_index(path: tuple, list_name: str) -> int | None:
    for i in range(len(path) - 1):
        if path[i] == list_name and isinstance(path[i + 1], int):
            return i
    return None
