"""Safety projector (C-Abstractor), safety tokens and safety head vs a PyTorch reference
(docs/safety_modules.md)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from configs.model import model_config
from safevlm_jax import sharding
from safevlm_jax.models.safety_head import SafetyHead, first_token, init_safety_tokens, safety_keys
from safevlm_jax.models.safety_projector import SafetyProjector, adaptive_avg_pool2d
from tests import torch_safety_ref as ref


def _with(cfg, grid=None, num_queries=None, **model):
    vision = cfg.vision if grid is None else dataclasses.replace(
        cfg.vision, image_size=grid * cfg.vision.patch_size)
    safety = dataclasses.replace(cfg.safety, num_queries=num_queries)
    return cfg.replace(vision=vision, safety=safety, **model)


def _jitter_vectors(module: torch.nn.Module, seed: int) -> None:
    """Moves every bias and LayerNorm scale off its init, so a wrong mapping cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _from_torch(cls, cfg, theirs):
    """Our module with the reference's weights (built abstract: no random init to pay for)."""
    ours = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    ref.load_into_jax(ours, theirs)
    return ours


def _torch_projector(cfg, seed=0):
    torch.manual_seed(seed)
    m = ref.CAbstractor(cfg.vision.hidden_size, cfg.abstractor_hidden_size, cfg.text.hidden_size,
                        cfg.num_queries, cfg.safety.depth)
    _jitter_vectors(m, seed)
    return m.eval()


def _torch_head(cfg, seed=0):
    torch.manual_seed(seed)
    s = cfg.safety
    m = ref.SafetyHead(cfg.text.hidden_size, s.head_num_heads, s.num_levels, s.num_types)
    _jitter_vectors(m, seed)
    return m.eval()


@pytest.mark.parametrize("grid,num_queries", [(4, None), (4, 4), (6, 9), (5, 9)],
                         ids=["identity_pool", "pool_4x4_to_2x2", "pool_6x6_to_3x3",
                              "overlapping_pool_5x5_to_3x3"])
def test_safety_projector_matches_torch_c_abstractor(tiny_config, grid, num_queries):
    cfg = _with(tiny_config, grid, num_queries)
    theirs = _torch_projector(cfg)
    ours = _from_torch(SafetyProjector, cfg, theirs)
    x = np.random.default_rng(0).standard_normal((2, grid * grid, cfg.vision.hidden_size),
                                                  dtype=np.float32)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    got = nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x))  # one compile: faster than eager
    assert got.shape == (2, cfg.num_queries, cfg.text.hidden_size)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("size_in,size_out", [((7, 5), (3, 4)), ((6, 6), (4, 4)), ((3, 3), (5, 2))])
def test_adaptive_avg_pool2d_matches_torch(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((2, 3) + size_in, dtype=np.float32)  # NCHW
    expected = F.adaptive_avg_pool2d(torch.from_numpy(x), size_out).numpy()
    got = adaptive_avg_pool2d(jnp.asarray(x.transpose(0, 2, 3, 1)), size_out)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, atol=1e-6)


def _head_inputs(cfg, batch=3, length=5, seed=0):
    rng = np.random.default_rng(seed)
    d = cfg.text.hidden_size
    text = rng.standard_normal((batch, length, d), dtype=np.float32)
    tokens = 0.02 * rng.standard_normal((cfg.safety.num_tokens, d), dtype=np.float32)
    projected = rng.standard_normal((batch, cfg.num_queries, d), dtype=np.float32)
    return text, tokens, projected


@nnx.jit
def _verdict(head, query, tokens, projected):
    return head(query, safety_keys(tokens, projected))


def test_safety_head_on_first_token_matches_torch_head_at_position_0(tiny_config):
    """The authors attend from all text positions and keep position 0; we pass only that one."""
    theirs = _torch_head(tiny_config)
    ours = _from_torch(SafetyHead, tiny_config, theirs)
    text, tokens, projected = _head_inputs(tiny_config)
    with torch.no_grad():
        level_t, type_t = theirs(torch.from_numpy(text), torch.from_numpy(tokens)[None],
                                 torch.from_numpy(projected))
    level, kind = _verdict(ours, jnp.asarray(text[:, 0]), jnp.asarray(tokens), jnp.asarray(projected))
    assert level.dtype == kind.dtype == jnp.float32
    assert level.shape == (3, tiny_config.safety.num_levels) and kind.shape == (3, 7)
    np.testing.assert_allclose(np.asarray(level), level_t.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(kind), type_t.numpy(), atol=1e-4, rtol=1e-4)


