"""The LUMI and A100 profiles resolve every rule; what they submit is in tests/test_slurm_submission.py."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from fedhpc.ops.submit import SubmitError, head_parameters
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


@pytest.mark.parametrize("profile", ["lumi", "lumi-dev", "a100", "ci-slurm"])
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


def test_cheap_steps_run_on_the_head_node_and_heavy_ones_are_jobs():
    rules = {}
    for smk in (REPO / "rules").glob("*.smk"):
        for name, body in re.findall(r"^(?:rule|checkpoint) (\w+):\n((?:    .*\n|\n)*)", smk.read_text(), re.M):
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
    heavy = ("train", "resident", "aggregate", "evaluate_shared", "evaluate_site", "shard", "shard_site")
    assert not any(rules[r] for r in heavy)


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


@pytest.mark.parametrize("profile", ["lumi", "lumi-dev", "a100"])
def test_a_resident_sites_job_gets_what_its_train_jobs_would(profile):
    # A resident site of 8 ranks needs the whole node its train jobs get; an entry of its own
    # (one GPU) would start 8 ranks on one GCD.
    cfg = yaml.safe_load((REPO / "profiles" / profile / "config.yaml").read_text())
    assert cfg["set-resources"]["resident"] == cfg["set-resources"]["train"]
    assert cfg["set-threads"]["resident"] == cfg["set-threads"]["train"]


@pytest.mark.parametrize(("profile", "env"), [("lumi", "lumi.sh"), ("lumi-dev", "lumi.sh"), ("a100", "a100.sh")])
def test_head_job_of_fedhpc_submit_sources_the_site_environment(profile, env):
    # The sbatch wrappers source envs/<site>.sh (FEDHPC_SITE_ENV); `fedhpc submit` gets it from head.yaml.
    assert head_parameters(REPO / "profiles" / profile)["site_env"] == str(REPO / "envs" / env)


def test_a_site_env_that_is_not_there_is_refused_naming_the_file_and_key(tmp_path):
    (tmp_path / "head.yaml").write_text("partition: small\nsite_env: ../envs/lumi.sh\n")
    with pytest.raises(SubmitError, match=r"head\.yaml: site_env '\.\./envs/lumi\.sh' is not a file"):
        head_parameters(tmp_path)


def test_profiles_give_no_resource_advice_for_the_command_line():
    # --default-resources/--set-resources on the command line replace the profile's whole entry
    # (account, gres, ... gone): no profile or page may suggest them.
    for path in [*(REPO / "profiles").glob("*/config.yaml"), REPO / "docs" / "running-on-lumi.md", REPO / "README.md"]:
        for line in path.read_text().splitlines():
            if re.search(r"--(default|set)-resources\s+\S+=", line):
                pytest.fail(f"{path.relative_to(REPO)} suggests a command-line resource override: {line.strip()}")


def test_a_dry_run_writes_nothing_to_the_run_directory(tmp_path):
    # The head of a real run writes the config snapshot the jobs read; a dry run (say, with other
    # --config overrides while the federation runs) used to rewrite it under the running jobs.
    cfg = tiny_config(tmp_path)
    write_config(tmp_path, cfg)
    run = tmp_path / "results" / cfg["run"]
    run.mkdir(parents=True)
    (run / "config.json").write_text("what the running head wrote\n")
    out, _ = snakemake(tmp_path, "local", "-n", "--config", "seed=99").communicate(timeout=300)
    assert "This was a dry-run" in out, out[-3000:]
    assert (run / "config.json").read_text() == "what the running head wrote\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
