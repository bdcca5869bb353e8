#!/usr/bin/env bash
# One GPU measurement, end to end on the device machine: train configs/gpu_small.yaml on one GPU, evaluate
# teacher-forced acceptance, export to Hugging Face, and benchmark batch-1 decoding on held-out prompts (our
# greedy decoder with CUDA graphs vs self-speculative K = 1..4, in bf16 with stock transformers generate on the
# export, and in fp32 where greedy and speculative tokens can be compared without bf16 rounding ties).
# Needs runs/gpu_data (tools/fetch_corpus.py --max-bytes 0; tools/train_tokenizer.py --vocab-size 8192;
# tools/preprocess_data.py --append-eod). Arguments are config overrides for the training run. Writes logs and
# JSON under ${OUT:-runs/gpu_small/out}; SKIP_HF=1 leaves out transformers generate (the slowest part).
set -euo pipefail
out=${OUT:-runs/gpu_small/out}
mkdir -p "$out"
ckpt=runs/gpu_small/checkpoints
py=${PYTHON:-python3}
torchrun --nproc-per-node 1 -m mtpd_megatron.train --config configs/gpu_small.yaml "$@" 2>&1 \
  | tee "$out/train.log" | grep -E "step (100|1000|2000)/|validation|error|Error" || true
test -f "$ckpt/latest_checkpointed_iteration.txt"
$py tools/eval_acceptance.py --ckpt "$ckpt" --split valid --num-samples 64 --out "$out/acceptance.json" \
  2>&1 | tee "$out/eval.log" | tail -5
hf=()
if [ "${SKIP_HF:-0}" != 1 ]; then
  $py tools/convert_to_hf.py --ckpt "$ckpt" --out runs/gpu_small/hf --dtype bf16 --overwrite 2>&1 | tail -2
  hf=(--hf runs/gpu_small/hf)
fi
bench=(tools/bench_decode.py --ckpt "$ckpt" --split valid --k 1 2 3 4 --num-prompts 8 --new-tokens 256)
$py "${bench[@]}" --dtype bf16 "${hf[@]}" --out "$out/decode.json" 2>&1 | tee "$out/decode.log" | grep -E "^(greedy|k=)|error"
$py "${bench[@]}" --dtype fp32 --out "$out/decode_fp32.json" 2>&1 | tee "$out/decode_fp32.log" | grep -E "^(greedy|k=)|error"
