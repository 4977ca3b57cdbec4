"""Softmax attention: one entry point, an implementation per platform chosen at lowering time.

    out = self_attention(q, k, v, valid, causal=True, implementation="auto")

Implementations (`IMPLEMENTATIONS`; `ModelConfig.attention` picks one, "auto" by default):

  xla         the reference: f32 scores of every query against every key, softmax, values.
  cpu_blocks  the same math in query blocks of QUERY_BLOCK; with `causal`, block i scores only
              the keys up to its own end (about half the work; tuned for XLA:CPU,
              docs/performance.md).
  splash      Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): a
              TPU kernel that keeps no T x T scores in HBM and skips fully masked blocks.
              Padding is a segment of its own (segment ids); inside a mesh it runs in
              `shard_map` over the batch and head axes of the logical-axis rules.
  cudnn       cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`)
              where its dtypes and head size allow, else xla.
  auto        per platform at lowering time (`jax.lax.platform_dependent`): tpu -> splash,
              cuda -> cudnn, cpu -> cpu_blocks, others -> xla. A program lowered for a TPU from
              a CPU host (AOT) takes the TPU branch.

Tokens written to a KV cache (a prefill chunk, a decode step) attend over its slots with
`models.kv_cache.attend` (XLA on every platform; each row's slots may follow a reused prefix).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from safevlm_jax import sharding
from safevlm_jax.config import ATTENTION_IMPLEMENTATIONS as IMPLEMENTATIONS

QUERY_BLOCK = 64  # queries per causal block of cpu_blocks
SPLASH_BLOCKS = (512, 256, 128)  # splash tile sizes, largest that divides the padded length
# splash's q, k, v shard over the batch and (query / key-value) heads; length stays whole
SPLASH_AXES = ("batch", "act_heads", None, None)


def _grouped(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, causal_blocks: bool) -> jax.Array:
    """Softmax attention with f32 scores in the XLA:CPU-friendly layout.

    q [B, KVH, G, T, Dh] (scaled; query head h = kv head h // G, member h % G as HF's
    `repeat_kv`); k, v [B * KVH, S, Dh] (batch and kv head merged);
    mask [B, 1, 1, T, S] bool (True = attend). Returns [B, KVH, G, T, Dh]. A fully masked
    row (a padding query) attends uniformly.

    `causal_blocks` (keys are the queries' own tokens, S = T, mask causal): queries go in
    blocks of QUERY_BLOCK and block i scores only the keys up to its own end. The products
    have one batch axis (b*k) and one query axis (m = g*t): with more, XLA:CPU reshaped or
    transposed the keys (docs/performance.md).
    """
    b, kvh, g, t, dh = q.shape
    block = QUERY_BLOCK if causal_blocks else t
    outs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        keys = end if causal_blocks else k.shape[1]
        qb = q[:, :, :, start:end].reshape(b * kvh, g * (end - start), dh)
        scores = jnp.einsum("nmd,nsd->nms", qb, k[:, :keys], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[..., start:end, :keys], scores.reshape(b, kvh, g, end - start, keys),
                           jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b * kvh, g * (end - start), keys)
        outs.append(jnp.einsum("nms,nsd->nmd", probs, v[:, :keys]).reshape(b, kvh, g, end - start, dh))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)


def _mask(valid: jax.Array | None, b: int, t: int, causal: bool) -> jax.Array:
    """[B, 1, 1, T, T] bool: key j is seen by query i when it is real (and j <= i if causal)."""
    mask = jnp.ones((b, t, t), jnp.bool_) if valid is None else jnp.broadcast_to(valid[:, None, :], (b, t, t))
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, t), jnp.bool_))
    return mask[:, None, None]


def _xla_or_blocks(q, k, v, valid, *, causal: bool, blocks: bool):
    b, h, t, dh = q.shape
    kvh = k.shape[1]
    out = _grouped(q.reshape(b, kvh, h // kvh, t, dh), k.reshape(b * kvh, t, dh), v.reshape(b * kvh, t, dh),
                   _mask(valid, b, t, causal), causal_blocks=blocks and causal)
    return out.reshape(b, h, t, dh)


def splash_block(length: int) -> int:
    """Splash's tile size (queries and keys) for a padded length: the largest of SPLASH_BLOCKS
    that divides it."""
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, length: int, block: int, causal: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    one = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():  # concrete mask tables, reused by every trace
        return splash.make_splash_mha(splash.MultiHeadMask([one] * heads), block_sizes=sizes,
                                      head_shards=1, q_seq_shards=1)


def _splash_local(q, k, v, segments, *, causal: bool):
    """splash on one shard: q [b, h, T, Dh], k, v [b, kvh, T, Dh], segments [b, T] int32."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    t = q.shape[2]
    kernel = _splash_kernel(q.shape[1], t, splash_block(t), causal)
    # one row at a time (lax.map, not vmap: Pallas's TPU interpret mode, which the tests run,
    # fails on a vmapped kernel in jax 0.10.2); the scope names the mask for plan's FLOP count.
    # 16-bit inputs take the MXU's native products (f32 accumulation): Mosaic refuses the f32
    # products of bf16 operands that a global jax_default_matmul_precision="float32" asks for
    native = jax.default_matmul_precision("default") if q.dtype.itemsize == 2 else contextlib.nullcontext()
    with jax.named_scope("causal" if causal else "bidirectional"), native:
        return jax.lax.map(lambda a: kernel(*a[:3], segment_ids=SegmentIds(a[3], a[3])), (q, k, v, segments))


def _splash(q, k, v, valid, *, causal: bool):
    """Splash attention; the length padded to a multiple of 128 (the kernel's lane width)
    with a segment of its own, which real tokens never see."""
    b, _, t, _ = q.shape
    padded = -(-t // SPLASH_BLOCKS[-1]) * SPLASH_BLOCKS[-1]
    segments = jnp.ones((b, t), jnp.int32) if valid is None else valid.astype(jnp.int32)
    if padded != t:
        pad = ((0, 0), (0, 0), (0, padded - t), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, padded - t)))
    local = functools.partial(_splash_local, causal=causal)
    out = sharding.shard_map(local, (SPLASH_AXES,) * 3 + (SPLASH_AXES[:1] + (None,),), q, k, v, segments)
    return out[:, :, :t]


