"""Import the authors' trained safety modules into a `safevlm_jax` checkpoint.

    python -m checkpoints_tools.import_safety --src safevlm_release.bin --checkpoint ckpt/llava7b

`--src` is a torch state dict (read with `torch.load(weights_only=True)`, memory-mapped) or a
safetensors file, with the authors' key names (docs/checkpoint_format.md, `keymap.safety_rules`),
possibly among the other keys of a whole-model state dict and under a prefix such as `model.` (found
automatically, or given with `--prefix`). `--rename` takes a JSON file {key in the file:
authors' key} for releases that name things differently. The checkpoint is rewritten
atomically (in place, or to `--out`); its other parameters are copied unchanged.
`--query_token pad` records that the head reads the `<pad>` embedding, as the authors'
training code trained it (`SafetyConfig.query_token`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np
from absl import flags

from checkpoints_tools.keymap import safety_rules
from safevlm_jax import cli
from safevlm_jax.checkpoint.format import check_matches, checkpoint_writer, load_config, load_template
from safevlm_jax.checkpoint.io import ParamReader, iter_unscanned, unstacked_shapes

COPY_BUDGET = 1 << 30  # bytes of other parameters copied per orbax write


def open_tensors(path: str) -> tuple[list[str], Callable[[str], np.ndarray]]:
    """(keys, get) of a safetensors file or a torch state dict; `get(key)` reads one tensor
    (bf16 kept bit for bit), so a whole-model file is never loaded at once."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="np") as f:
            keys = list(f.keys())

        def get(key):
            with safe_open(path, framework="np") as f:
                return f.get_tensor(key)

        return keys, get
    import ml_dtypes
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")

    def get_torch(key):
        t = obj[key].detach().contiguous()
        return (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                else t.numpy())

    return [k for k, v in obj.items() if isinstance(v, torch.Tensor)], get_torch


def find_prefix(keys, names: list[str], where: str) -> str:
    """The one prefix under which every authors' key in `names` is present in `keys`."""
    keys = set(keys)
    anchor = names[0]
    candidates = sorted({k[:-len(anchor)] for k in keys if k.endswith(anchor)
                         and (k == anchor or k[-len(anchor) - 1] == ".")})
    complete = [p for p in candidates if all(p + n in keys for n in names)]
    if len(complete) == 1:
        return complete[0]
    if complete:
        raise ValueError(f"{where}: safety keys found under several prefixes {complete}; pass --prefix")
    best = max(candidates, key=lambda p: sum(p + n in keys for n in names), default="")
    raise ValueError(f"{where}: no complete set of safety keys (best prefix {best!r}); "
                     f"missing {[best + n for n in names if best + n not in keys]}")


def import_safety(src: str, checkpoint: str, out: str | None = None, prefix: str | None = None,
                  rename: dict[str, str] | None = None, cast: bool = False,
                  overwrite: bool = False, query_token: str | None = None, log=print) -> str:
    """Replaces the safety modules of `checkpoint` by those in `src`; writes `out` (default:
    `checkpoint`, atomically; another existing `out` only with `overwrite`). Shapes must
    match the checkpoint's config; dtypes too unless `cast`. `query_token`: the head's query
    in the output's config ("pad" for a head trained by the authors' PSA-VLM code, which read
    `<pad>` at position 0; `SafetyConfig.query_token`); None keeps the checkpoint's.
    Returns the output directory."""
    config = load_config(checkpoint)
    if query_token is not None:
        config = config.replace(safety=dataclasses.replace(config.safety, query_token=query_token))
    if not config.safety.enabled:
        raise ValueError(f"{checkpoint}: config.json has safety modules disabled")
    reader = ParamReader(checkpoint)
    check_matches(config, reader.shapes, checkpoint)
    src_keys, get = open_tensors(src)
    renamed = {(rename or {}).get(k, k): k for k in src_keys}
    rules = safety_rules(config)
    if prefix is None:
        prefix = find_prefix(renamed, [r.hf for r in rules], src)
    new, bad = {}, []
    for r in rules:
        key = prefix + r.hf
        if key not in renamed:
            bad.append(f"{key}: missing")
            continue
        locs = [reader.locate(p) for p in r.jax]
        want = r.transform.hf_shape([reader.shapes[s][1:] if i is not None else reader.shapes[s]
                                     for s, i in locs])
        dtype = reader.dtypes[locs[0][0]]
        x = get(renamed[key])
        if tuple(x.shape) != want:
            bad.append(f"{key}: expected shape {want}, got {tuple(x.shape)}")
        elif x.dtype != dtype and not cast:
            bad.append(f"{key}: expected dtype {dtype}, got {x.dtype} (pass --cast to convert)")
        else:
            new.update(zip(r.jax, (y.astype(dtype) for y in r.transform.to_jax(x))))
    if bad:
        raise ValueError(f"{src}: safety modules do not fit {checkpoint}: {bad}")
    out = out or checkpoint
    others = [k for k in sorted(unstacked_shapes(reader.shapes)) if k not in new]
    with checkpoint_writer(out, config, assets_dir=checkpoint, template=load_template(checkpoint),
                           overwrite=overwrite or os.path.abspath(out) == os.path.abspath(checkpoint)
                           ) as write:
        chunk, size = {}, 0
        for key, array in iter_unscanned(reader, others, COPY_BUDGET):
            chunk[key], size = array, size + array.nbytes
            if size >= COPY_BUDGET:
                write(chunk)
                chunk, size = {}, 0
        write({**chunk, **new})
    log(f"wrote {out}: {len(rules)} safety tensors from {src} (prefix {prefix!r})")
    return out


FLAGS = flags.FlagValues()
flags.DEFINE_string("src", None, "Authors' release: torch state dict (.bin/.pt/.pth) or .safetensors.",
                    required=True, flag_values=FLAGS)
flags.DEFINE_string("checkpoint", None, "safevlm_jax checkpoint to update.", required=True, flag_values=FLAGS)
flags.DEFINE_string("out", None, "Write here instead of updating --checkpoint in place.", flag_values=FLAGS)
flags.DEFINE_string("prefix", None, "Key prefix in --src (default: found automatically).", flag_values=FLAGS)
flags.DEFINE_string("rename", None, "JSON file {key in --src: authors' key name}.", flag_values=FLAGS)
flags.DEFINE_bool("cast", False, "Convert dtypes to the checkpoint's instead of failing.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)
flags.DEFINE_enum("query_token", None, ["bos", "pad"], "The safety head's query (default: keep the "
                  "checkpoint's): pad for weights trained by the authors' PSA-VLM code.", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    rename = None
    if FLAGS.rename:
        with open(FLAGS.rename) as f:
            try:
                rename = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"--rename {FLAGS.rename}: not valid JSON ({e})") from e
    import_safety(FLAGS.src, FLAGS.checkpoint, FLAGS.out, FLAGS.prefix, rename, FLAGS.cast,
                  FLAGS.overwrite, FLAGS.query_token)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
