"""`fedhpc exchange <action>`: what each side offers, pulls and publishes through the hub, by name.

The coordinator offers the data (manifest, tokenizer, shared shards), each round (plan and
global model) and each round's candidate model; a site pulls those and publishes its data
catalogue, its update and its scores of models on its own held-out data. Only these named
files ever cross; every bundle is signed by its sender and checked by its receiver.
"""

from __future__ import annotations

from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.exchange import hub as ex
from fedhpc.stages.context import Ctx
from fedhpc.trust.scrub import Scrubber
from fedhpc.trust.signing import COORDINATOR, TrustStore

OFFERS = {"outbox", "outbox-data", "outbox-candidate"}
PULLS = {"pull", "pull-data", "pull-candidate"}
PUBLISHES = {"publish", "publish-catalogue", "publish-eval"}
EXCHANGE_ACTIONS = OFFERS | PULLS | PUBLISHES
CANDIDATE_FILES = ("model.safetensors",)
CATALOGUE_FILES = ("catalogue.json",)
EVAL_FILES = ("eval.json",)


def shared_shard_files(layout: RunLayout) -> list[str]:
    """Every file of the manifest's (shared) shards, relative to `data/`: shared data may travel."""

    names = []
    for entry in read_json(layout.manifest)["shards"]:
        root = layout.root / entry["path"]
        names += sorted(p.relative_to(layout.data).as_posix() for p in root.rglob("*") if p.is_file())
    return names


def bundle_dir(layout: RunLayout, action: str, r: int, which: str, site: str | None) -> tuple[Path, list[str]]:
    """The directory a bundle lives in (the same relative path on every side) and the names it may hold."""
    if action in ("outbox", "pull"):
        return layout.round_dir(r), list(ex.ROUND_FILES)
    if action in ("outbox-data", "pull-data"):
        return layout.data, list(ex.DATA_FILES)
    if action in ("outbox-candidate", "pull-candidate"):
        return layout.candidate(r).parent, list(CANDIDATE_FILES)
    assert site is not None
    if action == "publish":
        return layout.site_dir(r, site), list(ex.SITE_FILES)
    if action == "publish-catalogue":
        return layout.site_data(site), list(CATALOGUE_FILES)
    return layout.eval_part(r, which, site).parent, list(EVAL_FILES)


def needed_round(action: str, r: int) -> int | None:
    """The round a pull waits for: a coordinator's stop before it ends the wait (a candidate's
    pull needs round r's aggregation, announced with round r + 1)."""
    return {"pull": r, "pull-candidate": r + 1}.get(action)


def exchange_action(cfg: Config, layout: RunLayout, trust: TrustStore, action: str, r: int, which: str) -> str:
    """Run one exchange action; the line to print."""
    site = cfg.exchange.site
    if action in OFFERS:
        d, names = bundle_dir(layout, action, r, which, None)
        names = ex.present(d, names)
        if action == "outbox-data":
            names += shared_shard_files(layout)
        if cfg.exchange.kind == "s3":  # the hub is not this directory: upload the offer to it
            transport = ex.transport_for(cfg.exchange)
            rel = d.relative_to(layout.root).as_posix()
            ex.publish(transport, d, names, rel, COORDINATOR, trust.private_key(COORDINATOR))
            return f"{d}: offered {len(names)} files at {transport.describe()}"
        ex.write_index(d, names, COORDINATOR, trust.private_key(COORDINATOR))
        return f"{d}: offered {len(names)} files"
    if cfg.exchange.role != "site":
        raise SystemExit(f"fedhpc exchange {action}: only a site pulls and publishes (exchange.role is site)")
    transport = ex.transport_for(cfg.exchange)
    d, names = bundle_dir(layout, action, r, which, site)
    rel = d.relative_to(layout.root).as_posix()
    if action in PUBLISHES:
        if action == "publish" and layout.train_log(r, site).exists():  # the job's log travels too, scrubbed
            Scrubber(cfg.trust.scrub).file(layout.train_log(r, site), d / "train.log")
        names = ex.present(d, names)
        ex.publish(transport, d, names, rel, site, trust.private_key(site))
        return f"published {', '.join(names) or 'nothing (no update this round)'} to {transport.describe()}/{rel}"
    doc = ex.wait_pull(
        transport,
        rel,
        d,
        trust,
        COORDINATOR,
        cfg.exchange.poll_seconds,
        cfg.exchange.wait_minutes * 60,
        on_reject=ex.audit_rejects(layout, rel),
        # Stop waiting once the coordinator announced it stopped in a round this pull needs.
        round_=needed_round(action, r),
    )
    return f"pulled {len(doc['files'])} files from {transport.describe()}/{rel}, hashes verified"


def stopped_before(layout: RunLayout, trust: TrustStore, action: str, r: int) -> str | None:
    """In one run directory: why the coordinator stopped the federation, if it did so before the
    round that `action` of round r waits for (its signed notice at the run's root)."""
    path = layout.root / ex.STOPPED
    return ex.read_stop(path, trust, needed_round(action, r), str(path))


def try_pull(cfg: Config, layout: RunLayout, trust: TrustStore, action: str, r: int) -> bool:
    """One look at the hub for a site's pull (`pull` or `pull-candidate` of round r), for a caller
    that keeps its own clock (a resident site): True once the bundle is here, every file checked;
    a TransferError once the coordinator announced it stopped before the round."""
    d, _ = bundle_dir(layout, action, r, "", cfg.exchange.site)
    if (d / ex.INDEX).exists():  # installed last: a complete pull
        return True
    transport = ex.transport_for(cfg.exchange)
    rel = d.relative_to(layout.root).as_posix()
    if ex.pull(transport, rel, d, trust, COORDINATOR, on_reject=ex.audit_rejects(layout, rel)) is not None:
        return True
    if why := ex.stop_notice(transport, d / ex.STAGING, trust, needed_round(action, r)):
        raise ex.TransferError(f"{transport.describe()}/{rel}: the coordinator stopped the federation ({why})")
    return False


def run(ctx: Ctx, action: str, r: int, which: str) -> str:
    """The exchange stage: one offer, pull or publish through the hub; the line to print."""
    return exchange_action(ctx.cfg, ctx.layout, ctx.trust, action, r, which)
