"""What an engine publishes: the whole model, fp32, on the CPU; DeepSpeed's from its fp32 master weights."""

from __future__ import annotations

import pytest
import torch

from fedhpc.config.federation import ModelConfig, TrainingConfig
from fedhpc.training.distributed import World
from fedhpc.training.engines import Engine
from fedhpc.training.model import GPT
from tests.rank_util import run_ranks

# Two ranks of a DeepSpeed site in bf16: DeepSpeed casts the module to bf16 and keeps fp32 master
# weights in its optimizer (under ZeRO, a slice on each rank).
DEEPSPEED_BF16 = """
import json, os
os.environ["DS_ACCELERATOR"] = "cpu"
import torch
from fedhpc.training import distributed
from fedhpc.config.federation import ModelConfig, TrainingConfig
from fedhpc.training.engines import DeepSpeedEngine

torch.set_num_threads(1)
world = distributed.detect()
distributed.init(world, torch.device("cpu"))
out = {}
for stage in (2, 3):
    torch.manual_seed(0)
    from fedhpc.training.model import GPT
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8), 20)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    t = TrainingConfig(lr=1e-2, precision="bf16")
    engine = DeepSpeedEngine(model, t, world, torch.device("cpu"), 2, 1, stage)
    x = torch.randint(0, 20, (2, 9), generator=torch.Generator().manual_seed(world.rank))
    engine.backward(engine.forward(x[:, :-1], x[:, 1:]), 1.0, True)
    state = engine.full_state()
    if state is not None:
        out[stage] = {
            "dtypes": sorted({str(v.dtype) for v in state.values()}),
            "devices": sorted({v.device.type for v in state.values()}),
            # fp32 master weights after an AdamW step are, with rare exceptions, not bf16 numbers
            "bf16_numbers": sum(int(torch.equal(v, v.bfloat16().float())) for v in state.values()),
            "tensors": len(state),
            "whole_model": {n: list(v.shape) for n, v in state.items()} == shapes,  # ZeRO-3: not slices
            # the module's weights are the masters rounded to bf16 (stage 2: whole on every rank)
            "module_is_rounded_export": all(
                torch.equal(p.detach(), state[n].bfloat16()) for n, p in model.named_parameters()
            ) if stage == 2 else None,
        }
distributed.barrier(world)
distributed.shutdown()  # a process group left to interpreter exit can abort it ("terminate called ...")
print(json.dumps(out), flush=True)
# The answer is out. Two DeepSpeed engines (ZeRO-2, then ZeRO-3) in one process still aborted a rank
# at interpreter teardown once in about a thousand runs (exit -6, "terminate called without an
# active exception", after the answer): leave without the teardown, which checks nothing here.
os._exit(0)
"""


def test_a_bf16_deepspeed_site_publishes_its_fp32_master_weights_not_their_bf16_copy():
    pytest.importorskip("deepspeed")
    rank0, rank1 = run_ranks(DEEPSPEED_BF16, timeout=300)
    assert rank1 == {}  # only rank 0 publishes
    for stage in ("2", "3"):
        got = rank0[stage]
        assert (got["dtypes"], got["devices"], got["whole_model"]) == (["torch.float32"], ["cpu"], True), stage
        # LayerNorm biases may stay at exact values; the weight matrices must not be bf16-rounded.
        assert got["bf16_numbers"] < got["tensors"] // 2, (stage, got)
    assert rank0["2"]["module_is_rounded_export"] is True


def test_the_published_state_is_a_cpu_copy_not_the_live_parameters():
    model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8), 20)
    state = Engine(model, TrainingConfig(), World(), torch.device("cpu")).full_state()
    with torch.no_grad():
        model.tok.weight.add_(1.0)  # training on after publishing must not change what was published
    assert not torch.equal(state["tok.weight"], model.tok.weight)
    assert {v.device.type for v in state.values()} == {"cpu"} and {v.dtype for v in state.values()} == {torch.float32}
