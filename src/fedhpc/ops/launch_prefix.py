"""What goes before `fedhpc train` and `fedhpc aggregate` in a job: the launcher and the container.

srun (or mpiexec) for several ranks, and for a site's training the container runtime with its
image and accelerator flags.
"""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Mapping
from typing import Any

from fedhpc.config.federation import SiteConfig
from fedhpc.ops.containers import RUNTIMES, ContainerError, find_runtime

# What the runtime needs to pass the site's GPUs into the image.
# cuda: --nv binds the host's NVIDIA driver libraries and devices; without it torch in the image
# sees no GPU and `device: auto` trains on CPU.
# rocm: nothing. The image carries its own ROCm user space (LUMI's PyTorch images), and the
# runtime mounts the host's /dev, /dev/kfd and /dev/dri included, as LUMI's AI guide relies on;
# --rocm would also bind the host's ROCm libraries, which need not match the image's. What RCCL
# needs between LUMI nodes (Slingshot binds and CXI variables) is site environment: envs/lumi.sh.
GPU_FLAGS: dict[str, tuple[str, ...]] = {"cuda": ("--nv",), "rocm": (), "cpu": ()}


def srun_prefix(
    launcher: str,
    cpus_per_task: int,
    *,
    nodes: int | None = None,
    ntasks_per_node: int | None = None,
    ntasks: int | None = None,
    cpu_bind: str | None = None,
) -> str:
    """`srun …` that starts a job step's tasks, killing all when one fails."""
    # The job-step executor clears SLURM_* before running a rule's shell; a cluster whose config
    # is not in the default place needs SLURM_CONF handed on to srun.
    conf = os.environ.get("SLURM_CONF")
    words = [f"env SLURM_CONF={shlex.quote(conf)}"] if conf else []
    words += [launcher, "--kill-on-bad-exit=1"]
    words += [f"--nodes={nodes}"] if nodes is not None else []
    words += [f"--ntasks-per-node={ntasks_per_node}"] if ntasks_per_node is not None else []
    words += [f"--ntasks={ntasks}"] if ntasks is not None else []
    words += [f"--cpus-per-task={cpus_per_task}"]
    words += [f"--cpu-bind={cpu_bind}"] if cpu_bind else []
    return " ".join(words) + " "


def site_runtime(site_name: str, runs_here: bool) -> str:
    """The runtime command for a site that trains in an image.

    Looked up by the process that runs the job's command: Snakemake evaluates a rule's params
    again in the job, on the compute node (the job-step executor re-reads the workflow there),
    so `runs_here` is true in that process and in a single-machine run. That node is the one
    whose runtime counts, after whatever the job's environment loaded (`module load apptainer`
    on clusters that ship it as a module; LUMI's compute nodes have `singularity` built in).
    A head that submits to Slurm, or a dry run, only records or prints the command and never
    runs it, so it must not need a runtime (on some clusters login and head nodes have none);
    it writes the command with the runtime it has, else apptainer.
    """
    runtime = find_runtime()
    if runtime:
        return runtime
    if not runs_here:
        return RUNTIMES[0]
    raise ContainerError(
        f"site {site_name!r} trains in a container image (sites.{site_name}.container), but neither "
        f"apptainer nor singularity is on PATH on {socket.gethostname()}: make the runtime available "
        f"in the site's job environment (e.g. `module load apptainer` in envs/<site>.sh; LUMI has "
        f"`singularity` without a module), or set sites.{site_name}.container to null to train on the host"
    )


def container_prefix(site_name: str, site: SiteConfig, runtime: str) -> str:
    """`<runtime> exec <accelerator flags> <image> `."""
    words = [runtime, "exec", *GPU_FLAGS[site.accelerator], shlex.quote(str(site.container))]
    return " ".join(words) + " "


def train_prefix(site_name: str, site: SiteConfig, resources: Mapping[str, Any], threads: int, runs_here: bool) -> str:
    """What goes before `fedhpc train`: srun when the job has an `mpi` launcher, then the site's
    image (inside srun, so each rank runs in the image rather than srun itself)."""
    launch = ""
    if resources.get("mpi"):
        launch = srun_prefix(
            resources.get("mpi"),
            resources.get("cpus_per_task", threads),
            nodes=resources.get("nodes", 1),
            ntasks_per_node=resources.get("tasks_per_node"),
            cpu_bind=resources.get("cpu_bind"),
        )
    if site.container:
        launch += container_prefix(site_name, site, site_runtime(site_name, runs_here))
    return launch


def resident_cores(executor: str) -> int:
    """The cores a resident site's job asks of Snakemake (its rule's default `threads`). Run by
    this machine's Snakemake (the local executor) none: the job sleeps while the coordinator's jobs
    run, and holding a core would starve them, a deadlock on a small --cores. Submitted to Slurm,
    and inside that job (the job-step executor re-evaluates `threads`), a train job's 2."""
    return 0 if executor == "local" else 2


def aggregate_prefix(ranks: int, resources: Mapping[str, Any], threads: int) -> str:
    """What goes before `fedhpc aggregate`: several MPI ranks split a large checkpoint's tensors,
    started by srun when the job has an `mpi` launcher (a Slurm job), else by mpiexec on this
    machine; nothing for one rank."""
    if ranks <= 1:
        return ""
    if resources.get("mpi"):
        cpus = resources.get("cpus_per_task", max(1, threads // ranks))
        return srun_prefix(resources.get("mpi"), cpus, ntasks=ranks)
    return f"mpiexec -n {ranks} --oversubscribe "
