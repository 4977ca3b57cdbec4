"""Scan an image collection with SafeVLM's safety head alone (guard mode).

    python -m safevlm_jax.scan --checkpoint CKPT --images DIR_OR_GLOB_OR_TFDS --out OUT \
        [--batch_size 64] [--policy policy.json] [--no_blur] [--distributed] [--mesh tensor=4]

`--images` is a folder (walked recursively), a glob (`**` allowed) or a dataset directory
built by `safevlm_jax.data.build` (every split; keys `split[index]`). Writes:

  OUT/verdicts.jsonl  one object per image: path, risk_level, risk_type, risk_type_name,
                      risk_level_probs, risk_type_probs, action (the risk policy's)
  OUT/skipped.jsonl   unreadable / corrupt / too-large images: path, reason, detail
  OUT/summary.md, OUT/histogram.png, OUT/contact_sheet.png   (`safevlm_jax.guard.report`)

Re-running skips every path already in verdicts.jsonl or skipped.jsonl. With `--distributed`
(`jax.distributed.initialize`), process p of n scores items p, p+n, ... of the sorted list
on its local devices, writing `OUT/parts/*-p-of-n.jsonl`; process 0 merges them into
verdicts.jsonl and skipped.jsonl and writes the report.
"""

from __future__ import annotations

from absl import flags

from safevlm_jax import cli
from safevlm_jax.guard.collection import scan
from safevlm_jax.safety.policy import RiskPolicy, load_policy

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "checkpoint directory (safety modules on)", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("images", None, "folder, glob or TFDS dataset directory", required=True,
                    flag_values=FLAGS)
flags.DEFINE_string("out", None, "output directory (re-use it to resume)", required=True, flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 64, "images per step (all local devices)", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("policy", None, "risk policy file (JSON/YAML; default: the paper's rules)", flag_values=FLAGS)
flags.DEFINE_bool("no_blur", False, "do not blur the contact sheet thumbnails", flag_values=FLAGS)
flags.DEFINE_bool("no_progress", False, "no tqdm bar", flag_values=FLAGS)
cli.define_mesh_flag(FLAGS)
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host; settings from the "
                  "environment)", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    policy = load_policy(FLAGS.policy) if FLAGS.policy else RiskPolicy()
    if FLAGS.distributed:
        import jax

        jax.distributed.initialize()
    counts = scan(FLAGS.checkpoint, FLAGS.images, FLAGS.out, batch_size=FLAGS.batch_size, policy=policy,
                  blur=not FLAGS.no_blur, progress=not FLAGS.no_progress, mesh=cli.mesh_flag(FLAGS))
    print(" ".join(f"{k}={v}" for k, v in counts.items()) + f" out={FLAGS.out}")


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
