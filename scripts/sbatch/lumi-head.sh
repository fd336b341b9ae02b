#!/bin/bash
# The federation's head process on LUMI, as a small LUMI-C job (login nodes do not allow
# long-running processes). Set your project once below, then:
#
#   sbatch scripts/sbatch/lumi-head.sh [config.yaml]
#
# Training runs in the standard-g jobs this head submits (profiles/lumi).
#SBATCH --job-name=fedhpc-head
#SBATCH --account=project_465000000
#SBATCH --partition=small
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/head/%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export FEDHPC_SITE_ENV=envs/lumi.sh
exec bash scripts/sbatch/head.sh profiles/lumi "${1:-config.yaml}"
