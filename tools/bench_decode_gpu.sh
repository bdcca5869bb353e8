#!/usr/bin/env bash
# Issue-12 decoding measurements on one GPU (H200), from the repository root:
#
#   CKPT=runs/experiments/seesaw_gpu_small/c_mtpd_f0.1/ckpt HF=runs/hf_c_mtpd_f0.1 OUT=$OUT bash tools/bench_decode_gpu.sh
#
# CKPT: a trained gpu_small MTP-D checkpoint (save dir or iter_N); its main-head validation loss is read from
# the experiment's result.json beside it (tools/run_experiment.py), else computed on 64 held-out sequences.
# HF: its Hugging Face export (tools/convert_to_hf.py), or empty to leave out the transformers-generate row.
# Prompts: the first 128 tokens of 8 held-out (valid split) sequences, 256 new tokens, as in docs/benchmarks.md.
# Seven runs, each under its own time limit so that one failure or overrun leaves the others' files; RUNS picks
# some (default all; their limits add up to more than one 10-minute device call: split them, e.g. RUNS="1 2"
# after training in one call, RUNS="3 4 5" in the next; inductor's on-disk cache makes a repeated compile cheap
# on a machine that stays warm):
#   1. gpu_small checkpoint (bf16, compiled: DecodeOptions.compile): profile of a greedy and a K=4 step, greedy
#      vs K=1..4, transformers generate, exact greedy              -> $OUT/gpu_small.{json,md}, $OUT/profile_gpu_small/
#   2. gpu_small checkpoint, compiled: fixed K = 3, 4 (the best two of run 2, 2026-12-03) vs adaptive
#      (P = 0.1 0.3), batch 1/4/16
#                                                                  -> $OUT/gpu_small_adaptive_batch.{json,md}
#   3. gpu_small checkpoint: every DecodeOptions switch on vs off at K=4 (eager baseline, compile last)
#                                                                  -> $OUT/ablation_gpu_small.{json,md}
#   4. dense_2b shape, random weights (cost side only), compiled: profile, exact greedy, K=4 with a
#      frequency-ranked draft vocabulary of 32,768 / 16,384 ids      -> $OUT/dense_2b.{json,md}, $OUT/profile_dense_2b/
#   5. dense_2b shape: compile vs compile_autotune (max-autotune-no-cudagraphs) vs eager
#                                                                  -> $OUT/dense_2b_autotune.{json,md}
#   6. gpu_small checkpoint, compiled: K=4 with a draft vocabulary of 1,024 / 2,048 / 4,096 of the 8,192 ids
#      (what the restriction costs in accepted tokens)             -> $OUT/gpu_small_draft_vocab.{json,md}
#   7. the decode-width products alone (tools/bench_gemv.py): cuBLAS vs inductor's autotuned kernel per weight
#      shape of dense_2b and gpu_small, ~2.5 minutes; no checkpoint -> $OUT/gemv_{dense_2b,gpu_small}.{json,log}
# Compile warm-up is part of each run's time (rows record warmup_seconds): at gpu_small ~20 s per verify width
# and a few s per draft depth and batch size (measured 2026-12-03), about twice that at the dense_2b shape.
# Measured 2026-12-04: one run with its training took 340-560 s, mostly compile warm-up (docs/benchmarks.md
# runs 5-7); run 5's autotuning alone outlasted a 545 s call (it autotuned the prefill's 128-row products;
# since 2026-12-04 the prefill's pieces compile in the default mode, so run 5 autotunes only decode widths).
# INDUCTOR_CACHE=DIR keeps inductor's and Triton's caches (compiled graphs, kernels, autotune choices) in DIR: tar DIR into $OUT at the end of a call (a file of
# <= 16 MiB comes back) and unpack it into a carried folder before the next call, which then skips the
# compiles of every unchanged piece.
# Then $OUT/tables.md concatenates the markdown of all runs. Logs: $OUT/*.log.
set -uo pipefail
: "${CKPT:?set CKPT=<mtpd megatron checkpoint dir>}"
out=${OUT:?set OUT=<output dir>}
mkdir -p "$out"
py=${PYTHON:-python3}
hf=()
if [ -n "${HF:-}" ]; then hf=(--hf "$HF"); fi
common=(--dtype bf16 --repeats 1 --new-tokens 256)
if [ -n "${INDUCTOR_CACHE:-}" ]; then
  mkdir -p "$INDUCTOR_CACHE/triton"
  export TORCHINDUCTOR_CACHE_DIR=$(cd "$INDUCTOR_CACHE" && pwd) TRITON_CACHE_DIR=$(cd "$INDUCTOR_CACHE/triton" && pwd)
fi
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

runs=" ${RUNS:-1 2 3 4 5 6 7} "
[[ $runs == *" 1 "* ]] && run 400 gpu_small --ckpt "$CKPT" --split valid --num-prompts 8 --prompt-len 128 --k 1 2 3 4 \
  "${common[@]}" "${hf[@]}" --compile --profile "$out/profile_gpu_small" --exact-greedy
[[ $runs == *" 2 "* ]] && run 400 gpu_small_adaptive_batch --ckpt "$CKPT" --split valid --num-prompts 8 \
  --prompt-len 128 --k 4 "${common[@]}" --compile --draft-threshold 0.1 0.3 --adaptive-fixed 3 4 --batch 1 4 16
[[ $runs == *" 3 "* ]] && run 300 ablation_gpu_small --ckpt "$CKPT" --split valid --num-prompts 8 --prompt-len 128 \
  --k 4 "${common[@]}" --ablate
[[ $runs == *" 4 "* ]] && run 300 dense_2b --config configs/dense_2b.yaml --num-prompts 2 --prompt-len 128 --k 4 \
  --dtype bf16 --repeats 1 --new-tokens 128 --compile --profile "$out/profile_dense_2b" --exact-greedy \
  --draft-vocab 32768 16384
[[ $runs == *" 5 "* ]] && run 500 dense_2b_autotune --config configs/dense_2b.yaml --num-prompts 2 --prompt-len 128 \
  --k 4 --dtype bf16 --repeats 1 --new-tokens 128 --ablate compile compile_autotune
[[ $runs == *" 6 "* ]] && run 400 gpu_small_draft_vocab --ckpt "$CKPT" --split valid --num-prompts 8 --prompt-len 128 \
  --k 4 "${common[@]}" --compile --draft-vocab 1024 2048 4096
if [[ $runs == *" 7 "* ]]; then
  echo "== gemv (limit 300s)"
  timeout --signal=INT --kill-after=10 200 $py tools/bench_gemv.py --config configs/dense_2b.yaml --rows 1 5 \
    --draft-vocab 16384 --out "$out/gemv_dense_2b.json" > "$out/gemv_dense_2b.log" 2>&1 || status=1
  timeout --signal=INT --kill-after=10 100 $py tools/bench_gemv.py --config configs/gpu_small.yaml --vocab-size 8192 \
    --rows 1 5 --draft-vocab 2048 --out "$out/gemv_gpu_small.json" > "$out/gemv_gpu_small.log" 2>&1 || status=1
  cat "$out"/gemv_*.log | grep -v "^\[rank"
fi
cat "$out"/{gpu_small,gpu_small_adaptive_batch,ablation_gpu_small,dense_2b,dense_2b_autotune,gpu_small_draft_vocab}.md > "$out/tables.md" 2>/dev/null
ls -l "$out"
exit $status
