"""Write a round's signed plan.json from the manifest, the sites and the previous round."""

from __future__ import annotations

import math
import time

from .allocate import Shard, learned_throughput, make_plan
from .audit import AuditLog
from .config import Config
from .exchange import CompletenessCache
from .files import read_json, write_json
from .gather import arrived_sites, bundle_checks
from .layout import RunLayout
from .shards import load_manifest
from .signing import COORDINATOR, TrustStore, create_keypair, sign_document
from .sites import batch_shape, site_ranks


def missed_shards(
    layout: RunLayout, r: int, fold_late: bool = False, bundles: CompletenessCache | None = None
) -> list[str]:
    """Shards planned in round r whose site produced no accepted update. With late folding, a
    site whose update has arrived since the round closed (by the same test `gather` applies:
    with staged transfer, a complete bundle) is not missed: the next round takes it up."""
    if r < 0 or not layout.verdicts(r).exists():
        return []
    plan = read_json(layout.plan(r))
    accepted = set(read_json(layout.verdicts(r))["accepted"])
    if fold_late:
        accepted |= set(arrived_sites(layout, r, read_json(layout.arrivals(r))["missing"], bundles))
    return [sid for site, e in sorted(plan["sites"].items()) if site not in accepted for sid in e["shards"]]


def identified_sites(cfg: Config, trust: TrustStore, r: int) -> tuple[dict, list[str]]:
    """The sites that can take part in round r: those with a public key. A site added to the
    config between rounds gets its key pair here when this machine makes keys
    (trust.generate_missing); otherwise it waits, with a note, until its key is installed."""
    usable, notes = {}, []
    for name, site in sorted(cfg.sites.items()):
        if trust.listed and name not in trust.listed:
            notes.append(f"site {name!r} is not in the trust list (trust.public_keys); not planned until it is")
            continue
        if not trust.knows(name):
            if not cfg.trust.generate_missing:
                notes.append(f"site {name!r} has no public key in {trust.keys_dir}; not planned until it does")
                continue
            create_keypair(trust.keys_dir, name)
            notes.append(f"site {name!r} joined in round {r}: created its identity in {trust.keys_dir}")
        usable[name] = site
    return usable, notes


def plan_round(cfg: Config, layout: RunLayout, trust: TrustStore, r: int) -> dict:
    sites, joined = identified_sites(cfg, trust, r)
    manifest = load_manifest(layout, trust)
    shards = [Shard(s["id"], s["tokens"], s["residency"]) for s in manifest["shards"]]
    prev = read_json(layout.plan(r - 1))["state"] if r > 0 else None
    requeue = missed_shards(layout, r - 1, cfg.rounds.late_updates == "fold", bundle_checks(cfg, trust))
    measured = None
    if cfg.rounds.learn_throughput and r > 0:
        tps = {}
        for site in sites:
            try:  # read before anyone verified it: a hostile receipt must not stop planning
                tps[site] = max(0.0, float(read_json(layout.receipt(r - 1, site)).get("tokens_per_second") or 0.0))
            except (FileNotFoundError, ValueError, TypeError, AttributeError):
                continue
            if not math.isfinite(tps[site]):
                del tps[site]
        measured = learned_throughput({n: s.throughput for n, s in sites.items()}, tps)
    plan = make_plan(r, shards, sites, cfg.rounds.tokens_per_round, cfg.seed, prev, requeue, measured)
    plan["notes"] = joined + plan["notes"]
    vocab = manifest["tokenizer"]["vocab_size"]
    for name, entry in plan["sites"].items():
        shape = batch_shape(
            name,
            cfg.sites[name],
            cfg.model,
            vocab,
            cfg.sites[name].batch_tokens or cfg.training.batch_tokens,
            cfg.training.max_micro_batch,
            devices=site_ranks(cfg.sites[name]),
        )
        entry["micro_batch"] = shape.micro_batch
        entry["grad_accum_planned"] = shape.grad_accum
    plan.update(run=cfg.run, created=time.time(), requeued=requeue)
    plan = sign_document(plan, COORDINATOR, trust.private_key(COORDINATOR))
    write_json(layout.plan(r), plan)
    AuditLog(layout.audit).append(
        "round.planned",
        round=r,
        participants=plan["participants"],
        tokens=plan["tokens"],
        assignment={s: e["shards"] for s, e in plan["sites"].items()},
        requeued=requeue,
        notes=plan["notes"],
    )
    return plan
