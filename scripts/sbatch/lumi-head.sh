#!/bin/bash
# The federation's head process on LUMI, as a small LUMI-C job (login nodes do not allow
# long-running processes). Set your project once below, then, from the clone's directory:
#
#   sbatch scripts/sbatch/lumi-head.sh [config.yaml] [profile]
#
# profile: profiles/lumi (training on standard-g) or profiles/lumi-dev (a first try on dev-g).
# The log is fedhpc-head-<jobid>.out there; at its time limit the head requeues itself and
# resumes (scripts/sbatch/head.sh).
#SBATCH --job-name=fedhpc-head
#SBATCH --account=project_465000000
#SBATCH --partition=small
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=3-00:00:00
#SBATCH --output=fedhpc-head-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export FEDHPC_SITE_ENV=envs/lumi.sh
exec bash scripts/sbatch/head.sh "${2:-profiles/lumi}" "${1:-config.yaml}"
