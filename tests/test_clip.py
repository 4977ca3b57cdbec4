"""CLIP vision tower and LLaVA projector vs HF transformers (tiny random configs, f32)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from safevlm_jax import sharding
from safevlm_jax.config import VisionConfig
from safevlm_jax.models.clip import CLIPVisionModel
from safevlm_jax.models.projector import MultiModalProjector
from tests.hf_weights import copy_clip, copy_projector

NUM_LAYERS = 4
SIZES = [(28, 7), (30, 5)]  # (image_size, patch_size): 4x4 and 6x6 patch grids
ATOL = 1e-4


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (HF's init leaves LayerNorms at 1/0, which hides swaps)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@functools.cache
def hf_clip(image_size: int, patch_size: int) -> transformers.CLIPVisionModel:
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, attn_implementation="eager")
    model = transformers.CLIPVisionModel(config).eval()
    _perturb(model, seed=image_size)
    return model


def vision_config(hf) -> VisionConfig:
    c = hf.config
    return VisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        image_size=c.image_size, patch_size=c.patch_size, num_channels=c.num_channels,
                        layer_norm_eps=c.layer_norm_eps, hidden_act=c.hidden_act)


def ours(hf, scan_layers=False, **kw) -> CLIPVisionModel:
    """Our model with `hf`'s weights (built abstract: the copy replaces every parameter)."""
    model = nnx.eval_shape(lambda: CLIPVisionModel(vision_config(hf), scan_layers=scan_layers,
                                                   rngs=nnx.Rngs(1), **kw))
    copy_clip(model, hf)
    return model


@functools.partial(nnx.jit, static_argnames=("feature_layer", "output_hidden_states"))
def forward(model, x, feature_layer=-2, output_hidden_states=False):
    return model(x, feature_layer, output_hidden_states)


@functools.partial(nnx.jit, static_argnames=("select_strategy",))
def features(model, x, select_strategy="default"):
    return model.image_features(x, -2, select_strategy)


def pixels(image_size: int, batch: int = 2) -> np.ndarray:
    """[batch, height, width, channels] (NHWC, our layout)."""
    return np.random.default_rng(image_size).normal(size=(batch, image_size, image_size, 3)).astype(np.float32)


def hf_hidden_states(hf, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = hf(torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True)
    return [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize("size,scan_layers", [(SIZES[0], False), (SIZES[0], True), (SIZES[1], True)],
                         ids=["28px_patch7-unrolled", "28px_patch7-scanned", "30px_patch5-scanned"])
def test_hidden_states_match_hf_at_every_feature_layer(size, scan_layers):
    hf = hf_clip(*size)
    model = ours(hf, scan_layers)
    x = pixels(size[0])
    expected = hf_hidden_states(hf, x)
    assert len(expected) == NUM_LAYERS + 1
    last, stacked = forward(model, jnp.asarray(x), feature_layer=-1, output_hidden_states=True)
    np.testing.assert_allclose(stacked, np.stack(expected), atol=ATOL)
    np.testing.assert_array_equal(stacked[-1], last)
    for layer in (-2, 0, 2):  # each runs only the layers it needs
        got = forward(model, jnp.asarray(x), feature_layer=layer)
        np.testing.assert_allclose(got, expected[layer], atol=ATOL, err_msg=f"feature_layer={layer}")


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}px_patch{s[1]}")
def test_image_features_select_strategy_matches_hf(size):
    hf = hf_clip(*size)
    model = ours(hf)
    x = pixels(size[0])
    penultimate = hf_hidden_states(hf, x)[-2]
    grid = size[0] // size[1]
    default = features(model, jnp.asarray(x), "default")
    full = features(model, jnp.asarray(x), "full")
    assert default.shape == (2, grid * grid, 32) and full.shape == (2, grid * grid + 1, 32)
    np.testing.assert_allclose(default, penultimate[:, 1:], atol=ATOL)
    np.testing.assert_allclose(full, penultimate, atol=ATOL)


def test_scanned_equals_unrolled():
    hf = hf_clip(*SIZES[0])
    x = jnp.asarray(pixels(SIZES[0][0]))
    np.testing.assert_allclose(forward(ours(hf, True), x), forward(ours(hf, False), x), atol=1e-6)


@pytest.mark.parametrize("scan_layers,policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_gives_identical_outputs(scan_layers, policy):
    hf = hf_clip(*SIZES[0])
    x = jnp.asarray(pixels(SIZES[0][0]))
    np.testing.assert_array_equal(features(ours(hf, scan_layers, remat_policy=policy), x),
                                  features(ours(hf, scan_layers), x))


def test_bf16_compute_keeps_f32_params_and_stays_close():
    hf = hf_clip(*SIZES[0])
    x = jnp.asarray(pixels(SIZES[0][0]))
    model = ours(hf, dtype=jnp.bfloat16)
    out = features(model, x)
    assert out.dtype == jnp.bfloat16
    assert all(v.dtype == jnp.float32 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    np.testing.assert_allclose(out.astype(jnp.float32), features(ours(hf), x), atol=0.1)


def test_every_param_has_logical_axes_of_its_rank():
    model = ours(hf_clip(*SIZES[0]), scan_layers=True)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == var.ndim, (path, axes)


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2},
                                        pytest.param({"fsdp": 1, "tensor": 1}, id="one_device")])
def test_sharded_forward_equals_unsharded(mesh_shape):
    hf = hf_clip(*SIZES[0])
    x = jnp.asarray(pixels(SIZES[0][0], batch=4))
    model = ours(hf, scan_layers=True)
    expected = features(model, x)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(list(mesh_shape.values())))])
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh, "fsdp_tensor"))

    @jax.jit
    def run(state, x):
        with sharding.use_rules(mesh, "fsdp_tensor"):
            return nnx.merge(graphdef, state).image_features(x)

    np.testing.assert_allclose(run(state, x), expected, atol=1e-5)


def test_bad_inputs_are_rejected_with_the_expected_shape():
    model = ours(hf_clip(*SIZES[0]))
    with pytest.raises(ValueError, match=r"\[batch, 28, 28, 3\]"):
        model(jnp.zeros((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="feature_layer"):
        model(jnp.zeros((1, 28, 28, 3)), feature_layer=NUM_LAYERS + 1)
    with pytest.raises(ValueError, match="select_strategy"):
        model.image_features(jnp.zeros((1, 28, 28, 3)), select_strategy="cls")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_projector_matches_hf(bias):
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=32, num_attention_heads=4),
        text_config=transformers.LlamaConfig(hidden_size=48, num_attention_heads=4),
        multimodal_projector_bias=bias)
    torch.manual_seed(0)
    hf = LlavaMultiModalProjector(config).eval()
    model = nnx.eval_shape(lambda: MultiModalProjector(32, 48, act=config.projector_hidden_act,
                                                       use_bias=bias, rngs=nnx.Rngs(0)))
    copy_projector(model, hf)
    x = np.random.default_rng(0).normal(size=(2, 5, 32)).astype(np.float32)
    with torch.no_grad():
        expected = hf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=ATOL)
