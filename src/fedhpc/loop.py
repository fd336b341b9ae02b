"""The local training loop of one site and round: short and linear, like nanoGPT's."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import TrainingConfig
from .sites import BatchShape


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


def make_optimizer(model: torch.nn.Module, t: TrainingConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
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
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, precision: str
) -> float:
    """Token-weighted mean cross-entropy (nats) over `windows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with autocast_for(device, precision):
        for i in range(0, len(windows), batch_size):
            w = windows[i : i + batch_size].to(device, non_blocking=True)
            _, loss = model(w[:, :-1], w[:, 1:])
            total += loss.item() * w[:, 1:].numel()
            count += w[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


@dataclass
class RoundResult:
    steps: int
    tokens: int
    seconds: float
    last_loss: float
    lr_first: float
    lr_last: float


def local_round(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    windows: torch.Tensor,
    shape: BatchShape,
    t: TrainingConfig,
    device: torch.device,
    progress: Callable[[float], float],
    generator: torch.Generator,
    log: Callable[[dict], None] | None = None,
) -> RoundResult:
    """Train on `windows` (one pass, shuffled) in optimizer steps of `shape`.

    `progress(f)` maps the fraction f of this round done to the federation-wide schedule
    position; `log` receives a record every `t.log_every` steps.
    """
    per_step = shape.micro_batch * shape.grad_accum  # this rank's sequences per optimizer step
    steps = len(windows) // per_step
    order = torch.randperm(len(windows), generator=generator)
    ctx = autocast_for(device, t.precision)
    model.train()
    t0 = time.perf_counter()
    lr_first = lr = lr_at(progress(0.0), t)
    loss_sum = torch.zeros((), device=device)
    last_loss, tokens_done, last_log_t, last_log_tokens = float("nan"), 0, t0, 0
    for step in range(steps):
        lr = lr_at(progress(step / steps), t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro in range(shape.grad_accum):
            start = (step * shape.grad_accum + micro) * shape.micro_batch
            batch = windows[order[start : start + shape.micro_batch]].to(device, non_blocking=True)
            with ctx:
                _, loss = model(batch[:, :-1], batch[:, 1:])
            (loss / shape.grad_accum).backward()
            loss_sum += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_done += per_step * shape.seq_len
        if log is not None and ((step + 1) % t.log_every == 0 or step + 1 == steps):
            now = time.perf_counter()
            n = (step % t.log_every) + 1 if (step + 1) % t.log_every else t.log_every
            last_loss = loss_sum.item() / (n * shape.grad_accum)
            loss_sum.zero_()
            log(
                {
                    "step": step + 1,
                    "steps": steps,
                    "loss": last_loss,
                    "grad_norm": float(norm),
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
    )
