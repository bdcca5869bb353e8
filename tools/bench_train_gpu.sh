#!/usr/bin/env bash
# Issue-16 training-throughput measurements on one GPU (H200), from the repository root (~6 minutes):
#
#   OUT=$OUT bash tools/bench_train_gpu.sh
#
# Four runs, each under its own time limit so that one failure or overrun leaves the others' files; RUNS picks
# some (default all):
#   1. dense_2b MTP-D, compile_layers on vs off (its RoPE and bf16 fused-CE parts, unmeasured so far), the
#      presets' other fast paths on                                    -> $OUT/dense_compile/bench.json
#   2. moe_a1b 6 layers, no MTP / MTP / MTP-D in one process, 5 steps, compile_layers on
#                                                                       -> $OUT/moe_arms/bench.json
#   3. moe_a1b 6 layers MTP-D at global batch 128 (the optimizer amortised as in pretraining)
#                                                                       -> $OUT/moe_gb128/bench.json
#   4. moe_a1b 6 layers, one profiled no-MTP step of the stacked experts -> $OUT/moe_profile/profile_nomtp.txt
# Synthetic tokens (tools/bench_train.py); seq 4096, micro-batch 2. Logs: $OUT/*.log.
set -uo pipefail
out=${OUT:?set OUT=<output dir>}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
moe=(--config configs/moe_a1b.yaml --layers 6)
status=0

run() {  # run <limit seconds> <name> args...
  local limit=$1 name=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=10 "$limit" $py tools/bench_train.py --out "$out/$name" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  grep -E "step  |rror" "$out/$name.log" | grep -v "^\[rank" | tail -8
  [ $rc -eq 0 ] || { echo "$name: exit $rc (see $out/$name.log)"; status=1; }
}

runs=" ${RUNS:-1 2 3 4} "
[[ $runs == *" 1 "* ]] && run 150 dense_compile --config configs/dense_2b.yaml --arms mtpd --steps 3 --warmup 2 \
  --compare compile_layers training.global_batch_size=4
[[ $runs == *" 2 "* ]] && run 150 moe_arms "${moe[@]}" --arms nomtp,mtp,mtpd --steps 5 --warmup 2 \
  training.global_batch_size=4 model.compile_layers=true
[[ $runs == *" 3 "* ]] && run 150 moe_gb128 "${moe[@]}" --arms mtpd --steps 2 --warmup 1 \
  training.global_batch_size=128 model.compile_layers=true
[[ $runs == *" 4 "* ]] && run 80 moe_profile "${moe[@]}" --arms nomtp --steps 2 --warmup 2 --profile nomtp \
  training.global_batch_size=4 model.compile_layers=true
ls -l "$out"
exit $status
