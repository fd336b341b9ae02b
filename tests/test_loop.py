"""The site training loop: accumulation, clipping, precision, and that it learns."""

from __future__ import annotations

import contextlib

import torch

from fedhpc.config.federation import ModelConfig, TrainingConfig
from fedhpc.training.distributed import World
from fedhpc.training.engines import Engine
from fedhpc.training.loop import autocast_for, local_round, mean_loss, to_windows
from fedhpc.training.model import GPT
from fedhpc.training.sites import BatchShape

MCFG = ModelConfig(n_layer=1, n_head=2, d_model=16, seq_len=8)


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(MCFG, 20)


def _run(shape: BatchShape, windows: torch.Tensor, t: TrainingConfig) -> GPT:
    model = _model()
    engine = Engine(model, t, World(), torch.device("cpu"))
    local_round(engine, windows, shape, t, torch.device("cpu"), lambda f: 0.5, torch.Generator().manual_seed(1))
    return model


def test_to_windows_overlaps_by_one_token_for_next_token_targets():
    w = to_windows(torch.arange(20), 4)
    assert w.tolist() == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [8, 9, 10, 11, 12], [12, 13, 14, 15, 16]]


def test_gradient_accumulation_matches_one_big_micro_batch():
    windows = to_windows(torch.randint(0, 20, (8 * 8 * 3 + 1,), generator=torch.Generator().manual_seed(2)), 8)
    t = TrainingConfig(lr=1e-2, warmup_fraction=0.0, grad_clip=0.0)
    big = _run(BatchShape(micro_batch=8, grad_accum=1, devices=1, seq_len=8), windows, t)
    acc = _run(BatchShape(micro_batch=4, grad_accum=2, devices=1, seq_len=8), windows, t)
    for (name, a), (_, b) in zip(big.named_parameters(), acc.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_clipping_bounds_the_gradient_norm_the_optimizer_sees():
    windows = to_windows(torch.randint(0, 20, (8 * 4 + 1,), generator=torch.Generator().manual_seed(3)), 8)
    records = []
    model = _model()
    t = TrainingConfig(lr=1e-3, grad_clip=1e-3, log_every=1)
    engine = Engine(model, t, World(), torch.device("cpu"))
    seen = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        total = orig(params, max_norm)
        seen.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())).item())
        return total

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        local_round(
            engine,
            windows,
            BatchShape(4, 1, 1, 8),
            t,
            torch.device("cpu"),
            lambda f: 0.5,
            torch.Generator().manual_seed(1),
            records.append,
        )
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    assert seen and all(n <= 1e-3 * 1.0001 for n in seen)
    assert all(r["grad_norm"] > 1e-3 for r in records)  # the logged norm is the one before clipping


def test_bf16_autocast_only_where_asked_or_supported():
    cpu = torch.device("cpu")
    assert isinstance(autocast_for(cpu, "auto"), contextlib.nullcontext)  # CPUs: fp32 unless asked
    assert isinstance(autocast_for(cpu, "fp32"), contextlib.nullcontext)
    with autocast_for(cpu, "bf16"):
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_a_local_round_learns_a_repeating_sequence():
    pattern = torch.tensor([1, 5, 2, 7, 3, 9, 4, 11] * 200)
    windows = to_windows(pattern, 8)
    model = _model()
    t = TrainingConfig(lr=1e-2, warmup_fraction=0.0, log_every=5)
    fwd = lambda x, y: model(x, y)[1]
    before = mean_loss(fwd, windows[:16], 8, torch.device("cpu"), "fp32")
    logs = []
    res = local_round(
        Engine(model, t, World(), torch.device("cpu")),
        windows,
        BatchShape(8, 1, 1, 8),
        t,
        torch.device("cpu"),
        lambda f: f,
        torch.Generator().manual_seed(0),
        logs.append,
    )
    after = mean_loss(fwd, windows[:16], 8, torch.device("cpu"), "fp32")
    # 199 windows at 8 a step: 24 whole steps, then one of the 7 left over.
    assert res.steps == 25 and res.tokens == len(windows) * 8
    assert after < 0.4 * before
    assert [r["step"] for r in logs][-1] == res.steps and all(r["tokens_per_s"] > 0 for r in logs)