def _cudnn_fits(q: jax.Array) -> bool:
    """cuDNN flash attention takes 16-bit inputs and head sizes that are multiples of 8 up to 128."""
    return q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128


def _cudnn(q, k, v, valid, *, causal: bool):
    """cuDNN flash attention ([B, T, heads, Dh] layout); padding masked per key and query as
    splash's segments are, so no row is fully masked."""
    mask = None if valid is None else (valid[:, None, :, None] == valid[:, None, None, :])  # [B, 1, T, T]
    out = jax.nn.dot_product_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), mask=mask,
                                       scale=1.0, is_causal=causal, implementation="cudnn")
    return out.transpose(0, 2, 1, 3)


@functools.lru_cache(maxsize=1)
def _cudnn_available() -> bool:
    """Whether this host can trace cuDNN attention (it checks for cuDNN at trace time, so a
    host without CUDA lowers the cuda branch as xla: it cannot compile for a GPU anyway)."""
    x = jax.ShapeDtypeStruct((1, 128, 1, 64), jnp.bfloat16)
    try:
        jax.eval_shape(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), x, x, x)
        return True
    except Exception:  # noqa: BLE001 -- any failure means: not here
        return False


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array | None, *,
                   causal: bool, implementation: str = "auto") -> jax.Array:
    """Self-attention over T tokens.

    q [B, H, T, Dh] (already scaled by Dh^-0.5); k, v [B, KVH, T, Dh] with H a multiple of
    KVH (query head h reads kv head h // (H / KVH), HF's `repeat_kv`); valid [B, T] bool
    (True = a real token; None: all real). A query sees the real keys (up to itself when
    `causal`). Returns [B, H, T, Dh] in v's dtype; the output at a padding query is not
    specified (implementations differ there: it never reaches a loss or a sampled token).
    """
    xla = functools.partial(_xla_or_blocks, causal=causal, blocks=False)
    blocks = functools.partial(_xla_or_blocks, causal=causal, blocks=True)
    splash = functools.partial(_splash, causal=causal)
    cudnn = functools.partial(_cudnn, causal=causal) if _cudnn_fits(q) else xla
    chosen = {"xla": xla, "cpu_blocks": blocks, "splash": splash, "cudnn": cudnn}
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "auto":
        return chosen[implementation](q, k, v, valid)
    cuda = cudnn if _cudnn_available() else xla
    return jax.lax.platform_dependent(q, k, v, valid, cpu=blocks, tpu=splash, cuda=cuda, default=xla)
