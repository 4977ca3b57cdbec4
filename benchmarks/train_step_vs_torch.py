"""Stage-2 LoRA train step: ours (JAX) vs PyTorch + peft, same LLaMA config, batch, precision.

  python benchmarks/train_step_vs_torch.py            # ~350M: 24 layers, d 1024, vocab 32064
  python benchmarks/train_step_vs_torch.py --layers 4 --d 512 --mlp 1376 --heads 8 --vocab 4096 --batch 4

The LLM part of the stage-2 step (LoRA r on q,k,v,o,gate,up,down; AdamW on the adapters
only; the vision tower is frozen upstream and left out on both sides). FLOPs per step are
4·N·tokens (forward + input gradients through the frozen weights; N = LLM parameters
without the embedding table), MFU is against a matmul peak measured here. Last line:
`ratio=<torch time / our time> mfu=<ours> ratio_bf16=… mfu_bf16=…`.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from flax import nnx

from safevlm_jax.config import LoRAConfig, TextConfig
from safevlm_jax.models.llama import LlamaForCausalLM
from safevlm_jax.train.loss import lm_nll_sum


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def matmul_peak(dtype, n: int = 2048) -> float:
    """FLOP/s of an n x n matmul (jitted, this machine, `dtype` inputs accumulated in f32 as
    the model's dots are: for bf16 3-4x XLA:CPU's bf16 -> bf16 rate)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / timed(lambda: f(a).block_until_ready())


def ours(tc: TextConfig, lora: LoRAConfig, ids: np.ndarray, dtype) -> tuple[float, int]:
    model = LlamaForCausalLM(tc, lora, scan_layers=False, remat_policy="none", dtype=dtype,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    opt = optax.adamw(1e-4, weight_decay=0.0)
    opt_state = opt.init(trainable)
    ids = jnp.asarray(ids)
    mask = jnp.ones_like(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def loss_fn(trainable, frozen):
        m = nnx.merge(graphdef, trainable, frozen, copy=True)
        logits, _ = m(m.embed(ids), positions, mask)
        return lm_nll_sum(logits, ids) / ids.size

    @jax.jit
    def step(trainable, opt_state, frozen):
        grads = jax.grad(loss_fn)(trainable, frozen)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    state = [trainable, opt_state]

    def run():
        state[0], state[1] = step(state[0], state[1], frozen)
        jax.block_until_ready(state[0])

    n = sum(v.get_value().size for p, v in nnx.to_flat_state(frozen)
            if isinstance(v, nnx.Param) and "embed_tokens" not in p)
    return timed(run), n


def theirs(tc: TextConfig, lora: LoRAConfig, ids: np.ndarray, bf16: bool) -> float:
    import peft
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                                   intermediate_size=tc.intermediate_size,
                                   num_hidden_layers=tc.num_hidden_layers,
                                   num_attention_heads=tc.num_attention_heads,
                                   num_key_value_heads=tc.num_key_value_heads, attn_implementation="sdpa")
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    x = torch.as_tensor(ids, dtype=torch.long)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32064)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    a = p.parse_args()
    tc = TextConfig(vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.mlp, num_hidden_layers=a.layers,
                    num_attention_heads=a.heads, num_key_value_heads=a.heads)
    lora = LoRAConfig(rank=a.rank, alpha=16.0, dropout=0.0)
    ids = np.random.default_rng(0).integers(0, a.vocab, size=(a.batch, a.length)).astype(np.int32)
    tokens = ids.size
    out = {}
    for name, dtype, bf16 in (("", jnp.float32, False), ("_bf16", jnp.bfloat16, True)):
        t_ours, n = ours(tc, lora, ids, dtype)
        t_torch = theirs(tc, lora, ids, bf16)
        peak = matmul_peak(dtype)
        mfu = 4 * n * tokens / t_ours / peak
        print(f"{name or '_f32'}: ours {t_ours * 1e3:.1f} ms, torch+peft {t_torch * 1e3:.1f} ms, "
              f"N={n / 1e6:.1f}M, peak {peak / 1e9:.1f} GFLOP/s, torch mfu {4 * n * tokens / t_torch / peak:.2f}")
        out[f"ratio{name}"], out[f"mfu{name}"] = t_torch / t_ours, mfu
    print(" ".join(f"{k}={v:.2f}" for k, v in out.items()))


if __name__ == "__main__":
    main()
