# shellcheck shell=bash
# Shared launch logic for slurm/*.sbatch. Source it; it defines functions and sets nothing until called.
#
#   mtpd_init                 defaults for every MTPD_* knob, the launch environment, MASTER_ADDR/PORT
#   mtpd_launch CMD [ARGS..]  srun CMD once per task (one task per GPU) with RANK/WORLD_SIZE/LOCAL_RANK set,
#                             forwarding USR1/TERM from the batch shell to the step; exit code 75 from the
#                             step = "checkpoint saved, please requeue" -> scontrol requeue $SLURM_JOB_ID.
#                             Returns the code the batch script should exit with.
#   mtpd_exec_task CMD..      (inside each srun task) export the per-rank variables and exec CMD
#
# Every knob is listed in slurm/README.md.

MTPD_EXIT_REQUEUE=75 # EX_TEMPFAIL: the trainer saved a checkpoint after SIGUSR1/SIGTERM and wants a requeue

mtpd_log() { printf '[mtpd %s] %s\n' "$(date '+%F %T')" "$*" >&2; }
mtpd_die() {
    mtpd_log "ERROR: $*"
    exit 2
}

# The repository root: MTPD_ROOT, else the submit directory if it is the repo, else the directory of the
# sbatch script as given to sbatch (Slurm runs a copy of the script from its spool, so $0 is useless).
# Each sbatch script has this same logic inline to find this file; it is here for other callers.
mtpd_find_root() {
    if [[ -n ${MTPD_ROOT:-} ]]; then
        printf '%s\n' "$MTPD_ROOT"
    elif [[ -n ${SLURM_SUBMIT_DIR:-} && -f $SLURM_SUBMIT_DIR/slurm/common.sh ]]; then
        printf '%s\n' "$SLURM_SUBMIT_DIR"
    else
        (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
}

# Tasks per node of this step as a list: "2(x3),1" -> "2 2 2 1".
mtpd_expand_tasks_per_node() {
    local part count reps parts out=()
    IFS=, read -r -a parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]}
            reps=${BASH_REMATCH[2]}
        else
            count=$part
            reps=1
        fi
        while ((reps-- > 0)); do out+=("$count"); done
    done
    echo "${out[*]}"
}

# Runs inside each srun task (also inside the container): the torch.distributed env:// contract.
mtpd_exec_task() {
    [[ $# -gt 0 ]] || mtpd_die "mtpd_exec_task: no command"
    export RANK=${SLURM_PROCID:?not inside an srun task}
    export WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:?}}
    export LOCAL_RANK=${SLURM_LOCALID:?}
    export NODE_RANK=${SLURM_NODEID:-0}
    export GROUP_RANK=$NODE_RANK
    local per_node
    read -r -a per_node <<<"$(mtpd_expand_tasks_per_node "${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}")"
    export LOCAL_WORLD_SIZE=${per_node[$NODE_RANK]:-${per_node[0]}}
    # One line per rank: where it landed (a wrong layout shows up here before any rendezvous hangs).
    if [[ ${MTPD_RANK_BANNER:-1} == 1 ]]; then
        mtpd_log "rank $RANK/$WORLD_SIZE on node ${SLURMD_NODENAME:-$(hostname)} (node rank $NODE_RANK," \
            "local rank $LOCAL_RANK/$LOCAL_WORLD_SIZE), master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}"
    fi
    exec "$@"
}

