"""LoRA to peft (and merged), and the authors' safety modules in and out, bit for bit."""

import os

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from checkpoints_tools.export_hf import export_hf
from checkpoints_tools.import_hf import import_hf
from checkpoints_tools.import_safety import import_safety
from safevlm_jax.checkpoint.format import abstract_model, load_checkpoint, load_config, restore_params, save_checkpoint
from safevlm_jax.checkpoint.io import flat_values
from safevlm_jax.config import LoRAConfig
from tests.hf_llava import TINY_SAFETY, read_all_file, save_tiny_llava


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """An imported tiny LLaVA plus random LoRA factors (rank 4) on every LLM linear."""
    root = tmp_path_factory.mktemp("lora")
    save_tiny_llava(str(root / "hf"))
    base = import_hf(str(root / "hf"), str(root / "base"), safety=TINY_SAFETY, log=lambda *a: None)
    config = base.replace(lora=LoRAConfig(rank=4, alpha=8.0))
    params = nnx.state(abstract_model(config), nnx.Param)
    rng = np.random.default_rng(0)
    base_params = restore_params(str(root / "base"), nnx.state(abstract_model(base), nnx.Param))
    merged = {**{k: np.asarray(v) for k, v in flat_values(base_params).items()},
              **{k: rng.normal(0, 0.1, v.shape).astype(np.float32)
                 for k, v in flat_values(params).items() if "/lora/" in k}}
    state = nnx.from_flat_state([(p, v.replace(jnp.asarray(merged["/".join(map(str, p))])))
                                 for p, v in nnx.to_flat_state(params)])
    save_checkpoint(str(root / "lora"), state, config)
    return root


def _logits_ours(ckpt, ids, pixels):
    _, model = load_checkpoint(ckpt)
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(pixels.transpose(0, 2, 3, 1)),
                            jnp.ones(ids.shape, jnp.int32), use_safety=False).logits)


def _inputs():
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 400, (2, 21))
    ids[:, 1:17] = 500
    return ids, rng.normal(size=(2, 3, 28, 28)).astype(np.float32)


def _hf_logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()


def test_peft_adapter_reproduces_our_lora_forward(lora_ckpt):
    out = str(lora_ckpt / "peft_out")
    export_hf(str(lora_ckpt / "lora"), out, log=lambda *a: None)
    ids, pixels = _inputs()
    base = transformers.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    model = peft.PeftModel.from_pretrained(base, os.path.join(out, "lora_adapter")).eval()
    ours = _logits_ours(str(lora_ckpt / "lora"), ids, pixels)
    np.testing.assert_allclose(ours, _hf_logits(model, ids, pixels), atol=1e-4, rtol=0)
    assert np.abs(ours - _logits_ours(str(lora_ckpt / "base"), ids, pixels)).max() > 1e-3


def test_merged_lora_export_reproduces_our_lora_forward(lora_ckpt):
    out = str(lora_ckpt / "merged_out")
    export_hf(str(lora_ckpt / "lora"), out, merge_lora=True, log=lambda *a: None)
    assert not os.path.exists(os.path.join(out, "lora_adapter"))
    ids, pixels = _inputs()
    model = transformers.LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    np.testing.assert_allclose(_logits_ours(str(lora_ckpt / "lora"), ids, pixels),
                               _hf_logits(model, ids, pixels), atol=1e-4, rtol=0)


def test_authors_state_dict_with_prefix_imports_and_exports_bit_exact(lora_ckpt, tmp_path):
    export_hf(str(lora_ckpt / "base"), str(tmp_path / "hf"), log=lambda *a: None)
    authors = read_all_file(str(tmp_path / "hf" / "safety_modules.safetensors"))
    rng = np.random.default_rng(2)
    authors = {k: rng.normal(size=v.shape).astype(v.dtype) for k, v in authors.items()}
    whole = {f"model.{k}": torch.from_numpy(v) for k, v in authors.items()}
    whole["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)  # other keys of a whole model
    torch.save(whole, tmp_path / "release.bin")
    import_safety(str(tmp_path / "release.bin"), str(lora_ckpt / "base"), out=str(tmp_path / "ckpt"),
                  query_token="pad", log=lambda *a: None)  # a head trained by the authors' code
    assert load_config(str(tmp_path / "ckpt")).safety.query_token == "pad"
    assert load_config(str(lora_ckpt / "base")).safety.query_token == "bos"
    export_hf(str(tmp_path / "ckpt"), str(tmp_path / "again"), log=lambda *a: None)
    back = read_all_file(str(tmp_path / "again" / "safety_modules.safetensors"))
    assert sorted(back) == sorted(authors)
    for k, v in authors.items():
        assert back[k].dtype == v.dtype and back[k].tobytes() == v.tobytes(), k
    _, model = load_checkpoint(str(tmp_path / "ckpt"))
    np.testing.assert_array_equal(model.safety_tokens_head[...], authors["safety_query_tokens"][0])


def test_safety_import_names_dtype_and_shape_mismatches(lora_ckpt, tmp_path):
    export_hf(str(lora_ckpt / "base"), str(tmp_path / "hf"), log=lambda *a: None)
    authors = read_all_file(str(tmp_path / "hf" / "safety_modules.safetensors"))
    from safetensors.numpy import save_file

    bad = {**authors, "safety_query_tokens": authors["safety_query_tokens"].astype(np.float16),
           "safe_part.other_head.bias": np.zeros(6, np.float32)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"safety_query_tokens: expected dtype float32, got float16.*"
                                         r"safe_part\.other_head\.bias: expected shape \(7,\), got \(6,\)"):
        import_safety(str(tmp_path / "bad.safetensors"), str(lora_ckpt / "base"), out=str(tmp_path / "x"))
    save_file({k: v for k, v in authors.items() if "readout.2" not in k}, str(tmp_path / "part.safetensors"))
    with pytest.raises(ValueError, match=r"no complete set of safety keys.*missing "
                                         r"\['safe_mm_projector\.proj\.readout\.2\.weight'"):
        import_safety(str(tmp_path / "part.safetensors"), str(lora_ckpt / "base"), out=str(tmp_path / "x"))
    assert not os.path.exists(tmp_path / "x")
