"""Input pipeline: batch layout, per-process shards, deterministic shuffling, resumable
iterator state, global jax.Array batches."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from safevlm_jax.data import synthetic
from safevlm_jax.data.images import ImageConfig
from safevlm_jax.data.pipeline import (BATCH_KEYS, ExampleProcessor, data_source, make_dataset,
                                       make_global_batch)
from safevlm_jax.data.records import load_json
from safevlm_jax.data.template import IGNORE_INDEX, VICUNA_SYSTEM, TextEncoder
from safevlm_jax.data.tfds_builder import build_dataset
from safevlm_jax.data.tokenizer import train_tokenizer

MAX_LEN = 192


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    json_path = synthetic.generate(root, n=24, seed=11, image_size=32)
    dataset_dir, _ = build_dataset(json_path, root, str(tmp_path_factory.mktemp("ds")), validation_fraction=0.0)
    texts = [t["value"] for r in load_json(json_path) for t in r["conversations"]] + [VICUNA_SYSTEM]
    return data_source(dataset_dir, "train"), train_tokenizer(texts, vocab_size=500)


@pytest.fixture(scope="module")
def processor(dataset, tiny_config):
    _, tokenizer = dataset
    return ExampleProcessor(TextEncoder(tokenizer, tiny_config.num_image_tokens, MAX_LEN),
                            ImageConfig(image_size=tiny_config.vision.image_size))


def example_number(ex):
    """The synthetic index in the id "syn11-000007" (lets a test see which examples it got)."""
    return np.int32(int(ex["id"].decode().split("-")[1]))


def test_batches_have_fixed_shapes_and_dtypes(dataset, processor, tiny_config):
    source, tokenizer = dataset
    batch = next(iter(make_dataset(source, processor, 4, seed=0, process_index=0, process_count=1)))
    size = tiny_config.vision.image_size
    assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
        "input_ids": ((4, MAX_LEN), "int32"), "labels": ((4, MAX_LEN), "int32"),
        "attention_mask": ((4, MAX_LEN), "int32"), "pixel_values": ((4, size, size, 3), "float32"),
        "safe_level": ((4,), "int32"), "safe_type": ((4,), "int32")}
    assert set(batch) == set(BATCH_KEYS)
    pad = batch["attention_mask"] == 0
    assert pad.any() and np.all(batch["input_ids"][pad] == tokenizer.pad_token_id)
    assert np.all(batch["labels"][pad] == IGNORE_INDEX)
    assert np.all((batch["input_ids"] == tiny_config.image_token_index).sum(1) == tiny_config.num_image_tokens)
    assert np.all((batch["labels"] != IGNORE_INDEX).sum(1) > 0)


def test_two_processes_read_disjoint_halves_covering_everything(dataset):
    source, _ = dataset
    seen = []
    for index in range(2):
        ds = make_dataset(source, example_number, 1, seed=3, process_index=index, process_count=2)
        seen.append([int(b[0]) for b in ds])
    assert len(seen[0]) == len(seen[1]) == len(source) // 2
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(int(example_number(ex)) for ex in source)


def test_shuffle_is_seeded_and_differs_per_epoch(dataset):
    source, _ = dataset

    def order(seed):
        ds = make_dataset(source, example_number, 1, seed=seed, num_epochs=2, process_index=0, process_count=1)
        return [int(b[0]) for b in ds]

    first = order(5)
    n = len(source)
    assert first == order(5) and first != order(6)
    assert sorted(first[:n]) == sorted(first[n:]) and first[:n] != first[n:]


def test_iterator_resumes_from_saved_state(dataset, processor):
    source, _ = dataset
    ds = make_dataset(source, processor, 3, seed=1, num_epochs=None, process_index=1, process_count=2)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = [next(it) for _ in range(5)]  # crosses an epoch boundary (12 examples, 4 batches)
    resumed = iter(ds)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key])


def test_process_index_must_be_in_range(dataset):
    with pytest.raises(ValueError, match="process_index=2"):
        make_dataset(dataset[0], example_number, 1, seed=0, process_index=2, process_count=2)


def test_global_batch_is_sharded_over_the_data_axis(dataset, processor):
    source, _ = dataset
    batch = next(iter(make_dataset(source, processor, 8, seed=0, process_index=0, process_count=1)))
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    out = make_global_batch(batch, sharding)
    for key in BATCH_KEYS:
        assert out[key].sharding == sharding
        assert len(out[key].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(out[key]), batch[key])
    per_key = make_global_batch(batch, {k: NamedSharding(mesh, PartitionSpec()) for k in BATCH_KEYS})
    assert per_key["input_ids"].sharding.spec == PartitionSpec()
