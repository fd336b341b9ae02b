"""A DeepSpeed site's local round: the same steps, remainder included, as the plain engine's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

# In a child: DeepSpeed needs a process group and sets global accelerator state.
CHILD = textwrap.dedent(
    """
    import json, os
    os.environ["DS_ACCELERATOR"] = "cpu"
    import torch
    import fedhpc.training.engines
    from fedhpc.config.federation import ModelConfig, TrainingConfig
    from fedhpc.training.distributed import World
    from fedhpc.training.engines import DeepSpeedEngine, Engine
    from fedhpc.training.loop import local_round, to_windows
    from fedhpc.training.model import GPT
    from fedhpc.training.sites import BatchShape
    from fedhpc.stages.train import _single_process_group_for_deepspeed

    _single_process_group_for_deepspeed(World())  # as a one-rank DeepSpeed site's training job does
    torch.set_num_threads(1)
    adamw = fedhpc.training.engines.make_optimizer

    def sgd(model, t):
        return torch.optim.SGD(model.parameters(), lr=t.lr)

    # 19 windows at 4 a micro-batch, 2 a step: two whole steps of 8, then one micro-batch of 3.
    windows = to_windows(torch.arange(8 * 19 + 1) % 13, 8)
    shape = BatchShape(micro_batch=4, grad_accum=2, devices=1, seq_len=8)
    cpu = torch.device("cpu")
    out = {}
    # Plain SGD without clipping moves by -lr x the gradient, so a wrong loss scale shows (AdamW
    # would normalise it away); AdamW with clipping through ZeRO-2 checks the sharded path.
    for opt, clip, stage in (("sgd", 0.0, 0), ("adamw", 1.0, 2)):
        fedhpc.training.engines.make_optimizer = sgd if opt == "sgd" else adamw
        t = TrainingConfig(lr=1e-2, warmup_fraction=0.0, min_lr_ratio=1.0, grad_clip=clip, precision="fp32")
        for kind in ("single", "deepspeed"):
            torch.manual_seed(0)
            model = GPT(ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8), 20)
            start = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if kind == "single":
                engine = Engine(model, t, World(), cpu)
            else:
                engine = DeepSpeedEngine(model, t, World(), cpu, shape.micro_batch, shape.grad_accum, stage)
            res = local_round(engine, windows, shape, t, cpu, lambda f: f, torch.Generator().manual_seed(0))
            out[f"{opt}/{kind}"] = {
                "steps": res.steps,
                "tokens": res.tokens,
                "lr_sum": res.lr_sum,
                "moved": {k: (v.detach() - start[k]).flatten().tolist() for k, v in model.state_dict().items()},
            }
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def rounds() -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_a_deepspeed_round_trains_the_remainder_and_moves_the_model_as_the_plain_engine(rounds, opt):
    single, ds = rounds[f"{opt}/single"], rounds[f"{opt}/deepspeed"]
    # Every window trained: two whole steps, then a last one of the 3 left at 3/8 of the lr.
    assert ds["steps"] == single["steps"] == 3
    assert ds["tokens"] == single["tokens"] == 19 * 8
    assert abs(ds["lr_sum"] - 1e-2 * (2 + 3 / 8)) < 1e-12
    # The same steps: on the short one DeepSpeed's fixed 1/gas loss scale is undone. AdamW moves a
    # parameter by about the lr a step, so float differences in ZeRO's flat buffers (up to 7e-6
    # seen) stay far below the 3.75e-3 of the last step; SGD's moves are proportional to the gradient.
    assert max(abs(x) for a in single["moved"].values() for x in a) > 1e-3  # the model did move
    for name, a in single["moved"].items():
        b = ds["moved"][name]
        tolerance = 1e-4 if opt == "adamw" else 1e-8 + 1e-4 * max(abs(x) for x in a)
        assert max(abs(x - y) for x, y in zip(a, b)) <= tolerance, name