def _round(engine, windows, t, shape):
    cpu = torch.device("cpu")
    return local_round(engine, windows, shape, t, cpu, lambda f: f, torch.Generator().manual_seed(0))


def test_the_windows_whole_steps_leave_are_trained_in_a_smaller_last_step_at_a_scaled_lr():
    windows = to_windows(torch.arange(8 * 21 + 1) % 13, 8)  # 21 windows
    t = TrainingConfig(lr=1e-2, warmup_fraction=0.0, min_lr_ratio=1.0)  # a constant lr
    shape = BatchShape(micro_batch=4, grad_accum=2, devices=1, seq_len=8)
    engine = Engine(_model(), t, World(), torch.device("cpu"))
    sizes, shares, forward, backward = [], [], engine.forward, engine.backward
    engine.forward = lambda x, y, last=True: sizes.append(len(x)) or forward(x, y, last)
    engine.backward = lambda loss, share, last: shares.append(share) or backward(loss, share, last)
    res = _round(engine, windows, t, shape)
    # Two whole steps of 8 sequences, then the 5 left: micro-batches of 4 and 1, at 5/8 of the lr;
    # each micro-batch's loss weighted by its share of its step's sequences.
    assert sizes == [4, 4, 4, 4, 4, 1] and shares == [0.5, 0.5, 0.5, 0.5, 0.8, 0.2]
    assert res.steps == 3 and res.tokens == 21 * 8
    assert res.lr_first == 1e-2 and abs(res.lr_last - 1e-2 * 5 / 8) < 1e-12
    assert abs(res.lr_sum - 1e-2 * (2 + 5 / 8)) < 1e-12
    assert engine.optimizer.param_groups[0]["lr"] == res.lr_last


def test_a_smaller_last_step_takes_the_mean_gradient_of_its_sequences():
    # One step over 5 sequences in micro-batches of 4 and 1 moves the model exactly as one
    # batch of all 5 does (plain SGD, so the update is -lr × the gradient).
    windows = to_windows(torch.arange(8 * 5 + 1) % 13, 8)
    t = TrainingConfig(lr=1e-2, warmup_fraction=0.0, min_lr_ratio=1.0, grad_clip=0.0)
    moved = []
    for shape in (BatchShape(4, 2, 1, 8), BatchShape(5, 1, 1, 8)):
        torch.manual_seed(3)
        engine = Engine(_model(), t, World(), torch.device("cpu"))
        engine.optimizer = torch.optim.SGD(engine.module.parameters(), lr=t.lr)
        start = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
        _round(engine, windows, t, shape)
        moved.append({k: v - start[k] for k, v in engine.module.state_dict().items()})
    # The 5-sequence batch is a whole step at the full lr; the split one is 5/8 of a batch of 8.
    for k in moved[0]:
        torch.testing.assert_close(moved[0][k], moved[1][k] * 5 / 8, rtol=1e-4, atol=1e-7)


def test_rocm_ranks_get_their_own_miopen_cache(monkeypatch, tmp_path):
    from fedhpc.stages.train import accelerator_env

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    a = accelerator_env("rocm", World(rank=0, size=2), str(tmp_path))
    b = accelerator_env("rocm", World(rank=1, size=2), str(tmp_path))
    assert a["MIOPEN_USER_DB_PATH"] == str(tmp_path / "miopen-77-0") == a["MIOPEN_CUSTOM_CACHE_DIR"]
    assert b["MIOPEN_USER_DB_PATH"] == str(tmp_path / "miopen-77-1")
    assert accelerator_env("cuda", World()) == {} and accelerator_env("cpu", World()) == {}
