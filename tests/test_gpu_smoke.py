"""GPU smoke suite: `pytest -m gpu` or scripts/gpu-smoke.sh on a machine with GPUs (CUDA or ROCm).

One federation of three sites, one per engine (DDP, FSDP, DeepSpeed ZeRO-2), each of 2 ranks on
a GPU each, bf16, trains a round that is published, verified and aggregated through the
workflow; and a site's ranks join one process group (each on its own GPU, NCCL/RCCL for device
tensors, gloo for bookkeeping). Every test has two variants: `gpu` (marked gpu, skipped without
a GPU) and `cpu` (gloo, run by the ordinary suite so this code cannot rot here). The cpu
variant tests the code path, not a GPU: its sites are declared cpu and train on the CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedhpc.training.devices import torch_gpu_family, what_the_job_sees
from tests.rank_util import run_ranks
from tests.workflow_util import env, snakemake_cmd, tiny_config, write_config

# One worker builds each variant's federation (module-scoped), not both workers of `make test`.
pytestmark = pytest.mark.xdist_group("gpu_smoke")
VARIANTS = [pytest.param("gpu", marks=pytest.mark.gpu, id="gpu"), pytest.param("cpu", marks=pytest.mark.e2e, id="cpu")]
ENGINES = ["ddp", "fsdp", "deepspeed"]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def gpus_or_skip(variant: str) -> int:
    """GPUs the gpu variant trains on (0 for the cpu variant); skips the gpu variant without one."""
    if variant == "cpu":
        return 0
    if torch_gpu_family() is None or torch.cuda.device_count() == 0:
        pytest.skip(f"no GPU: {what_the_job_sees()}")
    return torch.cuda.device_count()


def ranks_for(variant: str, gpus: int) -> int:
    # NCCL and RCCL refuse two ranks of one process group on one GPU: with a single GPU every
    # site trains on one rank (DeepSpeed still runs; DDP and FSDP then train as one process).
    return 2 if variant == "cpu" or gpus >= 2 else 1


def smoke_config(tmp: Path, variant: str, ranks: int) -> dict:
    """The tests' tiny federation, its data shared by three sites of one engine each, in bf16."""
    cfg = tiny_config(tmp, run=f"smoke-{variant}", rounds=1)
    accelerator = torch_gpu_family() if variant == "gpu" else "cpu"
    gpu = {"gpus": ranks, "gpu_memory_gb": 16} if variant == "gpu" else {"memory_gb": 8}
    engines = [e for e in ENGINES if e != "deepspeed" or HAS_DEEPSPEED]
    cfg["sites"] = {
        e: {"accelerator": accelerator, **gpu, "ranks_per_node": ranks, "engine": e, "zero_stage": 2} for e in engines
    }
    for domain in cfg["data"]["synth"]["domains"]:
        domain.pop("site", None)
    cfg["model"]["n_layer"] = 2  # FSDP shards two layers
    # Each site as it is declared: a GPU site whose job sees no GPU stops, never trains on the CPU.
    cfg["training"].update(precision="bf16", device="auto")
    cfg["rounds"]["quorum"] = 1.0
    return cfg


@pytest.fixture(scope="module", params=VARIANTS)
def smoke(request, tmp_path_factory) -> dict:
    """One round of the three-site federation, run by the workflow on this machine."""
    variant = request.param
    gpus = gpus_or_skip(variant)
    ranks = ranks_for(variant, gpus)
    tmp = tmp_path_factory.mktemp(f"smoke-{variant}")
    cfg = smoke_config(tmp, variant, ranks)
    write_config(tmp, cfg)
    # Started inside a Slurm allocation (srun scripts/gpu-smoke.sh), the workflow would launch
    # ranks with srun; the suite starts them on this node (torchrun), as on any machine.
    local = {k: v for k, v in env().items() if not k.startswith("SLURM_")}
    proc = subprocess.run(snakemake_cmd(tmp), capture_output=True, text=True, env=local, timeout=900)
    run = Path(cfg["output_dir"]) / cfg["run"]
    logs = {p.name: p.read_text()[-3000:] for p in sorted((run / "logs" / "train").glob("*.log"))}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{json.dumps(logs, indent=1)}"
    return {"variant": variant, "ranks": ranks, "cfg": cfg, "run": run, "logs": logs}


