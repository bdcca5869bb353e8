#!/usr/bin/env bash
# Issue-12 decoding measurements on one GPU (H200), < 7 minutes, from the repository root:
#
#   CKPT=runs/experiments/seesaw_gpu_small/c_mtpd_f0.1/ckpt HF=runs/hf_c_mtpd_f0.1 OUT=$OUT bash tools/bench_decode_gpu.sh
#
# CKPT: a trained gpu_small MTP-D checkpoint (save dir or iter_N); its main-head validation loss is read from
# the experiment's result.json beside it (tools/run_experiment.py), else computed on 64 held-out sequences.
# HF: its Hugging Face export (tools/convert_to_hf.py), or empty to leave out the transformers-generate row.
# Prompts: the first 128 tokens of 8 held-out (valid split) sequences, 256 new tokens, as in docs/benchmarks.md.
# Three runs, each under its own time limit so that one failure or overrun leaves the others' files:
#   1. gpu_small checkpoint (bf16): profile of a greedy and a K=4 step, greedy vs K=1..4, transformers generate,
#      fixed K vs adaptive (P = 0.3 0.5 0.7), exact greedy, batch 1/4/16   -> $OUT/gpu_small.{json,md}, $OUT/profile_gpu_small/
#   2. gpu_small checkpoint: every DecodeOptions switch on vs off at K=4 (compile included)
#                                                                           -> $OUT/ablation_gpu_small.{json,md}
#   3. dense_2b shape, random weights (cost side only): profile, switch ablation, exact greedy
#                                                                           -> $OUT/dense_2b.{json,md}, $OUT/profile_dense_2b/
# Then $OUT/tables.md concatenates the markdown of all three. Logs: $OUT/*.log.
set -uo pipefail
: "${CKPT:?set CKPT=<mtpd megatron checkpoint dir>}"
out=${OUT:?set OUT=<output dir>}
mkdir -p "$out"
py=${PYTHON:-python3}
hf=()
if [ -n "${HF:-}" ]; then hf=(--hf "$HF"); fi
common=(--dtype bf16 --repeats 1 --new-tokens 256)
status=0

run() {  # run <limit seconds> <name> args...
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" $py tools/bench_decode.py "$@" --out "$out/$name.json" \
    --markdown "$out/$name.md" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E "^(greedy|k=)|error" "$out/$name.log" | tail -8
  [ $rc -eq 0 ] || { echo "$name: exit $rc (see $out/$name.log)"; status=1; }
}

run 180 gpu_small --ckpt "$CKPT" --split valid --num-prompts 8 --prompt-len 128 --k 1 2 3 4 "${common[@]}" \
  "${hf[@]}" --profile "$out/profile_gpu_small" --draft-threshold 0.3 0.5 0.7 --exact-greedy --batch 1 4 16
run 130 ablation_gpu_small --ckpt "$CKPT" --split valid --num-prompts 8 --prompt-len 128 --k 4 "${common[@]}" \
  --ablate
run 100 dense_2b --config configs/dense_2b.yaml --num-prompts 2 --prompt-len 128 --k 4 --dtype bf16 --repeats 1 \
  --new-tokens 128 --profile "$out/profile_dense_2b" --ablate --exact-greedy
cat "$out"/gpu_small.md "$out"/ablation_gpu_small.md "$out"/dense_2b.md > "$out/tables.md" 2>/dev/null
ls -l "$out"
exit $status
