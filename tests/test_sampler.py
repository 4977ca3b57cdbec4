"""The generation path (prefill -> insert -> decode steps over one DecodeState): HF parity,
batching, chunked and reused prefills, buckets (no recompiles), EOS, the sampling family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from checkpoints_tools.import_hf import import_hf
from safevlm_jax.checkpoint.format import load_checkpoint
from safevlm_jax.inference import programs
from safevlm_jax.inference.buckets import bucket
from safevlm_jax.inference.errors import BadRequest
from safevlm_jax.inference.requests import SamplingParams
from safevlm_jax.inference.runner import Runner
from safevlm_jax.inference.sampling import RowSampling, sample
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
    return hf, model, Runner(model, max_length=512, eos_id=EOS, pad_id=PAD), pixels


def prompt(model, n_before: int, n_after: int, seed: int) -> list[int]:
    """BOS, n_before text ids, the image positions of plain LLaVA, n_after text ids."""
    ids = np.random.default_rng(seed).integers(3, 400, size=n_before + n_after).tolist()
    image = [model.config.image_token_index] * model.num_image_tokens(use_safety=False)
    return [1] + ids[:n_before] + image + ids[n_before:]


def generate(runner, pixels, prompts, max_new=10, sampling=None, stream=False):
    """`Runner.generate`: the decode loop, or (`stream`) the step program looped from Python."""
    features, _, _ = runner.encode(pixels, [1] * len(prompts), False)
    sampling = sampling or [SamplingParams()] * len(prompts)
    return runner.generate(prompts, features, sampling, max_new, False, (lambda *a: None) if stream else None)[0]


def test_greedy_ids_equal_hf_llava_generate_with_safety_off(setup):
    hf, model, runner, pixels = setup
    for i, (before, after) in enumerate([(3, 6), (8, 2)]):
        ids = prompt(model, before, after, seed=i)
        ours = generate(runner, pixels[i:i + 1], [ids], max_new=12)[0]
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              pixel_values=torch.from_numpy(pixels[i:i + 1].transpose(0, 3, 1, 2)),
                              max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
        assert ours == out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def batch(setup):
    """Three prompts of different lengths (batch bucket 4) and their greedy batch output."""
    _, model, runner, pixels = setup
    prompts = [prompt(model, 2, 3, 10), prompt(model, 7, 5, 11), prompt(model, 1, 11, 12)]
    return prompts, generate(runner, pixels, prompts)


def test_batch_of_different_lengths_equals_each_row_alone_and_the_streamed_step_loop(setup, batch):
    _, _, runner, pixels = setup
    prompts, tokens = batch
    assert tokens == [generate(runner, pixels[i:i + 1], [p])[0] for i, p in enumerate(prompts)]
    assert generate(runner, pixels, prompts, stream=True) == tokens


def test_a_prompt_prefilled_in_chunks_after_a_reused_prefix_gives_the_whole_prefill_tokens(setup, batch):
    """The first 12 tokens copied (`reuse`) from the prefix of another prompt that shares 20,
    then chunks that start inside the image: the same first token and the same decode as one
    whole prefill. The prompt: BOS, 7 text tokens, 16 image positions (8..23), 5 text tokens."""
    _, model, runner, pixels = setup
    prompts, tokens = batch
    ids = prompts[1]
    [features], _, _ = runner.encode(pixels[1:2], [1], False)
    rule = RowSampling.of([SamplingParams()])
    other = ids[:20] + [5, 6, 7]
    _, cached = runner.prefill(runner.new_prefix(1, 128), [other], [0], [features], rule, False)
    prefix, done = runner.reuse(cached, 12, 128), 12
    for chunk in (5, 100):  # 12 -> 17 (inside the image) -> 29 (the rest)
        part = ids[done:done + chunk]
        first, prefix = runner.prefill(prefix, [part], [ids[:done].count(model.config.image_token_index)],
                                       [features], rule, False)
        done += len(part)
    assert done == len(ids) and int(first[0]) == tokens[1][0]
    runner.reset(1, 256)
    runner.insert(prefix, first, [0], rule, [10])
    assert [int(first[0]), *runner.decode(16)[0].tolist()] == tokens[1]


def test_no_recompile_for_lengths_new_tokens_seeds_or_temperatures_inside_a_bucket(setup):
    _, model, runner, pixels = setup
    generate(runner, pixels[:1], [prompt(model, 2, 2, 0)], max_new=3, sampling=[SamplingParams(0.7)])
    before = len(_COMPILES)
    for n, (length, new, temp) in enumerate([(1, 16, 0.3), (9, 9, 1.5), (4, 5, 1.0)]):
        out = generate(runner, pixels[:1], [prompt(model, length, 2, n)], max_new=new,
                       sampling=[SamplingParams(temp, seed=n)])
        assert len(out[0]) <= new
    assert len(_COMPILES) == before


def test_each_row_stops_at_its_own_eos(setup, batch):
    _, model, _, pixels = setup
    prompts, free = batch
    stop = free[0][3]  # the 4th token of row 0 becomes EOS (the EOS id is traced: no recompile)
    got = generate(Runner(model, max_length=512, eos_id=stop, pad_id=PAD), pixels, prompts)
    for row, tokens in zip(free, got):
        assert tokens == (row[:row.index(stop) + 1] if stop in row else row)
    assert got[0][-1] == stop and len(got[0]) <= 4


def test_a_new_shape_compiles_once_not_again_on_its_second_call(setup):
    """A fresh state and prefix are committed to the model's device, as those a program hands
    back are: otherwise the second call compiled the same program again."""
    _, model, runner, pixels = setup
    before = programs.generate_program._cache_size()
    for n in range(3):  # a state length no other test uses
        generate(runner, pixels[:1], [prompt(model, 3, 2, n)], max_new=30)
    assert programs.generate_program._cache_size() - before == 1


def test_top_k_1_top_p_tiny_and_cold_temperature_are_greedy_row_by_row():
    logits = 3 * jax.random.normal(jax.random.key(0), (5, 50))
    rows = RowSampling.of([SamplingParams(), SamplingParams(1e-4), SamplingParams(0.8, top_k=1),
                           SamplingParams(0.8, top_p=1e-6), SamplingParams(0.8, top_k=3, top_p=1e-6)])
    assert (sample(logits, rows, jnp.zeros(5, jnp.int32)) == jnp.argmax(logits, -1)).all()


def test_each_row_samples_inside_its_own_set_independently_of_the_other_rows():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 6))
    params = [SamplingParams(1.0), SamplingParams(1.0, top_k=2), SamplingParams(1.0, top_p=0.7),
              SamplingParams(1.0, top_k=3, top_p=0.5), SamplingParams(1.0, top_k=2, top_p=0.95), SamplingParams()]
    rows = RowSampling.of(params)
    draw = jax.jit(jax.vmap(lambda seed: sample(logits, RowSampling(rows.temperature, rows.top_k, rows.top_p,
                                                                     jnp.full(6, seed, jnp.uint32)),
                                               jnp.zeros(6, jnp.int32))))
    draws = np.asarray(draw(jnp.arange(600, dtype=jnp.uint32)))
    # top-p 0.7 needs the second token (0.5 < 0.7), not the third; top-k 3 then top-p 0.5:
    # the first alone; top-k 2 and top-p 0.95 together: the first two
    assert [set(draws[:, r]) for r in range(1, 6)] == [{0, 1}, {0, 1}, {0}, {0, 1}, {0}]
    np.testing.assert_allclose(np.bincount(draws[:, 0], minlength=4) / 600, [0.5, 0.3, 0.15, 0.05], atol=0.06)
    noisy = jax.random.normal(jax.random.key(2), (6, 50))
    together = sample(noisy, rows, jnp.arange(6))
    for r in range(6):  # a row draws the same alone: its key is its seed and step
        alone = RowSampling.of([params[r]])
        assert sample(noisy[r:r + 1], alone, jnp.array([r]))[0] == together[r]


def test_sampling_params_are_checked_naming_the_field():
    assert SamplingParams(0.7, top_k=5, top_p=0.9).check(vocab_size=10).top_k == 5
    for bad, field in ((dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_p=0), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=11), "top_k"),
                       (dict(top_k=True), "top_k"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed")):
        with pytest.raises(BadRequest) as e:
            SamplingParams(**bad).check(vocab_size=10)
        assert e.value.param == field and e.value.code == "invalid_value"


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
    runner = Runner(lora_model, max_length=512, eos_id=EOS, pad_id=PAD)
    ids = prompt(lora_model, 2, 3, 20)
    first = generate(runner, pixels[:1], [ids], max_new=4)
    assert generate(runner, pixels[:1], [ids], max_new=4) == first


def test_buckets_round_up_and_refuse_past_the_largest():
    assert bucket(1, (4, 8)) == 4 and bucket(5, (4, 8)) == 8 and bucket(8, (4, 8)) == 8
    with pytest.raises(ValueError, match="batch 9 exceeds the largest bucket 8"):
        bucket(9, (4, 8), "batch")


def test_the_decode_loop_writes_the_cache_in_place_without_copying_it(setup):
    """The compiled loop holds no copy of a KV cache buffer (XLA:CPU copied each one three
    times per step when the product's operand was a reshape of the loop's buffer)."""
    _, _, runner, _ = setup
    runner.reset(2, 96)
    buffer = runner.state.cache.k[0]
    assert runner.state.cache.merged and buffer.shape[0] == 2 * runner.config.text.num_key_value_heads
    hlo = programs.generate_program.lower(runner.graphdef, runner.params, runner.state, np.int32(EOS), np.int32(PAD),
                                          max_steps=16).compile().as_text()
    shape = "f32[" + ",".join(map(str, buffer.shape)) + "]"
    assert not [line for line in hlo.splitlines() if " copy(" in line and shape in line]
