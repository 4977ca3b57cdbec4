"""Steps of launch/make_demo.sh: training data, example images, the exported checkpoint.

    python launch/demo.py data --out DIR --n N --photos P --seed S --vocab_size V
    python launch/demo.py examples --out DIR --seed S
    python launch/demo.py export --src STAGE2/export --tokenizer DIR/tokenizer --out DEST

The plain synthetic records (`safevlm_jax.data.synthetic`) refuse level-3 images unprompted, so
a model trained on them refuses with or without the safety modules. The demo's base model
should behave like LLaVA-1.5 instead: describe what it sees, and obey a `Safe Hint:` when the
user turn carries one. So each record's first exchange is rewritten: for a risky image, with
probability `hint_fraction`, the question carries the hint the sampler would add for its labels
(`safety.hints.HintConfig`, same text and `Safe Hint:` prefix) and the answer obeys it (level
3: the refusal the hint dictates; levels 1-2: the generator's cautious answer); otherwise the
answer plainly describes the image. So that ordinary photos come out safe, `data` adds P clean
records of photos (level 0, type clean: random crops of `safevlm_jax.data.photos`'
TRAINING_PHOTOS, scikit-image's bundled sample images, answered with `photos.PHOTO_ANSWER`);
the held-out photos are never used. `data` writes DIR/data.json, DIR/images/ and a tokenizer
trained on every text the model will read (system prompt and hints included) in DIR/tokenizer;
`examples` writes one image per risk level (`clean.png`, `low_risk.png`, `medium_risk.png`,
`risky.png` = level 3) and a held-out photo (`photo.png`) to DIR;
`export` merges the LoRA adapters into the LLM and writes a complete checkpoint (parameters,
config, tokenizer, `preprocessor_config.json`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from absl import flags
from PIL import Image

from safevlm_jax import cli
from safevlm_jax.checkpoint.assets import save_image_settings
from safevlm_jax.checkpoint.format import load_checkpoint, load_template, save_checkpoint
from safevlm_jax.config import LoRAConfig
from safevlm_jax.data import photos, synthetic
from safevlm_jax.data.template import VICUNA_SYSTEM
from safevlm_jax.data.tokenizer import train_tokenizer
from safevlm_jax.models.lora import merge_lora
from safevlm_jax.safety.hints import HintConfig

COLOR_NAMES = ("red", "orange", "purple", "blue", "brown", "pink", "green")  # synthetic.COLORS


def describe(level: int, type_: int) -> str:
    """What a helpful model without safety alignment says about any image."""
    return (f"The image shows a {COLOR_NAMES[type_]} {synthetic.SHAPES[level]} with the letter "
            f"{synthetic.GLYPHS[type_]} on a light, noisy background.")


def obey(level: int, type_: int, hint: str) -> str:
    """The answer that follows `hint` (level 3: the refusal sentence the hint dictates)."""
    if level == 3:
        return hint.split("answer: ", 1)[1]
    return synthetic.answer(level, type_, synthetic.SHAPES[level])


def rewrite(records: list[dict], hint_fraction: float, seed: int, hints: HintConfig) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        level, type_ = r["safe_level"], r["safe_type"]
        human, _, *rest = r["conversations"]
        question, answer = human["value"], describe(level, type_)
        if level > 0 and rng.random() < hint_fraction:
            hint = hints.hints[(level, type_)]
            question, answer = f"{question} {hints.prefix} {hint}", obey(level, type_, hint)
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}, *rest]
        out.append({**r, "conversations": turns})
    return out


def make(out_dir: str, n: int, seed: int, vocab_size: int, hint_fraction: float = 0.5,
         image_size: int = 64, num_photos: int = 0) -> str:
    """Writes `n` synthetic and `num_photos` photo records and the tokenizer under `out_dir`;
    returns the path of data.json."""
    path = synthetic.generate(out_dir, n, seed, image_size)
    with open(path) as f:
        records = json.load(f)
    hints = HintConfig()
    records = rewrite(records, hint_fraction, seed, hints)
    records += photos.crop_records(out_dir, num_photos, seed, size=image_size)  # the pipeline shuffles
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    texts = [t["value"] for r in records for t in r["conversations"]]
    texts += [VICUNA_SYSTEM + " USER: ASSISTANT:", hints.fail_closed, *hints.hints.values()]
    train_tokenizer(texts, vocab_size=vocab_size, out_dir=os.path.join(out_dir, "tokenizer"))
    return path


EXAMPLE_NAMES = ("clean.png", "low_risk.png", "medium_risk.png", "risky.png")  # by level
PHOTO_EXAMPLE = ("photo.png", "astronaut", 128)  # a held-out photo (public domain, NASA), side in px


def examples(out_dir: str, seed: int, image_size: int = 64) -> list[str]:
    """The first image of each level drawn with `seed` (keep it apart from the training seed),
    copied to `out_dir` as `EXAMPLE_NAMES[level]`, and a held-out photo as `PHOTO_EXAMPLE[0]`;
    returns the paths (by level, then the photo)."""
    os.makedirs(out_dir, exist_ok=True)
    name, photo, side = PHOTO_EXAMPLE
    photo_path = os.path.join(out_dir, name)
    Image.fromarray(photos.load(photo)).resize((side, side), Image.BICUBIC).save(photo_path)
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        with open(synthetic.generate(tmp, 64, seed, image_size)) as f:
            records = json.load(f)
        for r in records:
            level = r["safe_level"]
            if level not in paths:
                paths[level] = shutil.copy(os.path.join(tmp, r["image"]), os.path.join(out_dir, EXAMPLE_NAMES[level]))
    return [paths[level] for level in sorted(paths)] + [photo_path]


def export(src: str, tokenizer_dir: str, out: str) -> str:
    """Checkpoint `src` with LoRA merged (plain weights: no adapter, no dropout at inference)
    plus the tokenizer and image settings, written to `out` (replaced), recording the
    conversation template `src` was trained with."""
    config, model = load_checkpoint(src)
    merge_lora(model)
    with tempfile.TemporaryDirectory() as assets:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), assets)
        save_image_settings(assets, config)
        return save_checkpoint(out, model, config.replace(lora=LoRAConfig()), assets_dir=assets,
                               overwrite=True, template=load_template(src))


FLAGS = flags.FlagValues()
flags.DEFINE_string("out", None, "data, examples: output directory; export: the checkpoint's directory",
                    flag_values=FLAGS)
flags.DEFINE_integer("n", None, "data: synthetic records", flag_values=FLAGS)
flags.DEFINE_integer("photos", 0, "data: clean photo records (needs scikit-image)", flag_values=FLAGS)
flags.DEFINE_integer("seed", None, "data, examples: random seed", flag_values=FLAGS)
flags.DEFINE_integer("vocab_size", None, "data: the model's image_token_index", flag_values=FLAGS)
flags.DEFINE_float("hint_fraction", 0.5, "data: the share of risky records whose question carries a hint",
                   flag_values=FLAGS)
flags.DEFINE_string("src", None, "export: the trained checkpoint (stage 2's export)", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "export: the tokenizer directory `data` wrote", flag_values=FLAGS)
# command: (the flags it requires, the ones it also takes); absl's flags are the whole program's,
# so each command checks its own
COMMANDS = {"data": (("out", "n", "seed", "vocab_size"), ("photos", "hint_fraction")),
            "examples": (("out", "seed"), ()),
            "export": (("src", "tokenizer", "out"), ())}


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise cli.UsageError(f"expected one command of {', '.join(COMMANDS)}, got {argv[1:]}")
    command = argv[1]
    required, optional = COMMANDS[command]
    missing = [f"--{name}" for name in required if FLAGS[name].value is None]
    if missing:
        raise cli.UsageError(f"{command} needs {', '.join(missing)}")
    stray = sorted({f"--{name}" for names in COMMANDS.values() for name in sum(names, ())
                    if FLAGS[name].present and name not in required + optional})
    if stray:
        raise cli.UsageError(f"{command} takes no {', '.join(stray)}")
    if command == "data":
        print(make(FLAGS.out, FLAGS.n, FLAGS.seed, FLAGS.vocab_size, FLAGS.hint_fraction, num_photos=FLAGS.photos))
    elif command == "examples":
        print("\n".join(examples(FLAGS.out, FLAGS.seed)))
    else:
        print(export(FLAGS.src, FLAGS.tokenizer, FLAGS.out))


if __name__ == "__main__":
    cli.run(main, FLAGS, positional=True)
