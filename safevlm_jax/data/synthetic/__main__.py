"""Command line: `python -m safevlm_jax.data.synthetic --out DIR --n N [--seed S] [--image_size P]`
writes N synthetic examples (`safevlm_jax.data.synthetic.generate`) and prints the path of
their data.json."""

from __future__ import annotations

from absl import flags

from safevlm_jax import cli
from safevlm_jax.data.synthetic import generate

FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "output directory", required=True, flag_values=FLAGS)
flags.DEFINE_integer("n", None, "number of examples", required=True, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "random seed (part of every id)", flag_values=FLAGS)
flags.DEFINE_integer("image_size", 64, "image side in pixels", flag_values=FLAGS)


def _main(argv) -> None:
    del argv
    print(generate(FLAGS.out, FLAGS.n, FLAGS.seed, FLAGS.image_size))


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring); `argv`: the flags (default: sys.argv)."""
    cli.run(_main, FLAGS, argv)


if __name__ == "__main__":
    main()
