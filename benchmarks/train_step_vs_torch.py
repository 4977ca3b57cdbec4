"""Stage-2 LoRA train step: ours (JAX) vs PyTorch + peft, same LLaMA config, batch, precision.

  python benchmarks/train_step_vs_torch.py            # ~350M: 24 layers, d 1024, vocab 32064
  python benchmarks/train_step_vs_torch.py --layers 4 --d 512 --mlp 1376 --heads 8 --vocab 4096 --batch 4
  python benchmarks/train_step_vs_torch.py --layers 32 --d 4096 --mlp 11008 --heads 32 --rank 256 \
      --dtypes bf16 --frozen_dtype bfloat16 --scan_layers --batch 2 --length 1024   # 7B, on a GPU

The LLM part of the stage-2 step (LoRA r on q,k,v,o,gate,up,down; AdamW on the adapters
only; the vision tower is frozen upstream and left out on both sides). LoRA weights are f32
masters; the frozen weights are `--frozen_dtype` (the 7B recipe keeps them in bf16); compute
is f32 or bf16 (ours: the model's dtype; torch: autocast on `--device`). Model FLOPs per step:
4·N·tokens through the frozen weights (forward and input gradients; N = LLM parameters without
the embedding table), 6·N_lora·tokens through the adapters (their weight gradients too), and
6·B·T²·d·layers for causal attention (half of the score and value products, forward and
backward). MFU is against a matmul peak measured in the same run (random n x n matrices
through the model's own dot). The torch side runs first, and gives its memory back before
ours. Last line: `ratio=<torch time / our time> mfu=<ours> ms= torch_ms= torch_mfu= peak_tflops=`,
each with `_bf16` for the bf16 run.
"""

from __future__ import annotations

import gc
import time

import devices  # before jax: no preallocation; puts the repo root on sys.path
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from safevlm_jax import cli  # noqa: E402
from safevlm_jax.config import LoRAConfig, TextConfig  # noqa: E402
from safevlm_jax.models.dot import xla_dot  # noqa: E402
from safevlm_jax.models.llama import LlamaForCausalLM  # noqa: E402
from safevlm_jax.train.loss import lm_nll_sum  # noqa: E402
from safevlm_jax.train.optimizer import split_trainable  # noqa: E402

