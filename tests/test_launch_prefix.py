"""The command before `fedhpc train`: srun for several ranks, then whichever container runtime the
node has (LUMI: singularity; elsewhere apptainer), with what the site's accelerator needs; and
before `fedhpc aggregate`: srun or mpiexec for its ranks."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from fedhpc.config.federation import SiteConfig
from fedhpc.ops.containers import ContainerError
from fedhpc.ops.launch_prefix import aggregate_prefix, resident_cores, srun_prefix, train_prefix
from tests.test_containers import fake_runtimes
from tests.workflow_util import REPO, run_workflow, tiny_config, write_config

LUMI_TRAIN = {"mpi": "srun", "nodes": 2, "tasks_per_node": 8, "cpus_per_task": 7, "cpu_bind": "mask_cpu:0xfe"}


def run_prefix(prefix: str, tmp_path: Path) -> list[dict]:
    """Run `<prefix>true` as the rule's shell would, and return the runtime's recorded calls."""
    log = tmp_path / "runtime.jsonl"
    subprocess.run(f"{prefix}true", shell=True, check=True, env={**os.environ, "FAKE_RUNTIME_LOG": str(log)})
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("runtime", ["singularity", "apptainer"])
@pytest.mark.parametrize("accelerator,flags", [("cuda", ["--nv"]), ("rocm", []), ("cpu", [])])
def test_the_image_runs_under_the_runtime_on_path_with_the_accelerators_flags(
    tmp_path, monkeypatch, runtime, accelerator, flags
):
    fake_runtimes(tmp_path, monkeypatch, runtime)
    site = SiteConfig(accelerator=accelerator, container="/images/site image.sif")
    prefix = train_prefix("s", site, {}, 2, runs_here=True)
    [call] = run_prefix(prefix, tmp_path)
    assert call["runtime"] == runtime
    assert call["argv"] == ["exec", *flags, "/images/site image.sif", "true"]


def test_several_ranks_start_under_srun_each_in_the_image(tmp_path, monkeypatch):
    fake_runtimes(tmp_path, monkeypatch, "singularity")
    monkeypatch.delenv("SLURM_CONF", raising=False)
    site = SiteConfig(accelerator="rocm", container="/scratch/p/fedhpc-rocm.sif")
    words = shlex.split(train_prefix("lumi", site, LUMI_TRAIN, 7, runs_here=True))
    assert words == [
        "srun",
        "--kill-on-bad-exit=1",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=7",
        "--cpu-bind=mask_cpu:0xfe",
        "singularity",
        "exec",
        "/scratch/p/fedhpc-rocm.sif",
    ]
    # Without an image, srun starts `fedhpc train` itself; a single rank on the host needs nothing.
    assert shlex.split(train_prefix("lumi", SiteConfig(accelerator="rocm"), LUMI_TRAIN, 7, runs_here=True))[-1] == (
        "--cpu-bind=mask_cpu:0xfe"
    )
    assert train_prefix("laptop", SiteConfig(), {}, 2, runs_here=True) == ""


def test_a_slurm_conf_elsewhere_is_handed_on_to_srun(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", "/etc/b/slurm.conf")
    prefix = train_prefix("a100", SiteConfig(), {"mpi": "srun", "tasks_per_node": 4}, 16, runs_here=True)
    assert prefix.startswith("env SLURM_CONF=/etc/b/slurm.conf srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=4")


def test_srun_for_a_fixed_number_of_tasks_is_the_aggregation_form(monkeypatch):
    """The same srun part serves a job of N tasks on whatever nodes (MPI aggregation)."""
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert srun_prefix("srun", 7, ntasks=4) == "srun --kill-on-bad-exit=1 --ntasks=4 --cpus-per-task=7 "


def test_the_aggregation_prefix_is_built_by_the_same_srun_part(monkeypatch):
    """One rank: nothing; a Slurm job: srun for N tasks (SLURM_CONF handed on, CPUs shared out
    when the profile sets none); elsewhere mpiexec."""
    monkeypatch.setenv("SLURM_CONF", "/etc/b/slurm.conf")
    assert aggregate_prefix(1, {"mpi": "srun"}, 8) == ""
    assert aggregate_prefix(2, {"mpi": "srun"}, 8) == (
        "env SLURM_CONF=/etc/b/slurm.conf srun --kill-on-bad-exit=1 --ntasks=2 --cpus-per-task=4 "
    )
    monkeypatch.delenv("SLURM_CONF")
    assert aggregate_prefix(4, {"mpi": "srun", "cpus_per_task": 7}, 8) == srun_prefix("srun", 7, ntasks=4)
    assert aggregate_prefix(2, {}, 8) == "mpiexec -n 2 --oversubscribe "


def test_a_node_without_a_runtime_names_the_site_and_what_to_do(tmp_path, monkeypatch):
    fake_runtimes(tmp_path, monkeypatch)  # neither on PATH
    site = SiteConfig(accelerator="cuda", container="/images/a100.sif")
    with pytest.raises(ContainerError) as err:
        train_prefix("a100", site, {}, 2, runs_here=True)
    msg = str(err.value)
    assert "site 'a100'" in msg and "neither apptainer nor singularity" in msg
    assert "module load apptainer" in msg and "sites.a100.container" in msg
    # A Slurm head only records the command its jobs build again on their compute nodes.
    assert train_prefix("a100", site, {}, 2, runs_here=False) == "apptainer exec --nv /images/a100.sif "


def federation_in_images(tmp_path, monkeypatch, runtime: str, *profile: str, lumi_ranks: int = 1) -> dict:
    """One round with the GPU sites in images and only `runtime`'s stand-in on PATH: each site's
    recorded runtime calls (the laptop has no image and trains on the host)."""
    fake_runtimes(tmp_path, monkeypatch, runtime)
    log = tmp_path / "runtime.jsonl"
    monkeypatch.setenv("FAKE_RUNTIME_LOG", str(log))
    cfg = tiny_config(tmp_path, run=runtime, rounds=1)
    cfg["sites"]["lumi"].update(ranks_per_node=lumi_ranks, engine="ddp", container="/images/fedhpc-rocm.sif")
    cfg["sites"]["a100"]["container"] = "/images/fedhpc-cuda.sif"
    write_config(tmp_path, cfg)
    run_workflow(tmp_path, *profile)
    run = Path(cfg["output_dir"]) / runtime
    for site in cfg["sites"]:
        assert (run / "rounds" / "r0000" / "sites" / site / "receipt.json").exists(), site
    calls: dict[str, list] = {}
    for line in log.read_text().splitlines():
        call = json.loads(line)
        assert call["runtime"] == runtime
        calls.setdefault(call["argv"][call["argv"].index("--site") + 1], []).append(call["argv"])
    train = ["train", "--config", str(run / "config.json"), "--round", "0000"]
    for argv in calls["lumi"]:
        assert argv[:8] == ["exec", "/images/fedhpc-rocm.sif", "fedhpc", *train]  # ROCm: no flag
    for argv in calls["a100"]:
        assert argv[:9] == ["exec", "--nv", "/images/fedhpc-cuda.sif", "fedhpc", *train]
    return calls


@pytest.mark.e2e
def test_an_a100_clusters_apptainer_runs_the_gpu_sites_in_their_images(tmp_path, monkeypatch):
    calls = federation_in_images(tmp_path, monkeypatch, "apptainer")
    assert set(calls) == {"lumi", "a100"} and [len(c) for c in calls.values()] == [1, 1]


@pytest.mark.e2e
def test_on_slurm_each_rank_runs_in_the_image_under_the_compute_nodes_singularity(slurm, tmp_path, monkeypatch):
    """LUMI's path through a real Slurm cluster, with only singularity: each job's own Snakemake
    builds `srun … singularity exec <image>` on its compute node, and srun starts every rank in it."""
    calls = federation_in_images(
        tmp_path, monkeypatch, "singularity", "--profile", str(REPO / "profiles" / "ci-slurm"), lumi_ranks=2
    )
    assert {site: len(c) for site, c in calls.items()} == {"lumi": 2, "a100": 1}  # one call per rank
    receipt = json.loads(
        (tmp_path / "results" / "singularity" / "rounds" / "r0000" / "sites" / "lumi" / "receipt.json").read_text()
    )
    assert (receipt["ranks"], receipt["launcher"]) == (2, "slurm") and receipt["slurm_job_id"]


def test_a_resident_job_holds_no_local_core_but_keeps_its_cores_inside_its_slurm_job():
    # Locally the sleeping job must not starve the coordinator's jobs of Snakemake's cores; inside
    # a Slurm job the job-step executor evaluates `threads` again and must not get 0 (one thread).
    assert resident_cores("local") == 0
    assert resident_cores("slurm") == resident_cores("slurm-jobstep") == 2
