"""LLaMA decoder vs `transformers.LlamaForCausalLM` (f32, tiny random configs), KV cache,
scan-over-layers and remat."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from safevlm_jax.config import LoRAConfig, TextConfig
from safevlm_jax.models.kv_cache import KVCache
from safevlm_jax.models.llama import LlamaForCausalLM
from tests.hf_weights import copy_llama, torch_state

SIZES = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             rms_norm_eps=1e-5, rope_theta=500.0)


def make_pair(heads=4, kv_heads=2, tie=False, scan=False, remat="none", seed=0):
    """An HF model with random weights and ours holding a copy of them."""
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **SIZES, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=tie, max_position_embeddings=64, attn_implementation="eager")).eval()
    text = TextConfig(**SIZES, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tie)
    ours = LlamaForCausalLM(text, LoRAConfig(), scan_layers=scan, remat_policy=remat,
                            rngs=nnx.Rngs(seed))
    copy_llama(ours, torch_state(hf))
    return hf, ours


def positions_of(mask):
    return jnp.clip(jnp.cumsum(mask, -1) - 1, 0).astype(jnp.int32)


@nnx.jit
def _forward(model, ids, mask):
    return model(model.embed(ids), positions_of(mask), mask)[0]


def forward(model, ids, mask):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


IDS = np.random.RandomState(0).randint(0, SIZES["vocab_size"], (2, 9))
# row 0: 3 tokens of left padding; row 1: none (a forward without a cache takes either side)
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9])


@pytest.mark.parametrize("heads,kv_heads,tie", [(4, 4, False), (4, 2, False), (4, 2, True), (4, 1, True)])
def test_logits_match_hf(heads, kv_heads, tie):
    hf, ours = make_pair(heads, kv_heads, tie)
    assert (ours.lm_head is None) == tie
    with torch.no_grad():
        ref = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(forward(ours, IDS, np.ones_like(IDS)), ref, atol=1e-4, rtol=0)


def test_left_padded_batch_matches_rows_alone_and_hf_with_attention_mask():
    hf, ours = make_pair()
    out = forward(ours, IDS, MASK)
    assert np.isfinite(out).all()  # fully masked (padding) query rows give no NaN
    with torch.no_grad():
        ref = hf(torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    real = MASK.astype(bool)
    np.testing.assert_allclose(out[real], ref[real], atol=1e-4, rtol=0)
    alone = forward(ours, IDS[:1, 3:], MASK[:1, 3:])
    np.testing.assert_allclose(out[0, 3:], alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out[1], forward(ours, IDS[1:], MASK[1:])[0], atol=1e-5, rtol=0)


def right_padded(seqs, width):
    """Sequences -> ids [B, width] with each row's tokens first, mask [B, width]."""
    ids, mask = np.zeros((len(seqs), width), np.int32), np.zeros((len(seqs), width), np.int32)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)], mask[r, :len(seq)] = seq, 1
    return ids, mask


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(scan):
    """Rows of different lengths, right-padded, prefilled together, then decoded a token per
    step each at its own position (a row past its end idle): every real position's logits
    equal the full forward of that row alone; rows advance by their real tokens."""
    _, ours = make_pair(scan=scan)
    seqs = [IDS[0, 3:], IDS[1]]  # 6 and 9 tokens
    full = [forward(ours, s[None], np.ones((1, len(s)), np.int32))[0] for s in seqs]
    step = nnx.jit(lambda m, i, p, a, c: m(m.embed(i), p, a, c), donate_argnums=(4,))
    cache = ours.init_cache(batch=2, max_len=16)
    assert len(cache.k) == len(cache.v) == 2  # one buffer per layer, each [B, KVH, S, Dh]
    assert cache.k[0].shape == cache.v[1].shape == (2, 2, 16, 8)
    assert cache.mask.shape == (2, 16) and cache.index.shape == (2,)
    prefill = [4, 5]
    ids, mask = right_padded([s[:n] for s, n in zip(seqs, prefill)], 5)
    positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
    logits, cache = step(ours, ids, positions, mask, cache)
    assert cache.index.tolist() == prefill
    for r, n in enumerate(prefill):
        np.testing.assert_allclose(logits[r, :n], full[r][:n], atol=1e-5, rtol=0)
    for t in range(4):
        ids, active = np.zeros((2, 1), np.int32), np.zeros((2, 1), np.int32)
        for r, (seq, n) in enumerate(zip(seqs, prefill)):
            if n + t < len(seq):
                ids[r, 0], active[r, 0] = seq[n + t], 1
        positions = cache.index[:, None]
        logits, cache = step(ours, ids, positions, active, cache)
        for r, (seq, n) in enumerate(zip(seqs, prefill)):
            if n + t < len(seq):
                np.testing.assert_allclose(logits[r, 0], full[r][n + t], atol=1e-5, rtol=0)
    assert cache.index.tolist() == [6, 9] and cache.mask.sum(1).tolist() == [6, 9]


