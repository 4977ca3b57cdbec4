"""Input pipeline: TFDS array_record dataset -> grain -> fixed-shape numpy batches -> jax.Array.

Order of operations (all deterministic in `seed`):
  source -> drop the last (N mod P) -> this process's shard [p::P] -> shuffle (reshuffled
  every epoch) -> repeat -> decode + tokenize -> batch (drop remainder).
Every process sees a disjoint shard of the same size, so all hosts take the same number of
steps. The iterator's `get_state()` is a small JSON-serialisable dict to save with the
training checkpoint; `set_state` on a fresh iterator of the same pipeline resumes exactly.

A batch is a dict of numpy arrays:
  input_ids      [B, max_len] int32, right-padded with the pad id
  labels         [B, max_len] int32, -100 outside assistant answers and on padding
  attention_mask [B, max_len] int32, 1 on tokens, 0 on padding
  pixel_values   [B, H, W, 3] float32 (channels last)
  safe_level     [B] int32, safe_type [B] int32
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from safevlm_jax.data.images import ImageConfig, load_pixel_values
from safevlm_jax.data.records import turns_from_json
from safevlm_jax.data.template import IGNORE_INDEX, TextEncoder

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "pixel_values", "safe_level", "safe_type")


def data_source(dataset_dir: str, split: str = "train"):
    """Random-access source over one split of a dataset built by `builder.build_dataset`."""
    return tfds.builder_from_directory(dataset_dir).as_data_source(split=split)


class ExampleProcessor:
    """One stored example -> dict of fixed-shape arrays (the batch layout without B).

    Args:
      encoder: the `TextEncoder` (tokenizer, template, image positions, max_len).
      image_config: image preprocessing; `image_size` must be the vision tower's.
      pad_token_id: defaults to the tokenizer's pad id (LLaVA: 32001).
    """

    def __init__(self, encoder: TextEncoder, image_config: ImageConfig, pad_token_id: int | None = None):
        pad = encoder.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            raise ValueError(f"tokenizer {encoder.tokenizer.name_or_path!r} has no pad token; pass pad_token_id")
        self.encoder, self.image_config, self.pad_token_id = encoder, image_config, pad

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray]:
        n = self.encoder.max_len
        example_id = _text(example["id"])
        ids, labels = self.encoder.encode(turns_from_json(_text(example["conversations"])), example_id=example_id)
        input_ids = np.full(n, self.pad_token_id, np.int32)
        input_ids[:len(ids)] = ids
        padded_labels = np.full(n, IGNORE_INDEX, np.int32)
        padded_labels[:len(labels)] = labels
        mask = np.zeros(n, np.int32)
        mask[:len(ids)] = 1
        return {
            "input_ids": input_ids,
            "labels": padded_labels,
            "attention_mask": mask,
            "pixel_values": load_pixel_values(bytes(example["image"]), self.image_config),
            "safe_level": np.int32(example["safe_level"]),
            "safe_type": np.int32(example["safe_type"]),
        }


def make_dataset(source, processor: Callable[[Mapping[str, Any]], Any], batch_size: int, *, seed: int,
                 num_epochs: int | None = 1, shuffle: bool = True,
                 process_index: int | None = None, process_count: int | None = None) -> grain.MapDataset:
    """A grain dataset of batches for this process (`batch_size` is per process).

    `processor` maps one stored example to arrays (normally an `ExampleProcessor`).

    `process_index`/`process_count` default to `jax.process_index()`/`jax.process_count()`.
    `num_epochs=None` repeats forever. Iterate with `iter(ds)`; the iterator has
    `get_state()`/`set_state()`.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} must be in [0, process_count={count})")
    ds = grain.MapDataset.source(source)
    ds = ds[:len(ds) - len(ds) % count][index::count]
    if len(ds) < batch_size:
        raise ValueError(f"process {index} of {count} has {len(ds)} examples, fewer than batch_size={batch_size}")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    return ds.map(processor).batch(batch_size, drop_remainder=True)


def make_global_batch(batch: Mapping[str, np.ndarray],
                      sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding]) -> dict[str, jax.Array]:
    """Process-local batch -> global `jax.Array`s (the global batch is the concatenation over
    processes along axis 0). `sharding`: one sharding for every key, or one per key."""
    out = {}
    for key, local in batch.items():
        s = sharding[key] if isinstance(sharding, Mapping) else sharding
        out[key] = jax.make_array_from_process_local_data(s, np.asarray(local))
    return out


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
