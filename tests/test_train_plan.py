"""The AOT memory plan compiles the tiny stage-2 step for a mesh of 8 and prints its table."""

from configs.stage2 import get_config
from safevlm_jax import plan


def test_plan_prints_per_device_table_for_mesh_of_8(capsys):
    assert plan.print_report(get_config("tiny"), plan.parse_mesh("fsdp=8"), None, 1)
    out = capsys.readouterr().out
    for row in ("trainable_params", "frozen_params", "optimizer_state", "temp (activations", "total"):
        assert row in out
    assert "fits 1 GiB: yes" in out


def test_parse_mesh():
    assert plan.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert get_config("tiny").model.lora.rank > 0
