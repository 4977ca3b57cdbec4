"""Sharding refuses what it cannot do: an axis the mesh does not divide is an error naming the
parameter, the axis and the sizes, or, when chosen explicitly, a logged replication."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from safevlm_jax import sharding


class Heads(nnx.Module):
    def __init__(self, kv_heads: int):
        self.k = nnx.Param(jnp.zeros((64, kv_heads, 16)), out_sharding=("embed", "kv", None),
                              eager_sharding=False)


def test_indivisible_parameter_axis_is_an_error_naming_parameter_axis_and_sizes():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    state = nnx.state(Heads(kv_heads=2))
    with pytest.raises(ValueError) as e:
        sharding.state_shardings(state, mesh, "fsdp_tensor")
    message = str(e.value)
    assert "parameter k" in message and "'kv'" in message and "size 2" in message
    assert "('tensor',)" in message and "total size 4" in message


def test_explicit_replicate_fallback_replicates_only_that_axis_and_warns(caplog):
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    state = nnx.state(Heads(kv_heads=2))
    with caplog.at_level("WARNING"):
        shardings = sharding.state_shardings(state, mesh, "fsdp_tensor", fallback="replicate")
    assert shardings["k"].get_value().spec == jax.sharding.PartitionSpec("fsdp", None, None)
    assert any("replicated instead" in r.getMessage() for r in caplog.records)


def test_divisible_axes_shard_as_the_rules_say():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    spec = sharding.state_shardings(nnx.state(Heads(kv_heads=8)), mesh, "fsdp_tensor")["k"].get_value().spec
    assert spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_indivisible_activation_constraint_is_an_error():
    mesh = sharding.make_mesh({"data": 8})
    with sharding.use_rules(mesh, "data"), pytest.raises(ValueError, match="activation.*size 3"):
        jax.jit(lambda x: sharding.constrain(x, ("batch", None)))(jnp.zeros((3, 4)))


def test_unknown_fallback_is_refused():
    with pytest.raises(ValueError, match="fallback"):
        sharding.logical_to_spec(("embed",), {"embed": ("fsdp",)}, fallback="ignore")
