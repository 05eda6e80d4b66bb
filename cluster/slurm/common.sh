# Sourced by every stage's batch script: the environment a midpo stage job runs in.
# `python -m stages.cluster submit` (make submit) exports MIDPO_REPO, MIDPO_PYTHON and
# MIDPO_SETUP; a script submitted by hand (`sbatch cluster/slurm/prepare.sbatch --config X`
# from the repository) falls back to the submit directory and the `python3` on PATH.
set -euo pipefail

export MIDPO_REPO=${MIDPO_REPO:-$SLURM_SUBMIT_DIR}
MIDPO_PY=${MIDPO_PYTHON:-python3}

# cluster.setup lines (module load ..., source .../activate). Activation scripts often read
# unset variables, so not under `set -u`.
if [[ -n ${MIDPO_SETUP:-} ]]; then
  set +u
  eval "$MIDPO_SETUP"
  set -u
fi

# A login node without GPUs exports the CPU defaults (the Makefile's DS_ACCELERATOR=cpu,
# VLLM_CPU_KVCACHE_SPACE): on a node with GPUs let DeepSpeed and vLLM find them.
if (( ${SLURM_GPUS_ON_NODE:-0} > 0 )); then
  if [[ ${DS_ACCELERATOR:-} == cpu ]]; then unset DS_ACCELERATOR; fi
  unset VLLM_CPU_KVCACHE_SPACE
fi

echo "[midpo] $(date -Is) job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) on ${SLURM_JOB_NODELIST}," \
     "restart ${SLURM_RESTART_COUNT:-0}, cwd ${PWD}, python ${MIDPO_PY}" >&2

# Run one single-node stage: `run_stage <stage> <args...>` (its exit code is the job's).
run_stage() {
  local stage=$1
  shift
  exec "$MIDPO_PY" -m "stages.${stage}" "$@"
}
