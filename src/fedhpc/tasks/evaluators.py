"""Pluggable evaluators run on every global and candidate model, after the task's own evaluation.

An evaluator is a class with an `Options` dataclass and `evaluate(task, ec, result) -> dict`:
`ec` is the task's EvalContext (model file, verified held-out data), `result` the task's metrics.
It returns its metrics and may say `ok: false` (with a `reason`); with `gate: true` in the
config that rolls the round back (compliance checks). See docs/writing-a-task.md.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any

from fedhpc.config.federation import Config, opt
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import finite_or_none
from fedhpc.tasks import EvalContext, NoOptions, Task, resolve
from fedhpc.tasks.base import TaskError, options_from


class Evaluator(abc.ABC):
    """Base class of evaluators."""

    Options: type = NoOptions
    needs_tokens = False  # True: only for language-model tasks (their `domains` hold token losses)

    def __init__(self, cfg: Config, options: Any):
        self.cfg, self.options = cfg, options

    @abc.abstractmethod
    def evaluate(self, task: Task, ec: EvalContext, result: dict[str, Any]) -> dict[str, Any]:
        """This evaluator's results for the model `ec` holds; `result` is the task's own evaluation."""


@dataclass(kw_only=True)
class PerplexityOptions:
    """Options of the built-in perplexity evaluators."""

    max_perplexity: float | None = opt(
        None, "Report `ok: false` when any group's perplexity exceeds this (null: never).", exclusiveMinimum=0
    )


class DomainPerplexity(Evaluator):
    """Perplexity and loss per held-out domain (the task's token-weighted held-out losses)."""

    Options = PerplexityOptions
    needs_tokens = True

    def groups(self, ec: EvalContext) -> dict[str, str]:
        return {e["domain"]: e["domain"] for e in ec.manifest["heldout"]}

    def evaluate(self, task, ec, result):
        pooled: dict[str, list[float]] = {}
        for domain, group in self.groups(ec).items():
            d = result["domains"].get(domain)
            if d is None:
                continue
            acc = pooled.setdefault(group, [0.0, 0.0])
            acc[0] += (d["loss"] if d["loss"] is not None else math.inf) * d["tokens"]
            acc[1] += d["tokens"]
        out: dict[str, Any] = {}
        for group, (loss_tokens, tokens) in sorted(pooled.items()):
            loss = loss_tokens / max(tokens, 1)
            out[group] = {
                "loss": finite_or_none(loss),
                "perplexity": finite_or_none(math.exp(min(loss, 700))),
                "tokens": int(tokens),
            }
        limit = self.options.max_perplexity
        if limit is not None:
            bad = sorted(g for g, v in out.items() if v["perplexity"] is None or v["perplexity"] > limit)
            return {
                "groups": out,
                "ok": not bad,
                "reason": f"perplexity above {limit:g}: {', '.join(bad)}" if bad else "",
            }
        return {"groups": out}


class LanguagePerplexity(DomainPerplexity):
    """Perplexity per language: held-out domains pooled by the language of their shards
    (a domain whose shards carry several languages counts under `lang1+lang2`)."""

    def groups(self, ec):
        langs: dict[str, set[str]] = {}
        for s in ec.manifest["shards"]:
            langs.setdefault(s["domain"], set()).add(s.get("language") or "und")
        return {e["domain"]: "+".join(sorted(langs.get(e["domain"], {"und"}))) for e in ec.manifest["heldout"]}


BUILTIN = {
    "domain_perplexity": "fedhpc.tasks.evaluators:DomainPerplexity",
    "language_perplexity": "fedhpc.tasks.evaluators:LanguagePerplexity",
}


def load_evaluators(cfg: Config) -> list[tuple[str, Evaluator, bool]]:
    """(label, evaluator, gate) for every configured evaluator, options checked."""
    out, seen = [], set()
    for i, ev in enumerate(cfg.evaluation.evaluators):
        key = f"evaluation.evaluators[{i}]"
        cls = resolve(ev.name, f"{key}.name", BUILTIN)
        if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
            raise TaskError(f"{key}.name: {ev.name!r} is not a subclass of fedhpc.tasks.evaluators.Evaluator")
        if cls.__abstractmethods__:
            raise TaskError(f"{key}.name: {ev.name!r} does not implement {', '.join(sorted(cls.__abstractmethods__))}")
        label = ev.name.rsplit(":", 1)[-1] if ":" in ev.name else ev.name
        if label in seen:
            label = f"{label}#{i}"
        seen.add(label)
        out.append((label, cls(cfg, options_from(cls.Options, ev.options, f"{key}.options")), ev.gate))
    return out


def run_evaluators(cfg: Config, task: Task, ec: EvalContext, result: dict) -> tuple[dict, dict]:
    """({label: evaluator result}, {label: guard}) for the configured evaluators."""
    results, guards = {}, {}
    for label, ev, gate in load_evaluators(cfg):
        if ev.needs_tokens and not task.uses_tokens:
            raise FedhpcError(f"evaluator {label!r} needs a language-model task, not {cfg.task.name!r}")
        res = ev.evaluate(task, ec, result)
        results[label] = res
        if gate and "ok" in res:
            guards[label] = {"ok": bool(res["ok"]), "reason": res.get("reason", ""), "evaluator": True}
    return results, guards


_SKIP = {"loss", "perplexity", "tokens", "entropy_floor", "gap_to_floor", "domains", "model_sha256", "guards"}


def flat_metrics(ev: dict[str, Any]) -> dict[str, float]:
    """The numbers of an eval.json beyond loss and domains, flattened (`mrr_at_10`,
    `evaluators.language_perplexity.groups.en.perplexity`, …), for MLflow and the report."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            out[prefix] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[prefix] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    for key, value in ev.items():
        if key not in _SKIP:
            walk(key, value)
    for name, guard in (ev.get("guards") or {}).items():
        out[f"guards.{name}.ok"] = float(bool(guard.get("ok", True)))
        if isinstance(guard.get("value"), (int, float)) and math.isfinite(guard["value"]):
            out[f"guards.{name}.value"] = float(guard["value"])
    return out
