"""Peak host memory of `import_hf` on a sharded safetensors model, against its largest shard.

    python benchmarks/convert_rss.py [--hidden 1024 --layers 8 --shard_mb 64]

Builds a random LLaVA (CLIP-L-like tower, a LLaMA of the given size) in float32, saves it with
`max_shard_size`, then runs the import in a fresh process and reads its peak RSS
(`ru_maxrss`). The baseline is the same process importing the libraries and building the
config only, so "import overhead" is what streaming the weights costs. Prints a table, then
one line of key=value.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from safevlm_jax import cli  # noqa: E402

FLAGS = flags.FlagValues()
flags.DEFINE_integer("hidden", 1024, "the LLaMA's hidden size (its MLP: 2.6875x that)", flag_values=FLAGS)
flags.DEFINE_integer("layers", 8, "the LLaMA's layers", flag_values=FLAGS)
flags.DEFINE_integer("shard_mb", 64, "max_shard_size of the saved model, in MB", flag_values=FLAGS)

CHILD = """
import resource, sys
from checkpoints_tools import import_hf
from safevlm_jax.checkpoint.format import abstract_model
from safevlm_jax.config import ModelConfig
config = ModelConfig.from_hf(sys.argv[1])
abstract_model(config)
if sys.argv[3] == "import":
    import_hf.import_hf(sys.argv[1], sys.argv[2], log=lambda *a: None)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak(hf_dir: str, out: str, mode: str) -> int:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TQDM_DISABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", CHILD, hf_dir, out, mode], capture_output=True,
                         text=True, env=env, cwd=root, check=True)
    return int(run.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    del argv
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                           num_attention_heads=4, image_size=56, patch_size=14)
    text = transformers.LlamaConfig(vocab_size=32064, hidden_size=FLAGS.hidden,
                                    intermediate_size=int(FLAGS.hidden * 2.6875),
                                    num_hidden_layers=FLAGS.layers, num_attention_heads=8,
                                    max_position_embeddings=512)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        model = transformers.LlavaForConditionalGeneration(config)
        model.save_pretrained(hf_dir, max_shard_size=f"{FLAGS.shard_mb}MB")
        del model
        files = [f for f in os.listdir(hf_dir) if f.endswith(".safetensors")]
        sizes = [os.path.getsize(os.path.join(hf_dir, f)) for f in files]
        base = _peak(hf_dir, os.path.join(tmp, "unused"), "baseline")
        peak = _peak(hf_dir, os.path.join(tmp, "ckpt"), "import")
    mb = 2**20
    rows = [("model size (MiB)", sum(sizes) / mb), ("shards", len(files)),
            ("largest shard (MiB)", max(sizes) / mb), ("baseline RSS (MiB)", base / mb),
            ("import peak RSS (MiB)", peak / mb), ("import overhead (MiB)", (peak - base) / mb),
            ("overhead / largest shard", (peak - base) / max(sizes))]
    for name, value in rows:
        print(f"{name:28s} {value:10.2f}")
    print(f"model_mib={sum(sizes) / mb:.1f} largest_shard_mib={max(sizes) / mb:.1f} "
          f"baseline_rss_mib={base / mb:.1f} peak_rss_mib={peak / mb:.1f} "
          f"overhead_over_largest_shard={(peak - base) / max(sizes):.2f}")


if __name__ == "__main__":
    cli.run(main, FLAGS)
