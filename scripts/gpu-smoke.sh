#!/bin/bash
# GPU smoke suite (tests/test_gpu_smoke.py, `pytest -m gpu`): on a machine with GPUs, a round of
# DDP, FSDP and DeepSpeed sites of 2 ranks each (a GPU per rank) in bf16, published and
# aggregated, and a site's ranks joined over NCCL/RCCL. A few minutes; run it from a clone:
#
#   scripts/gpu-smoke.sh                                   # a GPU workstation or an interactive node
#   srun -p dev-g --gpus-per-node=2 -t 15 scripts/gpu-smoke.sh                            # LUMI
#   srun -p dev-g --gpus-per-node=2 -t 15 singularity exec "$SIF" env PYTHON=python scripts/gpu-smoke.sh
#   apptainer exec --nv fedhpc-cuda.sif env PYTHON=python scripts/gpu-smoke.sh             # CUDA image
#
# In an image, PYTHON=python takes the image's torch (the clone's .venv has the head's CPU torch);
# containers/*.def install pytest for this. No --rocm on LUMI: the image carries its own ROCm.
#
# The ranks start on the node the script runs on (torchrun), whatever the allocation.
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3); it needs
# fedhpc with its test extras. Extra arguments go to pytest (e.g. -k fsdp).
# It fails, rather than passing on skipped tests, when torch sees no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" - <<'EOF'
import sys

import torch

from fedhpc.training.devices import torch_gpu_family, what_the_job_sees

print(f"gpu-smoke: {what_the_job_sees()}")
if torch_gpu_family() is None or torch.cuda.device_count() == 0:
    sys.exit("gpu-smoke: torch sees no GPU here, so there is nothing to test (see above)")
if torch.cuda.device_count() < 2:
    print("gpu-smoke: one GPU: every site trains on one rank; DDP, FSDP and two-rank NCCL/RCCL are skipped")
EOF
start=$SECONDS
"$PYTHON" -m pytest -m gpu -p no:cacheprovider -q -rs tests/test_gpu_smoke.py "$@"
echo "gpu-smoke: passed in $((SECONDS - start)) s (goal: under 300 s)"
