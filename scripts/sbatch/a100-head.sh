#!/bin/bash
# The federation's head process on an A100 cluster, as a small CPU job. Set account and
# partition for your centre, then, from the clone's directory:
#   sbatch scripts/sbatch/a100-head.sh [config.yaml]
# The log is fedhpc-head-<jobid>.out there; at its time limit the head requeues itself and
# resumes (scripts/sbatch/head.sh).
#SBATCH --job-name=fedhpc-head
#SBATCH --account=my_project
#SBATCH --partition=cpu
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
export FEDHPC_SITE_ENV=envs/a100.sh
exec bash scripts/sbatch/head.sh profiles/a100 "${1:-config.yaml}"
