"""Tokens/s of fedhpc's site training loop against a bare PyTorch loop, same model and batch, one run.

Usage: python benchmarks/train_throughput.py [--repeats 5] [--steps 30] [--threads 2]
Prints one line per repeat, then a JSON object on the last line with the medians and
their ratio (goal: >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedhpc.config.federation import ModelConfig, TrainingConfig
from fedhpc.core.files import append_jsonl
from fedhpc.training.distributed import World
from fedhpc.training.engines import Engine
from fedhpc.training.loop import local_round, make_optimizer, to_windows
from fedhpc.training.model import GPT
from fedhpc.training.sites import BatchShape
from fedhpc.training.sysinfo import SystemProbe


def bare_loop(model, opt, windows, shape, t, steps) -> float:
    """What a person would write by hand: no schedule, no logging, no metrics."""
    order = torch.randperm(len(windows))
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for micro in range(shape.grad_accum):
            start = (step * shape.grad_accum + micro) * shape.micro_batch
            batch = windows[order[start : start + shape.micro_batch]]
            _, loss = model(batch[:, :-1], batch[:, 1:])
            (loss / shape.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * shape.tokens_per_step / (time.perf_counter() - t0)


def ours(model, opt, windows, shape, t, metrics: Path) -> float:
    """fedhpc's loop with everything a site does per step: engine, schedule, metrics file, system probe."""
    probe = SystemProbe()
    engine = Engine(model, t, World(), torch.device("cpu"))
    engine.optimizer = opt
    res = local_round(
        engine,
        windows,
        shape,
        t,
        torch.device("cpu"),
        lambda f: 0.5 + f / 8,
        torch.Generator().manual_seed(0),
        lambda rec: append_jsonl(metrics, {**rec, **probe.sample()}),
    )
    return res.tokens / res.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mcfg = ModelConfig(n_layer=4, n_head=4, d_model=128, seq_len=128)  # the demo model
    t = TrainingConfig(batch_tokens=4096, log_every=10)
    shape = BatchShape(micro_batch=16, grad_accum=2, devices=1, seq_len=mcfg.seq_len)
    g = torch.Generator().manual_seed(0)
    windows = to_windows(torch.randint(0, 257, (a.steps * shape.tokens_per_step + 1,), generator=g), mcfg.seq_len)
    rates = {"bare": [], "fedhpc": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            # Alternate the order so drift in machine speed hits both loops alike.
            for name in ("bare", "fedhpc") if i % 2 == 0 else ("fedhpc", "bare"):
                torch.manual_seed(0)
                model = GPT(mcfg, 257)
                opt = make_optimizer(model, t)
                rate = (
                    bare_loop(model, opt, windows, shape, t, a.steps)
                    if name == "bare"
                    else ours(model, opt, windows, shape, t, Path(tmp) / f"m{i}.jsonl")
                )
                rates[name].append(rate)
                print(f"repeat {i} {name:7s} {rate:9.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "bare_tokens_per_s": med["bare"],
                "fedhpc_tokens_per_s": med["fedhpc"],
                "ratio": med["fedhpc"] / med["bare"],
                "repeats": a.repeats,
                "steps": a.steps,
                "tokens_per_step": shape.tokens_per_step,
                "threads": a.threads,
            }
        )
    )


if __name__ == "__main__":
    main()
