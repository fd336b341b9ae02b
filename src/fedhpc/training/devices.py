"""The device a site's rank trains on (`training.device`), and a clear stop when a GPU site sees no GPU.

A job that trains a GPU site on the CPU by accident (an image run without `--nv`, a job on a
CPU partition, a CPU-only torch) is hundreds of times slower and says nothing: it must stop,
naming the site, what it declared, what the job saw and what to do.
"""

from __future__ import annotations

import os

import torch

from fedhpc.core.errors import FedhpcError
from fedhpc.training.distributed import World

# What decides which GPUs a process sees: the runtimes' own masks and what Slurm granted.
VISIBLE_DEVICE_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "SLURM_GPUS_ON_NODE",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
)

SEE_NO_GPU = {
    "cuda": "run the image with --nv (`apptainer exec --nv`), submit to a GPU partition with GPUs requested "
    "(gres: gpu:N or --gpus-per-node), and check that CUDA_VISIBLE_DEVICES is not empty",
    "rocm": "run the image with --rocm, submit to a GPU partition (on LUMI standard-g, small-g or dev-g) with GPUs "
    "requested (gres: gpu:N or --gpus-per-node), and check that ROCR_VISIBLE_DEVICES and HIP_VISIBLE_DEVICES are "
    "not empty",
}


class DeviceError(FedhpcError):
    """A site that trains on GPUs cannot use one."""


def torch_gpu_family() -> str | None:
    """`rocm` or `cuda`: what this torch was built for; None for a CPU-only build."""
    if getattr(torch.version, "hip", None):
        return "rocm"
    return "cuda" if torch.version.cuda else None


def what_the_job_sees() -> str:
    family = torch_gpu_family()
    build = {"rocm": f"built for ROCm {torch.version.hip}", "cuda": f"built for CUDA {torch.version.cuda}"}
    count = torch.cuda.device_count() if family else 0
    env = ", ".join(f"{k}={os.environ[k]!r}" if k in os.environ else f"{k} unset" for k in VISIBLE_DEVICE_VARIABLES)
    return f"torch {torch.__version__} ({build.get(family, 'a CPU-only build')}), {count} GPU(s) visible; {env}"


def pick_device(choice: str, site: str, accelerator: str, world: World) -> torch.device:
    """This rank's device. `cpu` trains every site on the CPU (a simulation, chosen in the config);
    `auto` follows the site's declared accelerator; `cuda` puts every site on a GPU. A site that
    should train on a GPU and cannot raises DeviceError; it never falls back to the CPU."""
    if choice == "cpu" or (choice == "auto" and accelerator == "cpu"):
        return torch.device("cpu")
    family = torch_gpu_family()
    count = torch.cuda.device_count() if family else 0
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if world.launcher == "torchrun" else 1
    see_gpus = SEE_NO_GPU.get(accelerator, f"{SEE_NO_GPU['cuda']} (NVIDIA), or {SEE_NO_GPU['rocm']} (AMD)")
    if family is None:
        problem = "runs a torch without GPU support"
        image = f"the site's {accelerator} image" if accelerator != "cpu" else "a GPU image"
        todo = (
            f"run it with a GPU build of torch, e.g. in {image} (sites.{site}.container, see containers/); {see_gpus}"
        )
    elif choice == "auto" and family != accelerator:
        problem = f"runs a torch built for {family}, not {accelerator}"
        todo = f"run it in the site's {accelerator} image, or correct sites.{site}.accelerator"
    elif count == 0:
        problem = "sees no GPU"
        todo = see_gpus
    elif local_ranks > count:
        # torchrun's ranks on a node all see the same GPUs; two ranks on one GPU fail in NCCL/RCCL.
        problem = f"starts {local_ranks} ranks on one node, which share {count} GPU(s)"
        todo = f"give each rank its own GPU: sites.{site}.ranks_per_node at most {count}"
    elif world.local_rank >= count > 1:
        problem = f"has local rank {world.local_rank} (rank {world.rank}) but sees only {count} GPUs"
        todo = f"give each rank its own GPU: sites.{site}.ranks_per_node at most the GPUs of a node, or one per task"
    else:
        # One visible GPU per task (--gpus-per-task=1, LUMI's ROCR_VISIBLE_DEVICES=$SLURM_LOCALID) is device 0.
        return torch.device("cuda", world.local_rank if count > 1 else 0)
    why = (
        f"declares accelerator {accelerator!r} (training.device: auto)"
        if choice == "auto"
        else "must train on a GPU (training.device: cuda)"
    )
    raise DeviceError(
        f"site {site!r} {why}, but its job {problem}. The job sees: {what_the_job_sees()}. To fix: {todo}. "
        "Training never falls back to the CPU on its own; to simulate this site on the CPU, set training.device: cpu"
    )