# Hostname or address of the first node of the allocation (rank 0 runs there: srun's block distribution).
mtpd_master_addr() {
    local first addr
    first=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
    if getent hosts "$first" >/dev/null 2>&1; then
        printf '%s\n' "$first"
        return
    fi
    # The node name does not resolve (NodeName != NodeHostname): use the address Slurm itself uses.
    addr=$(scontrol -o show node "$first" | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
    printf '%s\n' "${addr:-$first}"
}

mtpd_init() {
    MTPD_ROOT=$(mtpd_find_root)
    export MTPD_ROOT
    if [[ -n ${MTPD_ENV_FILE:-} ]]; then
        # Site setup (module load, proxies, NCCL_* for the fabric, ...).
        # shellcheck disable=SC1090
        source "$MTPD_ENV_FILE"
    fi

    if [[ -z ${MTPD_PYTHON:-} ]]; then
        if [[ -z ${MTPD_CONTAINER_IMAGE:-} && -x $MTPD_ROOT/.venv/bin/python ]]; then
            MTPD_PYTHON=$MTPD_ROOT/.venv/bin/python
        else
            MTPD_PYTHON=python3
        fi
    fi
    export MTPD_PYTHON
    export MTPD_TRAIN_MODULE=${MTPD_TRAIN_MODULE:-mtpd_megatron.train}
    export MTPD_LOOPED_MODULE=${MTPD_LOOPED_MODULE:-mtpd_megatron.looped}
    export MTPD_CONVERT_SCRIPT=${MTPD_CONVERT_SCRIPT:-$MTPD_ROOT/tools/convert_to_hf.py}
    export MTPD_LOG_DIR=${MTPD_LOG_DIR:-$MTPD_ROOT/runs/slurm-logs}
    export MTPD_MAX_REQUEUES=${MTPD_MAX_REQUEUES:-50}
    export MTPD_REQUEUE=${MTPD_REQUEUE:-1}
    export MTPD_SRUN_WAIT=${MTPD_SRUN_WAIT:-60}
    # The package is importable even when the venv does not have it installed.
    export PYTHONPATH=$MTPD_ROOT${PYTHONPATH:+:$PYTHONPATH}

    # Usual Megatron/NCCL environment; anything already set (NCCL_*, TORCH_NCCL_*, ...) passes through.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1
    # Since Slurm 22.05 srun ignores SLURM_CPUS_PER_TASK: without this, `sbatch --cpus-per-task=N` would
    # still give each rank a single CPU.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} && -z ${SRUN_CPUS_PER_TASK:-} ]]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi

    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        # MTPD_MASTER_* override; a MASTER_ADDR left in the submitting shell's environment is not trusted.
        MASTER_ADDR=${MTPD_MASTER_ADDR:-$(mtpd_master_addr)}
        # Same job id after a requeue -> same port; distinct jobs sharing a node get distinct ports.
        MASTER_PORT=${MTPD_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
        export MASTER_ADDR MASTER_PORT
    fi
}

# The srun command line (array MTPD_SRUN) for one task per rank of the allocation.
mtpd_build_srun() {
    MTPD_SRUN=(srun --kill-on-bad-exit=0 "--wait=$MTPD_SRUN_WAIT" --export=ALL)
    if [[ ${MTPD_SRUN_LABEL:-1} == 1 ]]; then
        MTPD_SRUN+=(--label)
    fi
    if [[ ${MTPD_RANK_LOGS:-0} == 1 ]]; then
        mkdir -p "$MTPD_LOG_DIR"
        MTPD_SRUN+=(--open-mode=append "--output=$MTPD_LOG_DIR/%x-%j-rank%t.log")
    fi
    if [[ -n ${MTPD_CONTAINER_IMAGE:-} ]]; then
        local workdir=${MTPD_CONTAINER_WORKDIR:-$PWD}
        local mounts=${MTPD_CONTAINER_MOUNTS:-$MTPD_ROOT:$MTPD_ROOT}
        if [[ -z ${MTPD_CONTAINER_MOUNTS:-} && $PWD != "$MTPD_ROOT" && $PWD != "$MTPD_ROOT"/* ]]; then
            mounts+=",$PWD:$PWD"
        fi
        MTPD_SRUN+=("--container-image=$MTPD_CONTAINER_IMAGE" "--container-mounts=$mounts"
            "--container-workdir=$workdir")
        if [[ -n ${MTPD_CONTAINER_NAME:-} ]]; then
            MTPD_SRUN+=("--container-name=$MTPD_CONTAINER_NAME")
        fi
    fi
    if [[ -n ${MTPD_SRUN_ARGS:-} ]]; then
        local extra
        read -r -a extra <<<"$MTPD_SRUN_ARGS"
        MTPD_SRUN+=("${extra[@]}")
    fi
}

# Warn when a GPU node runs a different number of tasks than it has GPUs (one task per GPU).
mtpd_check_layout() {
    command -v nvidia-smi >/dev/null 2>&1 || return 0
    local gpus tasks_here
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $gpus -gt 0 ]] || return 0
    tasks_here=${SLURM_NTASKS_PER_NODE:-}
    if [[ -z $tasks_here ]]; then
        local per_node
        read -r -a per_node <<<"$(mtpd_expand_tasks_per_node "${SLURM_TASKS_PER_NODE:-1}")"
        tasks_here=${per_node[0]}
    fi
    if [[ $tasks_here != "$gpus" ]]; then
        mtpd_log "WARNING: $tasks_here task(s) on this node but $gpus GPU(s); expected one task per GPU" \
            "(sbatch --ntasks-per-node=$gpus --gpus-per-node=$gpus)"
    fi
}

MTPD_STEP_PID=
MTPD_SIGNALLED=
# Signals reach the step as SIGUSR1 whatever the batch shell got: srun forwards USR1 to every task, but on
# SIGTERM srun cancels the step (SIGKILL after KillWait) instead of forwarding it. When Slurm itself ends
# the job (time limit, scancel, preemption) it sends SIGTERM to the tasks directly anyway.
mtpd_forward_signal() {
    local sig=$1
    MTPD_SIGNALLED=$sig
    if [[ -n $MTPD_STEP_PID ]] && kill -0 "$MTPD_STEP_PID" 2>/dev/null; then
        mtpd_log "batch shell got SIG$sig: forwarding SIGUSR1 to the step (srun pid $MTPD_STEP_PID)"
        kill -USR1 "$MTPD_STEP_PID" 2>/dev/null || true
    else
        mtpd_log "batch shell got SIG$sig with no step running"
    fi
}

mtpd_launch() {
    [[ $# -gt 0 ]] || mtpd_die "mtpd_launch: no command"
    mtpd_build_srun
    mtpd_check_layout
    mtpd_log "job ${SLURM_JOB_ID:-?} (${SLURM_JOB_NAME:-?}) restart ${SLURM_RESTART_COUNT:-0}:" \
        "${SLURM_JOB_NUM_NODES:-?} node(s) [${SLURM_JOB_NODELIST:-?}], ${SLURM_NTASKS:-?} task(s)," \
        "master ${MASTER_ADDR:-?}:${MASTER_PORT:-?}, python $MTPD_PYTHON"
    mtpd_log "command: $*"

    trap 'mtpd_forward_signal USR1' USR1
    trap 'mtpd_forward_signal TERM' TERM
    # Each task: set the per-rank variables, then exec the trainer (signals go straight to it).
    # shellcheck disable=SC2016  # expanded by the task's shell
    "${MTPD_SRUN[@]}" bash -c 'source "$MTPD_ROOT/slurm/common.sh" && mtpd_exec_task "$@"' mtpd-task "$@" &
    MTPD_STEP_PID=$!

    local rc
    while :; do
        # A trapped signal interrupts `wait` (status > 128) while srun keeps running: wait again.
        wait "$MTPD_STEP_PID" && rc=0 || rc=$?
        if ((rc > 128)) && kill -0 "$MTPD_STEP_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    # If srun ended right after an interrupted wait, this returns its real status (bash keeps it).
    wait "$MTPD_STEP_PID" && rc=0 || rc=$?
    MTPD_STEP_PID=
    trap - USR1 TERM
    mtpd_log "step exited with $rc${MTPD_SIGNALLED:+ (after SIG$MTPD_SIGNALLED)}"

    if ((rc == MTPD_EXIT_REQUEUE)); then
        mtpd_requeue
        return
    fi
    return "$rc"
}

# The trainer saved and asked for a requeue: put this same job (same id, same dependencies) back in the
# queue. Returns 0 if requeued (Slurm then ends this run), else 75 so the job shows up as failed.
# Never requeues a job that Slurm is ending (scancel, time limit, preemption: the batch shell got SIGTERM
# or the job is no longer RUNNING): `scontrol requeue` would otherwise undo a user's scancel.
mtpd_requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} state
    if [[ $MTPD_REQUEUE != 1 ]]; then
        mtpd_log "exit $MTPD_EXIT_REQUEUE (checkpoint saved) but MTPD_REQUEUE=$MTPD_REQUEUE: not requeueing"
        return "$MTPD_EXIT_REQUEUE"
    fi
    if [[ $MTPD_SIGNALLED == TERM ]]; then
        mtpd_log "checkpoint saved; Slurm is terminating the job (SIGTERM): not requeueing"
        return "$MTPD_EXIT_REQUEUE"
    fi
    state=$(scontrol -o show job "$SLURM_JOB_ID" | tr ' ' '\n' | sed -n 's/^JobState=//p')
    if [[ $state != RUNNING ]]; then
        mtpd_log "checkpoint saved; job state is ${state:-unknown}, not RUNNING: not requeueing"
        return "$MTPD_EXIT_REQUEUE"
    fi
    if ((restarts >= MTPD_MAX_REQUEUES)); then
        mtpd_log "already requeued $restarts times (MTPD_MAX_REQUEUES=$MTPD_MAX_REQUEUES): giving up"
        return "$MTPD_EXIT_REQUEUE"
    fi
    mtpd_log "checkpoint saved; requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    if scontrol requeue "$SLURM_JOB_ID"; then
        return 0
    fi
    mtpd_log "scontrol requeue failed (submitted without --requeue?)"
    return "$MTPD_EXIT_REQUEUE"
}
