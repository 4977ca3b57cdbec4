"""The jitted sampler: HF parity, batching, buckets (no recompiles), EOS, samplers, limits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints_tools.import_hf import import_hf
from safevlm_jax.checkpoint.format import load_checkpoint
from safevlm_jax.inference.buckets import bucket
from safevlm_jax.inference.decode import Decoder
from safevlm_jax.inference.sampling import Greedy, PerRow, Temperature, TopK, TopP, make_sampler
from tests.hf_llava import TINY_SAFETY, save_tiny_llava

EOS, PAD = 2, 501
_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny HF LLaVA and the same weights imported into our checkpoint format."""
    root = tmp_path_factory.mktemp("sampler")
    hf = save_tiny_llava(str(root / "hf"))
    import_hf(str(root / "hf"), str(root / "ckpt"), safety=TINY_SAFETY, log=lambda *a: None)
    config, model = load_checkpoint(str(root / "ckpt"))
    pixels = np.random.default_rng(0).normal(size=(3, 28, 28, 3)).astype(np.float32)
    return hf, model, Decoder(model, eos_id=EOS, pad_id=PAD), pixels


def prompt(model, n_before: int, n_after: int, seed: int) -> list[int]:
    """BOS, n_before text ids, the image positions of plain LLaVA, n_after text ids."""
    ids = np.random.default_rng(seed).integers(3, 400, size=n_before + n_after).tolist()
    image = [model.config.image_token_index] * model.num_image_tokens(use_safety=False)
    return [1] + ids[:n_before] + image + ids[n_before:]


def run(decoder, pixels, prompts, use_safety=False, **kw):
    features, _, _ = decoder.encode(pixels, [p[0] for p in prompts], use_safety)
    return decoder.generate(prompts, features, use_safety=use_safety, **kw).tokens


def test_greedy_ids_equal_hf_llava_generate_with_safety_off(setup):
    hf, model, decoder, pixels = setup
    for i, (before, after) in enumerate([(3, 6), (8, 2)]):
        ids = prompt(model, before, after, seed=i)
        ours = run(decoder, pixels[i:i + 1], [ids], max_new_tokens=12)[0]
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pixel_values=torch.from_numpy(pixels[i:i + 1].transpose(0, 3, 1, 2)),
                              max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert ours == out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def batch(setup):
    """Three prompts of different lengths (batch bucket 4) and their greedy batch output."""
    _, model, decoder, pixels = setup
    prompts = [prompt(model, 2, 3, 10), prompt(model, 7, 5, 11), prompt(model, 1, 11, 12)]
    return prompts, run(decoder, pixels, prompts, max_new_tokens=10)


def test_batch_of_different_lengths_equals_each_row_alone(setup, batch):
    _, _, decoder, pixels = setup
    prompts, tokens = batch
    assert tokens == [run(decoder, pixels[i:i + 1], [p], max_new_tokens=10)[0]
                      for i, p in enumerate(prompts)]


def test_no_recompile_for_lengths_new_tokens_seeds_or_temperatures_inside_a_bucket(setup):
    _, model, decoder, pixels = setup
    features, _, _ = decoder.encode(pixels[:1], [1], False)
    decoder.generate([prompt(model, 2, 2, 0)], features[:1], max_new_tokens=3, use_safety=False,
                     sampler=Temperature(0.7))
    before = len(_COMPILES)
    for n, (length, new, temp) in enumerate([(1, 16, 0.3), (9, 9, 1.5), (4, 5, 1.0)]):
        out = decoder.generate([prompt(model, length, 2, n)], features[:1], max_new_tokens=new, use_safety=False,
                               sampler=Temperature(temp), seed=n)
        assert len(out.tokens[0]) <= new
    assert len(_COMPILES) == before


def test_each_row_stops_at_its_own_eos(setup, batch):
    _, model, _, pixels = setup
    prompts, free = batch
    stop = free[0][3]  # the 4th token of row 0 becomes EOS (the EOS id is traced: no recompile)
    got = run(Decoder(model, eos_id=stop, pad_id=PAD), pixels, prompts, max_new_tokens=10)
    for row, tokens in zip(free, got):
        assert tokens == (row[:row.index(stop) + 1] if stop in row else row)
    assert got[0][-1] == stop and len(got[0]) <= 4


def test_prompt_plus_new_tokens_beyond_context_is_an_error(setup):
    _, model, decoder, _ = setup
    limit = model.config.text.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the context length {limit}"):
        decoder.generate([[1] * (limit - 10)], None, max_new_tokens=11)
    with pytest.raises(ValueError, match="context length 40"):
        Decoder(model, eos_id=EOS, pad_id=PAD, max_length=40).generate([[1] * 30], None, max_new_tokens=11)


