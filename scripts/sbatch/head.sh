#!/bin/bash
# Run a federation's Snakemake head process as its own Slurm job (not on a login node).
#
#   sbatch -A <account> -p <partition> scripts/sbatch/head.sh [profile] [config]
#
# profile defaults to profiles/ci-slurm, config to config.yaml.
# Resubmitting after the job ends (time limit, node failure) resumes the federation.
#SBATCH --job-name=fedhpc-head
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/head/%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
profile=${1:-profiles/ci-slurm}
config=${2:-config.yaml}
site_env=${FEDHPC_SITE_ENV:-}
if [ -n "$site_env" ]; then
  # shellcheck source=/dev/null
  source "$site_env"
fi
# The head's own allocation must not leak into the jobs it submits.
for var in $(compgen -e | grep -E '^(SLURM|SBATCH|SRUN)_' || true); do unset "$var"; done
fedhpc=${FEDHPC:-$(command -v fedhpc || echo .venv/bin/fedhpc)}
exec "$fedhpc" run --profile "$profile" --configfile "$config"