def test_a_round_of_every_engine_is_published_verified_and_aggregated(smoke):
    run, sites = smoke["run"], sorted(smoke["cfg"]["sites"])
    r0 = run / "rounds" / "r0000"
    verdicts = json.loads((r0 / "verdicts.json").read_text())
    assert sorted(verdicts["accepted"]) == sites and not verdicts["rejected"], verdicts
    aggregate = json.loads((r0 / "aggregate.json").read_text())
    assert sorted(aggregate["selected"]) == sites and all(w > 0 for w in aggregate["weights"].values())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["global_model_sha256"] == aggregate["output_sha256"]


@pytest.mark.parametrize("engine", ENGINES)
def test_each_engine_trains_its_ranks_on_the_variants_device_in_bf16(smoke, engine):
    if engine == "deepspeed" and not HAS_DEEPSPEED:
        pytest.skip("DeepSpeed is not installed here (pip install -e '.[deepspeed]')")
    ranks, gpu = smoke["ranks"], smoke["variant"] == "gpu"
    if ranks == 1 and engine != "deepspeed":
        pytest.skip(f"one GPU: site {engine!r} trained on one rank, so {engine} itself was not exercised")
    receipt = json.loads((smoke["run"] / "rounds" / "r0000" / "sites" / engine / "receipt.json").read_text())
    assert (receipt["engine"], receipt["ranks"]) == (engine, ranks), smoke["logs"]
    assert receipt["launcher"] == ("torchrun" if ranks > 1 else "none")
    assert receipt["device"] == ("cuda:0" if gpu else "cpu")  # rank 0's; never a fall-back to the CPU
    assert receipt["loss_after"] < receipt["loss_before"]
    if engine == "deepspeed":
        ds = json.loads((smoke["run"] / "site-state" / engine / "deepspeed-r0000.json").read_text())
        assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"] == {"stage": 2}


PROCESS_GROUP = """
import json, os, torch
from fedhpc.training import distributed
from fedhpc.training.devices import pick_device
world = distributed.detect()
device = pick_device("auto", "smoke", os.environ["SMOKE_ACCELERATOR"], world)
distributed.init(world, device)
x = torch.full((4,), float(world.rank + 1), device=device)
torch.distributed.all_reduce(x)  # a device tensor: NCCL/RCCL on GPUs
answer = {
    "device": str(device),
    "current": torch.cuda.current_device() if device.type == "cuda" else None,
    "device_sum": x.tolist(),
    "sum": distributed.all_sum([1.0], world),  # CPU tensors: gloo beside NCCL
    "decision": distributed.broadcast({"from": world.rank}, world),
}
distributed.barrier(world)
distributed.shutdown()
print(json.dumps(answer))
"""


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_sites_ranks_each_take_a_device_and_join_one_process_group(variant):
    gpus = gpus_or_skip(variant)
    if variant == "gpu" and gpus < 2:
        pytest.skip(f"{gpus} GPU: two ranks need a GPU each (NCCL/RCCL refuse two ranks on one GPU)")
    accelerator = torch_gpu_family() if variant == "gpu" else "cpu"
    answers = run_ranks(PROCESS_GROUP, SMOKE_ACCELERATOR=accelerator)
    for rank, a in enumerate(answers):
        if variant == "gpu":
            assert (a["device"], a["current"]) == (f"cuda:{rank}", rank)
        else:
            assert (a["device"], a["current"]) == ("cpu", None)
        assert a["device_sum"] == [3.0] * 4 and a["sum"] == [2.0] and a["decision"] == {"from": 0}
