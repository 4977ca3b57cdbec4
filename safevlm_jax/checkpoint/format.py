"""The library's checkpoint format: save, load and partially restore a `SafeVLM`.

A checkpoint is a directory:

    params/        orbax PyTree of the model's `nnx.Param`s (nested dicts, string keys)
    config.json    `ModelConfig` (sizes, dtypes, safety/LoRA settings) and, under
                   "conversation_template", the `ConversationTemplate` the model was trained
                   with (absent in older checkpoints: LLaVA-1.5's v1)
    tokenizer.json, tokenizer_config.json, preprocessor_config.json, ...   (optional assets;
                   tokenizer_config.json names the class transformers loaded them with at the
                   source, `checkpoint.tokenizer_files`)

Writes go to a temporary sibling directory renamed at the end, so a crash leaves nothing
half-written; on multi-process runs every process saves its shards of the arrays into the
same one and process 0 writes the rest (`checkpoint.io.atomic_directory`). Loads restore
every array straight into its target sharding (`ShapeDtypeStruct` with a `NamedSharding`,
no host copy of the whole model) and convert between the scanned ([num_layers, ...] stacks)
and unscanned layouts, so any checkpoint loads into any model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from orbax.checkpoint import v1 as ocp

from safevlm_jax import sharding
from safevlm_jax.checkpoint.io import (_STACKED, CONFIG_FILE, PARAMS_DIR, ParamReader, atomic_directory,
                                       finalize_partial, flat_values, is_primary, local_path, nest, path_str,
                                       unstacked_shapes, write_partial)
from safevlm_jax.checkpoint.tokenizer_files import pin_tokenizer_class, restore_tokenizer_class
from safevlm_jax.config import ModelConfig
from safevlm_jax.data.template import ConversationTemplate, get_template
from safevlm_jax.models.safevlm import SafeVLM

TEMPLATE_KEY = "conversation_template"

ASSET_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
               "processor_config.json", "chat_template.json", "chat_template.jinja",
               "generation_config.json")


def abstract_model(config: ModelConfig, seed: int = 0) -> SafeVLM:
    """The model with `ShapeDtypeStruct` leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: SafeVLM(config, rngs=nnx.Rngs(seed)))


def check_matches(config: ModelConfig, shapes: Mapping[str, tuple], where: str) -> None:
    """Raises a ValueError listing every missing/unexpected key and shape mismatch between
    the parameters `config` builds and `shapes` ({key: shape}, either layout)."""
    want = unstacked_shapes({k: v.shape for k, v in
                             flat_values(nnx.state(abstract_model(config), nnx.Param)).items()})
    got = unstacked_shapes(shapes)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    bad = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(set(want) & set(got))
           if want[k] != got[k]]
    if missing or extra or bad:
        raise ValueError(f"{where}: weights do not match the model config: "
                         f"missing {missing}; unexpected {extra}; shape mismatch {bad}")


def copy_assets(src_dir: str, dst_dir: str, hf_layout: bool = False) -> list[str]:
    """Copies the tokenizer / image-processor files of ASSET_FILES found in `src_dir`, so that
    transformers loads the tokenizer in `dst_dir` as in `src_dir` (a checkpoint of ours), or,
    with `hf_layout`, declaring the tokenizer class the files had before their import."""
    found = [f for f in ASSET_FILES if os.path.isfile(os.path.join(src_dir, f))]
    for f in found:
        shutil.copy2(os.path.join(src_dir, f), os.path.join(dst_dir, f))
    restore_tokenizer_class(dst_dir) if hf_layout else pin_tokenizer_class(src_dir, dst_dir)
    return found