LORA = r"/lora/lora_[ab]$"  # the adapters' paths inside the LLM
DTYPES = {"f32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}

FLAGS = flags.FlagValues()
flags.DEFINE_integer("layers", 24, "LLM layers", flag_values=FLAGS)
flags.DEFINE_integer("d", 1024, "hidden size", flag_values=FLAGS)
flags.DEFINE_integer("mlp", 2816, "MLP intermediate size", flag_values=FLAGS)
flags.DEFINE_integer("heads", 16, "attention heads (as many KV heads)", flag_values=FLAGS)
flags.DEFINE_integer("vocab", 32064, "vocabulary size", flag_values=FLAGS)
flags.DEFINE_integer("rank", 64, "LoRA rank", flag_values=FLAGS)
flags.DEFINE_integer("batch", 2, "sequences per step", flag_values=FLAGS)
flags.DEFINE_integer("length", 256, "tokens per sequence", flag_values=FLAGS)
flags.DEFINE_list("dtypes", ["f32", "bf16"], "compute dtypes to run, of f32,bf16", flag_values=FLAGS)
flags.DEFINE_enum("frozen_dtype", "float32", ["float32", "bfloat16"], "dtype of the frozen weights",
                  flag_values=FLAGS)
flags.DEFINE_bool("scan_layers", False, "ours: one scanned layer (compiles once)", flag_values=FLAGS)
flags.DEFINE_enum("device", "auto", ["auto", "cpu", "cuda"], "torch device (auto: JAX's GPU if any)",
                  flag_values=FLAGS)


def timed(fn, warmup: int = 2, iters: int = 5) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def matmul_peak(dtype) -> float:
    """FLOP/s of an n x n x n product of random `dtype` matrices through `xla_dot`, as the
    model's dots run (on CPU: bf16 accumulated in f32, 3-4x XLA:CPU's bf16 -> bf16 rate);
    n = 8192 on an accelerator, 2048 on a CPU."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a, b = (jax.random.normal(k, (n, n), dtype) for k in jax.random.split(jax.random.key(0)))
    f = jax.jit(lambda x, w: xla_dot(x, w, dtype))
    return 2 * n**3 / timed(lambda: f(a, b).block_until_ready())


def ours(tc: TextConfig, lora: LoRAConfig, ids: np.ndarray, dtype, frozen_dtype: str,
         scan_layers: bool) -> tuple[float, int, int]:
    """(seconds per step, frozen parameters N, LoRA parameters)."""
    model = LlamaForCausalLM(tc, lora, scan_layers=scan_layers, remat_policy="none", dtype=dtype,
                             param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, trainable, frozen = split_trainable(model, (LORA,), frozen_dtype)
    del model
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
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    return timed(run), n, n_lora


def theirs(tc: TextConfig, lora: LoRAConfig, ids: np.ndarray, compute, frozen_dtype: str,
           device: torch.device) -> float:
    """Seconds per step of transformers' LLaMA + peft LoRA (f32 adapters), AdamW, autocast."""
    import peft
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                                   intermediate_size=tc.intermediate_size,
                                   num_hidden_layers=tc.num_hidden_layers,
                                   num_attention_heads=tc.num_attention_heads,
                                   num_key_value_heads=tc.num_key_value_heads, attn_implementation="sdpa")
    with torch.device(device):
        base = transformers.LlamaForCausalLM(cfg).to(DTYPES["bf16" if frozen_dtype == "bfloat16" else "f32"][1])
        model = peft.get_peft_model(base, peft.LoraConfig(
            r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.targets)))
    trained = [p for p in model.parameters() if p.requires_grad]
    for p in trained:
        p.data = p.data.float()
    opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0)
    x = torch.as_tensor(ids, dtype=torch.long, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=compute == torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        devices.synchronize(device)

    try:
        return timed(run)
    finally:
        del model, base, opt, trained
        gc.collect()
        devices.release(device)


def main(argv) -> None:
    del argv
    names = FLAGS.dtypes
    if not set(names) <= set(DTYPES):
        raise cli.UsageError(f"--dtypes takes f32 and/or bf16, got {','.join(names)!r}")
    device = devices.torch_device(FLAGS.device)
    tc = TextConfig(vocab_size=FLAGS.vocab, hidden_size=FLAGS.d, intermediate_size=FLAGS.mlp,
                    num_hidden_layers=FLAGS.layers, num_attention_heads=FLAGS.heads,
                    num_key_value_heads=FLAGS.heads)
    lora = LoRAConfig(rank=FLAGS.rank, alpha=16.0, dropout=0.0)
    ids = np.random.default_rng(0).integers(0, FLAGS.vocab, size=(FLAGS.batch, FLAGS.length)).astype(np.int32)
    tokens = ids.size
    out = {}
    for name in names:
        dtype, compute = DTYPES[name]
        t_torch = theirs(tc, lora, ids, compute, FLAGS.frozen_dtype, device)
        t_ours, n, n_lora = ours(tc, lora, ids, dtype, FLAGS.frozen_dtype, FLAGS.scan_layers)
        peak = matmul_peak(dtype)
        flops = tokens * (4 * n + 6 * n_lora) + 6 * FLAGS.batch * FLAGS.length**2 * FLAGS.d * FLAGS.layers
        key = "" if name == "f32" else "_bf16"
        print(f"{name}: ours {t_ours * 1e3:.1f} ms, torch+peft {t_torch * 1e3:.1f} ms on {device}, "
              f"N={n / 1e6:.1f}M + LoRA {n_lora / 1e6:.1f}M (frozen {FLAGS.frozen_dtype}), "
              f"batch {FLAGS.batch} x {FLAGS.length}, {flops / 1e12:.2f} TFLOP/step, "
              f"peak {peak / 1e12:.2f} TFLOP/s, mfu ours {flops / t_ours / peak:.2f}, "
              f"torch {flops / t_torch / peak:.2f}")
        out.update({f"ratio{key}": t_torch / t_ours, f"mfu{key}": flops / t_ours / peak, f"ms{key}": t_ours * 1e3,
                    f"torch_ms{key}": t_torch * 1e3, f"torch_mfu{key}": flops / t_torch / peak,
                    f"peak_tflops{key}": peak / 1e12})
        gc.collect()
    print(" ".join(f"{k}={v:.4g}" for k, v in out.items()))


if __name__ == "__main__":
    cli.run(main, FLAGS)
