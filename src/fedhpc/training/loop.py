"""The local training loop of one site and round: short and linear, like nanoGPT's."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedhpc.config.federation import TrainingConfig
from fedhpc.training.distributed import World, all_sum
from fedhpc.training.sites import BatchShape

SINGLE = World()


def lr_at(progress: float, t: TrainingConfig) -> float:
    """One schedule over the whole federation: linear warm-up once, then cosine to min_lr.

    `progress` runs from 0 (start of round 0) to 1 (end of the last round), so a site's
    position in the schedule does not depend on how many steps it takes per round.
    """
    progress = min(max(progress, 0.0), 1.0)
    if t.warmup_fraction > 0 and progress < t.warmup_fraction:
        return t.lr * (progress + 1e-9) / t.warmup_fraction
    span = max(1e-9, 1.0 - t.warmup_fraction)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - t.warmup_fraction) / span)))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * cos)


def lr_scale(shape: BatchShape, t: TrainingConfig) -> float:
    """A site's multiplier on the schedule (training.lr_batch_scaling): 1, or √(its batch / the federation's).

    Counted in whole sequences, as batch_shape forms steps, so a site on `batch_tokens` gets
    exactly 1 when `batch_tokens` is not a multiple of the sequence length.
    """
    if t.lr_batch_scaling == "sqrt":
        return math.sqrt(shape.sequences_per_step / max(1, t.batch_tokens // shape.seq_len))
    return 1.0


def make_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # a frozen base (LoRA) is not optimised
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=False, foreach=True)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_windows(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping (seq_len + 1)-token windows; inputs are [:-1], targets [1:]."""
    n = (tokens.numel() - 1) // seq_len
    if n <= 0:
        return tokens.new_zeros((0, seq_len + 1))
    idx = torch.arange(seq_len + 1).unsqueeze(0) + seq_len * torch.arange(n).unsqueeze(1)
    return tokens[idx]


@torch.no_grad()
def mean_loss(
    forward: Callable,
    windows: torch.Tensor,
    batch_size: int,
    device: torch.device,
    precision: str,
    world: World = SINGLE,
) -> float:
    """Token-weighted mean cross-entropy (nats) over `windows`, shared out across the site's ranks.

    `forward(x, y)` returns the mean loss of a batch (a model's or an engine's forward).
    """
    total, count = 0.0, 0
    mine = windows[world.rank :: world.size]
    # Every rank runs the same number of batches: sharded models need all ranks in each forward.
    n_batches = -(-len(windows[0 :: world.size]) // batch_size)
    with autocast_for(device, precision):
        for i in range(n_batches):
            w = mine[i * batch_size : (i + 1) * batch_size]
            if len(w) == 0:
                w, weight = windows[:1], 0  # keep collectives in step; contributes nothing
            else:
                weight = w[:, 1:].numel()
            w = w.to(device, non_blocking=True)
            loss = forward(w[:, :-1], w[:, 1:])
            total += loss.item() * weight
            count += weight
    total, count = all_sum([total, float(count)], world)
    return total / max(count, 1)


@dataclass
class RoundResult:
    steps: int
    tokens: int  # across all ranks of the site
    seconds: float
    last_loss: float
    lr_first: float
    lr_last: float
    lr_sum: float  # Σ of the step learning rates: the round's "effort" for heterogeneity-aware weights


def local_round(
    engine,
    windows: torch.Tensor,
    shape: BatchShape,
    t: TrainingConfig,
    device: torch.device,
    progress: Callable[[float], float],
    generator: torch.Generator,
    log: Callable[[dict], None] | None = None,
) -> RoundResult:
    """Train on `windows` (one pass, shuffled, shared out across ranks) in optimizer steps of `shape`.

    `engine` hides the intra-site strategy (see training/engines.py). `progress(f)` maps the fraction
    f of this round done to the federation-wide schedule position; `log` receives a record
    every `t.log_every` steps (on every rank; callers log on rank 0).
    """
    world = engine.world
    per_step = shape.micro_batch * shape.grad_accum  # this rank's sequences per optimizer step
    # The same permutation on every rank (same generator seed); each rank takes its stride.
    order = torch.randperm(len(windows), generator=generator)
    full_steps = len(order) // (per_step * world.size)
    # What whole steps leave (up to a batch a round, a tenth of a big-batch site's share in small
    # rounds) is trained in one last, smaller step at an lr scaled by its share of a batch, not dropped.
    tail = (len(order) - full_steps * per_step * world.size) // world.size
    steps = full_steps + (tail > 0)
    mine = order[world.rank :: world.size]
    ctx = autocast_for(device, t.precision)
    engine.train(True)
    t0 = time.perf_counter()
    scale = lr_scale(shape, t)
    lr_first = lr = lr_at(progress(0.0), t) * scale
    loss_sum = torch.zeros((), device=device)
    last_loss, tokens_done, last_log_t, last_log_tokens, lr_sum, micros = float("nan"), 0, t0, 0, 0.0, 0
    for step in range(steps):
        n_seq = per_step if step < full_steps else tail  # this rank's sequences in this step
        n_micro = -(-n_seq // shape.micro_batch)
        lr = lr_at(progress(step / steps), t) * scale * n_seq / per_step
        lr_sum += lr
        engine.set_lr(lr)
        for micro in range(n_micro):
            start = step * per_step + micro * shape.micro_batch
            idx = mine[start : min(start + shape.micro_batch, step * per_step + n_seq)]
            batch = windows[idx].to(device, non_blocking=True)
            last = micro == n_micro - 1
            with ctx:
                loss = engine.forward(batch[:, :-1], batch[:, 1:], last)
            # The step's gradient is the mean over its sequences, however its micro-batches split them.
            engine.backward(loss, len(idx) / n_seq, last)
            loss_sum += loss.detach()
        micros += n_micro
        norm = engine.step()
        tokens_done += n_seq * world.size * shape.seq_len
        if log is not None and ((step + 1) % t.log_every == 0 or step + 1 == steps):
            now = time.perf_counter()
            last_loss = reduce_mean(loss_sum, world) / micros
            loss_sum.zero_()
            micros = 0
            log(
                {
                    "step": step + 1,
                    "steps": steps,
                    "loss": last_loss,
                    "grad_norm": norm,
                    "lr": lr,
                    "tokens": tokens_done,
                    "tokens_per_s": (tokens_done - last_log_tokens) / max(now - last_log_t, 1e-9),
                    "progress": progress((step + 1) / steps),
                    "elapsed_s": now - t0,
                }
            )
            last_log_t, last_log_tokens = now, tokens_done
    return RoundResult(
        steps=steps,
        tokens=tokens_done,
        seconds=time.perf_counter() - t0,
        last_loss=last_loss,
        lr_first=lr_first,
        lr_last=lr,
        lr_sum=lr_sum,
    )


def reduce_mean(value: torch.Tensor, world: World) -> float:
    """Mean over the site's ranks of a scalar tensor."""
    if world.distributed:
        value = value.detach().clone().to(torch.float64)
        torch.distributed.all_reduce(value)
        value /= world.size
    return float(value)
