"""Write a round's signed plan.json from the manifest, the sites' catalogues and the previous round."""

from __future__ import annotations

import math
import time

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.allocation import Shard, learned_throughput, make_plan
from fedhpc.data.catalogue import load_catalogue, load_data, tokenizer_sha256
from fedhpc.data.shards import load_manifest
from fedhpc.exchange.hub import CompletenessCache, TransferError, audit_rejects, pull, transport_for
from fedhpc.stages.context import Ctx
from fedhpc.stages.gather import arrived_sites, bundle_checks
from fedhpc.tasks import load_task
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document


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
            notes.append(f"site {name!r}: created its identity in {trust.keys_dir}")
        usable[name] = site
    return usable, notes


class PlanError(FedhpcError, RuntimeError):
    """A round cannot be planned (no data to train on)."""


def _fetch_catalogue(cfg: Config, layout: RunLayout, trust: TrustStore, site: str) -> None:
    """With an object-store hub, pull the site's published catalogue into this run directory
    (with rsync or a shared filesystem it is published into this directory already)."""
    if cfg.exchange.kind != "s3" or layout.catalogue(site).exists():
        return
    rel = layout.site_data(site).relative_to(layout.root).as_posix()
    try:
        pull(
            transport_for(cfg.exchange), rel, layout.site_data(site), trust, site, on_reject=audit_rejects(layout, rel)
        )
    except TransferError as exc:
        print(f"{site}'s catalogue is not usable yet: {exc}", flush=True)


def collect_catalogues(
    cfg: Config, layout: RunLayout, trust: TrustStore, sites: list[str], waited: list[str], poll_seconds: float = 1.0
) -> tuple[dict[str, str], list[str], list[str]]:
    """({site: sha256 of its catalogue}, sites without one, notes).

    A site publishes the catalogue of the data it holds before it trains. The first plan that
    misses a site's catalogue waits for it until `rounds.deadline_minutes`; later plans
    (`waited`: sites an earlier plan waited for already) take what is there, so a site that
    never comes costs one wait, not one per round. A bad catalogue is refused with the
    reason and its site left out, never planned on.
    """
    tok = tokenizer_sha256(load_manifest(layout, trust))
    deadline = time.time() + cfg.rounds.deadline_minutes * 60
    found: dict[str, str] = {}
    notes: list[str] = []
    bad: dict[str, str] = {}
    last_report = time.time()
    while True:
        for site in sites:
            if site in found or site in bad:
                continue
            _fetch_catalogue(cfg, layout, trust, site)
            try:
                if load_catalogue(layout, trust, site, tok) is not None:
                    found[site] = sha256_file(layout.catalogue(site))
            except (ValueError, SignatureError) as exc:  # CatalogueError, DocumentError: malformed or lying
                bad[site] = str(exc)
        missing = [s for s in sites if s not in found and s not in bad]
        # In one run directory the workflow built every catalogue before the plan: nothing to wait for.
        if not [s for s in missing if s not in waited] or cfg.exchange.kind == "local" or time.time() >= deadline:
            break
        if time.time() - last_report >= 60:
            print(f"waiting for the data catalogues of {', '.join(missing)}", flush=True)
            last_report = time.time()
        time.sleep(poll_seconds)
    for site, why in sorted(bad.items()):
        notes.append(f"site {site!r} not planned: its catalogue is refused ({why})")
        AuditLog(layout.audit).append("catalogue.rejected", site=site, reason=why)
    for site in missing:
        notes.append(f"site {site!r} has not published its data catalogue; not planned until it does")
    return found, [*missing, *bad], notes


def smallest_trainable(train_tokens, limit: int = 1 << 40) -> int:
    """The fewest tokens t with train_tokens(t) > 0 (it grows with t): what a site's slice must hold."""
    hi = 1
    while not train_tokens(hi):
        if hi >= limit:
            raise PlanError(f"no slice of up to {limit} tokens can be trained")
        hi *= 2
    lo = hi // 2  # untrainable (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if train_tokens(mid) else (mid, hi)
    return hi


def plan_round(cfg: Config, layout: RunLayout, trust: TrustStore, r: int) -> dict:
    sites, joined = identified_sites(cfg, trust, r)
    prev_plan = read_json(layout.plan(r - 1)) if r > 0 else {}
    catalogues, uncatalogued, notes = collect_catalogues(
        cfg, layout, trust, sorted(sites), prev_plan.get("catalogue_missing", [])
    )
    sites = {n: s for n, s in sites.items() if n in catalogues}
    if r > 0:
        joined += [f"site {n!r} joined in round {r}" for n in sites if n not in prev_plan["sites"]]
    data = load_data(layout, trust, sorted(catalogues))
    shards = [Shard(s["id"], s["tokens"], s["residency"]) for s in data["shards"]]
    if not sites or not shards:
        raise PlanError(
            f"round {r}: nothing to plan: {len(sites)} sites with a data catalogue, {len(shards)} shards "
            f"({'; '.join(notes + joined) or 'no sites'})"
        )
    prev = prev_plan["state"] if r > 0 else None
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
    task = load_task(cfg)

    def slice_of(site: str, tokens: int) -> dict | None:
        """How the site trains a slice of `tokens`, or None when the task has no say (Task.plan_slice)."""
        return task.plan_slice(site, cfg.sites[site], data, tokens)

    floor = {
        n: smallest_trainable(lambda t, n=n: slice_of(n, t)["train_tokens"])
        for n in sites
        if slice_of(n, 1) is not None
    }
    plan = make_plan(r, shards, sites, cfg.rounds.tokens_per_round, cfg.seed, prev, requeue, measured, floor or None)
    plan["notes"] = joined + notes + plan["notes"]
    plan["catalogues"] = catalogues
    plan["catalogue_missing"] = uncatalogued
    for name, entry in plan["sites"].items():
        # What the task plans per site from its capability profile (e.g. the batch its memory holds).
        entry.update(task.plan_site(name, cfg.sites[name], data))
        if entry["tokens"] and (part := slice_of(name, entry["tokens"])) is not None:
            # What its receipt will claim: tokens planned = tokens trained, and why the rest is not.
            entry.update(
                train_tokens=part["train_tokens"], held_back_tokens=part["held_back_tokens"], steps=part["steps"]
            )
            entry["reason"] += f"; {part['slice']}"
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


def run(ctx: Ctx, r: int) -> dict:
    """The plan stage: round r's signed plan.json."""
    return plan_round(ctx.cfg, ctx.layout, ctx.trust, r)
