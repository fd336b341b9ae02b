"""Causal language-model tasks on the framework's token shards: data, local round, held-out perplexity.

Subclasses only say which module they train (`build_module`) and how it is described; the
nanoGPT-style loop (training/loop.py), the intra-site engines (DDP/FSDP/DeepSpeed), site-kept optimizer
state and the FedProx/SCAFFOLD gradient corrections are shared.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhpc.config.federation import ModelConfig, SiteConfig
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import finite_or_none
from fedhpc.core.scores import summary_of
from fedhpc.tasks.base import EvalContext, LocalResult, RoundContext, Task
from fedhpc.training.sites import BatchShape, batch_shape, site_ranks

# Planning and config checks load the task but never train: torch (seconds to import, see
# benchmarks/README.md) is imported by the methods that need it, so they stay light.
if TYPE_CHECKING:
    import torch

    from fedhpc.training.site_correction import GradCorrection


class TrainingError(FedhpcError, ValueError):
    """A site cannot train the round it was given (too little data, no memory, …)."""


class TokenLMTask(Task):
    """A causal LM trained on `data:` (tokenised by `data.tokenizer`) in windows of `seq_len` tokens."""

    uses_tokens = True
    corrects_gradients = True

    # -- what subclasses provide -----------------------------------------------------------
    @abc.abstractmethod
    def build_module(self, vocab_size: int, meta: dict[str, Any] | None = None) -> torch.nn.Module:
        """The trainable module: `forward(idx, targets)` -> (logits, mean loss)."""

    @abc.abstractmethod
    def shape_model(self, vocab_size: int) -> ModelConfig:
        """The model's shape for the memory estimate of a site's micro-batch."""

    @property
    def seq_len(self) -> int:
        return self.cfg.model.seq_len

    def describe(self, module: torch.nn.Module, vocab_size: int) -> dict[str, Any]:
        return {"vocab_size": vocab_size, "parameters": sum(p.numel() for p in module.parameters())}

    # -- data ------------------------------------------------------------------------------
    def prepare_data(self, data) -> None:
        raise FedhpcError("token tasks are prepared by fedhpc.stages.shard.prepare_data")

    # -- model -----------------------------------------------------------------------------
    def init_model(self, manifest):
        import torch

        from fedhpc.training.model import exported_state

        vocab = manifest["tokenizer"]["vocab_size"]
        torch.manual_seed(self.cfg.seed)
        module = self.build_module(vocab)
        return exported_state(module), self.describe(module, vocab)

    def load(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.nn.Module:
        from fedhpc.training.model import load_exported_state

        module = self.build_module(meta["vocab_size"], meta)
        load_exported_state(module, state)
        return module

    def batch(self, site: str, site_cfg: SiteConfig, vocab: int) -> BatchShape:
        return batch_shape(
            site,
            site_cfg,
            self.shape_model(vocab),
            vocab,
            site_cfg.batch_tokens or self.cfg.training.batch_tokens,
            self.cfg.training.max_micro_batch,
            devices=site_ranks(site_cfg),
        )

    def plan_site(self, site, site_cfg, manifest):
        shape = self.batch(site, site_cfg, manifest["tokenizer"]["vocab_size"])
        return {"micro_batch": shape.micro_batch, "grad_accum_planned": shape.grad_accum}

    def plan_slice(self, site: str, site_cfg: SiteConfig, manifest: dict, tokens: int) -> dict[str, Any]:
        """How the site will train a slice of `tokens` tokens: what `train_round` does with it, in
        numbers the plan records (`train_tokens` is what its receipt will claim; 0: it cannot train it)."""
        shape = self.batch(site, site_cfg, manifest["tokenizer"]["vocab_size"])
        windows = max(0, (tokens - 1) // self.seq_len)
        n_train = split_windows(windows, self.cfg.training.local_eval_fraction, shape.devices)
        per_step = shape.sequences_per_step
        full, last = divmod(n_train, per_step)
        steps = full + (last > 0)
        held = windows - n_train
        unused = tokens - windows * self.seq_len
        if n_train == 0:
            why = f"its {tokens} tokens make {windows} windows, too few to train after the held-back slice"
        else:
            why = f"trains {n_train * self.seq_len} of its {tokens} tokens: {n_train} sequences in {steps} step(s)"
            if last:
                why += f", the last of {last} sequences (a smaller step, at {last}/{per_step} of the lr)"
            why += f"; {held} sequences held back to score its loss before/after"
            if unused:
                why += f", {unused} tokens outside any window"
        return {
            "train_tokens": n_train * self.seq_len,
            "held_back_tokens": held * self.seq_len,
            "steps": steps,
            "slice": why,
        }

    # -- training --------------------------------------------------------------------------
    def train_round(self, rc: RoundContext) -> LocalResult:
        import torch

        from fedhpc.training import distributed, site_state
        from fedhpc.training.engines import make_engine
        from fedhpc.training.loop import local_round, mean_loss, to_windows
        from fedhpc.training.model import load_exported_state

        cfg, world, device, site, r = rc.cfg, rc.world, rc.device, rc.site, rc.round
        site_cfg = rc.site_cfg
        tokens = torch.from_numpy(np.concatenate([rc.read_shard(s).astype("int64") for s in rc.shards]))
        windows = to_windows(tokens, self.seq_len)
        n_train = split_windows(len(windows), cfg.training.local_eval_fraction, world.size)
        # The held-back windows are the site's own held-out slice for loss before/after.
        held = held_back_rows(len(windows), n_train)
        trained = torch.ones(len(windows), dtype=torch.bool)
        trained[held] = False
        train_w, eval_w = windows[trained], windows[held]

        vocab = rc.global_meta["vocab_size"]
        shape = batch_shape(
            site,
            site_cfg,
            self.shape_model(vocab),
            vocab,
            site_cfg.batch_tokens or cfg.training.batch_tokens,
            cfg.training.max_micro_batch,
            devices=world.size,
        )
        if n_train == 0:
            # The planner never plans such a slice (plan_slice); a plan made by hand might.
            raise TrainingError(
                f"site {site!r}, round {r}: {len(windows)} windows of {self.seq_len + 1} tokens leave no training "
                f"sequence for each of its {world.size} rank(s) after the held-back slice; plan at least "
                f"{min_slice_tokens(self.seq_len, cfg.training.local_eval_fraction, world.size)} tokens for it"
            )
        model = self.build_module(vocab, rc.global_meta)
        load_exported_state(model, rc.global_state)
        model.to(device)
        engine = make_engine(
            site_cfg.engine,
            model,
            cfg.training,
            world,
            device,
            shape.micro_batch,
            shape.grad_accum,
            site_cfg.zero_stage,
            rc.layout.site_state(site) / f"deepspeed-r{r:04d}.json",
        )
        state_round = None
        if cfg.training.keep_optimizer_state and engine.keeps_optimizer_state:
            state_path, state_round = site_state.latest(rc.layout, site, r, world)
            # All ranks resume, or none: ranks with different optimizer states would drift apart.
            found = distributed.all_sum([float(state_path is not None), float(state_round or 0)], world)
            if found[0] == world.size and found[1] == (state_round or 0) * world.size:
                engine.load_optimizer_state(torch.load(state_path, map_location=device, weights_only=False))
            else:
                state_round = None

        correction = gradient_correction(cfg, rc.layout, site, r, engine.module, rc.global_state, device)
        engine.correction = correction
        engine.train(False)
        loss_before = mean_loss(
            engine.eval_forward, eval_w, cfg.evaluation.batch_size, device, cfg.training.precision, world
        )
        gen = torch.Generator().manual_seed(rc.seed("order"))
        result = local_round(engine, train_w, shape, cfg.training, device, rc.progress, gen, rc.log)
        engine.train(False)
        loss_after = mean_loss(
            engine.eval_forward, eval_w, cfg.evaluation.batch_size, device, cfg.training.precision, world
        )
        local = engine.full_state()
        kept = cfg.training.keep_optimizer_state and engine.keeps_optimizer_state
        if kept:
            # Saved before the receipt: a job killed in between retrains from the older state,
            # exactly as an uninterrupted run would have.
            site_state.save(rc.layout, site, r, world, engine.optimizer_state())
        return LocalResult(
            state=local,
            tokens=result.tokens,
            samples=result.tokens // shape.seq_len,
            steps=result.steps,
            lr_first=result.lr_first,
            lr_last=result.lr_last,
            lr_sum=result.lr_sum,
            loss_before=loss_before,
            loss_after=loss_after,
            train_loss_last=result.last_loss,
            seconds=result.seconds,
            correction=correction,
            receipt={
                "micro_batch": shape.micro_batch,
                "grad_accum": shape.grad_accum,
                "engine": engine.name,
                "zero_stage": site_cfg.zero_stage if engine.name == "deepspeed" else None,
                "batch_tokens": shape.tokens_per_step,
                "eval_tokens": int(eval_w[:, 1:].numel()),
                "optimizer_state_from_round": state_round,
                "optimizer_state_kept": kept,
            },
        )

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, ec: EvalContext) -> dict[str, Any]:
        import torch

        from fedhpc.core.tensorfile import load_state

        torch.set_num_threads(ec.threads)
        model = self.load(load_state(ec.model_file), ec.global_meta)
        model.eval()
        domains = {}
        for entry in sorted(ec.manifest["heldout"], key=lambda e: e["domain"]):
            windows = self.heldout_windows(ec, entry)
            if len(windows) == 0:
                continue
            loss = self.mean_loss(model, windows)
            floor = entry.get("entropy_floor_nats_per_token")
            domains[entry["domain"]] = {
                "loss": finite_or_none(loss),
                "perplexity": finite_or_none(math.exp(min(loss, 700))),
                "tokens": int(windows[:, 1:].numel()),
                "entropy_floor": floor,
                "gap_to_floor": None if floor is None else finite_or_none(loss - floor),
            }
        return pooled(domains)

    def heldout_windows(self, ec: EvalContext, entry: dict) -> torch.Tensor:
        import torch

        from fedhpc.training.loop import to_windows

        tokens = torch.from_numpy(ec.read_heldout(entry).astype("int64"))
        # Windows cover the first tokens_per_domain tokens: the same slice for every model.
        return to_windows(tokens[: self.cfg.evaluation.tokens_per_domain + 1], self.seq_len)

    def mean_loss(self, model: torch.nn.Module, windows: torch.Tensor) -> float:
        import torch

        from fedhpc.training.loop import mean_loss

        return mean_loss(
            lambda x, y: model(x, y)[1], windows, self.cfg.evaluation.batch_size, torch.device("cpu"), "fp32"
        )


def split_windows(windows: int, eval_fraction: float, ranks: int) -> int:
    """How many of a round's `windows` a site trains; the rest are its held-back tail (loss before/after).

    At least one window per rank is held back, and the trained windows are a whole number per
    rank: the loop shares them out by stride, and a rank with one fewer sequence would leave the
    others' collectives waiting, so what would not divide goes to the held-back tail instead.
    """
    held = max(ranks, int(windows * eval_fraction))
    train = max(0, windows - held)
    return train - train % ranks


def held_back_rows(windows: int, train: int) -> torch.Tensor:
    """Which of a round's `windows` (in its shards' order) are held back: `windows - train` of them,
    evenly spaced over the round.

    Not its last ones: a round's shards come in plan order (a site's shared shards by size, then
    id), so the tail was always the same source's, and a site holding several sources never
    trained the last one's share (Polish lost a third of its tokens in real_text.py's centralized
    run) and scored its loss before/after on that source alone.
    """
    import torch

    held = windows - train
    return (torch.arange(held) * 2 + 1) * windows // (2 * held) if held > 0 else torch.zeros(0, dtype=torch.long)


def min_slice_tokens(seq_len: int, eval_fraction: float, ranks: int) -> int:
    """The fewest tokens a site of `ranks` ranks can train a round on (one sequence per rank)."""
    windows = 1
    while split_windows(windows, eval_fraction, ranks) == 0:
        windows += 1
    return windows * seq_len + 1


def pooled(domains: dict[str, dict]) -> dict[str, Any]:
    """Token-weighted loss, perplexity and entropy floor over the domains, with the domains."""
    return {**summary_of(domains), "domains": domains}


def gradient_correction(
    cfg, layout, site: str, r: int, module: torch.nn.Module, global_state: dict, device
) -> GradCorrection | None:
    import torch

    from fedhpc.core.tensorfile import load_state
    from fedhpc.training import site_state
    from fedhpc.training.site_correction import GradCorrection

    name = cfg.strategy.name
    if name == "fedprox" and cfg.strategy.proximal_mu > 0:
        anchor = {k: v.to(device, torch.float32) for k, v in global_state.items()}
        return GradCorrection(module, anchor=anchor, mu=cfg.strategy.proximal_mu)
    if name != "scaffold":
        return None
    c_global = {}
    if layout.server_state(r).exists():
        c_global = {k.removesuffix("@control"): v for k, v in load_state(layout.server_state(r)).items()}
    c_global = {k: c_global.get(k, torch.zeros_like(v, dtype=torch.float32)) for k, v in global_state.items()}
    c_local = site_state.latest_tensors(layout, site, "control", r)[0]
    return GradCorrection(module, c_global=c_global, c_local=c_local)
