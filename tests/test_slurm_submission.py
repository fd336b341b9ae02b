"""What a first federation on LUMI (and an A100 cluster) submits: the sbatch lines the Slurm
executor plugin builds for every job of a small federation, run to its end under profiles/lumi,
profiles/lumi-dev and profiles/a100 against recording stand-ins for sbatch & co (tests/fake_slurm.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fake_slurm import FakeSlurm, Job
from tests.test_profiles import LUMI_MASKS
from tests.workflow_util import BIN, REPO, tiny_config, write_config

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("fake-slurm")]

# The profiles under test (another directory to see what a changed profile would submit).
PROFILES = Path(os.environ.get("FEDHPC_TEST_PROFILES", REPO / "profiles"))
REMOTE_RULES = {"shard", "shard_site", "evaluate_shared", "evaluate_site", "train", "aggregate"}


def two_site_config(
    tmp: Path,
    run: str,
    gpu_site: str = "lumi",
    ranks: int = 1,
    laptop_data: bool = False,
    aggregator_ranks: int = 1,
    resident: bool = False,
) -> dict:
    """One round of two sites, `gpu_site` training as `ranks` ranks (in a resident job if
    `resident`) and `laptop` as one, written to tmp/config.yaml: a federation small enough for a
    test of its jobs or its head. Only `gpu_site` holds data of its own unless `laptop_data` (a
    site's own data is scored by jobs of its own: one more per model)."""
    cfg = tiny_config(tmp, run=run, rounds=1)
    cfg["strategy"] = {"ranks": aggregator_ranks}
    gpu = {**cfg["sites"]["lumi"], "ranks_per_node": ranks, "resident": resident}
    cfg["sites"] = {gpu_site: gpu, "laptop": cfg["sites"]["laptop"]}
    law, clinical, _ = cfg["data"]["synth"]["domains"]
    law["site"] = gpu_site
    if laptop_data:
        clinical["site"] = "laptop"
    else:
        del clinical["site"]
    cfg["rounds"]["tokens_per_round"] = 8192
    cfg["evaluation"]["tokens_per_domain"] = 256
    write_config(tmp, cfg)
    return cfg


def federation(tmp: Path, profile: str, gpu_site: str, ranks: int, **config):
    """two_site_config run to the end under `profile` as users run it (`fedhpc run`): the fake
    cluster, the config and the run's output."""
    cfg = two_site_config(tmp, profile, gpu_site, ranks, **config)
    fake = FakeSlurm(tmp / "fake-slurm").install()
    env = fake.env()
    env["PATH"] = f"{fake.bin}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"
    # The plugin's own polling, shortened: the scalar options on the command line leave the
    # profile's resource entries alone.
    poll = ["--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "1"]
    out = subprocess.run(
        [str(BIN / "fedhpc"), "run", "--profile", str(PROFILES / profile), "--directory", str(tmp)]
        + ["--configfile", str(tmp / "config.yaml"), "--", *poll],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    run = Path(cfg["output_dir"]) / profile
    assert json.loads((run / "summary.json").read_text())["rounds_completed"] == 1
    return fake, cfg, log


def by_rule(fake: FakeSlurm) -> dict[str, list[Job]]:
    jobs: dict[str, list[Job]] = {}
    for job in fake.jobs():
        jobs.setdefault(job.rule, []).append(job)
    return jobs


def site_of(job: Job) -> str:
    return (job.option("--comment") or "").rsplit("_", 1)[-1]


def sruns(fake: FakeSlurm, job: Job) -> list[list[str]]:
    return [c["argv"] for c in fake.srun_calls() if c["job"] == job.id]


def check_every_job(fake: FakeSlurm, account: str, rules: set[str] = REMOTE_RULES) -> dict[str, list[Job]]:
    """What every job needs anywhere: the account, a requeue on node failure, the job script
    that runs exactly this job's step, and that it ran to the end."""
    jobs = by_rule(fake)
    assert set(jobs) == rules, sorted(jobs)
    for job in fake.jobs():
        assert job.option("-A") == account, job.argv
        assert job.option("--requeue") == "" and job.option("--export") == "ALL", job.argv
        assert "--executor slurm-jobstep" in job.script and f"--target-jobs '{job.rule}:" in job.script, job.script
        assert job.state == "COMPLETED", (job.rule, job.argv)
    return jobs


def check_single_task(fake: FakeSlurm, job: Job) -> None:
    """A one-task job asks for no MPI: the plugin's CPU line says --ntasks=1 (a GPU line nothing),
    never several tasks, and nothing in the job starts srun."""
    assert job.option("--ntasks-per-node") is None and job.option("--ntasks") in (None, "1"), job.argv
    assert sruns(fake, job) == [], (job.rule, sruns(fake, job))


def check_multi_rank_training(fake: FakeSlurm, job: Job, ranks: int, cpus: int, bind: str, verb: str = "train") -> None:
    assert (job.option("--nodes"), job.option("--ntasks-per-node")) == ("1", str(ranks)), job.argv
    (srun,) = sruns(fake, job)
    launch = ["--kill-on-bad-exit=1", "--nodes=1", f"--ntasks-per-node={ranks}", f"--cpus-per-task={cpus}"]
    assert srun[: len(launch) + 1] == [*launch, f"--cpu-bind={bind}"], srun
    assert srun[len(launch) + 1 : len(launch) + 3] == ["fedhpc", verb], srun


@pytest.fixture(scope="module")
def lumi(tmp_path_factory):
    return federation(tmp_path_factory.mktemp("lumi"), "lumi", "lumi", 8)


@pytest.fixture(scope="module")
def lumi_dev(tmp_path_factory):
    # Both sites hold data: three dev-g scoring jobs are ready at once, one more than LUMI takes.
    # The aggregator runs as two MPI ranks; lumi trains and scores in one resident job of two ranks.
    return federation(
        tmp_path_factory.mktemp("lumi-dev"), "lumi-dev", "lumi", 2, laptop_data=True, aggregator_ranks=2, resident=True
    )


@pytest.fixture(scope="module")
def a100(tmp_path_factory):
    return federation(tmp_path_factory.mktemp("a100"), "a100", "a100", 4)


def test_lumi_sends_training_to_whole_standard_g_nodes_with_one_rank_per_gcd(lumi):
    fake, _, _ = lumi
    jobs = check_every_job(fake, "project_465000000")
    train = {site_of(j): j for j in jobs["train"]}
    for job in train.values():
        assert job.option("-p") == "standard-g" and job.option("--gres") == "gpu:8", job.argv
        assert job.option("--cpus-per-task") == "7" and job.option("-t") == "720", job.argv
        assert job.option("--mem") is None  # standard-g hands out whole nodes, memory included
    check_multi_rank_training(fake, train["lumi"], ranks=8, cpus=7, bind=LUMI_MASKS)
    check_single_task(fake, train["laptop"])  # a site of one rank asks for no MPI


def test_lumi_sends_cpu_work_to_lumi_c_and_scoring_to_one_gcd(lumi):
    fake, _, _ = lumi
    jobs = by_rule(fake)
    for rule in ("shard", "shard_site", "aggregate"):
        for job in jobs[rule]:
            # CPU work on LUMI-C: no GPU-hours billed for packing data or merging updates.
            assert job.option("-p") == "small" and job.option("--gres") is None, job.argv
            assert job.option("--mem") == "60000", job.argv
            check_single_task(fake, job)
    assert {j.option("-t") for j in jobs["shard"] + jobs["shard_site"]} == {"240"}
    # strategy.ranks is 1: the aggregator is one task (the plugin refuses an MPI job of one).
    (agg,) = jobs["aggregate"]
    assert (agg.option("--ntasks"), agg.option("--cpus-per-task"), agg.option("-t")) == ("1", "8", "120")
    for job in jobs["evaluate_shared"] + jobs["evaluate_site"]:
        assert (job.option("-p"), job.option("--gres"), job.option("--cpus-per-task")) == ("small-g", "gpu:1", "7")
        assert (job.option("--mem"), job.option("-t")) == ("60000", "60"), job.argv
        check_single_task(fake, job)


def test_the_head_asks_for_its_running_jobs_every_interval_not_after_the_plugins_back_off(lumi):
    # The run passes --seconds-between-status-checks 1. The plugin alone adds 10 s after every
    # check in which no job ended (11, 21, 31 s...): the head saw a finished job that much later.
    fake, _, _ = lumi
    queries = fake.status_queries()
    gaps = [
        (b - a, job.rule)
        for a, b in zip(queries, queries[1:])
        for job in fake.jobs()
        if job.submitted < a and job.ended is not None and job.ended > b
    ]
    assert gaps, "no job ran across two status checks: nothing was measured"
    assert max(gaps)[0] < 5, max(gaps)


def test_lumi_dev_keeps_every_job_within_dev_g_limits(lumi_dev):
    fake, cfg, _ = lumi_dev
    jobs = check_every_job(fake, "project_465000000", REMOTE_RULES | {"resident"})
    dev = [j for j in fake.jobs() if j.option("-p") == "dev-g"]
    assert {j.rule for j in dev} == {"train", "resident", "evaluate_shared", "evaluate_site"}
    assert all(int(j.option("-t")) <= 180 for j in dev), [(j.rule, j.option("-t")) for j in dev]
    # LUMI takes 2 jobs of a user in dev-g at a time (1 running): never more submitted at once.
    in_flight = max(sum(1 for o in dev if o.submitted <= j.submitted < (o.ended or float("inf"))) for j in dev)
    assert in_flight <= 2, in_flight
    for rule in ("shard", "shard_site", "aggregate"):
        assert {(j.option("-p"), j.option("--gres")) for j in jobs[rule]} == {("small", None)}, rule
    (train,), (resident,) = jobs["train"], jobs["resident"]
    for job in (train, resident):
        assert (job.option("--gres"), job.option("--mem"), job.option("--cpus-per-task")) == ("gpu:8", "480000", "7")
    # The resident site's job: a train job's node and ranks, and it scored lumi's held-out data
    # (so the only evaluate_site jobs are the laptop's).
    check_multi_rank_training(fake, resident, ranks=2, cpus=7, bind=LUMI_MASKS, verb="resident")
    assert (site_of(train), site_of(resident)) == ("laptop", "lumi")
    check_single_task(fake, train)
    assert {site_of(j) for j in jobs["evaluate_site"]} == {"laptop"}
    run = Path(cfg["output_dir"]) / "lumi-dev"
    assert json.loads((run / "rounds" / "r0000" / "sites" / "lumi" / "receipt.json").read_text())["ranks"] == 2
    # strategy.ranks 2: one job of two MPI tasks on LUMI-C, started by srun inside it.
    (agg,) = jobs["aggregate"]
    assert (agg.option("--ntasks"), agg.option("--cpus-per-task")) == ("2", "8"), agg.argv
    (srun,) = sruns(fake, agg)
    assert srun[:5] == ["--kill-on-bad-exit=1", "--ntasks=2", "--cpus-per-task=8", "fedhpc", "aggregate"], srun


def test_a100_profile_trains_four_ranks_per_node_and_asks_mpi_only_for_them(a100):
    fake, _, _ = a100
    jobs = check_every_job(fake, "my_project")
    train = {site_of(j): j for j in jobs["train"]}
    for job in train.values():
        assert (job.option("-p"), job.option("--gres"), job.option("--mem")) == ("gpu", "gpu:a100:4", "480000")
        assert job.option("--cpus-per-task") == "16", job.argv
    check_multi_rank_training(fake, train["a100"], ranks=4, cpus=16, bind="cores")
    check_single_task(fake, train["laptop"])
    for rule in ("shard", "shard_site", "aggregate"):
        for job in jobs[rule]:
            assert job.option("--gres") is None and job.option("--ntasks") == "1", job.argv
            check_single_task(fake, job)
    for job in jobs["evaluate_shared"] + jobs["evaluate_site"]:
        assert (job.option("-p"), job.option("--gres")) == ("gpu-small", "gpu:a100:1"), job.argv
