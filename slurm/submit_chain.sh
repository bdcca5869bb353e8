#!/usr/bin/env bash
# Submit the looped MTP-head extension as a chain of Slurm jobs, one per stage, each starting only after
# the previous one succeeded (--dependency=afterok). Stages that are already complete are skipped, so
# re-running this after a failure resubmits only what is left, and after completion submits nothing.
# A stage is an index into the config's looped.stages (0 = the first stage); checkpoints of stage I go to
# <checkpoint.save or looped.root>/stage_<I>_heads_<m>/.
#
#   slurm/submit_chain.sh CONFIG.yaml [--stages 0,1,...] [--after JOBID]
#       [--convert-to OUT_DIR [--convert-from CKPT_DIR]] [--dry-run] [sbatch args ...] [-- key=value ...]
#
#   --stages LIST      comma-separated stage indices, in order (default: every stage of looped.stages)
#   --after JOBID      the first submitted stage also waits for JOBID (e.g. the pretraining job)
#   --convert-to DIR   also submit slurm/convert_hf.sbatch --ckpt CKPT_DIR --out DIR after the last stage
#   --convert-from DIR the checkpoint directory to convert (default: the last stage's directory)
#   --dry-run          print the sbatch commands instead of running them
#   sbatch args        anything else before `--` goes to every stage's sbatch (e.g. -N 2
#                      --ntasks-per-node=8 --gpus-per-node=8 -p PART -t 12:00:00)
#   -- key=value ...   config overrides, passed to every stage and to the status check
#
# Prints one line per submitted job on stdout: "stage <I> job <id>" and "convert job <id>".
# A stage counts as complete when `$MTPD_PYTHON -m $MTPD_LOOPED_MODULE status --config CONFIG --stage I
# [overrides]` exits 0 (1 = not complete; anything else aborts). Knobs: slurm/README.md.
set -euo pipefail

MTPD_ROOT=${MTPD_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export MTPD_ROOT
# shellcheck source=slurm/common.sh
source "$MTPD_ROOT/slurm/common.sh"

usage() {
    sed -n '2,24s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

[[ $# -ge 1 && $1 != -* ]] || usage
config=$1
shift
[[ -f $config ]] || mtpd_die "config not found: $config"
config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")

stages=
after=
convert_to=
convert_from=
dry_run=0
sbatch_args=()
overrides=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --stages) stages=${2:?--stages needs a value}; shift 2 ;;
        --stages=*) stages=${1#*=}; shift ;;
        --after) after=${2:?--after needs a job id}; shift 2 ;;
        --after=*) after=${1#*=}; shift ;;
        --convert-to) convert_to=${2:?--convert-to needs a directory}; shift 2 ;;
        --convert-to=*) convert_to=${1#*=}; shift ;;
        --convert-from) convert_from=${2:?--convert-from needs a directory}; shift 2 ;;
        --convert-from=*) convert_from=${1#*=}; shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage ;;
        --) shift; overrides=("$@"); break ;;
        *) sbatch_args+=("$1"); shift ;;
    esac
done

# Environment for the status checks only; the jobs set up their own (a subshell keeps it from leaking
# into the sbatch environment).
stage_complete() {
    local rc=0
    (
        mtpd_init
        "$MTPD_PYTHON" -m "$MTPD_LOOPED_MODULE" status --config "$config" --stage "$1" "${overrides[@]}"
    ) >&2 || rc=$?
    case $rc in
        0) return 0 ;;
        1) return 1 ;;
        *) mtpd_die "status check for stage $1 failed (exit $rc)" ;;
    esac
}

# `status` exits 1 for "not complete", and so does python for a missing module: check it exists first.
(
    mtpd_init
    "$MTPD_PYTHON" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)' \
        "$MTPD_LOOPED_MODULE"
) || mtpd_die "cannot import MTPD_LOOPED_MODULE=${MTPD_LOOPED_MODULE:-mtpd_megatron.looped} with ${MTPD_PYTHON:-the default python}"

# The config's stages (with the overrides): their count and the last stage's checkpoint directory (what
# --convert-to converts unless --convert-from names another). A config error is reported in one line.
read -r count last_dir < <(
    mtpd_init
    "$MTPD_PYTHON" -c '
import sys
from mtpd_megatron.config.load import ConfigError, load_config
from mtpd_megatron.looped.stages import stage_dir, stages_of
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
    n = len(stages_of(cfg))
    print(n, stage_dir(cfg, n - 1))
except ConfigError as e:
    sys.exit(f"submit_chain.sh: error: {e}")
' "$config" "${overrides[@]}"
) || true
[[ -n ${count:-} ]] || mtpd_die "cannot read looped.stages from $config (see above)"
if [[ -z $stages ]]; then
    stages=$(seq -s, 0 $((count - 1)))
fi
convert_from=${convert_from:-$last_dir}
IFS=, read -r -a stage_list <<<"$stages"
for s in "${stage_list[@]}"; do
    [[ $s =~ ^[0-9]+$ ]] || mtpd_die "--stages must be comma-separated stage indices (0, 1, ...), got '$stages'"
done

log_dir=${MTPD_LOG_DIR:-$MTPD_ROOT/runs/slurm-logs}
submit() {
    local cmd=(sbatch --parsable "$@")
    if [[ $dry_run == 1 ]]; then
        printf '%q ' "${cmd[@]}" >&2
        echo >&2
        echo "DRYRUN$RANDOM"
        return
    fi
    local out
    out=$("${cmd[@]}")
    echo "${out%%;*}"
}

[[ $dry_run == 1 ]] || mkdir -p "$log_dir"
prev=$after
submitted=0
for stage in "${stage_list[@]}"; do
    if stage_complete "$stage"; then
        mtpd_log "stage $stage: already complete, skipped"
        continue
    fi
    dep=()
    if [[ -n $prev ]]; then
        dep=("--dependency=afterok:$prev" --kill-on-invalid-dep=yes)
    fi
    job=$(submit --job-name="mtpd-stage$stage" --output="$log_dir/%x-%j.out" "${dep[@]}" \
        "${sbatch_args[@]}" "$MTPD_ROOT/slurm/looped_extension.sbatch" "$config" "$stage" "${overrides[@]}")
    echo "stage $stage job $job"
    prev=$job
    submitted=$((submitted + 1))
done

if [[ -n $convert_to ]]; then
    if [[ $submitted -eq 0 && -f $convert_to/config.json ]]; then
        mtpd_log "conversion: $convert_to/config.json exists and no stage was submitted, skipped"
    else
        dep=()
        if [[ -n $prev ]]; then
            dep=("--dependency=afterok:$prev" --kill-on-invalid-dep=yes)
        fi
        # Not the stages' sbatch args (GPUs, nodes): MTPD_CONVERT_SBATCH_ARGS, e.g. "-p cpu -t 2:00:00".
        read -r -a convert_args <<<"${MTPD_CONVERT_SBATCH_ARGS:-}"
        job=$(submit --output="$log_dir/%x-%j.out" "${dep[@]}" "${convert_args[@]}" \
            "$MTPD_ROOT/slurm/convert_hf.sbatch" --ckpt "$convert_from" --out "$convert_to")
        echo "convert job $job"
        submitted=$((submitted + 1))
    fi
fi
[[ $submitted -gt 0 ]] || mtpd_log "nothing to submit: every stage is complete"
