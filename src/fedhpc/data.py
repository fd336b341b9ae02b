"""The data stage of a run: configured sources (and the generated corpus) → tokenizer, shards, manifest."""

from __future__ import annotations

from .audit import AuditLog
from .config import Config
from .files import read_json
from .ingest import iter_texts
from .layout import RunLayout
from .shards import Sealing, build_shards
from .signing import COORDINATOR, TrustStore
from .synth import domain_sources
from .tokenizer import build_tokenizer


def sealing(cfg: Config, trust: TrustStore) -> Sealing:
    """With `trust.encryption.shards`, who reads what: a pinned shard its owner, an unpinned one every
    site, a held-out split the coordinator (which evaluates). Sealing needs each reader's data key."""
    if not cfg.trust.encryption.shards:
        return None
    sites = sorted(cfg.sites)

    def readers(kind: str, residency: str | None) -> list:
        names = [COORDINATOR] if kind == "heldout" else ([residency] if residency else sites)
        return [trust.data_key(n) for n in names]

    return readers


def prepare_data(cfg: Config, layout: RunLayout, trust: TrustStore) -> dict:
    sources = list(cfg.data.sources)
    # Entropy rates are known only for generated domains: they give the evaluation its floor.
    entropy: dict[str, float | None] = {s.domain: None for s in sources}
    if cfg.data.synth is not None:
        corpus = read_json(layout.corpus_dir / "corpus.json")
        sources = domain_sources(corpus, layout.corpus_dir) + sources
        entropy.update({n: d["entropy_rate_nats_per_byte"] for n, d in corpus["domains"].items()})
    tok = build_tokenizer(cfg.data.tokenizer, iter_texts(sources))
    manifest = build_shards(
        sources, cfg.data, tok, layout, cfg.seed, trust.private_key(COORDINATOR), entropy, sealing(cfg, trust)
    )
    AuditLog(layout.audit).append(
        "data.sharded",
        sealed=cfg.trust.encryption.shards,
        shards=len(manifest["shards"]),
        tokens=sum(s["tokens"] for s in manifest["shards"]),
        heldout=[h["domain"] for h in manifest["heldout"]],
    )
    return manifest
