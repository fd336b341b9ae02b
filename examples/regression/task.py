"""An example user task: federated regression with a small MLP on generated, non-IID data.

It shows everything a task implements (docs/writing-a-task.md): its own data format
(JSON-lines shards, one domain pinned to each site), its model, one local round, and a
held-out evaluation. Plans, signatures, verification, aggregation and the audit log are the
framework's. Select it with `task: {name: "examples/regression/task.py:RegressionTask"}`.
"""

from __future__ import annotations

import math
import time
from dataclasses import MISSING, dataclass

import numpy as np
import torch

from fedhpc.config.federation import opt
from fedhpc.core.tensorfile import load_state
from fedhpc.data.taskdata import read_records
from fedhpc.tasks import LocalResult, Task


@dataclass(kw_only=True)
class Domain:
    """One data domain: where its inputs lie (a covariate shift), and which site owns it."""

    name: str = opt(MISSING, "Domain name (shard and held-out split names).")
    site: str | None = opt(None, "Site that owns this domain's shards; null: any site.")
    shift: float = opt(0.0, "Mean of the inputs of this domain (every feature).")


@dataclass(kw_only=True)
class RegressionOptions:
    """Options of the example regression task."""

    domains: list[Domain] = opt([], "The domains.", minItems=1)
    features: int = opt(8, "Input features.", minimum=1)
    hidden: int = opt(32, "Hidden units of the MLP.", minimum=1)
    examples_per_shard: int = opt(500, "Examples per shard.", minimum=10)
    shards_per_domain: int = opt(2, "Shards per domain.", minimum=1)
    heldout_examples: int = opt(400, "Held-out examples per domain.", minimum=10)
    noise: float = opt(0.05, "Std of the label noise.", minimum=0)
    batch_size: int = opt(32, "Examples per optimizer step.", minimum=1)
    lr: float = opt(0.01, "Adam learning rate.", exclusiveMinimum=0)


def target(x: np.ndarray) -> np.ndarray:
    """The function every site's data comes from: a linear part and a non-linear bump."""
    w = np.linspace(-1.0, 1.0, x.shape[1])
    return x @ w + np.sin(2 * x[:, 0]) + 0.5 * x[:, 1] ** 2 / (1 + x[:, 1] ** 2)


class MLP(torch.nn.Module):
    def __init__(self, features: int, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def tensors(records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.tensor([r["x"] for r in records], dtype=torch.float32),
        torch.tensor([r["y"] for r in records], dtype=torch.float32),
    )


class RegressionTask(Task):
    """y = f(x) + noise, with each domain's inputs shifted; MSE is the loss."""

    Options = RegressionOptions

    def problems(self):
        sites = set(self.cfg.sites)
        return [
            f"task.options.domains[{i}].site: {d.site!r} is not a site"
            for i, d in enumerate(self.options.domains)
            if d.site is not None and d.site not in sites
        ]

    def _examples(self, rng: np.random.Generator, n: int, shift: float) -> list[dict]:
        o = self.options
        x = rng.normal(shift, 1.0, size=(n, o.features))
        y = target(x) + rng.normal(0.0, o.noise, size=n)
        return [{"x": xi.round(6).tolist(), "y": round(float(yi), 6)} for xi, yi in zip(x, y)]

    def prepare_data(self, data) -> None:
        o = self.options
        for k, d in enumerate(self.options.domains):
            rng = np.random.default_rng([self.cfg.seed, k])
            for i in range(o.shards_per_domain):
                data.shard_records(
                    f"{d.name}-{i:03d}", self._examples(rng, o.examples_per_shard, d.shift), domain=d.name, site=d.site
                )
            data.split_records(d.name, self._examples(rng, o.heldout_examples, d.shift))

    def _model(self) -> MLP:
        return MLP(self.options.features, self.options.hidden)

    def init_model(self, manifest):
        torch.manual_seed(self.cfg.seed)
        model = self._model()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return state, {"parameters": sum(v.numel() for v in state.values()), "features": self.options.features}

    def train_round(self, rc):
        torch.set_num_threads(rc.threads)
        records = [rec for entry in rc.shards for rec in read_records(rc.read_shard(entry))]
        x, y = tensors(records)
        n_eval = max(1, len(x) // 10)  # the site's own held-back slice, for loss before/after
        x_tr, y_tr, x_ev, y_ev = x[:-n_eval], y[:-n_eval], x[-n_eval:], y[-n_eval:]
        model = self._model()
        model.load_state_dict(rc.global_state)
        mse = torch.nn.functional.mse_loss
        with torch.no_grad():
            before = float(mse(model(x_ev), y_ev))
        opt = torch.optim.Adam(model.parameters(), lr=self.options.lr)
        gen = torch.Generator().manual_seed(rc.seed("order"))
        order = torch.randperm(len(x_tr), generator=gen)
        bs = self.options.batch_size
        steps = len(order) // bs
        t0, loss = time.perf_counter(), math.nan
        for step in range(steps):
            idx = order[step * bs : (step + 1) * bs]
            loss_t = mse(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss_t.backward()
            opt.step()
            loss = float(loss_t.detach())
            if (step + 1) % 5 == 0 or step + 1 == steps:
                rc.log({"step": step + 1, "steps": steps, "loss": loss, "progress": rc.progress((step + 1) / steps)})
        with torch.no_grad():
            after = float(mse(model(x_ev), y_ev))
        lr = self.options.lr
        return LocalResult(
            state={k: v.detach().clone() for k, v in model.state_dict().items()},
            tokens=steps * bs,
            samples=steps * bs,
            steps=steps,
            lr_first=lr,
            lr_last=lr,
            lr_sum=lr * steps,
            loss_before=before,
            loss_after=after,
            train_loss_last=loss,
            seconds=time.perf_counter() - t0,
            receipt={"batch_size": bs},
        )

    def evaluate(self, ec):
        model = self._model()
        model.load_state_dict(load_state(ec.model_file))
        model.eval()
        domains, total, weighted = {}, 0, 0.0
        for entry in ec.manifest["heldout"]:
            x, y = tensors(read_records(ec.read_heldout(entry)))
            with torch.no_grad():
                loss = float(torch.nn.functional.mse_loss(model(x), y))
            domains[entry["domain"]] = {"loss": loss, "tokens": len(x), "rmse": math.sqrt(loss)}
            total, weighted = total + len(x), weighted + loss * len(x)
        return {"loss": weighted / max(total, 1), "tokens": total, "domains": domains}
