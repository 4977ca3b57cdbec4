"""Sharded inference on the suite's 8 fake CPU devices: a GQA model's weights restored straight
into a mesh, its KV cache split by kv head over `tensor` (rows over `data`), and greedy ids
equal to one device's, for sampling and for the engine; an axis the mesh cannot divide is
refused with the sizes."""

import dataclasses

import jax
import numpy as np
import pytest

from configs.model import model_config
from safevlm_jax import sharding
from safevlm_jax.checkpoint.demo import random_checkpoint
from safevlm_jax.config import SafetyConfig, TextConfig, VisionConfig
from safevlm_jax.inference.engine import Engine, EngineRequest
from safevlm_jax.inference.pipeline import Request, SafeVLMInference

QUESTIONS = ("What is shown in this image?", "Describe the picture.")


def gqa_config(kv_heads: int = 8):
    """Every axis the "inference" rules split divides by 8: 16 query heads over `kv_heads`."""
    return model_config("tiny").replace(
        vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                            image_size=28, patch_size=7),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=16, num_key_value_heads=kv_heads, max_position_embeddings=512),
        safety=SafetyConfig(num_tokens=8, abstractor_hidden_size=64, head_num_heads=8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return random_checkpoint(str(root / "gqa"), config=gqa_config())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("images"), np.random.default_rng(0)
    paths = [str(root / f"{i}.png") for i in range(2)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(path)
    return paths


def mesh(**shape):
    n = int(np.prod(list(shape.values())))
    return sharding.make_mesh(shape, jax.devices()[:n])


def answers(checkpoint, images, mesh=None):
    vlm = SafeVLMInference.from_checkpoint(checkpoint, mesh=mesh)
    return vlm, [r.token_ids for r in vlm.answer([Request(p, q) for p, q in zip(images, QUESTIONS)],
                                                 max_new_tokens=12)]


@pytest.fixture(scope="module")
def unsharded(checkpoint, images):
    return answers(checkpoint, images)[1]


@pytest.mark.parametrize("tensor", [2, 8])  # 4 kv heads per device, and one (tensor=4: the engine's test)
def test_greedy_ids_sharded_over_tensor_equal_one_device(checkpoint, images, unsharded, tensor):
    vlm, got = answers(checkpoint, images, mesh(tensor=tensor))
    assert got == unsharded
    kernel = vlm.model.language_model.model.layers[0].self_attn.k_proj.kernel[...]
    assert kernel.sharding.shard_shape(kernel.shape) == (128, 64 // tensor)  # restored into the mesh
    cache = vlm.runner.state.cache.k[0]  # [rows, kv heads, slots, head dim]: kv heads split
    assert cache.sharding.shard_shape(cache.shape)[1] == 8 // tensor


def test_the_engine_on_data_2_tensor_4_gives_one_devices_greedy_ids(checkpoint, images, unsharded):
    vlm = SafeVLMInference.from_checkpoint(checkpoint, mesh=mesh(data=2, tensor=4))
    engine = Engine.from_inference(vlm, slots=4, max_length=256).start()
    try:
        handles = [engine.submit(EngineRequest(vlm_pixels(vlm, p), q, max_tokens=12))
                   for p, q in zip(images, QUESTIONS)]
        assert all(h.wait(300) for h in handles)
    finally:
        engine.shutdown()
    assert [h.token_ids for h in handles] == unsharded
    cache = engine.runner.state.cache.k[0]
    assert cache.sharding.shard_shape(cache.shape)[:2] == (2, 2)  # rows over data, kv heads over tensor


def vlm_pixels(vlm, path):
    from safevlm_jax.inference.pipeline import load_image

    return load_image(path, vlm.images)


def test_an_axis_the_mesh_cannot_divide_is_refused_with_the_sizes(tmp_path, images):
    four = random_checkpoint(str(tmp_path / "kv4"), config=gqa_config(kv_heads=4))
    with pytest.raises(ValueError, match=r"'cache_kv', size 4\) does not divide over mesh axes \('tensor',\) "
                                         r"of total size 8"):
        SafeVLMInference.from_checkpoint(four, mesh=mesh(tensor=8)).answer([Request(images[0], "Hi")])
    vlm = SafeVLMInference.from_checkpoint(four, mesh=mesh(data=2, tensor=4))
    with pytest.raises(ValueError, match=r"'cache_batch', size 3\) does not divide over mesh axes \('data',\)"):
        Engine.from_inference(vlm, slots=3, max_length=256)
    odd = dataclasses.replace(gqa_config(), text=dataclasses.replace(gqa_config().text, intermediate_size=252))
    with pytest.raises(ValueError, match=r"'mlp', size 252\) does not divide"):
        SafeVLMInference.from_checkpoint(random_checkpoint(str(tmp_path / "mlp"), config=odd), mesh=mesh(tensor=8))