def _read_config_json(directory: str) -> tuple[str, dict]:
    path = os.path.join(local_path(directory, "checkpoint"), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory}: not a checkpoint (no {CONFIG_FILE})")
    with open(path) as f:
        try:
            return path, json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def load_config(directory: str) -> ModelConfig:
    """The `ModelConfig` of checkpoint `directory`; FileNotFoundError if it has no config.json
    (ValueError for a URL: see `checkpoint.io.local_path`)."""
    path, data = _read_config_json(directory)
    data.pop(TEMPLATE_KEY, None)
    try:
        return ModelConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def load_template(directory: str) -> ConversationTemplate:
    """The conversation template checkpoint `directory` was trained with (its config.json's
    "conversation_template"); LLaVA-1.5's v1 for older checkpoints that do not record one."""
    path, data = _read_config_json(directory)
    if TEMPLATE_KEY not in data:
        return get_template("v1")
    try:
        return ConversationTemplate.from_dict(data[TEMPLATE_KEY])
    except ValueError as e:
        raise ValueError(f"{path}: {TEMPLATE_KEY}: {e}") from e


def _write_metadata(tmp: str, config: ModelConfig, assets_dir: str | None,
                    template: ConversationTemplate | str) -> None:
    """config.json (with the template) and the assets of `assets_dir` (if any), from process 0."""
    if is_primary():
        config.save(os.path.join(tmp, CONFIG_FILE), {TEMPLATE_KEY: get_template(template).to_dict()})
        if assets_dir:
            copy_assets(assets_dir, tmp)


def save_checkpoint(directory: str, model_or_state: nnx.Module | nnx.State, config: ModelConfig,
                    *, assets_dir: str | None = None, overwrite: bool = False,
                    template: ConversationTemplate | str = "v1") -> str:
    """Writes the `nnx.Param`s of a model (or a State of Params) with `config`, atomically.

    Arrays may be sharded over any mesh; they are saved in the model's layout (scanned or
    not). `assets_dir`: copy tokenizer/image-processor files from there. `template`: the
    conversation template the model was trained with (recorded in config.json). Refuses an
    existing `directory` unless `overwrite`. Returns `directory`.

    Multi-process: every process calls it with the same `directory` and the same global
    (possibly cross-process sharded) arrays; each writes its shards, process 0 the metadata,
    and all return once `directory` is complete.
    """
    state = (nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module)
             else model_or_state)
    flat = flat_values(state)
    check_matches(config, {k: v.shape for k, v in flat.items()}, directory)
    with atomic_directory(directory, overwrite) as tmp:
        ocp.save(os.path.join(tmp, PARAMS_DIR), nest(flat))
        _write_metadata(tmp, config, assets_dir, template)
    return directory


@contextlib.contextmanager
def checkpoint_writer(directory: str, config: ModelConfig, *, assets_dir: str | None = None,
                      overwrite: bool = False, template: ConversationTemplate | str = "v1"
                      ) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """Streaming save: yields `write({key: array})`, called once per piece (e.g. a few hundred
    MB of a source shard), so the whole model is never in memory. orbax holds a copy of a piece
    until it is on disk, so a piece costs twice its size: keep pieces small. On exit the pieces
    must cover exactly the parameters of `config` (unscanned keys); otherwise nothing is written.
    `assets_dir`, `template`: as for `save_checkpoint`."""
    with atomic_directory(directory, overwrite) as tmp:
        params, shapes = os.path.join(tmp, PARAMS_DIR), {}

        def write(flat: Mapping[str, Any]) -> None:
            again = sorted(set(flat) & set(shapes))
            if again:
                raise ValueError(f"{directory}: parameters written twice: {again}")
            write_partial(params, flat)
            shapes.update({k: tuple(v.shape) for k, v in flat.items()})

        yield write
        check_matches(config, shapes, directory)
        finalize_partial(params)
        _write_metadata(tmp, config, assets_dir, template)


def _drop_leading(s):
    return NamedSharding(s.mesh, P(*tuple(s.spec)[1:])) if isinstance(s, NamedSharding) else s


def _add_leading(s):
    return NamedSharding(s.mesh, P(None, *tuple(s.spec))) if isinstance(s, NamedSharding) else s


