"""The SafeVLM loss against PyTorch's cross-entropy (HF's causal-LM shift, ignore_index -100)."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from safevlm_jax.train.loss import IGNORE_INDEX, loss_sums, num_target_tokens, total_loss

RNG = np.random.default_rng(0)
B, T, V = 3, 9, 11
LOGITS = RNG.normal(size=(B, T, V)).astype(np.float32)
LABELS = RNG.integers(0, V, size=(B, T))
LABELS[0, :4] = IGNORE_INDEX  # a masked prompt
LABELS[2, 6:] = IGNORE_INDEX  # right padding
LEVEL, TYPE = RNG.normal(size=(B, 4)).astype(np.float32), RNG.normal(size=(B, 7)).astype(np.float32)
SAFE_LEVEL, SAFE_TYPE = np.array([0, 3, 1]), np.array([6, 2, 0])


def torch_loss(rows=slice(None)) -> float:
    """HF's LM loss (shift, mean over real targets) + 10 x (CE level + CE type), rows averaged."""
    ce = torch.nn.functional.cross_entropy
    lm = ce(torch.from_numpy(LOGITS[rows, :-1]).reshape(-1, V),
            torch.from_numpy(LABELS[rows, 1:]).reshape(-1), ignore_index=IGNORE_INDEX)
    head = ce(torch.from_numpy(LEVEL[rows]), torch.from_numpy(SAFE_LEVEL[rows])) + \
        ce(torch.from_numpy(TYPE[rows]), torch.from_numpy(SAFE_TYPE[rows]))
    return float(lm + 10.0 * head)


def ours(rows=slice(None)):
    args = (LOGITS[rows], LEVEL[rows], TYPE[rows], LABELS[rows], SAFE_LEVEL[rows], SAFE_TYPE[rows])
    return loss_sums(*map(jnp.asarray, args)), num_target_tokens(jnp.asarray(LABELS[rows]))


def test_loss_equals_torch_cross_entropy():
    sums, tokens = ours()
    assert float(tokens) == float(np.sum(LABELS[:, 1:] != IGNORE_INDEX))
    np.testing.assert_allclose(float(total_loss(sums, tokens, B, 10.0)), torch_loss(), rtol=1e-6)
    assert float(sums.level_correct) == np.sum(LEVEL.argmax(-1) == SAFE_LEVEL)


def test_microbatch_sums_add_up_to_the_whole_batch():
    whole, tokens = ours()
    parts = [ours(slice(0, 1)), ours(slice(1, 3))]
    summed = [sum(float(getattr(p[0], f)) for p in parts) for f in whole._fields]
    np.testing.assert_allclose(summed, [float(x) for x in whole], rtol=1e-6)
    assert sum(float(p[1]) for p in parts) == float(tokens)


def test_chunked_lm_loss_equals_the_whole_logits_loss_and_its_gradient():
    """Final hidden states through a head a chunk of positions at a time (T = 9 in chunks of
    4: a padded last chunk) give the loss and the input gradient of the whole [B, T, V] logits."""
    from safevlm_jax.train.loss import chunked_lm_nll_sum, lm_nll_sum

    hidden = jnp.asarray(RNG.normal(size=(B, T, 5)).astype(np.float32))
    w = jnp.asarray(RNG.normal(size=(5, V)).astype(np.float32))
    labels = jnp.asarray(LABELS)
    whole = jax.value_and_grad(lambda h: lm_nll_sum(h @ w, labels))(hidden)
    chunked = jax.value_and_grad(lambda h: chunked_lm_nll_sum(h, lambda x: x @ w, labels, chunk=4))(hidden)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-6)
