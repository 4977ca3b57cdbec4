"""LoRA on the LLaMA linears vs peft, merge/unmerge, state split and dropout modes."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from safevlm_jax.config import DEFAULT_LORA_TARGETS, LoRAConfig, TextConfig
from safevlm_jax.models.llama import LlamaForCausalLM
from safevlm_jax.models.lora import lora_state, merge_lora, merge_lora_state, unmerge_lora
from tests.hf_weights import copy_llama, torch_state

SIZES = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
RANK, ALPHA = 4, 8.0
IDS = np.random.RandomState(1).randint(0, SIZES["vocab_size"], (2, 7))


def make_pair(scan=False, dropout=0.0):
    """A peft-wrapped HF model with nonzero lora_B, and ours with the same weights."""
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, max_position_embeddings=64, attn_implementation="eager"))
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=list(DEFAULT_LORA_TARGETS)))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.eval()
    ours = LlamaForCausalLM(TextConfig(**SIZES), LoRAConfig(rank=RANK, alpha=ALPHA, dropout=dropout),
                            scan_layers=scan, rngs=nnx.Rngs(0))
    copy_llama(ours, torch_state(hf))
    return hf, ours


@nnx.jit
def _forward(model, ids):
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return model(model.embed(ids), pos, jnp.ones_like(ids))[0]


def forward(model):
    return np.asarray(_forward(model, jnp.asarray(IDS)))


@pytest.mark.parametrize("scan", [False, True])
def test_lora_forward_matches_peft(scan):
    hf, ours = make_pair(scan)
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
        base = hf.get_base_model()
        with hf.disable_adapter():
            ref_base = base(torch.tensor(IDS)).logits.numpy()
    assert np.abs(ref - ref_base).max() > 1e-3  # the adapters do change the output
    np.testing.assert_allclose(forward(ours), ref, atol=1e-4, rtol=0)


def test_lora_params_only_on_targets_and_split_by_type():
    _, ours = make_pair()
    lora, rest = lora_state(ours)
    paths = [p for p, _ in nnx.to_flat_state(lora)]
    assert len(paths) == 2 * 7 * SIZES["num_hidden_layers"]
    assert all(p[-2] == "lora" and p[-3] in DEFAULT_LORA_TARGETS for p in paths)
    assert not any("lora" in p for p, _ in nnx.to_flat_state(rest))
    assert ours.model.layers[0].self_attn.q_proj.lora.lora_a[...].shape == (32, RANK)


@pytest.mark.parametrize("scan", [False, True])
def test_lora_merge_equals_unmerged_forward(scan):
    _, ours = make_pair(scan)
    expected = forward(ours)
    merged_state = merge_lora_state(nnx.state(ours), ALPHA / RANK)
    merge_lora(ours)
    assert not nnx.to_flat_state(lora_state(ours)[0])  # no LoRA params remain
    np.testing.assert_allclose(forward(ours), expected, atol=1e-5, rtol=0)
    for (p, a), (q, b) in zip(nnx.to_flat_state(nnx.state(ours)), nnx.to_flat_state(merged_state)):
        assert p == q
        np.testing.assert_allclose(a.get_value(), b.get_value(), atol=1e-6, rtol=0)


def test_lora_merge_then_unmerge_gives_back_base_kernels():
    _, ours = make_pair(scan=True)
    expected = forward(ours)
    base = jax.tree.map(np.asarray, nnx.state(ours, nnx.Param))
    merge_lora(ours, keep_lora=True)
    kernel = ours.model.layers.self_attn.q_proj.kernel[...]
    assert np.abs(np.asarray(kernel) - base["model"]["layers"]["self_attn"]["q_proj"]["kernel"]).max() > 1e-3
    np.testing.assert_allclose(forward(ours), expected, atol=1e-5, rtol=0)  # adapter skipped
    unmerge_lora(ours)
    for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(base)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    np.testing.assert_allclose(forward(ours), expected, atol=1e-5, rtol=0)


def test_lora_dropout_only_in_training_mode():
    _, ours = make_pair(scan=True, dropout=0.5)
    ours.eval()
    evaluated = forward(ours)
    np.testing.assert_array_equal(forward(ours), evaluated)
    ours.train()
    trained = forward(ours)
    assert np.abs(trained - evaluated).max() > 1e-3
    assert np.abs(forward(ours) - trained).max() > 1e-6  # a fresh mask every call
    ours.eval()
    np.testing.assert_allclose(forward(ours), evaluated, atol=1e-6, rtol=0)