def test_buckets_round_up_and_refuse_past_the_largest():
    assert bucket(1, (4, 8)) == 4 and bucket(5, (4, 8)) == 8 and bucket(8, (4, 8)) == 8
    with pytest.raises(ValueError, match="batch 9 exceeds the largest bucket 8"):
        bucket(9, (4, 8), "batch")


def test_top_k_1_top_p_tiny_and_cold_temperature_are_greedy():
    logits = jax.random.normal(jax.random.key(0), (16, 50))
    want = Greedy()(logits, None)
    key = jax.random.key(1)
    for sampler in (TopK(1, 1.0), TopP(1e-6, 1.0), Temperature(1e-4)):
        assert (sampler(logits, key) == want).all()


def test_top_p_and_top_k_sample_only_inside_their_set():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 1000)
    draw = lambda s: np.asarray(jax.vmap(lambda k: s(logits, k)[0])(keys))
    assert set(draw(TopP(0.7))) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
    assert set(draw(TopP(0.5))) == {0}
    assert set(draw(TopK(3))) == {0, 1, 2}
    counts = np.bincount(draw(Temperature(1.0)), minlength=4) / len(keys)
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.05)


def test_per_row_rule_greedy_cold_top_k_1_and_tiny_top_p_rows_are_greedy():
    logits = 3 * jax.random.normal(jax.random.key(0), (4, 50))
    rule = PerRow(jnp.array([0.0, 1e-4, 0.8, 0.8]), jnp.array([0, 0, 1, 0]), jnp.array([1.0, 1.0, 1.0, 1e-6]))
    assert (rule(logits, jax.random.split(jax.random.key(1), 4)) == Greedy()(logits, None)).all()


def test_per_row_rule_samples_inside_each_rows_set_independently_of_the_other_rows():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 5))
    rule = PerRow(jnp.array([1.0, 1.0, 1.0, 1.0, 0.0]), jnp.array([0, 2, 0, 3, 0]),
                  jnp.array([1.0, 1.0, 0.7, 0.5, 1.0]))
    draws = np.asarray(jax.vmap(lambda k: rule(logits, k))(jax.random.split(jax.random.key(0), (1000, 5))))
    assert [set(draws[:, r]) for r in range(1, 5)] == [{0, 1}, {0, 1}, {0}, {0}]
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 1000, [0.5, 0.3, 0.15, 0.05], atol=0.05)
    noisy = jax.random.normal(jax.random.key(2), (5, 50))
    keys = jax.random.split(jax.random.key(3), 5)
    together = rule(noisy, keys)
    for r in range(5):
        alone = PerRow(*(a[r:r + 1] for a in (rule.temperature, rule.top_k, rule.top_p)))
        assert alone(noisy[r:r + 1], keys[r:r + 1])[0] == together[r]


def test_make_sampler_maps_cli_numbers():
    assert make_sampler() == Greedy()
    assert make_sampler(0.7) == Temperature(0.7)
    assert make_sampler(0.7, top_k=5) == TopK(5, 0.7)
    assert make_sampler(0.7, top_p=0.9) == TopP(0.9, 0.7)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(temperature=1, top_k=3, top_p=0.5)):
        with pytest.raises(ValueError):
            make_sampler(**bad)


def test_model_with_lora_dropout_samples_deterministically(setup, tmp_path, monkeypatch):
    """A stage-2 export keeps LoRA dropout in its config: sampling switches it off; the
    checkpoint also loads from a path relative to the working directory."""
    from flax import nnx

    from configs.model import model_config
    from safevlm_jax.checkpoint.format import save_checkpoint
    from safevlm_jax.config import LoRAConfig
    from safevlm_jax.models.safevlm import SafeVLM

    _, model, _, pixels = setup
    config = model_config("tiny").replace(lora=LoRAConfig(rank=2, dropout=0.5))
    save_checkpoint(str(tmp_path / "lora"), nnx.state(SafeVLM(config, rngs=nnx.Rngs(0)), nnx.Param), config)
    monkeypatch.chdir(tmp_path)
    _, lora_model = load_checkpoint("lora")
    decoder = Decoder(lora_model, eos_id=EOS, pad_id=PAD)
    ids = prompt(lora_model, 2, 3, 20)
    first = run(decoder, pixels[:1], [ids], max_new_tokens=4)
    assert run(decoder, pixels[:1], [ids], max_new_tokens=4) == first


def test_a_new_shape_compiles_once_not_again_on_its_second_call(setup):
    """The fresh cache of a new shape is committed to the model's device, as the cache the
    program hands back is: otherwise the second call compiled the same program again."""
    _, model, decoder, pixels = setup
    from safevlm_jax.inference.decode import _generate

    features, _, _ = decoder.encode(pixels[:1], [1], False)
    before = _generate._cache_size()
    for n in range(3):  # 300 new tokens: a bucket no other test uses
        decoder.generate([prompt(model, 3, 2, n)], features[:1], max_new_tokens=300, use_safety=False)
    assert _generate._cache_size() - before == 1
