"""The plan command on fake CPU devices (today's `cpu:N` target) and its target names; the TPU
compiler's plans are tested in test_tpu_compile.py."""

import importlib.util

import jax

import pytest

from configs.stage2 import get_config
from safevlm_jax import plan
from safevlm_jax.plan import targets


def test_plan_prints_per_device_table_for_a_cpu_mesh_of_8(capsys):
    cfg = get_config("tiny")
    cfg.data.max_length, cfg.model.scan_layers = 64, True
    p = plan.make_plan(cfg, targets.get_target("cpu:8"), "train", {"fsdp": 8}, hbm_gib=1)
    assert p.fits and p.target.chip is None and p.bound_s is None
    print(plan.format_plan(p))
    out = capsys.readouterr().out
    for row in ("trainable params", "frozen params", "optimizer state", "temporaries", "total", "fits 1 GiB: yes",
                "FLOPs, loop-corrected", "compiled / analytic"):
        assert row in out
    assert "roofline" not in out  # no published figures for a CPU


@pytest.mark.parametrize("name,topology", [("v5e-8", "v5e:2x4"), ("v5litepod-16", "v5e:4x4"), ("v5p-64", "v5p:2x4x4"),
                                           ("v5p-8", "v5p:2x2x1"), ("v6e-8", "v6e:2x4"), ("v5e:2x4", "v5e:2x4"),
                                           ("cpu:8", None)])
def test_slice_names_map_to_topologies(name, topology):
    assert targets.topology_name(name) == topology
    if topology:
        assert targets.topology_name(targets.accelerator_type(topology)) == topology


@pytest.mark.parametrize("name", ["v5e-3", "v5p-63", "tpu", "v9z-8"])
def test_unknown_targets_are_refused_with_the_forms_that_work(name):
    with pytest.raises(ValueError, match="--target"):
        targets.topology_name(name)


def test_a_tpu_target_without_libtpu_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(ValueError, match=r'pip install -e "\.\[tpu\]"'):
        targets.get_target("v5e-8")


def test_a_program_the_compiler_refuses_for_want_of_hbm_is_a_plan_that_does_not_fit(monkeypatch):
    """The TPU compiler stops at its own HBM check (what the plan prints instead of a traceback)."""
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(22.15G) exceeds available HBM (15.75G).")

    class Refused:
        def compile(self):
            raise jax.errors.JaxRuntimeError(message)

    built = plan.programs.Program(Refused(), {"params": plan.GIB}, 1e15, 1e15, "a big step")
    monkeypatch.setattr(plan.programs, "train", lambda *a: built)
    p = plan.make_plan(get_config("tiny"), targets.get_target("cpu:8"), "train", {"fsdp": 8})
    assert not p.fits and p.flops is None and p.bound_s is None
    assert p.memory["temporaries"] == int(22.15 * plan.GIB) and p.memory["total"] > 23 * plan.GIB
    assert "refused" in plan.format_plan(p)
