#!/usr/bin/env bash
# Reproduces the demo checkpoint in safevlm_jax/assets/demo/ from nothing (CPU is enough):
#   synthetic data + photo crops + tokenizer (seed 1) -> stage 0 (CLIP + projector + LLM, LLaVA stand-in)
#   -> stage 1 (safety modules) -> stage 2 (LoRA) -> export + example images (seed 99).
# Usage: launch/make_demo.sh [WORKDIR]   (default /tmp/safevlm_demo; PYTHON overrides the interpreter)
# Needs the demo extra (pip install -e '.[demo]': scikit-image, whose bundled sample photos are
# the clean photos; nothing is downloaded).
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
WORK=${1:-/tmp/safevlm_demo}
DEST=safevlm_jax/assets/demo
TRAIN_SEED=1      # held-out seeds: 99 (examples here), 7, 99 and 2024 (tests/test_demo.py)
EXAMPLES_SEED=99
SYNTHETIC=3000    # synthetic records (a third clean)
PHOTOS=600        # clean photo records: crops of photos.TRAINING_PHOTOS
VOCAB=$($PY -c "from configs.demo import VOCAB; print(VOCAB)")
if ! $PY -c "import skimage" 2>/dev/null; then
  echo "error: scikit-image is missing: pip install -e '.[demo]'" >&2
  exit 2
fi

rm -rf "$WORK"
mkdir -p "$WORK"
start=$SECONDS

echo "== data and tokenizer"
$PY launch/demo.py data --out "$WORK/data" --n $SYNTHETIC --photos $PHOTOS --seed $TRAIN_SEED --vocab_size "$VOCAB"
$PY -m safevlm_jax.data.build --json "$WORK/data/data.json" --image_root "$WORK/data" \
  --out "$WORK/tfds" --validation_fraction 0
DATA=(--config.data.dataset_dir="$WORK/tfds/safe_vlm_data/1.0.0" --config.data.tokenizer="$WORK/data/tokenizer")

init=()
for stage in stage0 stage1 stage2; do
  echo "== $stage ($((SECONDS - start)) s so far)"
  $PY -m safevlm_jax.train --config "configs/demo.py:$stage" --workdir "$WORK/$stage" "${DATA[@]}" "${init[@]}"
  init=(--config.init_from="$WORK/$stage/export")
done

echo "== export to $DEST"
$PY launch/demo.py export --src "$WORK/stage2/export" --tokenizer "$WORK/data/tokenizer" --out "$DEST"
$PY launch/demo.py examples --out "$DEST/examples" --seed $EXAMPLES_SEED

for image in "$DEST"/examples/risky.png "$DEST"/examples/clean.png "$DEST"/examples/photo.png; do
  echo "== $image"
  $PY -m safevlm_jax.sample --image "$image" --prompt "What is shown in this image?"
done
du -sh "$DEST"
echo "done in $((SECONDS - start)) s"
