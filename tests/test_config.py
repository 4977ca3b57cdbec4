"""Config: presets build, dicts round-trip, bad fields are rejected by name."""

import json

import pytest

from configs.model import PRESETS, get_config
from safevlm_jax.config import ModelConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_round_trips_through_dict_and_json(preset, tmp_path):
    cfg = ModelConfig.from_dict(get_config(preset).model)
    path = tmp_path / "config.json"
    cfg.save(str(path))
    assert ModelConfig.load(str(path)) == cfg


def test_unknown_field_is_rejected_by_name():
    d = ModelConfig().to_dict()
    d["text"]["hiden_size"] = 3
    with pytest.raises(ValueError, match="hiden_size"):
        ModelConfig.from_dict(d)


def test_safety_query_token_is_bos_or_pad():
    d = ModelConfig().to_dict()
    assert d["safety"]["query_token"] == "bos"
    d["safety"]["query_token"] = "pad"
    assert ModelConfig.from_dict(d).safety.query_token == "pad"
    d["safety"]["query_token"] = "cls"
    with pytest.raises(ValueError, match="query_token must be one of"):
        ModelConfig.from_dict(d)


def test_llava_7b_image_positions_follow_spec():
    cfg = ModelConfig.from_dict(get_config("llava_7b").model)
    assert cfg.num_image_features == 576
    assert cfg.num_image_tokens == 640
    assert cfg.abstractor_hidden_size == 1088


def test_from_hf_reads_sizes_from_llava_config(tmp_path):
    import transformers

    hf = transformers.LlavaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=28, patch_size=7),
        text_config=dict(model_type="llama", vocab_size=300, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-6, max_position_embeddings=128),
        image_token_index=299, pad_token_id=298)
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig.from_hf(str(tmp_path))
    assert cfg.text.num_key_value_heads == 2 and cfg.text.hidden_size == 48
    assert cfg.text.rms_norm_eps == 1e-6 and cfg.text.head_dim == 12
    assert cfg.vision.num_patches == 16 and cfg.image_token_index == 299
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava"


def test_hf_config_round_trip_is_exact(tiny_config):
    """`to_hf` is the inverse of `from_hf`: the round trip gives the same ModelConfig."""
    from safevlm_jax.config import ModelConfig

    for config in (tiny_config, tiny_config.replace(pad_token_id=-1)):
        back = ModelConfig.from_hf(config.to_hf(), safety=config.safety, lora=config.lora,
                                   param_dtype=config.param_dtype, dtype=config.dtype,
                                   scan_layers=config.scan_layers, remat_policy=config.remat_policy)
        assert back == config
