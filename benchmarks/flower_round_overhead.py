"""What a round costs beyond local training in a Flower simulation, to set beside round_overhead.py's figure.

Usage: python benchmarks/flower_round_overhead.py [--rounds 20] [--clients 3]

Runs in its own venv with torch and flwr[simulation] (Ray), not .venv, and imports nothing from
fedhpc. A federation of `--clients` clients, each training a 1-layer GPT (d_model 32, 2 heads,
seq_len 32, vocab 512) for 15 AdamW steps of 16 random sequences a round, FedAvg over all clients
every round, each new global model scored on held-out data by two clients and the server (1024
tokens each, as round_overhead.py's federation scores each candidate) and gated on its loss, for
`--rounds` rounds, with flwr.simulation.run_simulation on the Ray backend, one CPU per client.
Same definitions as round_overhead.py: a round's wall time is the time from one round's
aggregation to the next (taken on the server); its training time is the longest of the clients'
training loops that round (perf_counter around the optimizer steps alone, returned in the train
metrics); the overhead is the difference. Medians over the rounds after the first.
Prints a JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

T0 = time.perf_counter()  # before torch, flwr and Ray load: startup belongs in seconds_total

# Offline machine: Flower's telemetry and Ray's usage stats would otherwise try to phone home.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import flwr  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from torch import nn  # noqa: E402

VOCAB, SEQ, D_MODEL, HEADS = 512, 32, 32, 2
STEPS, BATCH, LR = 15, 16, 0.01
# Held-out scoring as round_overhead.py's federation does it each round (evaluation.tokens_per_domain
# 1024, batches of 16): two of the clients score the new global on their own held-out split, the
# server on a shared one, and the round is gated on the loss.
EVAL_TOKENS, EVAL_BATCH, EVAL_CLIENTS = 1024, 16, 2


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, D_MODEL)
        self.pos = nn.Embedding(SEQ, D_MODEL)
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = nn.Sequential(nn.Linear(D_MODEL, 4 * D_MODEL), nn.GELU(), nn.Linear(4 * D_MODEL, D_MODEL))
        self.ln_f = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False)
        self.register_buffer("mask", torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1), persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=self.mask[:t, :t], need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        logits = self.head(self.ln_f(x))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


client = ClientApp()


def held_out_loss(model: TinyGPT, seed: int) -> float:
    """The mean loss on one holder's held-out split: EVAL_TOKENS tokens, the same every round."""
    data = torch.randint(0, VOCAB, (EVAL_TOKENS // SEQ, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        losses = [model(batch[:, :-1], batch[:, 1:]).item() for batch in data.split(EVAL_BATCH)]
    return sum(losses) / len(losses)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = TinyGPT()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = held_out_loss(model, seed=int(context.node_id) % 1000)
    metrics = MetricRecord({"loss": loss, "num-examples": EVAL_TOKENS // SEQ})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@client.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)
    model = TinyGPT()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    data = torch.randint(0, VOCAB, (STEPS, BATCH, SEQ + 1))
    model.train()
    t0 = time.perf_counter()
    for batch in data:
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    metrics = MetricRecord({"train-seconds": seconds, "loss": loss.item(), "num-examples": STEPS * BATCH})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round's aggregate is ready and its slowest client's training loop."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.done: dict[int, float] = {}
        self.train: dict[int, float] = {}

    def aggregate_train(self, server_round: int, replies):
        replies = list(replies)
        out = super().aggregate_train(server_round, replies)
        self.done[server_round] = time.perf_counter()
        self.train[server_round] = max(
            (m.content["metrics"]["train-seconds"] for m in replies if m.has_content()), default=0.0
        )
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=3)
    a = ap.parse_args()
    strategy = TimedFedAvg(
        fraction_train=1.0,
        fraction_evaluate=EVAL_CLIENTS / a.clients,
        min_train_nodes=a.clients,
        min_evaluate_nodes=EVAL_CLIENTS,
        min_available_nodes=a.clients,
    )
    losses: list[float] = []

    def server_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = TinyGPT()
        model.load_state_dict(arrays.to_torch_state_dict())
        losses.append(held_out_loss(model, seed=999))
        # The gate: a round whose loss regresses by over 25% would be rolled back.
        regressed = len(losses) > 1 and losses[-1] > 1.25 * losses[-2]
        return MetricRecord({"loss": losses[-1], "regressed": int(regressed)})

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        torch.manual_seed(0)
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(TinyGPT().state_dict()),
            num_rounds=a.rounds,
            evaluate_fn=server_evaluate,
        )

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=a.clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    total = time.perf_counter() - T0
    done, trains = strategy.done, strategy.train
    rounds = [r for r in range(2, a.rounds + 1) if r in done and r - 1 in done]
    if not rounds:
        raise SystemExit(f"too few rounds completed to measure: {sorted(done)}")
    walls = [done[r] - done[r - 1] for r in rounds]
    train_s = [trains[r] for r in rounds]
    overheads = [w - t for w, t in zip(walls, train_s)]
    wall, train_med, over = (statistics.median(x) for x in (walls, train_s, overheads))
    print(f"Flower {flwr.__version__}, {a.rounds} rounds x {a.clients} clients, Ray backend: {total:.1f} s in all")
    print(f"  a round (median of rounds 2-{a.rounds}): {wall:.3f} s, of which training {train_med:.3f} s")
    print(f"  overhead per round: {over:.3f} s, {over / max(train_med, 1e-9):.1f}x the training it serves")
    print(
        json.dumps(
            {
                "framework": "flower",
                "flwr": flwr.__version__,
                "rounds": a.rounds,
                "clients": a.clients,
                "seconds_total": total,
                "round_seconds_median": wall,
                "training_seconds_median": train_med,
                "overhead_seconds_median": over,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
