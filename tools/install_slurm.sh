#!/usr/bin/env bash
# Install a minimal Slurm (controller, node daemon, client commands) and munge from the distribution's
# packages. Idempotent: does nothing when the commands are already there. Used by tests/slurm_cluster.py
# to run a throwaway two-node cluster on one machine; also fine for a single-box dev setup.
#
# Needs root (or passwordless sudo) when something is missing. Debian/Ubuntu (apt) only.
# Knobs: SLURM_APT_PACKAGES (default: "slurmctld slurmd slurm-client munge").
set -euo pipefail

packages=${SLURM_APT_PACKAGES:-"slurmctld slurmd slurm-client munge"}
needed_cmds=(slurmctld slurmd sbatch srun scontrol sinfo munged)

missing=()
for cmd in "${needed_cmds[@]}"; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$cmd" ]]; then
        missing+=("$cmd")
    fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install_slurm: already installed (slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo '?'))"
    exit 0
fi
echo "install_slurm: missing ${missing[*]}; installing: $packages"

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm: apt-get not found; install Slurm and munge with your package manager" >&2
    exit 1
fi
sudo_cmd=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo_cmd=(sudo -n)
    else
        echo "install_slurm: need root (or passwordless sudo) to apt-get install $packages" >&2
        exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086  # $packages is a word list on purpose
"${sudo_cmd[@]}" apt-get update -qq
# shellcheck disable=SC2086
"${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends $packages
echo "install_slurm: installed slurm-client $(dpkg-query -W -f='${Version}' slurm-client 2>/dev/null || echo "?")"
