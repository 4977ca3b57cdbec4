"""Training input: the data pipeline for `config.data`, per process, with resumable state.

With `data.dataset_dir = ""` a synthetic dataset (and a tiny tokenizer trained on it) is built
once under WORKDIR/synthetic by process 0, so the tiny presets train end to end from nothing.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import transformers
from jax.experimental import multihost_utils

from safevlm_jax.checkpoint.io import is_primary
from safevlm_jax.config import ModelConfig
from safevlm_jax.data import pipeline, synthetic
from safevlm_jax.data.images import ImageConfig
from safevlm_jax.data.template import TextEncoder
from safevlm_jax.data.tfds_builder import build_dataset
from safevlm_jax.data.tokenizer import check_matches_model, train_tokenizer

READY = "READY"


def prepare_synthetic(root: str, num_examples: int, seed: int, mcfg: ModelConfig) -> tuple[str, str]:
    """Builds (once; process 0) synthetic data + tokenizer under `root`; every process waits.
    Returns (dataset_dir, tokenizer_dir)."""
    raw, tfds_dir, tok_dir = (os.path.join(root, d) for d in ("raw", "tfds", "tokenizer"))
    marker = os.path.join(root, READY)
    if is_primary() and not os.path.exists(marker):
        json_path = synthetic.generate(raw, num_examples, seed, image_size=max(64, mcfg.vision.image_size))
        dataset_dir, _ = build_dataset(json_path, raw, tfds_dir, overwrite=True, validation_fraction=0.0)
        with open(json_path) as f:
            texts = [t["value"] for r in json.load(f) for t in r["conversations"]]
        train_tokenizer(texts, vocab_size=mcfg.image_token_index, out_dir=tok_dir)
        with open(marker, "w") as f:
            f.write(dataset_dir)
    multihost_utils.sync_global_devices("synthetic data ready")
    with open(marker) as f:
        return f.read().strip(), tok_dir


def make_dataset(cfg, mcfg: ModelConfig, workdir: str, batch_per_process: int, num_epochs: int | None,
                 process_index: int | None = None, process_count: int | None = None):
    """(grain IterDataset of this process's batches, examples per process per epoch).
    `process_index`/`process_count` default to this JAX process's."""
    d = cfg.data
    dataset_dir, tok_dir = d.dataset_dir, d.tokenizer
    if not dataset_dir:
        dataset_dir, synth_tok = prepare_synthetic(os.path.join(workdir, "synthetic"),
                                                   d.synthetic_examples, cfg.seed, mcfg)
        tok_dir = tok_dir or synth_tok
    if not tok_dir:
        raise ValueError("config.data.tokenizer: a tokenizer directory is needed with a real dataset")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir)
    check_matches_model(tokenizer, mcfg)
    encoder = TextEncoder(tokenizer, mcfg.num_image_tokens, d.max_length, template=d.template)
    processor = pipeline.ExampleProcessor(
        encoder, ImageConfig(image_size=mcfg.vision.image_size, aspect_mode=d.aspect_mode),
        pad_token_id=mcfg.pad_token_id)
    source = pipeline.data_source(dataset_dir)
    count = jax.process_count() if process_count is None else process_count
    ds = pipeline.make_dataset(source, processor, batch_per_process, seed=cfg.seed,
                               num_epochs=num_epochs, process_index=process_index,
                               process_count=count)
    options = grain.ReadOptions(num_threads=d.read_threads, prefetch_buffer_size=d.prefetch)
    return ds.to_iter_dataset(options), len(source) // count
