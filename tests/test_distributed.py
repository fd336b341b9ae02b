"""A site's ranks: the process group of GPU sites, Slurm host lists in a container, FSDP's units.

This machine has no GPU: the ranks here are real processes joined over gloo; what only a GPU
can show (NCCL/RCCL, one device per rank) is in tests/test_gpu_smoke.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedhpc.core.errors import FedhpcError
from fedhpc.training.distributed import first_host, hostnames
from fedhpc.training.engines import fsdp_units
from tests.rank_util import run_ranks

# (host list, the hosts `scontrol show hostnames` prints for it)
HOSTLISTS = [
    ("nid005000", ["nid005000"]),
    ("nid[005000-005001]", ["nid005000", "nid005001"]),
    ("nid[001-003,007]", ["nid001", "nid002", "nid003", "nid007"]),
    ("nid[8-10]", ["nid8", "nid9", "nid10"]),
    ("nid[08-10]", ["nid08", "nid09", "nid10"]),
    ("nid[008-10]", ["nid008", "nid009", "nid010"]),  # the low bound's digits set the width
    ("nid[1-010]", [f"nid{i}" for i in range(1, 11)]),
    ("nid[0-0]", ["nid0"]),
    ("nid[3,1-2]", ["nid3", "nid1", "nid2"]),  # Slurm's order, not sorted
    ("nid[1,1]", ["nid1", "nid1"]),
    ("rack[1-2]-nid[01-02]", ["rack1-nid01", "rack1-nid02", "rack2-nid01", "rack2-nid02"]),
    ("a[1-2]b[7]", ["a1b7", "a2b7"]),
    # Several groups: the last varies fastest, then the first, ..., the one before the last slowest.
    ("x[1-2]y[3-4]z[5]", ["x1y3z5", "x2y3z5", "x1y4z5", "x2y4z5"]),
    ("a[1-2]b[1-2]c[1-2]", [f"a{a}b{b}c{c}" for b in (1, 2) for a in (1, 2) for c in (1, 2)]),
    ("a[1-2]b[1-2]c[1-2]d[1-2]", [f"a{a}b{b}c{c}d{d}" for c in (1, 2) for b in (1, 2) for a in (1, 2) for d in (1, 2)]),
    ("nid[005000-005001],uan[01,03]", ["nid005000", "nid005001", "uan01", "uan03"]),
    ("gpu[09-10] login1,nid[1-2]", ["gpu09", "gpu10", "login1", "nid1", "nid2"]),
    ("a,,b,", ["a", "b"]),
    ("127.0.0.[1-2]", ["127.0.0.1", "127.0.0.2"]),
    ("nid[000998-001001]", ["nid000998", "nid000999", "nid001000", "nid001001"]),
]
# Text after the last bracket group: accepted here, refused by Slurm 22.05's scontrol.
SUFFIXED = [
    ("node[1-2]-ib", ["node1-ib", "node2-ib"]),
    ("gpu[1-2].cluster,login1", ["gpu1.cluster", "gpu2.cluster", "login1"]),
]
MALFORMED = ["nid[", "nid[1-2", "nid1-2]", "nid[[1-2]]", "nid[]", "nid[a-b]", "nid[3-1]", "nid[1,,2]", "nid[-1]"]


@pytest.mark.parametrize("expr, hosts", HOSTLISTS + SUFFIXED)
def test_slurm_host_lists_expand_to_every_host_in_slurms_order(expr, hosts):
    assert list(hostnames(expr)) == hosts


@pytest.mark.parametrize("expr", MALFORMED)
def test_a_malformed_host_list_is_refused_naming_it(expr):
    with pytest.raises(ValueError, match=re.escape(f"Slurm host list {expr!r}")):
        list(hostnames(expr))
    with pytest.raises(FedhpcError, match="SLURM_STEP_NODELIST: .* set MASTER_ADDR"):
        first_host(expr, "SLURM_STEP_NODELIST")


def test_the_first_host_of_a_huge_list_comes_without_expanding_it():
    assert first_host("nid[000000-999999],x[0-999999]", "SLURM_JOB_NODELIST") == "nid000000"


@pytest.fixture(scope="module")
def scontrol(tmp_path_factory):
    """`scontrol show hostnames` as a function. It parses without a running cluster; it only
    needs a slurm.conf, so a minimal one of its own keeps it away from any test cluster's."""
    exe = shutil.which("scontrol")
    if exe is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must compare host lists with Slurm's own parser, but scontrol is not on PATH")
        pytest.skip("no scontrol on this machine (Debian: slurm-client)")
    conf = tmp_path_factory.mktemp("scontrol") / "slurm.conf"
    conf.write_text("ClusterName=hostlists\nSlurmctldHost=localhost\n")

    def expand(expr: str) -> list[str] | None:
        proc = subprocess.run(
            [exe, "show", "hostnames", expr],
            env={**os.environ, "SLURM_CONF": str(conf)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        hosts = proc.stdout.split()  # a refused list: "Invalid hostlist" on stderr, maybe exit status 0
        return hosts if proc.returncode == 0 and hosts else None

    return expand


def test_host_lists_expand_as_slurms_scontrol_expands_them(scontrol):
    for expr, _ in HOSTLISTS:
        assert list(hostnames(expr)) == scontrol(expr), expr
    for expr, _ in SUFFIXED:  # a newer Slurm may accept these: then it must agree too
        if (theirs := scontrol(expr)) is not None:
            assert list(hostnames(expr)) == theirs, expr


SLURM_STEP = """
import json, os, torch
from fedhpc.training import distributed
world = distributed.detect()
distributed.init(world, torch.device("cpu"))
# Asked again once the group exists (a resident job's later rounds): srun's ranks, exported for torch.
again = distributed.detect()
out = {"launcher": world.launcher, "master": os.environ["MASTER_ADDR"], "sum": distributed.all_sum([1.0], world),
       "again": [again.launcher, again.rank == world.rank, again.size]}
distributed.barrier(world)
distributed.shutdown()  # a process group left to interpreter exit can abort it ("terminate called ...")
print(json.dumps(out))
"""


def test_srun_ranks_in_a_container_find_their_master_in_the_step_node_list():
    """Inside an image there is no scontrol: the ranks must read the first node themselves."""
    answers = run_ranks(
        SLURM_STEP,
        launcher="slurm",
        timeout=60,
        SLURM_STEP_NODELIST="127.0.0.[1-2]",
        PATH=str(Path(sys.executable).parent),  # no scontrol on it, as in a container
    )
    assert [(a["launcher"], a["master"], a["sum"]) for a in answers] == [("slurm", "127.0.0.1", [2.0])] * 2
    assert [a["again"] for a in answers] == [["slurm", True, 2]] * 2


# NCCL is not in this CPU build of torch. What matters is that NCCL serves device tensors only:
# gloo bound to cuda tensors alone ("cuda:gloo") fails a CPU tensor the same way, so it stands in
# for NCCL here, and setting the device (impossible without a GPU) is recorded, not done.
GPU_GROUP = """
import json, torch, torch.distributed as dist
from fedhpc.training import distributed
events = []
torch.cuda.set_device = lambda device: events.append(["set_device", str(device)])
real_init = dist.init_process_group
def without_nccl(backend, **kw):
    events.append(["init_process_group"])
    real_init(backend=("cuda:nccl" if backend == "nccl" else backend).replace("nccl", "gloo"), **kw)
dist.init_process_group = without_nccl
world = distributed.detect()
distributed.init(world, torch.device("cuda", world.local_rank))
total = distributed.all_sum([1.0, float(world.rank)], world)
decision = distributed.broadcast({"decided_by": world.rank}, world)
distributed.barrier(world)
distributed.shutdown()
print(json.dumps({"events": events, "sum": total, "decision": decision}))
"""


def test_a_gpu_sites_ranks_set_their_device_first_and_bookkeeping_collectives_run_beside_nccl():
    answers = run_ranks(GPU_GROUP)
    for rank, a in enumerate(answers):
        assert a["events"] == [["set_device", f"cuda:{rank}"], ["init_process_group"]]
        assert a["sum"] == [2.0, 1.0]  # all_sum of Python numbers (CPU tensors)
        assert a["decision"] == {"decided_by": 0}  # broadcast_object_list


FSDP_UNITS = """
import json, os, torch
from torch.distributed.fsdp import FSDPModule
from transformers import AutoModelForCausalLM
from fedhpc.training import distributed
from fedhpc.config.federation import ModelConfig, TrainingConfig
from fedhpc.training.engines import FSDPEngine
from fedhpc.training.model import GPT, trainable
from fedhpc.tasks.hf_lm import CausalLM

torch.set_num_threads(1)
world = distributed.detect()
distributed.init(world, torch.device("cpu"))
torch.manual_seed(0)
models = {
    "gpt": GPT(ModelConfig(n_layer=2, n_head=2, d_model=16, seq_len=8), 40),
    "hf_gpt2": CausalLM(AutoModelForCausalLM.from_pretrained(os.environ["HF_MODEL"], dtype=torch.float32)),
}
out = {}
for name, model in models.items():
    names = sorted(trainable(model))
    engine = FSDPEngine(model, TrainingConfig(precision="fp32"), world, torch.device("cpu"))
    x = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(world.rank))
    engine.backward(engine.forward(x[:, :-1], x[:, 1:]), 1.0, True)
    engine.step()
    state = engine.full_state()
    out[name] = {
        "units": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule)),
        "whole_model_on_rank_0": None if state is None else sorted(state) == names,
    }
distributed.barrier(world)
distributed.shutdown()  # a process group left to interpreter exit can abort it ("terminate called ...")
print(json.dumps(out))
"""


def tiny_gpt2(tmp: Path) -> Path:
    from tests.hf_util import tiny_causal_lm

    return tiny_causal_lm(tmp / "gpt2", ["the site trains its layers one by one"] * 20, vocab_size=280)


def test_fsdp_shards_each_decoder_layer_of_hugging_face_and_built_in_models(tmp_path):
    answers = run_ranks(FSDP_UNITS, HF_MODEL=str(tiny_gpt2(tmp_path)))
    for rank, a in enumerate(answers):
        # One unit per decoder layer plus the root (embeddings, final norm, head).
        assert a["gpt"]["units"] == ["", "blocks.0", "blocks.1"]
        assert a["hf_gpt2"]["units"] == ["", "lm.transformer.h.0", "lm.transformer.h.1"]
        expected = True if rank == 0 else None  # a training step, then the whole model gathered on rank 0
        assert a["gpt"]["whole_model_on_rank_0"] is expected and a["hf_gpt2"]["whole_model_on_rank_0"] is expected


class Layer(torch.nn.Module):
    def __init__(self, experts: int = 0):
        super().__init__()
        self.mix = torch.nn.Linear(4, 4)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(experts))


def test_without_declared_layer_classes_fsdp_shards_the_entries_of_module_lists():
    model = torch.nn.Sequential(torch.nn.Embedding(9, 4), torch.nn.ModuleList(Layer(experts=2) for _ in range(3)))
    # The layers, not the experts inside them: a unit inside another would be sharded twice.
    assert [n for n, m in model.named_modules() if any(m is u for u in fsdp_units(model))] == ["1.0", "1.1", "1.2"]
    assert fsdp_units(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == []  # one unit: the model


def test_lora_adapters_keep_the_hugging_face_layers_as_fsdp_units(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2(tmp_path), dtype=torch.float32)
    model = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["c_attn"]))
    units = [n for n, m in model.named_modules() if any(m is u for u in fsdp_units(model))]
    assert [n.rsplit(".", 2)[-2:] for n in units] == [["h", "0"], ["h", "1"]]
