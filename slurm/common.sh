#!/usr/bin/env bash
# Shared helpers for the slurm/ job scripts (sourced, not run).
#   PYTHON          interpreter on the compute nodes (default: python; activate your venv in ~/.bashrc
#                   or set PYTHON=/path/to/.venv/bin/python)
#   GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE, else 1)
#   SRUN_ARGS       extra options for every srun of the job scripts (e.g. "--cpu-bind=cores"); sbatch
#                   exports the submitting shell's environment to the job, so set it where you submit

dr_gpus_per_node() {
  echo "${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
}

# Options every srun of a job script gets, one per line (read with mapfile): the job's CPUs per task
# (since SLURM 22.05 srun no longer takes them from SLURM_CPUS_PER_TASK, so a step would otherwise get one
# CPU per task where the site binds tasks to CPUs), then SRUN_ARGS.
dr_srun_args() {
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then echo "--cpus-per-task=$SLURM_CPUS_PER_TASK"; fi
  local extra=()
  read -r -a extra <<<"${SRUN_ARGS:-}"
  if ((${#extra[@]})); then printf '%s\n' "${extra[@]}"; fi
}

# dr_run and the environment defaults are the launchers' own (this file is sourced by its real path,
# from the submit directory, so the repository's launch/ sits next to it).
# shellcheck source=SCRIPTDIR/../launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../launch/common.sh"
