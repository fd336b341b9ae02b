"""The round directory layout (the blackboard): the paths stages read and write.

A few records are defined beside the code that owns them: a site's status.json, attempt.json and
failure.json in stages/failures.py, stopped.json in exchange/hub.py, ledger_head.json in trust/ledger.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_ROUND = re.compile(r"^r(\d{4})$")


def round_name(r: int) -> str:
    return f"r{r:04d}"


def round_index(name: str) -> int:
    m = _ROUND.match(name)
    if not m:
        raise ValueError(f"not a round directory name: {name!r} (expected r0000 ... r9999)")
    return int(m.group(1))


@dataclass(frozen=True)
class RunLayout:
    """Paths inside `results/<run>/` (all but the few named in the module's docstring). Stages never
    call each other; they meet here."""

    root: Path

    @classmethod
    def of(cls, root: str | os.PathLike) -> RunLayout:
        return cls(Path(root))

    # run level
    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def corpus_dir(self) -> Path:
        return self.data / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.json"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def manifest_sig(self) -> Path:
        return self.data / "manifest.sig"

    def shard(self, shard_id: str) -> Path:
        return self.data / "shards" / f"{shard_id}.zarr"

    def heldout(self, domain: str) -> Path:
        return self.data / "heldout" / f"{domain}.zarr"

    def shard_part(self, part: int) -> Path:
        """What part job `part` of a parallel build tokenised, until the gather packs it."""
        return self.data / "parts" / str(part)

    # a site's own data: built and kept where the site runs, described by its signed catalogue
    def site_data(self, site: str) -> Path:
        return self.data / "sites" / site

    def catalogue(self, site: str) -> Path:
        return self.site_data(site) / "catalogue.json"

    # site-private state that is never published
    def site_state(self, site: str) -> Path:
        return self.root / "site-state" / site

    # rounds
    def round_dir(self, r: int) -> Path:
        return self.root / "rounds" / round_name(r)

    def global_model(self, r: int) -> Path:
        return self.round_dir(r) / "global" / "model.safetensors"

    def global_meta(self, r: int) -> Path:
        return self.round_dir(r) / "global" / "model.json"

    def global_eval(self, r: int) -> Path:
        return self.round_dir(r) / "global" / "eval.json"

    def plan(self, r: int) -> Path:
        return self.round_dir(r) / "plan.json"

    def site_dir(self, r: int, site: str) -> Path:
        return self.round_dir(r) / "sites" / site

    def update(self, r: int, site: str) -> Path:
        return self.site_dir(r, site) / "update.safetensors"

    def resident(self, r: int, site: str) -> Path:
        """The record of a resident job of `site` that started at round r (stages/resident.py)."""
        return self.site_dir(r, site) / "resident.json"

    def receipt(self, r: int, site: str) -> Path:
        return self.site_dir(r, site) / "receipt.json"

    def publish_lock(self, r: int, site: str) -> Path:
        """Held while a site's job publishes round r: two jobs of one site-round (a Slurm requeue
        and a Snakemake retry) publish one after the other. Kept at the site; never sent."""
        return self.root / "locks" / f"publish-{round_name(r)}-{site}.lock"

    def metrics(self, r: int, site: str) -> Path:
        return self.site_dir(r, site) / "metrics.jsonl"

    def train_log(self, r: int, site: str) -> Path:
        """The site's training job log (Snakemake's `log:` of rule train), kept at the site."""
        return self.root / "logs" / "train" / f"{round_name(r)}-{site}.log"

    def arrivals(self, r: int) -> Path:
        return self.round_dir(r) / "arrivals.json"

    def verdict(self, r: int, site: str) -> Path:
        return self.round_dir(r) / "verdicts" / f"{site}.json"

    def late_verdict(self, r: int, site: str, k: int) -> Path:
        """Round r's verdict on `site`'s late update from round k."""
        return self.round_dir(r) / "verdicts" / f"{site}@{round_name(k)}.json"

    def verdicts(self, r: int) -> Path:
        return self.round_dir(r) / "verdicts.json"

    def candidate(self, r: int) -> Path:
        return self.round_dir(r) / "candidate" / "model.safetensors"

    def candidate_eval(self, r: int) -> Path:
        return self.round_dir(r) / "candidate" / "eval.json"

    def eval_part(self, r: int, which: str, holder: str) -> Path:
        """One holder's evaluation of round r's `which` model (global or candidate) on the
        held-out data it keeps: the coordinator's shared splits, or a site's own."""
        return self.round_dir(r) / which / "evals" / holder / "eval.json"

    def server_state(self, r: int) -> Path:
        """Server-optimiser state (moments, momentum, control variates) that produced global r."""
        return self.round_dir(r) / "global" / "server_state.safetensors"

    def server_meta(self, r: int) -> Path:
        """Scalars of the server state: optimiser, step count, the privacy ledger."""
        return self.round_dir(r) / "global" / "server_state.json"

    def candidate_state(self, r: int) -> Path:
        return self.round_dir(r) / "candidate" / "server_state.safetensors"

    def candidate_meta(self, r: int) -> Path:
        return self.round_dir(r) / "candidate" / "server_state.json"

    def control_update(self, r: int, site: str) -> Path:
        """SCAFFOLD: the site's control-variate delta, published beside its update."""
        return self.site_dir(r, site) / "control.safetensors"

    def secagg_request(self, r: int) -> Path:
        """Secure aggregation: the coordinator's signed list of who is summed and who dropped."""
        return self.round_dir(r) / "secagg" / "request.json"

    def secagg_reveal(self, r: int, site: str) -> Path:
        """Secure aggregation: a survivor's signed reveal of the seeds it shared with the dropped sites."""
        return self.round_dir(r) / "secagg" / f"reveal-{site}.json"

    def secagg_recovery(self, r: int) -> Path:
        """Secure aggregation: what the aggregator needs to unmask the survivors' sum (coordinator-signed)."""
        return self.round_dir(r) / "secagg" / "recovery.json"

    def aggregate_record(self, r: int) -> Path:
        return self.round_dir(r) / "aggregate.json"

    def retention(self, r: int) -> Path:
        """What retention deleted once round r was promoted (coordinator-signed)."""
        return self.round_dir(r) / "retention.json"

    def tracked(self, r: int) -> Path:
        return self.round_dir(r) / "tracked.json"

    def rounds_present(self) -> list[int]:
        base = self.root / "rounds"
        if not base.is_dir():
            return []
        return sorted(round_index(p.name) for p in base.iterdir() if _ROUND.match(p.name))
