"""Our checkpoint format: any mesh to any mesh, scanned <-> unscanned, partial restore,
atomic writes, and a config that does not match the weights is refused by name."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from safevlm_jax import sharding
from safevlm_jax.checkpoint import format as checkpoint
from safevlm_jax.checkpoint.format import load_checkpoint, restore_params, save_checkpoint
from safevlm_jax.checkpoint.io import flat_values


@pytest.fixture(scope="module")
def saved(tiny_config, tmp_path_factory):
    """A tiny model (random values, no init compiles) saved from 8 devices (fsdp), and its
    parameters on the host."""
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                         nnx.state(checkpoint.abstract_model(tiny_config), nnx.Param))
    state = jax.device_put(state, sharding.state_shardings(state, sharding.make_mesh({"fsdp": 8}), "fsdp"))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    save_checkpoint(path, state, tiny_config)
    return path, {k: np.asarray(v) for k, v in flat_values(state).items()}


def _unscanned(model):
    from safevlm_jax.checkpoint.io import layer_key, unstacked_shapes

    flat = {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}
    out = {}
    for key in unstacked_shapes({k: v.shape for k, v in flat.items()}):
        split = layer_key(key)
        out[key] = flat[key] if key in flat else flat[split[0]][split[1]]
    return out


@pytest.mark.parametrize("devices,shape,rules,scan", [
    (1, {"fsdp": 1}, "fsdp", False),
    (4, {"fsdp": 2, "tensor": 2}, "fsdp_tensor", True),
])
def test_saved_on_8_devices_restores_exactly_on_other_meshes_and_layouts(saved, devices, shape, rules, scan):
    path, expected = saved
    mesh = sharding.make_mesh(shape, jax.devices()[:devices])
    config, model = load_checkpoint(path, mesh, rules, scan_layers=scan)
    assert config.scan_layers == scan
    got = _unscanned(model)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    state = nnx.state(model, nnx.Param)
    want = sharding.state_shardings(state, mesh, rules)
    for (p, v), (_, s) in zip(nnx.to_flat_state(state), nnx.to_flat_state(want)):
        assert v.get_value().sharding.is_equivalent_to(s.get_value(), v.get_value().ndim), p


def test_scanned_checkpoint_loads_unscanned(saved, tmp_path):
    path, expected = saved
    config, scanned = load_checkpoint(path, scan_layers=True)
    save_checkpoint(str(tmp_path / "scanned"), scanned, config)
    _, unscanned = load_checkpoint(str(tmp_path / "scanned"), scan_layers=False)
    got = _unscanned(unscanned)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_restore_params_restores_a_subtree_and_names_missing_keys(saved, tiny_config):
    path, expected = saved
    abstract = nnx.state(checkpoint.abstract_model(tiny_config.replace(scan_layers=True)), nnx.Param)
    part = restore_params(path, abstract["multi_modal_projector"], prefix="multi_modal_projector/")
    assert flat_values(part).keys() == {"linear_1/kernel", "linear_1/bias", "linear_2/kernel", "linear_2/bias"}
    np.testing.assert_array_equal(part["linear_1"]["kernel"][...], expected["multi_modal_projector/linear_1/kernel"])
    with_lora = nnx.state(checkpoint.abstract_model(
        tiny_config.replace(lora=tiny_config.lora.__class__(rank=2))), nnx.Param)
    with pytest.raises(ValueError, match=r"missing \[.*layers/0/mlp/down_proj/lora/lora_a"):
        restore_params(path, with_lora)


def test_config_that_does_not_match_the_weights_is_refused(saved, tmp_path):
    path, _ = saved
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["text"]["intermediate_size"] = 96
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"gate_proj/kernel: expected \(64, 96\), got \(64, 128\)"):
        load_checkpoint(bad)


def test_existing_directory_is_refused_unless_overwrite(saved, tiny_config):
    path, _ = saved
    _, model = load_checkpoint(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(path, model, tiny_config)
    save_checkpoint(path, model, tiny_config, overwrite=True)
    load_checkpoint(path)


def test_crash_mid_write_leaves_no_partial_checkpoint(saved, tiny_config, tmp_path, monkeypatch):
    path, _ = saved
    _, model = load_checkpoint(path)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while writing config.json")

    monkeypatch.setattr(type(tiny_config), "save", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        save_checkpoint(str(tmp_path / "new"), model, tiny_config)
    assert os.listdir(tmp_path) == []


def test_template_and_query_token_round_trip_through_the_checkpoint(saved, tiny_config, tmp_path):
    """config.json records the conversation template and SafetyConfig.query_token; a
    checkpoint without a template (older ones) reads as LLaVA-1.5's v1."""
    import dataclasses

    from safevlm_jax.data.template import TEMPLATES, VICUNA_SYSTEM

    path, _ = saved
    _, model = load_checkpoint(path)
    config = tiny_config.replace(safety=dataclasses.replace(tiny_config.safety, query_token="pad"))
    out = save_checkpoint(str(tmp_path / "psa"), nnx.state(model, nnx.Param), config, template="psa")
    assert checkpoint.load_config(out) == config and checkpoint.load_config(out).safety.query_token == "pad"
    assert checkpoint.load_template(out) == TEMPLATES["psa"]
    with open(os.path.join(out, "config.json")) as f:
        data = json.load(f)
    del data["conversation_template"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(data, f)
    assert checkpoint.load_template(out) == TEMPLATES["v1"] and TEMPLATES["v1"].system == VICUNA_SYSTEM
    data["conversation_template"] = {"name": "x"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="conversation_template: a conversation template needs"):
        checkpoint.load_template(out)


def test_urls_are_refused_with_the_mount_to_use_instead(saved, tiny_config, tmp_path):
    from configs.stage1 import get_config
    from safevlm_jax.train.loop import train

    path, _ = saved
    _, model = load_checkpoint(path)
    with pytest.raises(ValueError, match="gcsfuse"):
        save_checkpoint("gs://bucket/ckpt", model, tiny_config)
    with pytest.raises(ValueError, match="gcsfuse"):
        load_checkpoint("gs://bucket/ckpt")
    cfg = get_config("tiny")
    cfg.init_from = "gs://bucket/llava"
    with pytest.raises(ValueError, match="--config.init_from"):  # before any data or compile
        train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
