"""The data stage: the coordinator packs the shared sources (and sets the tokenizer), each site its own.

Data pinned to a site (`site:` on a source or a generated domain) is read, tokenised and
packed only by that site, which publishes a signed catalogue of it; the coordinator packs
the unpinned (shared) sources, trains the tokenizer on them if asked, and signs the manifest,
in one job or (`data.shard_jobs`) tokenizer, part jobs side by side, then the packing gather.
A task with its own data format (not `data:` token shards) generates all of it at the
coordinator (`Task.prepare_data`); its sites then publish empty catalogues.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedhpc.config.federation import Config, SourceConfig
from fedhpc.config.schema import ConfigError
from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.catalogue import write_catalogue
from fedhpc.data.ingest import DataError, iter_texts
from fedhpc.data.parts import part_documents, tokenise_part
from fedhpc.data.shards import (
    DataDirs,
    Sealing,
    build_shards,
    load_manifest,
    load_run_tokenizer,
    pack_sources,
    token_dtype,
)
from fedhpc.data.synth import domain_sources, generate_corpus
from fedhpc.data.taskdata import DataWriter
from fedhpc.data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from fedhpc.stages.context import Ctx
from fedhpc.tasks import Task, load_task
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, TrustStore


def sealing(cfg: Config, trust: TrustStore) -> Sealing:
    """With `trust.encryption.shards`, who reads what: a site's own shards and held-out splits that
    site (it trains and scores on them), a shared shard every site, a shared held-out split the
    coordinator (which scores the shared domains). Sealing needs each reader's data key."""
    if not cfg.trust.encryption.shards:
        return None
    sites = sorted(cfg.sites)

    def readers(kind: str, residency: str | None) -> list:
        names = [residency] if residency else [COORDINATOR] if kind == "heldout" else sites
        return [trust.data_key(n) for n in names]

    return readers


def corpus_dir(layout: RunLayout, site: str | None) -> Path:
    """Where the generated demo corpus of a party lives: the coordinator's shared domains, or a site's own."""
    return layout.corpus_dir if site is None else layout.site_data(site) / "corpus"


def party_sources(cfg: Config, layout: RunLayout, site: str | None) -> tuple[list[SourceConfig], dict]:
    """The sources `site` holds (None: the shared ones) and the entropy rate of each domain, where known."""
    sources = [s for s in cfg.data.sources if s.site == site]
    entropy: dict[str, float | None] = {s.domain: None for s in sources}
    generated = [d for d in (cfg.data.synth.domains if cfg.data.synth else []) if d.site == site]
    if generated:
        corpus = read_json(corpus_dir(layout, site) / "corpus.json")
        sources = domain_sources(corpus, corpus_dir(layout, site)) + sources
        entropy.update({n: d["entropy_rate_nats_per_byte"] for n, d in corpus["domains"].items()})
    return sources, entropy


def shared_tokenizer(cfg: Config, sources: list[SourceConfig]) -> Tokenizer:
    """The run's tokenizer; a BPE is trained on the shared sources."""
    if cfg.data.tokenizer.kind == "bpe" and not sources:
        raise DataError(
            "data.tokenizer.kind bpe is trained on the shared sources (those without `site`), and there are none: "
            "pinned data never leaves its site. Train a tokenizer elsewhere and use kind: pretrained, or kind: byte"
        )
    return build_tokenizer(cfg.data.tokenizer, iter_texts(sources))