@pytest.mark.parametrize("scan", [False, True])
def test_rows_put_into_a_bigger_cache_decode_at_their_own_positions_as_each_alone(scan):
    """Continuous batching: each request prefilled alone in a cache of its own (right-padded,
    logits at its last real token), put into a row of a bigger cache, then all rows decoded
    together, each at its own position (an idle row masked), give every row's full-forward
    logits; `take` gives a row back."""
    _, ours = make_pair(scan=scan)
    seqs, prompt_len, slot_of = [IDS[0, 3:], IDS[1]], [4, 6], [2, 0]  # 6 and 9 tokens
    full = [forward(ours, s[None], np.ones((1, len(s)), np.int32))[0] for s in seqs]
    big = KVCache.init(2, 3, 2, 16, 8)
    prefill = nnx.jit(lambda m, i, p, a, c, at: m(m.embed(i), p, a, c, logits_at=at))
    for r, (seq, n, slot) in enumerate(zip(seqs, prompt_len, slot_of)):
        ids, mask = right_padded([seq[:n]], 8)
        logits, small = prefill(ours, ids, positions_of(mask), mask, ours.init_cache(1, 8), jnp.array([n - 1]))
        np.testing.assert_allclose(logits[0, 0], full[r][n - 1], atol=1e-5, rtol=0)
        big = big.put(small, jnp.array([slot]), jnp.array([n]))
    assert big.index.tolist() == [6, 0, 4] and big.mask.sum(1).tolist() == [6, 0, 4]
    back = big.take(jnp.array([2]), 8)
    np.testing.assert_array_equal(back.k[1][0], big.k[1][2, :, :8])
    assert back.index.tolist() == [4]
    step = nnx.jit(lambda m, i, p, a, c: m(m.embed(i), p, a, c), donate_argnums=(4,))
    for t in range(3):
        ids, active = np.zeros((3, 1), np.int32), np.zeros((3, 1), np.int32)
        for seq, n, slot in zip(seqs, prompt_len, slot_of):
            if n + t < len(seq):
                ids[slot, 0], active[slot, 0] = seq[n + t], 1
        positions = big.index[:, None]
        logits, big = step(ours, ids, positions, active, big)
        for r, (seq, n, slot) in enumerate(zip(seqs, prompt_len, slot_of)):
            if n + t < len(seq):
                np.testing.assert_allclose(logits[slot, 0], full[r][n + t], atol=1e-5, rtol=0)


def test_a_decode_step_on_a_cache_view_equals_one_on_the_whole_cache():
    """`KVCache.view(rows, length)` + `merge_view`: busy rows 0 and 1, an idle (free) row 2
    whose index lies past `length`, row 3 outside the view; the busy rows' logits, and their
    cache afterwards, are those of the same step over every row and slot; idle rows keep
    their index (a free row's entries are garbage until its next `put`); row 3 is untouched."""
    _, ours = make_pair()
    rng = np.random.RandomState(1)
    whole = KVCache.init(2, 4, 2, 16, 8)
    prefill = nnx.jit(lambda m, i, p, a, c: m(m.embed(i), p, a, c)[1])
    for slot, n in ((0, 4), (1, 6), (2, 12), (3, 5)):
        ids, mask = rng.randint(0, SIZES["vocab_size"], (1, n)), np.ones((1, n), np.int32)
        small = prefill(ours, ids, positions_of(mask), mask, ours.init_cache(1, n))
        whole = whole.put(small, jnp.array([slot]), jnp.array([n]))

    step = nnx.jit(lambda m, i, a, c: m(m.embed(i), c.index[:, None], a, c))
    ids = rng.randint(0, SIZES["vocab_size"], (4, 1)).astype(np.int32)
    active = np.array([[1], [1], [0], [0]], np.int32)  # rows 2, 3: their requests ended
    want_logits, want = step(ours, ids, active, whole)
    view = whole.view(3, 8)
    assert view.k[0].shape == (4, 2, 16, 8) and view.max_len == 8 and view.index.tolist() == [4, 6, 12]
    logits, after = step(ours, ids[:3], active[:3], view)
    got = whole.merge_view(after)
    np.testing.assert_allclose(logits[:2], want_logits[:2], atol=1e-6, rtol=0)
    assert got.index.tolist() == [5, 7, 12, 5]
    np.testing.assert_array_equal(got.mask[:2], want.mask[:2])
    np.testing.assert_array_equal(got.mask[3], whole.mask[3])
    real = np.asarray(want.mask)[:2, None, :, None]  # [rows, heads, slots, dim]
    for g, w in zip((*got.k, *got.v), (*want.k, *want.v)):
        np.testing.assert_allclose(np.where(real, np.asarray(g)[:2], 0), np.where(real, np.asarray(w)[:2], 0),
                                   atol=1e-6, rtol=0)
    for g, w in zip((*got.k, *got.v), (*whole.k, *whole.v)):
        np.testing.assert_array_equal(np.asarray(g)[3], np.asarray(w)[3])


def test_last_only_logits_equal_the_last_position_of_the_full_forward():
    _, ours = make_pair()
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)
    last, _ = nnx.jit(lambda m: m(m.embed(ids), positions_of(mask), mask, last_only=True))(ours)
    assert last.shape == (2, 1, SIZES["vocab_size"])
    np.testing.assert_allclose(last, forward(ours, IDS, MASK)[:, -1:], atol=1e-6, rtol=0)


def test_scan_layers_equals_unrolled():
    _, unrolled = make_pair(scan=False)
    _, scanned = make_pair(scan=True)
    state = nnx.state(scanned, nnx.Param)
    assert state["model"]["layers"]["self_attn"]["q_proj"]["kernel"][...].shape == (2, 32, 32)
    np.testing.assert_allclose(forward(scanned, IDS, MASK), forward(unrolled, IDS, MASK),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan,policy", [(False, "dots_saveable"), (True, "full"), (True, "offload_layer_inputs")])
def test_remat_equals_no_remat_values_and_grads(scan, policy):
    ids, mask = jnp.asarray(IDS), jnp.asarray(MASK)

    def loss(model):
        logits, _ = model(model.embed(ids), positions_of(mask), mask)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * mask)

    results = []
    for remat in ("none", policy):
        _, model = make_pair(scan=scan, remat=remat)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
        results.append((value, jax.tree.leaves(grads)))
    for value, grads in results[1:]:
        np.testing.assert_allclose(value, results[0][0], atol=1e-6)
        for g, g0 in zip(grads, results[0][1]):
            np.testing.assert_allclose(g, g0, atol=1e-6)
