"""Every program compiled by the real TPU compiler on this CPU (libtpu's compile-only devices
for a v5e:2x2 slice, one per session): the tiny model's train step, encode, prefill and
decode. They take the TPU's choices, not the host's: splash attention (found by its kernel's
name: XLA's TPU compiler emits `tpu_custom_call`s of its own), no CPU FFI kernel, a bf16 KV
cache when the model computes in bf16, sharded by the `inference` rules. And the loop-corrected FLOP count of `plan.hlo_cost`
on a program of known FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from safevlm_jax import plan, sharding
from safevlm_jax.kernels import matvec
from safevlm_jax.plan import hlo_cost, targets

from train_helpers import tiny_train_config


@pytest.fixture(scope="session")
def v5e():
    return targets.get_target("v5e:2x2")


def config(**overrides):
    """The tiny stage-2 config laid out as the 7B one is (scanned, rematted layers), short rows."""
    return tiny_train_config(2, **{"data.max_length": 64, "model.scan_layers": True, "model.remat_policy": "full",
                                   **overrides})


def cache_parameters(hlo: str, shard: tuple[int, ...]) -> set[str]:
    """dtypes of the program's inputs shaped like one chip's shard of a KV cache buffer."""
    comps, entry = hlo_cost.parse(hlo)
    return {dt for i in comps[entry] if i.opcode == "parameter" for dt, dims in i.shapes if dims == shard}


def test_train_step_compiles_for_v5e_with_splash_no_cpu_kernel_and_layer_inputs_on_the_host(v5e):
    p = plan.make_plan(config(**{"model.remat_policy": "offload_layer_inputs"}), v5e, "train")
    for phase in ("fwd", "dq", "dkv"):  # "auto" took the TPU branch: the kernels of forward and backward
        assert f"splash_mha_{phase}_segmented" in p.hlo
    assert matvec.TARGET not in p.hlo
    assert not p.unknown_loops and p.flops > p.xla_flops  # the accumulation loop, counted twice
    assert 0 < p.memory["total"] < p.hbm_gib * plan.GIB and p.bound_s > 0 and 0 < p.mfu < 1
    assert p.host_bytes > 0 and "S(5)" in p.hlo  # the saved layer inputs live in pinned host memory


def test_encode_compiles_for_v5e(v5e):
    p = plan.make_plan(config(), v5e, "encode")
    assert "splash_mha_fwd" in p.hlo and p.memory["total"] > 0


@pytest.mark.parametrize("program", ["prefill", "decode"])
def test_serving_programs_compile_for_v5e_sharded_by_the_inference_rules_with_a_bf16_cache(v5e, program):
    """data=2 x tensor=2 under the `inference` rules: one chip holds half the decode rows (a
    prompt's prefix keeps its one row) and half the kv heads, in bf16 for a bf16 model."""
    cfg = config(**{"model.dtype": "bfloat16"})
    p = plan.make_plan(cfg, v5e, program, sharding.parse_mesh("data=2,tensor=2"), max_len=128, length=64)
    assert p.rules == "inference" and p.fits
    t = cfg.model.text
    kv, dh = t.num_key_value_heads // 2, t.hidden_size // t.num_attention_heads
    shard = (1, kv, 64, dh) if program == "prefill" else (8 // 2, kv, 128, dh)
    assert cache_parameters(p.hlo, shard) == {"bf16"}
    assert matvec.TARGET not in p.hlo


def test_the_same_decode_for_cpu_devices_keeps_an_f32_cache():
    cfg = config(**{"model.dtype": "bfloat16"})
    p = plan.make_plan(cfg, targets.get_target("cpu:4"), "decode", sharding.parse_mesh("data=2,tensor=2"), max_len=128)
    t = cfg.model.text
    shard = (4, t.num_key_value_heads // 2, 128, t.hidden_size // t.num_attention_heads)
    assert cache_parameters(p.hlo, shard) == {"f32"}


def test_loop_corrected_flops_count_every_iteration_of_nested_scans(v5e):
    """3 x 5 matmuls of [128, 256] x [256, 256] per chip: XLA counts one, the HLO walk all 15."""
    mesh = sharding.make_mesh({"fsdp": 4}, v5e.devices)

    def f(w, x):
        def outer(c, _):
            return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), c, w)[0], None
        return jax.lax.scan(outer, x, None, length=3)[0]

    w = jax.ShapeDtypeStruct((5, 256, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("fsdp")))
    compiled = jax.jit(f).lower(w, x).compile()
    once, corrected = hlo_cost.cost(compiled.as_text(), loop_bodies_once=True), hlo_cost.cost(compiled.as_text())
    one = 2 * 128 * 256 * 256
    assert once.flops == one and corrected.flops == 15 * one
    assert sorted(corrected.trip_counts.values()) == [3, 5]
    assert compiled.cost_analysis()["flops"] == pytest.approx(once.flops, rel=0.01)  # XLA's own rule, loop bodies once
    assert corrected.bytes > 5 * once.bytes  # the weights' slices and the carry, read in every iteration


def one_chip(v5e) -> NamedSharding:
    return NamedSharding(Mesh(np.array(v5e.devices[:1]), ("x",)), P())


def test_convolution_flops_count_only_the_window_taps_that_read_the_input(v5e):
    """A 3x3 'SAME' convolution over 8x8: per spatial dimension, 8 outputs x 3 taps less the 2
    that read padding = 22 (XLA's own count). XLA:TPU writes some dots as convolutions whose
    windows lie mostly in padding; counting every tap overcounted a 7B stage-1 step 6x."""
    x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.bfloat16, sharding=one_chip(v5e))
    w = jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.bfloat16, sharding=one_chip(v5e))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",  # noqa: E731
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    compiled = jax.jit(conv).lower(x, w).compile()
    assert "pad=1_1x1_1" in compiled.as_text()
    assert hlo_cost.cost(compiled.as_text()).flops == 2 * 32 * 16 * 22 * 22 == compiled.cost_analysis()["flops"]


def test_hbm_bytes_count_each_array_once_not_its_copy_in_vmem(v5e):
    """tanh(x @ y) * x, f32 [2048, 2048]: the TPU compiler prefetches y into VMEM (copy-start)
    and the product reads it there: HBM sees x and y read once and the result written once."""
    n = 2048
    x = jax.ShapeDtypeStruct((n, n), jnp.float32, sharding=one_chip(v5e))
    compiled = jax.jit(lambda x, y: jnp.tanh(x @ y) * x).lower(x, x).compile()
    text = compiled.as_text()
    assert "copy-start" in text and "S(1)}" in text  # a copy into memory space 1, VMEM
    assert hlo_cost.cost(text).bytes == 3 * 4 * n * n