def prepare_data(cfg: Config, layout: RunLayout, trust: TrustStore) -> dict:
    """The coordinator's part: tokenizer, shared shards and held-out splits, signed manifest.
    With `data.shard_jobs` > 1 this is the gather: the tokenizer and the parts' tokens are in place."""
    task = load_task(cfg)
    if not task.uses_tokens:
        return prepare_task_data(cfg, layout, trust, task)
    sources, entropy = party_sources(cfg, layout, None)
    documents = None
    if cfg.data.shard_jobs > 1:
        tok = load_tokenizer(layout.tokenizer)
        documents = part_documents(layout, sources, cfg.data.shard_jobs, token_dtype(tok.vocab_size))
    else:
        tok = shared_tokenizer(cfg, sources)
    key = trust.private_key(COORDINATOR)
    manifest = build_shards(sources, cfg.data, tok, layout, cfg.seed, key, entropy, sealing(cfg, trust), documents)
    AuditLog(layout.audit).append(
        "data.sharded",
        holder=COORDINATOR,
        sealed=cfg.trust.encryption.shards,
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


def prepare_site_data(cfg: Config, layout: RunLayout, trust: TrustStore, site: str) -> dict:
    """A site's part: its own sources packed under `data/sites/<site>/` with the federation's
    tokenizer (checked against the coordinator's manifest), and its signed catalogue."""
    if site not in cfg.sites:
        raise DataError(f"{site!r} is not a site of this federation; sites: {', '.join(sorted(cfg.sites))}")
    manifest = load_manifest(layout, trust)
    if not (trust.keys_dir / f"{site}.key").exists() and cfg.trust.generate_missing:
        # A site added to a running one-machine federation gets its identity where it packs its data.
        create_keypair(trust.keys_dir, site)
    layout.catalogue(site).unlink(missing_ok=True)  # no catalogue may list shards being rewritten
    shards: list[dict] = []
    heldout: list[dict] = []
    tok_sha = (manifest.get("tokenizer") or {}).get("sha256")
    if load_task(cfg).uses_tokens:
        tok = load_run_tokenizer(layout, manifest)
        sources, entropy = party_sources(cfg, layout, site)
        dirs = DataDirs.site(layout, site)
        shards, heldout = pack_sources(sources, cfg.data, tok, dirs, cfg.seed, entropy, sealing(cfg, trust))
    doc = write_catalogue(layout, site, tok_sha, shards, heldout, trust.private_key(site))
    AuditLog(layout.audit).append(
        "data.catalogued",
        holder=site,
        sealed=cfg.trust.encryption.shards,
        shards=len(shards),
        tokens=sum(s["tokens"] for s in shards),
        heldout=[h["domain"] for h in heldout],
    )
    return doc


def run_tokenizer(ctx: Ctx) -> Tokenizer:
    """Before the part jobs of a parallel build: the run's tokenizer, written once for all of them.
    A manifest signed over an earlier tokenizer is withdrawn first (its hash would no longer match)."""
    layout = ctx.layout
    layout.manifest_sig.unlink(missing_ok=True)
    layout.manifest.unlink(missing_ok=True)
    tok = shared_tokenizer(ctx.cfg, party_sources(ctx.cfg, layout, None)[0])
    save_tokenizer(tok, layout.tokenizer)
    return tok


def run_part(ctx: Ctx, part: int, workers: int = 1) -> dict:
    """Part job `part` of a parallel build: its group of the shared sources' files tokenised with
    `workers` processes, for the gather (`run`) to pack; returns the part's record."""
    sources, _ = party_sources(ctx.cfg, ctx.layout, None)
    return tokenise_part(ctx.layout, sources, ctx.cfg.data.shard_jobs, part, workers)


def run(ctx: Ctx, site: str | None = None) -> dict:
    """The shard stage: the shared sources packed under the signed manifest, or (`site`) that
    site's own sources under its signed catalogue. Returns the manifest or catalogue."""
    if site:
        return prepare_site_data(ctx.cfg, ctx.layout, ctx.trust, site)
    return prepare_data(ctx.cfg, ctx.layout, ctx.trust)


def run_synth(ctx: Ctx, site: str | None = None, out: Path | None = None) -> dict:
    """The demo corpus each party generates: only the domains it holds, the shared ones or (`site`)
    that site's pinned ones, into its corpus directory (or `out`); returns corpus.json."""
    synth = ctx.cfg.data.synth
    if synth is None:
        raise ConfigError("data.synth: not set; nothing to generate")
    mine = [d for d in synth.domains if d.site == site]
    if not mine:
        raise ConfigError(f"data.synth.domains: none is held by {site or 'the coordinator (shared)'}")
    return generate_corpus(replace(synth, domains=mine), ctx.cfg.seed, out or corpus_dir(ctx.layout, site))
