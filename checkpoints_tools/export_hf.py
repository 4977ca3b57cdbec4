"""Export a `safevlm_jax` checkpoint to an HF LLaVA directory, array by array.

    python -m checkpoints_tools.export_hf --checkpoint ckpt/safevlm7b --out hf/safevlm7b [--merge_lora]

Writes `config.json` + sharded `model-*.safetensors` (+ index) that
`LlavaForConditionalGeneration.from_pretrained` loads, the tokenizer/image-processor files
(tokenizer_config.json declaring the class it had before `import_hf`),
`safety_modules.safetensors` under the authors' key names (docs/checkpoint_format.md;
`import_safety` reads it back) and, when the checkpoint has LoRA and `--merge_lora` is not given, a
peft adapter in
`lora_adapter/`. With `--merge_lora` the LoRA update is added to the base kernels (in f32,
then cast to the stored dtype) and no adapter is written.
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags
from tqdm import tqdm

from checkpoints_tools.keymap import KEY_STYLES, Rule, llava_rules, lora_rules, safety_rules, styled_hf_key
from checkpoints_tools.safetensors_io import ShardWriter, parse_size, save_tensors
from safevlm_jax import cli
from safevlm_jax.checkpoint.format import check_matches, copy_assets, load_config
from safevlm_jax.checkpoint.io import CONFIG_FILE, ParamReader, atomic_directory, iter_unscanned
from safevlm_jax.config import ModelConfig
from safevlm_jax.models.lora import fold

ADAPTER_DIR = "lora_adapter"
SAFETY_FILE = "safety_modules.safetensors"
READ_BYTES = 1 << 28  # stored arrays restored at a time: memory, not the shard size, bounds it


def _emit(reader: ParamReader, rules: list[Rule], extra: dict[str, list[str]], budget: int):
    """Yields (rule, [our arrays], {extra key: array}) reading each stored array once;
    `extra` names more of our paths a rule needs (its LoRA factors, for merging)."""
    wanted = {p: r for r in rules for p in (*r.jax, *extra.get(r.hf, ()))}
    pending: dict[str, np.ndarray] = {}
    for key, array in iter_unscanned(reader, sorted(wanted), budget):
        pending[key] = array
        rule = wanted[key]
        need = (*rule.jax, *extra.get(rule.hf, ()))
        if all(p in pending for p in need):
            yield rule, [pending.pop(p) for p in rule.jax], {p: pending.pop(p) for p in extra.get(rule.hf, ())}


def adapter_config(config: ModelConfig, base: str) -> dict:
    """peft `LoraConfig` fields for our LoRA (language-model linears only)."""
    names = "|".join(config.lora.targets)
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
            "r": config.lora.rank, "lora_alpha": config.lora.alpha,
            "lora_dropout": config.lora.dropout, "bias": "none", "fan_in_fan_out": False,
            "target_modules": rf".*language_model.*\.({names})", "inference_mode": True,
            "use_rslora": False, "use_dora": False, "modules_to_save": None}


def export_hf(checkpoint: str, out: str, merge_lora: bool = False, key_style: str = "published",
              max_shard_size: str | int = "5GB", overwrite: bool = False, log=print) -> list[str]:
    """Writes checkpoint `checkpoint` as HF directory `out` (atomically); returns the files."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key style {key_style!r}; known: {sorted(KEY_STYLES)}")
    config = load_config(checkpoint)
    reader = ParamReader(checkpoint)
    check_matches(config, reader.shapes, checkpoint)
    has_lora = config.lora.rank > 0
    rules = llava_rules(config)
    merge = {}
    if has_lora and merge_lora:
        for r in rules:
            parts = r.jax[0].split("/")
            if parts[-1] == "kernel" and parts[-2] in config.lora.targets and "language_model" in parts:
                merge[r.hf] = [r.jax[0].replace("/kernel", "/lora/lora_a"),
                               r.jax[0].replace("/kernel", "/lora/lora_b")]
    budget = min(parse_size(max_shard_size), READ_BYTES)
    with atomic_directory(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for rule, arrays, lora in tqdm(_emit(reader, rules, merge, budget), total=len(rules),
                                       desc="export", unit="tensor"):
            if lora:
                a, b = (lora[p] for p in merge[rule.hf])
                arrays = [np.asarray(fold(arrays[0], a, b, config.lora.scaling))]
            writer.add(styled_hf_key(rule.hf, key_style), rule.transform.to_hf(arrays))
        files = writer.close()
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            json.dump(config.to_hf().to_dict(), f, indent=2, sort_keys=True)
        files += copy_assets(checkpoint, tmp, hf_layout=True)
        if config.safety.enabled:
            sr = safety_rules(config)
            save_tensors(os.path.join(tmp, SAFETY_FILE),
                         {r.hf: r.transform.to_hf(arrays) for r, arrays, _ in _emit(reader, sr, {}, budget)})
            files.append(SAFETY_FILE)
        if has_lora and not merge_lora:
            os.makedirs(os.path.join(tmp, ADAPTER_DIR))
            lr = lora_rules(config)
            save_tensors(os.path.join(tmp, ADAPTER_DIR, "adapter_model.safetensors"),
                         {r.hf: r.transform.to_hf(arrays) for r, arrays, _ in _emit(reader, lr, {}, budget)})
            with open(os.path.join(tmp, ADAPTER_DIR, "adapter_config.json"), "w") as f:
                json.dump(adapter_config(config, os.path.abspath(out)), f, indent=2)
            files.append(ADAPTER_DIR)
    log(f"wrote {out}: {files}")
    return files


FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "safevlm_jax checkpoint directory.", required=True, flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output HF directory.", required=True, flag_values=FLAGS)
flags.DEFINE_bool("merge_lora", False, "Add LoRA into the base weights instead of a peft adapter.",
                  flag_values=FLAGS)
flags.DEFINE_enum("key_style", "published", sorted(KEY_STYLES), "Tensor names: llava-hf's "
                  "published files or what transformers 5 save_pretrained writes.", flag_values=FLAGS)
flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    export_hf(FLAGS.checkpoint, FLAGS.out, FLAGS.merge_lora, FLAGS.key_style, FLAGS.max_shard_size,
              FLAGS.overwrite)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
