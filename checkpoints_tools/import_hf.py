"""Import an HF LLaVA-1.5 directory into a `safevlm_jax` checkpoint, shard by shard.

    python -m checkpoints_tools.import_hf --hf_dir llava-1.5-7b-hf --out ckpt/llava7b [--dtype bfloat16]

Sizes come from the HF `config.json` (through `ModelConfig.from_hf`); tensors keep their
dtype unless `--dtype` is given; the tokenizer and image-processor files are copied, so that
transformers tokenizes in the checkpoint exactly as in `--hf_dir` (`checkpoint.tokenizer_files`),
and LLaVA-1.5's conversation template (v1) is recorded in config.json. Safety modules are not
part of LLaVA: they are initialised from `--seed` (and the log says so).
"""

from __future__ import annotations

import numpy as np
from absl import flags
from flax import nnx
from tqdm import tqdm

from checkpoints_tools.keymap import canonical_hf_key, llava_rules
from checkpoints_tools.safetensors_io import SafetensorsDir
from safevlm_jax import cli
from safevlm_jax.checkpoint.format import abstract_model, checkpoint_writer
from safevlm_jax.checkpoint.io import flat_values
from safevlm_jax.config import ModelConfig, SafetyConfig
from safevlm_jax.models.safety_head import SafetyHead, init_safety_tokens
from safevlm_jax.models.safety_projector import SafetyProjector

SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
# Converted arrays handed to the checkpoint writer at a time (at most a shard). The writer
# (orbax) holds a copy of what it is given until it is written, so a piece costs about twice its
# size: a whole 5 GB shard at once peaked at 3.9x the shard (its memory-mapped pages counted too).
PIECE_BYTES = 1 << 28


def source_dtype(src: SafetensorsDir) -> str:
    """The one floating dtype of the source (a mix is an error: pass an explicit dtype)."""
    kinds = {d: sorted(k for k in src.dtypes if src.dtypes[k] == d)[:3] for d in set(src.dtypes.values())}
    if len(kinds) != 1 or next(iter(kinds)) not in SAFETENSORS_DTYPES:
        raise ValueError(f"{src.directory}: tensors have dtypes {kinds}; pass --dtype to convert "
                         f"them all to one floating dtype")
    return SAFETENSORS_DTYPES[next(iter(kinds))]


def init_safety(config: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Fresh safety tokens, projector and head ({our path: array})."""
    rngs = nnx.Rngs(seed)
    modules = nnx.Dict(safety_projector=SafetyProjector(config, rngs=rngs),
                       safety_tokens_head=init_safety_tokens(config, rngs),
                       safety_tokens_llm=init_safety_tokens(config, rngs),
                       safety_head=SafetyHead(config, rngs=rngs))
    return {k: np.asarray(v) for k, v in flat_values(nnx.state(modules, nnx.Param)).items()}


def import_hf(hf_dir: str, out: str, dtype: str | None = None, overwrite: bool = False,
              safety: SafetyConfig = SafetyConfig(), seed: int = 0, log=print) -> ModelConfig:
    """Converts `hf_dir` (HF LLaVA safetensors, any key style of docs/checkpoint_format.md)
    into checkpoint `out`; returns its config. `safety`: the safety modules' settings
    (docs/safety_modules.md by default; `enabled=False` gives plain LLaVA). Errors list every
    missing/unexpected key and every shape mismatch (key, file, expected, got) before anything
    is written."""
    src = SafetensorsDir(hf_dir)
    param_dtype = dtype or source_dtype(src)
    config = ModelConfig.from_hf(hf_dir, param_dtype=param_dtype, dtype=param_dtype,
                                 safety=safety)
    rules = {r.hf: r for r in llava_rules(config)}
    canonical = {}
    for key in src.shapes:
        c = canonical_hf_key(key)
        if c in canonical:
            raise ValueError(f"{hf_dir}: {key} and {canonical[c]} name the same tensor")
        canonical[c] = key
    ours = {k: v.shape for k, v in flat_values(nnx.state(abstract_model(config), nnx.Param)).items()}
    missing = sorted(set(rules) - set(canonical))
    extra = sorted(canonical[c] for c in set(canonical) - set(rules))
    bad = [f"{canonical[c]} ({src.file_of(canonical[c])}): expected {r.transform.hf_shape([ours[p] for p in r.jax])}, "
           f"got {src.shapes[canonical[c]]}" for c, r in rules.items()
           if c in canonical and tuple(src.shapes[canonical[c]]) != r.transform.hf_shape([ours[p] for p in r.jax])]
    if missing or extra or bad:
        raise ValueError(f"{hf_dir} does not match its config.json: missing keys {missing}; "
                         f"unexpected keys {extra}; shape mismatch {bad}")
    with checkpoint_writer(out, config, assets_dir=hf_dir, overwrite=overwrite, template="v1") as write:
        for path, tensors in tqdm(src.iter_shards(), total=len(src.files), desc="import", unit="shard"):
            pending, size = {}, 0
            for key, x in tensors:
                rule = rules[canonical_hf_key(key)]
                for p, y in zip(rule.jax, rule.transform.to_jax(x, param_dtype)):
                    pending[p], size = y, size + y.nbytes
                del x
                if size >= PIECE_BYTES:
                    write(pending)
                    pending, size = {}, 0
            if pending:
                write(pending)
            del pending
        if safety.enabled:
            write({k: v.astype(param_dtype) for k, v in init_safety(config, seed).items()})
            log(f"safety modules are not in {hf_dir}: initialised from seed {seed} "
                f"(load trained ones with checkpoints_tools.import_safety)")
    log(f"wrote {out} ({len(rules)} tensors, {param_dtype})")
    return config


FLAGS = flags.FlagValues()
flags.DEFINE_string("hf_dir", None, "HF LLaVA directory (config.json + *.safetensors).", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output checkpoint directory.", required=True, flag_values=FLAGS)
flags.DEFINE_string("dtype", None, "Parameter dtype (default: keep the source dtype).", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)
flags.DEFINE_bool("safety", True, "Add (freshly initialised) SafeVLM safety modules.", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the safety modules' initialisation.", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    import_hf(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, FLAGS.overwrite, SafetyConfig(enabled=FLAGS.safety),
              FLAGS.seed)


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
