#!/bin/bash
# The federation's head process on an A100 cluster, as a small CPU job. Set account and
# partition for your centre, then:   sbatch scripts/sbatch/a100-head.sh [config.yaml]
#SBATCH --job-name=fedhpc-head
#SBATCH --account=my_project
#SBATCH --partition=cpu
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=3-00:00:00
#SBATCH --output=logs/head/%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
export FEDHPC_SITE_ENV=envs/a100.sh
exec bash scripts/sbatch/head.sh profiles/a100 "${1:-config.yaml}"
