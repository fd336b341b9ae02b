"""The data stage of a run: configured sources (and the generated corpus) → tokenizer, shards, manifest."""

from __future__ import annotations

from .audit import AuditLog
from .config import Config
from .files import read_json
from .ingest import iter_texts
from .layout import RunLayout
from .shards import build_shards
from .signing import COORDINATOR, TrustStore
from .synth import domain_sources
from .taskdata import DataWriter
from .tasks import Task, load_task
from .tokenizer import build_tokenizer


def prepare_data(cfg: Config, layout: RunLayout, trust: TrustStore) -> dict:
    task = load_task(cfg)
    if not task.uses_tokens:
        return prepare_task_data(cfg, layout, trust, task)
    sources = list(cfg.data.sources)
    # Entropy rates are known only for generated domains: they give the evaluation its floor.
    entropy: dict[str, float | None] = {s.domain: None for s in sources}
    if cfg.data.synth is not None:
        corpus = read_json(layout.corpus_dir / "corpus.json")
        sources = domain_sources(corpus, layout.corpus_dir) + sources
        entropy.update({n: d["entropy_rate_nats_per_byte"] for n, d in corpus["domains"].items()})
    tok = build_tokenizer(cfg.data.tokenizer, iter_texts(sources))
    manifest = build_shards(sources, cfg.data, tok, layout, cfg.seed, trust.private_key(COORDINATOR), entropy)
    AuditLog(layout.audit).append(
        "data.sharded",
        shards=len(manifest["shards"]),
        tokens=sum(s["tokens"] for s in manifest["shards"]),
        heldout=[h["domain"] for h in manifest["heldout"]],
    )
    return manifest


def prepare_task_data(cfg: Config, layout: RunLayout, trust: TrustStore, task: Task) -> dict:
    """A task with its own data format writes its shards; the manifest is signed the same way."""
    # No valid manifest may point at shards while they are being rewritten.
    layout.manifest_sig.unlink(missing_ok=True)
    layout.manifest.unlink(missing_ok=True)
    writer = DataWriter(layout, cfg.seed, cfg.task.name)
    task.prepare_data(writer)
    manifest = writer.finish(trust.private_key(COORDINATOR))
    AuditLog(layout.audit).append(
        "data.sharded",
        task=cfg.task.name,
        shards=len(manifest["shards"]),
        tokens=sum(s["tokens"] for s in manifest["shards"]),
        heldout=[h["domain"] for h in manifest["heldout"]],
    )
    return manifest
