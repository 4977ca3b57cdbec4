#!/usr/bin/env bash
# The accelerator check of issue 19 in one command: the accelerator-relevant tests on the
# device, then decode, prefill(+verdict) and the stage-2 LoRA step against HF / torch + peft
# on the same chip, then a summary (each stage's table, a stage table, the issue's goals, and
# a last key=value line), all also written under $OUT (log.txt, summary.txt, junit.xml).
#
#   bash benchmarks/device_check.sh              # one GPU, full sizes: <= 8 minutes (DEADLINE_S=480)
#   OUT=/tmp/dc bash benchmarks/device_check.sh --tiny    # dry run on a CPU: tiny sizes, every stage
#   bash benchmarks/device_check.sh --only decode_7b,train_7b   # a subset of the stages
#
# Stages (each its own process under a time limit, so one that hangs or runs out of memory
# costs only itself; the run stops starting stages once DEADLINE_S seconds have passed):
#   env         versions, devices, and an import of every module the stages use
#   tests       model parity with PyTorch (CLIP, LLaMA, LLaVA logits in f32 and bf16, LoRA vs
#               peft, safety modules), greedy ids vs HF generate, sharded == unsharded on the
#               one device, the train step (stages, microbatches, remat, loss)
#   decode_350m benchmarks/sample_vs_hf.py, ~370M bf16, batch 1/8/32, copy-bandwidth floor
#   decode_7b   the same at LLaVA-1.5-7B shapes, bf16
#   train_350m  benchmarks/train_step_vs_torch.py, ~350M, LoRA r=256 on all LLM linears, bf16
#               compute, f32 adapters, bf16 frozen weights
#   train_7b    the same at 7B shapes (batch 2 x 1024, scanned layers)
# With --tiny every stage runs on tiny configs (decode batch 1/2).
#
# On the GPU machine (JAX 0.11 with CUDA, torch, transformers, peft; no network) the project
# runs from this tree via PYTHONPATH; the packages the image lacks travel as wheels: run
# `bash benchmarks/device_wheels.sh` here first and give the device call carry [".whl"]; they
# are installed into /tmp/safevlm_site. PYTHON picks the interpreter (default: .venv/bin/python
# if there is one, else python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

tiny=0
only=""
while (($#)); do
  case $1 in
    --tiny) tiny=1 ;;
    --only) only=${2:?--only takes a comma-separated list of stages}; shift ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
work=$(mktemp -d)
log=$OUT/log.txt
: >"$log"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEADLINE_S=${DEADLINE_S:-$((tiny ? 3600 : 480))}

