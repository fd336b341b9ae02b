"""The training-task protocol: what a task implements, and what the framework hands it.

A task owns what is *inside* an update: its data's format, its model, its local training
and its evaluation. The framework owns everything around it: plans, residency, staging,
signatures, verification, aggregation, the gate and the audit log. See docs/writing-a-task.md.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema

from fedhpc.config.federation import Config, SiteConfig
from fedhpc.config.schema import ConfigError, dataclass_schema, describe_errors, from_mapping
from fedhpc.core.errors import FedhpcError
from fedhpc.core.layout import RunLayout

if TYPE_CHECKING:  # torch is imported by the tasks that train: planning and config checks need none of it
    import torch

    from fedhpc.training.distributed import World


class TaskError(FedhpcError, ValueError):
    """A task cannot be loaded, is misconfigured, or cannot do what was asked of it."""


@dataclass(kw_only=True)
class NoOptions:
    """This task takes no options."""


@dataclass
class RoundContext:
    """Everything a site's local round may use; built by the framework in `fedhpc train`."""

    cfg: Config
    layout: RunLayout
    site: str
    site_cfg: SiteConfig
    round: int
    world: World
    device: torch.device
    threads: int
    global_state: dict[str, torch.Tensor]  # the exchanged tensors of the current global model
    global_meta: dict[str, Any]  # its coordinator-signed model.json
    plan_entry: dict[str, Any]  # this site's entry of the signed plan (shards, and what plan_site added)
    shards: list[dict[str, Any]]  # manifest entries of the planned shards, in plan order
    read_shard: Callable[[dict[str, Any]], Any]  # verified contents (token arrays) or path (file shards)
    log: Callable[[dict], None]  # one metrics.jsonl record; include "loss" (the verifier checks the curve)
    seed: Callable[[str], int]  # a stable seed for (run seed, purpose, round, site)
    progress: Callable[[float], float]  # fraction of this round done -> position in the federation's schedule


@dataclass
class LocalResult:
    """What a local round produced. `state` holds the site's new exchanged tensors (rank 0 only).

    The framework publishes `state - global` as the update and writes the numbers into the
    signed receipt, where verification (losses, steps) and weighting (tokens, samples,
    lr_sum) read them.
    """

    state: dict[str, torch.Tensor] | None
    tokens: int  # size units trained (tokens for language models, examples otherwise)
    samples: int  # sequences / examples trained ("samples" weighting)
    steps: int  # optimizer steps
    lr_first: float
    lr_last: float
    lr_sum: float  # Σ step learning rates: the effort of heterogeneity-aware weighting
    loss_before: float  # loss on the site's own held-back slice, before and after the round
    loss_after: float
    train_loss_last: float
    seconds: float
    receipt: dict[str, Any] = field(default_factory=dict)  # task-specific receipt fields (batch shape, …)
    correction: Any = None  # site_correction.GradCorrection of FedProx/SCAFFOLD, when the task applies one


@dataclass
class EvalContext:
    """What `Task.evaluate` gets: the model file to score and the run's verified held-out data."""

    cfg: Config
    layout: RunLayout
    manifest: dict[str, Any]
    model_file: Path
    global_meta: dict[str, Any]
    threads: int
    read_heldout: Callable[[dict[str, Any]], Any]  # verified contents (token arrays) or path (file splits)


class Task(abc.ABC):
    """Base class of a training task. Subclasses set `Options` (a dataclass: the task's
    `task.options`, unknown keys are errors) and implement the methods below."""

    Options: type = NoOptions
    uses_tokens = False  # True: data comes from `data.*` through the framework's tokenizer and token shards
    corrects_gradients = False  # True: FedProx/SCAFFOLD site corrections are supported

    def __init__(self, cfg: Config, options: Any):
        self.cfg, self.options = cfg, options

    # -- configuration --------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Cross-key configuration problems, each naming the key at fault."""
        return []

    # -- data (coordinator) ----------------------------------------------------------------
    def prepare_data(self, data) -> None:
        """Write the shards and held-out splits through `data` (a taskdata.DataWriter)."""
        raise TaskError(f"task {type(self).__name__} does not prepare data")

    # -- model -----------------------------------------------------------------------------
    @abc.abstractmethod
    def init_model(self, manifest: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the initial exchanged tensors, fields describing the model for model.json)."""

    def plan_site(self, site: str, site_cfg: SiteConfig, manifest: dict[str, Any]) -> dict[str, Any]:
        """Fields the plan records for a site (e.g. the batch size its memory allows)."""
        return {}

    def plan_slice(
        self, site: str, site_cfg: SiteConfig, manifest: dict[str, Any], tokens: int
    ) -> dict[str, Any] | None:
        """How `site` would train a slice of `tokens` (the manifest's unit): at least
        `train_tokens`, what its receipt will claim (0: it cannot train it), and `slice`, the reason
        the plan states. With it the planner never plans a slice the site cannot train and plans
        exactly what it trains; None (this default) leaves slices planned by tokens alone."""
        return None

    # -- training (sites) ------------------------------------------------------------------
    @abc.abstractmethod
    def train_round(self, rc: RoundContext) -> LocalResult:
        """One local round from `rc.global_state` on `rc.shards`: the new exchanged tensors and counts."""

    # -- evaluation (coordinator, and sites on their own held-out data) --------------------
    @abc.abstractmethod
    def evaluate(self, ec: EvalContext) -> dict[str, Any]:
        """Held-out metrics; must hold `loss` (lower is better: the gate compares it) and
        `domains` ({domain: {loss, …}}); may hold `guards` ({name: {ok, value, reason}}),
        and a failed guard rolls the round back."""

    # -- hand-over -------------------------------------------------------------------------
    def export(self, state: dict[str, torch.Tensor], meta: dict[str, Any], out: Path, layout: RunLayout) -> dict:
        """Write a Hugging Face directory for the model `state`; return what was written."""
        raise TaskError(f"task {type(self).__name__} has no export to a Hugging Face directory")


def options_from(cls: type, raw: dict[str, Any], where: str = "task.options") -> Any:
    """Build an options dataclass from a mapping, strictly: unknown keys and wrong types are errors."""

    errors = sorted(
        jsonschema.Draft202012Validator(dataclass_schema(cls)).iter_errors(raw or {}),
        key=lambda e: [str(p) for p in e.absolute_path],
    )
    if errors:
        raise ConfigError(f"{where}: invalid options of {cls.__qualname__}:\n" + describe_errors(errors, where))
    return from_mapping(cls, raw or {})


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}
