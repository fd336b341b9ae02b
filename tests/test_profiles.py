"""The LUMI and A100 profiles: resources resolve, and the sbatch/srun lines are what LUMI needs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.workflow_util import BIN, REPO, tiny_config, write_config

LUMI_MASKS = (
    "mask_cpu:0x00fe000000000000,0xfe00000000000000,0x0000000000fe0000,0x00000000fe000000,"
    "0x00000000000000fe,0x000000000000fe00,0x000000fe00000000,0x0000fe0000000000"
)


def snakemake(tmp: Path, profile: str, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
    # Targets and flags first: --configfile takes every word that follows it.
    cmd = [
        str(BIN / "snakemake"),
        *args,
        "--snakefile",
        str(REPO / "workflow" / "Snakefile"),
        "--profile",
        str(REPO / "profiles" / profile),
        "--directory",
        str(tmp),
        "--configfile",
        str(tmp / "config.yaml"),
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(extra_env or {})}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )


@pytest.mark.parametrize("profile", ["lumi", "a100", "ci-slurm"])
def test_dry_run_resolves_every_rule(profile, tmp_path):
    write_config(tmp_path, tiny_config(tmp_path))
    out, _ = snakemake(tmp_path, profile, "-n", "-p").communicate(timeout=120)
    assert "This was a dry-run" in out, out[-3000:]
    assert "train" in out and "aggregate" in out


def test_a_federation_of_hundreds_of_rounds_plans(tmp_path):
    # Each round hangs off the one before, and Snakemake walks that chain recursively: at
    # Python's default recursion limit the DAG failed from about 27 rounds ("cyclic dependency").
    cfg = tiny_config(tmp_path)
    cfg["rounds"]["count"] = 200
    write_config(tmp_path, cfg)
    out, _ = snakemake(tmp_path, "local", "-n").communicate(timeout=300)
    assert "This was a dry-run" in out, out[-3000:]
    counts = dict(re.findall(r"^(aggregate|promote|train)\s+(\d+)$", out, re.M))
    assert counts == {"aggregate": "200", "promote": "200", "train": str(200 * len(cfg["sites"]))}, counts


def test_lumi_training_job_gets_whole_nodes_eight_ranks_and_gcd_binding(tmp_path):
    write_config(tmp_path, tiny_config(tmp_path))
    out, _ = snakemake(tmp_path, "lumi", "-n", "-p").communicate(timeout=120)
    train = [b for b in out.split("\n\n") if "rule train:" in b]
    assert len(train) == 6  # 3 sites × 2 rounds
    for block in train:
        res = block[block.index("resources:") :].splitlines()[0]
        for item in (
            "slurm_partition=standard-g",
            "nodes=1",
            "tasks_per_node=8",
            "cpus_per_task=7",
            "gres=gpu:8",
            "mpi=srun",
            "slurm_account=project_465000000",
        ):
            assert item in res, (item, res)
    shells = re.findall(r"Shell command: (srun .*fedhpc train .*)$", out, re.M)
    assert len(shells) == 6
    for cmd in shells:
        assert cmd.startswith(
            f"srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=8 --cpus-per-task=7 --cpu-bind={LUMI_MASKS} fedhpc train"
        )


def test_cheap_steps_run_on_the_head_node_and_heavy_ones_are_jobs():
    rules = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for name, body in re.findall(r"^rule (\w+):\n((?:    .*\n|\n)*)", smk.read_text(), re.M):
            rules[name] = "localrule: True" in body
    assert {r for r, local in rules.items() if local} >= {
        "plan",
        "gather",
        "verify",
        "merge_eval",
        "merge_eval_initial",
        "promote",
        "track",
        "report",
    }
    heavy = ("train", "aggregate", "evaluate_shared", "evaluate_site", "shard", "shard_site")
    assert not any(rules[r] for r in heavy)


FAKE_TOOLS = {
    # sbatch records its arguments and answers like --parsable does.
    "sbatch": '#!/bin/sh\nprintf "%s\\n" "$*" >> "$FAKE_SLURM_LOG"\necho 4242\n',
    "sacctmgr": "#!/bin/sh\necho project_465000000\n",
    "sshare": "#!/bin/sh\necho project_465000000\n",
    "sacct": "#!/bin/sh\nexit 0\n",
    "squeue": "#!/bin/sh\nexit 0\n",
    "sinfo": "#!/bin/sh\necho 'standard-g small-g dev-g'\n",
    "scancel": "#!/bin/sh\nexit 0\n",
}


def test_sbatch_line_the_slurm_plugin_builds_for_lumi_training(tmp_path):
    """Run the real executor plugin against recording stand-ins for sbatch & co."""
    cfg = tiny_config(tmp_path, run="lumi")
    write_config(tmp_path, cfg)
    rdir = Path(cfg["output_dir"]) / "lumi" / "rounds" / "r0000"
    (rdir / "global").mkdir(parents=True)
    (rdir / "plan.json").write_text("{}")
    (rdir / "global" / "model.safetensors").write_bytes(b"")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    for name, body in FAKE_TOOLS.items():
        (fake / name).write_text(body)
        (fake / name).chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {"PATH": f"{fake}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    target = str(rdir / "sites" / "lumi" / "status.json")
    proc = snakemake(tmp_path, "lumi", target, "--allowed-rules=train", extra_env=env)
    try:
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().strip()):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "no sbatch call within 120 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    argv = shlex.split(log.read_text().splitlines()[0])
    flags = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else True for a in argv if a.startswith("-")}
    assert "--parsable" in flags and flags["--export"] == "ALL"
    assert argv[argv.index("-A") + 1] == "project_465000000"
    assert argv[argv.index("-p") + 1] == "standard-g"
    assert flags["--nodes"] == "1" and flags["--ntasks-per-node"] == "8" and flags["--cpus-per-task"] == "7"
    assert flags["--gres"] == "gpu:8" and "--requeue" in flags  # node failures are requeued
    assert argv[argv.index("-t") + 1] == "720"
    assert "--mem" not in flags  # standard-g hands out whole nodes
    # The job runs Snakemake's job step for exactly this training job.
    assert "--target-jobs 'train:r=0000,site=lumi'" in log.read_text()


def test_profiles_name_the_lumi_environment_and_placeholders():
    lumi = yaml.safe_load((REPO / "profiles" / "lumi" / "config.yaml").read_text())
    assert lumi["executor"] == "slurm"
    assert lumi["default-resources"]["slurm_account"] == "project_465000000"  # the documented placeholder
    assert lumi["set-resources"]["train"]["cpu_bind"] == LUMI_MASKS
    env = subprocess.run(
        ["bash", "-c", f"source {REPO / 'envs' / 'lumi.sh'} && env"], capture_output=True, text=True, check=True
    ).stdout
    assert "NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3" in env
    assert "SINGULARITY_BIND=/pfs,/scratch,/projappl,/project,/flash,/appl" in env


def test_lumi_aggregation_with_mpi_ranks_is_one_multi_task_job_under_srun(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["strategy"] = {"ranks": 4}
    write_config(tmp_path, cfg)
    out, _ = snakemake(tmp_path, "lumi", "-n", "-p").communicate(timeout=120)
    blocks = [b for b in out.split("\n\n") if "rule aggregate:" in b]
    assert len(blocks) == 2
    for block in blocks:
        res = block[block.index("resources:") :].splitlines()[0]
        assert "tasks=4" in res and "mpi=srun" in res and "cpus_per_task=7" in res, res
    shells = re.findall(r"Shell command: (.*fedhpc aggregate .*)$", out, re.M)
    assert len(shells) == 2
    for cmd in shells:
        assert cmd.startswith("srun --kill-on-bad-exit=1 --ntasks=4 --cpus-per-task=7 fedhpc aggregate"), cmd