def test_safety_head_batch_equals_each_row_alone_and_depends_on_keys(tiny_config):
    head = _from_torch(SafetyHead, tiny_config, _torch_head(tiny_config, seed=3))
    text, tokens, projected = _head_inputs(tiny_config)
    query, tokens, projected = jnp.asarray(text[:, 0]), jnp.asarray(tokens), jnp.asarray(projected)
    level, kind = _verdict(head, query, tokens, projected)
    for i in range(query.shape[0]):
        level_i, kind_i = _verdict(head, query[i:i + 1], tokens, projected[i:i + 1])
        np.testing.assert_allclose(np.asarray(level_i[0]), np.asarray(level[i]), atol=1e-6)
        np.testing.assert_allclose(np.asarray(kind_i[0]), np.asarray(kind[i]), atol=1e-6)
    level_other, _ = _verdict(head, query, tokens, projected.at[:, -1].add(1.0))
    assert not np.allclose(np.asarray(level_other), np.asarray(level), atol=1e-4)


def test_first_token_reads_bos_of_left_padded_rows():
    embeds = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    mask = jnp.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(first_token(embeds, mask)),
                                  np.asarray(embeds[jnp.array([0, 1]), jnp.array([2, 0])]))


def test_safety_keys_put_tokens_before_projected_features(tiny_config):
    text, tokens, projected = _head_inputs(tiny_config, batch=2)
    keys = safety_keys(jnp.asarray(tokens), jnp.asarray(projected))
    t = tiny_config.safety.num_tokens
    assert keys.shape == (2, t + tiny_config.num_queries, tiny_config.text.hidden_size)
    np.testing.assert_array_equal(np.asarray(keys[1, :t]), tokens)
    np.testing.assert_array_equal(np.asarray(keys[1, t:]), projected[1])


def test_safety_tokens_are_num_tokens_by_d_normal_002():
    cfg = model_config("llava_7b")
    tokens = init_safety_tokens(cfg, nnx.Rngs(0))
    assert tokens[...].shape == (64, 4096) and tokens[...].dtype == jnp.float32
    assert tokens.get_metadata()["out_sharding"] == (None, "embed")
    assert abs(float(jnp.std(tokens[...])) - 0.02) < 1e-3


def _shapes(abstract_module):
    """{'net_0/b1/conv1/conv/kernel': shape}; asserts every parameter names its logical axes."""
    flat = nnx.to_flat_state(nnx.state(abstract_module, nnx.Param))
    for path, v in flat:
        assert len(v.get_metadata()["out_sharding"]) == v.get_value().ndim, path
    return {"/".join(map(str, path)): tuple(v.get_value().shape) for path, v in flat}


