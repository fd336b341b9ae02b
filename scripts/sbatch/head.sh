#!/bin/bash
# Run a federation's Snakemake head process as its own Slurm job (not on a login node).
#
#   sbatch -A <account> -p <partition> scripts/sbatch/head.sh [profile] [config]
#
# Submit from the directory that holds scripts/, profiles/ and your config (the clone): the
# job runs there. profile defaults to profiles/ci-slurm, config to config.yaml.
# FEDHPC_SITE_ENV names a script sourced first (the site's environment: envs/lumi.sh); every
# job the head submits inherits that environment (sbatch --export=ALL).
#
# The log is fedhpc-head-<jobid>.out in that directory: Slurm opens it before the script runs,
# so it cannot be in a directory that may not exist yet.
#
# A federation outlives any one job's time limit: 5 minutes before the limit Slurm sends the
# head USR1, and the head stops Snakemake (it submits nothing more; jobs already submitted run
# on and are picked up when it returns), gives it up to FEDHPC_HEAD_GRACE seconds (120) to
# exit and requeues itself: the same job waits in the queue and, when it runs again, resumes
# the federation where it stopped.
#SBATCH --job-name=fedhpc-head
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=3-00:00:00
#SBATCH --output=fedhpc-head-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
profile=${1:-profiles/ci-slurm}
config=${2:-config.yaml}
job=${SLURM_JOB_ID:-}
grace=${FEDHPC_HEAD_GRACE:-120}
echo "fedhpc head: job ${job:-?}, start $((${SLURM_RESTART_COUNT:-0} + 1)), $(date -Is)"
site_env=${FEDHPC_SITE_ENV:-}
if [ -n "$site_env" ]; then
  # shellcheck source=/dev/null
  source "$site_env"
fi
# The head's own allocation must not leak into the jobs it submits.
for var in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN)_' || true); do unset "$var"; done
fedhpc=${FEDHPC:-$(command -v fedhpc || echo .venv/bin/fedhpc)}

requeue() {
  echo "fedhpc head: time limit near; stopping Snakemake, then requeueing job $job, $(date -Is)"
  kill -TERM "$head" 2>/dev/null || true
  for _ in $(seq "$grace"); do
    kill -0 "$head" 2>/dev/null || break
    sleep 1
  done
  # Snakemake waits for its running jobs before it exits; those run on without it. Nothing of
  # this head may outlive it: the requeued head takes the run directory's lock.
  kill -KILL -- "-$head" 2>/dev/null || true
  scontrol requeue "$job"
  exit 0
}
trap requeue USR1
# In the background (bash runs a trap only between commands, and `wait` is one it leaves at a
# signal), in a process group of its own that the trap can stop as a whole.
setsid "$fedhpc" run --profile "$profile" --configfile "$config" &
head=$!
wait "$head"