export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU's memory
export SAFEVLM_TEST_DEVICES=native          # tests/conftest.py: the device's own platform, not 8 fake CPUs
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! "$PYTHON" -c "import ml_collections, grain, tensorflow_datasets, tensorboardX" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    wheels=(.whl/*.whl)
    echo "installing ${#wheels[@]} carried wheels into /tmp/safevlm_site" | tee -a "$log"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/safevlm_site "${wheels[@]}" 2>&1 | tee -a "$log"
    export PYTHONPATH=$PYTHONPATH:/tmp/safevlm_site
  else
    echo "warning: project dependencies missing and no .whl/ (run benchmarks/device_wheels.sh here," \
         "carry .whl)" | tee -a "$log" >&2
  fi
fi
platform=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo unknown)
if [[ $platform != cpu ]]; then  # a rerun on the same (warm) machine skips the compiles
  export JAX_COMPILATION_CACHE_DIR=/tmp/safevlm_jax_cache
elif ((!tiny)); then
  echo "error: full sizes need an accelerator (JAX's platform is $platform); use --tiny" >&2
  exit 2
fi
mode=full
((tiny)) && mode=tiny
echo "$mode" >"$work/mode"
echo "mode=$mode platform=$platform python=$PYTHON OUT=$OUT" | tee -a "$log"

TEST_FILES=(tests/test_safevlm.py tests/test_llama.py tests/test_clip.py tests/test_lora.py
            tests/test_safety_modules.py tests/test_sampler.py tests/test_train_parallel.py
            tests/test_train_stages.py tests/test_train_loss.py tests/test_accumulating_dot.py)
TEST_K="test_llava_logits_match_hf_llava or test_bf16_logits_are_as_close or test_left_padded_batch
  or test_logits_match_hf or test_kv_cache_prefill_then_decode_equals_full_forward
  or test_remat_equals_no_remat or test_hidden_states_match_hf or test_bf16_compute
  or test_projector_matches_hf or test_lora_forward_matches_peft or test_safety_projector_matches_torch
  or test_safety_head_on_first_token_matches_torch or test_greedy_ids_equal_hf_llava_generate
  or test_batch_of_different_lengths or test_no_recompile or test_each_row_stops_at_its_own_eos
  or (test_sharded_forward_equals_unsharded and one_device)
  or (test_sharded_step_equals_single_device_step and one_device) or test_k_microbatches
  or test_stage_trains_only_its_parameters or test_loss_equals_torch_cross_entropy
  or test_forward_and_gradients_match_f64 or test_f32_is_a_plain_dot"
TEST_K=$(tr -s ' \n' ' ' <<<"$TEST_K")

SAMPLE=(benchmarks/sample_vs_hf.py --floor copy)
TRAIN=(benchmarks/train_step_vs_torch.py --dtypes bf16 --frozen_dtype bfloat16)
TINY_TRAIN=(--layers 2 --d 128 --mlp 256 --heads 4 --vocab 512 --rank 8 --batch 2 --length 64)
if ((tiny)); then
  TINY_SAMPLE=(--batches "1,2" --new_tokens 32 --repeats 1 --prefill_text 40 --bandwidth_gib 0.25)
  DECODE_350M=("${SAMPLE[@]}" --only tiny "${TINY_SAMPLE[@]}")
  DECODE_7B=("${SAMPLE[@]}" --only tiny_bf16 "${TINY_SAMPLE[@]}")
  TRAIN_350M=("${TRAIN[@]}" "${TINY_TRAIN[@]}")
  TRAIN_7B=("${TRAIN[@]}" "${TINY_TRAIN[@]}" --scan_layers)
  LIMITS=(env=300 tests=1500 decode_350m=900 decode_7b=900 train_350m=600 train_7b=600)
else
  FULL_SAMPLE=(--batches "1,8,32" --new_tokens 128 --repeats 2 --bandwidth_gib 4)
  DECODE_350M=("${SAMPLE[@]}" --only 350m_bf16 "${FULL_SAMPLE[@]}")
  DECODE_7B=("${SAMPLE[@]}" --only 7b_bf16 "${FULL_SAMPLE[@]}")
  TRAIN_350M=("${TRAIN[@]}" --rank 256 --batch 8 --length 512)
  TRAIN_7B=("${TRAIN[@]}" --layers 32 --d 4096 --mlp 11008 --heads 32 --rank 256 --batch 2 --length 1024
            --scan_layers)
  LIMITS=(env=30 tests=100 decode_350m=60 decode_7b=170 train_350m=45 train_7b=95)
fi

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [[ ${kv%%=*} == "$1" ]] && echo "${kv#*=}"; done; }

failed=0
run_stage() {  # name command...: stdout to $work/<name>.out (and the log), stderr live to the log
  local name=$1; shift
  if [[ -n $only && ",$only," != *",$name,"* && $name != env ]]; then return; fi
  local limit left start rc status
  limit=$(limit_of "$name")
  left=$((DEADLINE_S - SECONDS))
  if ((left < 15)); then
    printf '%s\tskipped (deadline)\t0\n' "$name" >>"$work/stages.tsv"; failed=1; return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee -a "$log"
  start=$SECONDS
  timeout -k 10 "$limit" "$@" >"$work/$name.out" 2> >(tee -a "$log" >&2)
  rc=$?
  cat "$work/$name.out" | tee -a "$log"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; failed=1 ;;
    *) status="failed rc=$rc"; failed=1 ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" $((SECONDS - start)) >>"$work/stages.tsv"
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$log"
}

run_stage env "$PYTHON" benchmarks/device_report.py env
run_stage tests "$PYTHON" -m pytest -q -p no:cacheprovider -rfE --junitxml="$OUT/junit.xml" \
  "${TEST_FILES[@]}" -k "$TEST_K"
run_stage decode_350m "$PYTHON" "${DECODE_350M[@]}"
run_stage decode_7b "$PYTHON" "${DECODE_7B[@]}"
run_stage train_350m "$PYTHON" "${TRAIN_350M[@]}"
run_stage train_7b "$PYTHON" "${TRAIN_7B[@]}"

echo | tee -a "$log"
"$PYTHON" benchmarks/device_report.py summary "$work" | tee "$OUT/summary.txt"
rm -rf "$work"
exit $failed