def restore_params(directory: str, abstract_state: nnx.State, shardings: nnx.State | None = None,
                   prefix: str = "") -> nnx.State:
    """Restores the variables of `abstract_state` (a State of Params with ShapeDtypeStruct or
    array leaves, any subset of the model) from `directory`, in their dtype and in `shardings`
    (a matching State of shardings, e.g. from `sharding.state_shardings`; default: one device).

    `prefix`: where `abstract_state` sits in the model when it is a subtree (e.g.
    "language_model/"). Either layout is converted to the target's. Parameters in the checkpoint but not in
    `abstract_state` are ignored; missing ones or a shape mismatch raise a ValueError naming
    every key.
    """
    reader = ParamReader(directory)
    variables = {prefix + path_str(p): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shard = ({prefix + k: s for k, s in flat_values(shardings).items()} if shardings is not None
             else {})
    target = {k: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                      sharding=shard.get(k, default)) for k, (_, v) in variables.items()}
    have = unstacked_shapes(reader.shapes)
    want = unstacked_shapes({k: t.shape for k, t in target.items()})
    missing = sorted(set(want) - set(have))
    bad = [f"{k}: expected {want[k]}, got {have[k]}" for k in sorted(set(want) & set(have))
           if want[k] != have[k]]
    if missing or bad:
        raise ValueError(f"{reader.path}: cannot restore: missing {missing}; shape mismatch {bad}")

    values = {}
    direct = [k for k in target if k in reader.shapes]
    values.update(reader.read(direct, {k: target[k].sharding for k in direct},
                              {k: target[k].dtype for k in direct}))
    for key in sorted(set(target) - set(direct)):
        t = target[key]
        if _STACKED.match(key):  # scanned target from per-layer arrays, one parameter at a time
            head, rest = _STACKED.match(key).groups()
            keys = [f"{head}/{i}/{rest}" for i in range(t.shape[0])]
            layers = reader.read(keys, dict.fromkeys(keys, _drop_leading(t.sharding)),
                                 dict.fromkeys(keys, t.dtype))
            stack = jax.jit(lambda *a: jnp.stack(a), out_shardings=t.sharding)
            values[key] = stack(*(layers[k] for k in keys))
        else:  # one layer of a scanned checkpoint
            stored, index = reader.locate(key)
            full = reader.read([stored], {stored: _add_leading(t.sharding)}, {stored: t.dtype})[stored]
            values[key] = jax.jit(lambda a, i=index: a[i], out_shardings=t.sharding)(full)
    return nnx.from_flat_state([(p, v.replace(values[k])) for k, (p, v) in variables.items()])


def load_checkpoint(directory: str, mesh: jax.sharding.Mesh | None = None,
                    rules: str | Mapping[str, Any] | None = None, scan_layers: bool | None = None,
                    seed: int = 0) -> tuple[ModelConfig, SafeVLM]:
    """Builds the model of `directory/config.json` and restores its parameters.

    mesh/rules: shard every parameter by its logical axes (`safevlm_jax.sharding`, default
    rules "fsdp"); without a mesh everything lands on the default device. scan_layers:
    override the config's layer layout (the stored layout is converted either way). `seed`
    initialises non-parameter state (dropout RNGs). Returns (config, model).
    """
    config = load_config(directory)
    if scan_layers is not None:
        config = config.replace(scan_layers=scan_layers)
    check_matches(config, ParamReader(directory).shapes, directory)
    graphdef, params, rest = nnx.split(abstract_model(config, seed), nnx.Param, ...)
    shardings = (sharding.state_shardings(params, mesh, rules or "fsdp") if mesh is not None
                 else None)
    params = restore_params(directory, params, shardings)
    if jax.tree.leaves(rest):
        rest = jax.jit(lambda: nnx.split(SafeVLM(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)[2])()
    return config, nnx.merge(graphdef, params, rest)