def test_parameter_shapes_and_count_follow_spec_for_clip_l_7b():
    cfg = model_config("llava_7b")  # C = 1024, h = 1088, d = 4096, Q = 576
    proj = _shapes(nnx.eval_shape(lambda: SafetyProjector(cfg, rngs=nnx.Rngs(0))))
    head = _shapes(nnx.eval_shape(lambda: SafetyHead(cfg, rngs=nnx.Rngs(0))))
    assert proj["net_0/b1/conv1/conv/kernel"] == (1, 1, 1024, 1088)
    assert proj["net_0/b1/conv2/conv/kernel"] == (3, 3, 1, 1088)  # depthwise
    assert proj["net_0/b1/se/fc1/kernel"] == (1, 1, 1088, 256)  # round(0.25 * 1024)
    assert proj["net_0/b2/se/fc1/kernel"] == (1, 1, 1088, 272)  # round(0.25 * 1088)
    assert proj["net_0/b1/downsample/conv/kernel"] == (1, 1, 1024, 1088)
    assert proj["net_0/b1/downsample/bn/scale"] == (1088,)
    assert not any("downsample" in k for k in proj if not k.startswith("net_0/b1/"))
    assert proj["readout_0/kernel"] == (1088, 4096) and proj["readout_2/kernel"] == (4096, 4096)
    assert head["cross_attention/q_proj/kernel"] == (4096, 4096)
    assert head["safety_head/kernel"] == (4096, 4) and head["other_head/kernel"] == (4096, 7)

    with torch.device("meta"):
        theirs = (sum(p.numel() for p in ref.CAbstractor(1024, 1088, 4096, 576).parameters())
                  + sum(p.numel() for p in ref.SafetyHead(4096, 8, 4, 7).parameters()))
    ours = sum(int(np.prod(s)) for s in [*proj.values(), *head.values()])
    spec = _spec_projector_count(1024, 1088, 4096) + (4 * 4096 * 4096 + 4 * 4096) + 4096 * 11 + 11
    assert ours == theirs == spec == 107_286_235
    print(f"safety projector + head parameters: {ours:,} (+ 2 x 64 x 4096 safety tokens)")


def _spec_projector_count(c, h, d, depth=3):
    """docs/safety_modules.md by hand: LN = 2 x channels, SE squeeze = round(0.25 x block input)."""
    def block(i, o):
        rd = int(round(0.25 * i))
        n = (i * o + 2 * o) + (9 * o + 2 * o) + (2 * o * rd + rd + o) + (o * o + 2 * o)
        return n + (i * o + 2 * o if i != o else 0)

    return block(c, h) + (2 * depth - 1) * block(h, h) + (h * d + d) + (d * d + d)


def test_bf16_compute_keeps_dtypes_under_jit(tiny_config):
    cfg = _with(tiny_config, dtype="bfloat16")
    proj = _from_torch(SafetyProjector, cfg, _torch_projector(cfg))
    head = _from_torch(SafetyHead, cfg, _torch_head(cfg))
    tokens = init_safety_tokens(cfg, nnx.Rngs(2))

    @nnx.jit
    def verdict(proj, head, tokens, features, query):
        projected = proj(features)
        return projected, head(query, safety_keys(tokens[...], projected))

    features = jnp.ones((2, cfg.vision.num_patches, cfg.vision.hidden_size), jnp.float32)
    projected, (level, kind) = verdict(proj, head, tokens, features, jnp.ones((2, 64), jnp.bfloat16))
    assert projected.dtype == jnp.bfloat16
    assert level.dtype == kind.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(level)))


def test_sharded_verdict_equals_torch_reference(tiny_config):
    """fsdp + tensor rules on 8 fake devices: parameters and activations sharded, same verdict."""
    cfg = _with(tiny_config, 4, 4)
    proj_t, head_t = _torch_projector(cfg), _torch_head(cfg)
    graphdef, state = nnx.split((_from_torch(SafetyProjector, cfg, proj_t),
                                 _from_torch(SafetyHead, cfg, head_t)))
    rng = np.random.default_rng(0)
    features = rng.standard_normal((4, 16, cfg.vision.hidden_size), dtype=np.float32)
    query = rng.standard_normal((4, 1, cfg.text.hidden_size), dtype=np.float32)
    tokens = 0.02 * rng.standard_normal((cfg.safety.num_tokens, cfg.text.hidden_size),
                                        dtype=np.float32)
    with torch.no_grad():
        expected = head_t(torch.from_numpy(query), torch.from_numpy(tokens)[None],
                          proj_t(torch.from_numpy(features)))
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    state = jax.device_put(state, sharding.state_shardings(state, mesh, "fsdp_tensor"))

    @jax.jit
    def verdict(state, features, query):
        with sharding.use_rules(mesh, "fsdp_tensor"):
            proj, head = nnx.merge(graphdef, state)
            return head(query, safety_keys(jnp.asarray(tokens), proj(features)))

    for got, want in zip(verdict(state, jnp.asarray(features), jnp.asarray(query[:, 0])), expected):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4, rtol=1e-4)
