"""Round planning: which site trains which shards, by residency, throughput and epoch."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedhpc.config.federation import SiteConfig

SHARED = "*shared*"  # pool of shards that any site may train


@dataclass(frozen=True)
class Shard:
    id: str
    tokens: int
    residency: str | None  # owning site, or None when unpinned


def stable_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def _epoch_order(pool: str, ids: list[str], epoch: int, seed: int) -> list[str]:
    rng = np.random.default_rng(stable_seed(seed, pool, epoch))
    return [ids[i] for i in rng.permutation(len(ids))]


def make_plan(
    r: int,
    shards: list[Shard],
    sites: dict[str, SiteConfig],
    tokens_per_round: int,
    seed: int,
    prev_state: dict | None = None,
    requeue: list[str] | None = None,
    measured: dict[str, tuple[float, str]] | None = None,
    min_tokens: dict[str, int] | None = None,
) -> dict:
    """Assign shards to sites for round `r`. Pure: the same arguments give the same plan.

    Every pool (each site's pinned shards, and the shared shards) is walked in a seeded
    per-epoch order, taking a slice proportional to the pool's size each round, so a whole
    epoch covers every shard exactly once and all pools finish their epoch together.
    Pinned shards go to their owner only. Shared shards are then placed, largest first, on
    the site that would finish earliest (load / throughput), which balances finish times.
    `requeue` holds shards of the previous round that produced no accepted update; they are
    taken first. `measured` overrides sites' declared throughput with what their receipts
    showed (value, explanation), so a straggler gets fewer shared shards next time.
    `min_tokens` is the smallest slice each site can train (a round's sequences after its
    held-back slice); no site is planned a smaller one (see `_trainable`).
    """
    speed = {n: (measured or {}).get(n, (sites[n].throughput, ""))[0] for n in sites}
    by_id = {s.id: s for s in shards}
    pools: dict[str, list[str]] = {}
    for s in shards:
        pools.setdefault(s.residency or SHARED, []).append(s.id)
    notes = [
        f"shards pinned to {p!r} are not trained: {p!r} is not a site of this federation"
        for p in sorted(pools)
        if p != SHARED and p not in sites
    ]
    pools = {p: ids for p, ids in pools.items() if p == SHARED or p in sites}
    total = sum(by_id[i].tokens for ids in pools.values() for i in ids)
    state = {p: {**v, "carry": list(v.get("carry", []))} for p, v in (prev_state or {}).items()}

    taken: dict[str, list[str]] = {p: [] for p in pools}
    for sid in requeue or []:
        if sid in by_id and (by_id[sid].residency or SHARED) in pools:
            taken[by_id[sid].residency or SHARED].append(sid)
    for pool, ids in sorted(pools.items()):
        st = state.setdefault(pool, {"epoch": 0, "position": 0, "debt": 0.0, "carry": []})
        quota = tokens_per_round * sum(by_id[i].tokens for i in ids) / total + st["debt"]
        got = sum(by_id[i].tokens for i in taken[pool])
        # Shards deferred last round (they were already in that round when a new epoch began).
        carry, st["carry"] = st["carry"], []
        for sid in carry:
            if sid in taken[pool]:
                st["carry"].append(sid)
            else:
                taken[pool].append(sid)
                got += by_id[sid].tokens
        order = _epoch_order(pool, ids, st["epoch"], seed)
        walked = 0
        need = (min_tokens or {}).get(pool, 0) if pool != SHARED else 0
        # Take whole shards while that brings us closer to the quota, and past it while the owner's
        # slice is too small to train (an epoch's short last shard); at most one pass per round.
        while walked < len(ids) and (got + by_id[order[st["position"]]].tokens / 2 <= quota or 0 < got < need):
            sid = order[st["position"]]
            if sid in taken[pool]:
                st["carry"].append(sid)  # keep its place in this epoch: take it next round
            else:
                taken[pool].append(sid)
                got += by_id[sid].tokens
            walked += 1
            st["position"] += 1
            if st["position"] == len(order):
                st["epoch"], st["position"] = st["epoch"] + 1, 0
                order = _epoch_order(pool, ids, st["epoch"], seed)
        st["debt"] = quota - got

    names = sorted(sites)
    load = {n: 0 for n in names}
    assigned: dict[str, list[str]] = {n: [] for n in names}
    pinned_tokens = {n: 0 for n in names}
    for pool, ids in taken.items():
        if pool == SHARED or pool not in sites:
            continue
        assigned[pool].extend(ids)
        pinned_tokens[pool] = sum(by_id[i].tokens for i in ids)
        load[pool] += pinned_tokens[pool]
    for sid in sorted(taken.get(SHARED, []), key=lambda i: (-by_id[i].tokens, i)):
        tok = by_id[sid].tokens
        best = min(names, key=lambda n: ((load[n] + tok) / speed[n], sites[n].energy_weight, n))
        assigned[best].append(sid)
        load[best] += tok
    if min_tokens:
        moved = _trainable(assigned, load, pinned_tokens, by_id, sites, speed, min_tokens)
        notes += moved.notes
        if moved.deferred:
            # Back to the shared pool: taken first next round, with the quota they did not use.
            st = state[SHARED]
            st["carry"] = [*moved.deferred, *st["carry"]]
            st["debt"] += sum(by_id[i].tokens for i in moved.deferred)

    thr_total = sum(speed[n] for n in names)
    round_tokens = sum(load.values())
    plan_sites = {}
    for n in names:
        share = speed[n] / thr_total
        reason = f"throughput {speed[n]:.3g} of {thr_total:.3g} → target {share:.0%} of {round_tokens} tokens"
        if measured and n in measured:
            reason = f"{measured[n][1]}; {reason}"
        if pinned_tokens[n] > share * round_tokens * 1.05:
            reason += f"; its pinned data ({pinned_tokens[n]} tokens) exceeds that share, so it sets the round's pace"
        plan_sites[n] = {
            "shards": assigned[n],
            "tokens": load[n],
            "pinned_tokens": pinned_tokens[n],
            "shared_tokens": load[n] - pinned_tokens[n],
            "throughput": speed[n],
            "declared_throughput": sites[n].throughput,
            "energy_weight": sites[n].energy_weight,
            "expected_time": load[n] / speed[n],
            "reason": reason,
        }
    return {
        "round": r,
        "tokens": round_tokens,
        "sites": plan_sites,
        "participants": [n for n in names if assigned[n]],
        "state": state,
        "notes": notes,
    }


@dataclass
class _Moved:
    notes: list[str]
    deferred: list[str]  # shared shards no site could train this round


def _trainable(
    assigned: dict[str, list[str]],
    load: dict[str, int],
    pinned_tokens: dict[str, int],
    by_id: dict[str, Shard],
    sites: dict[str, SiteConfig],
    speed: dict[str, float],
    need: dict[str, int],
) -> _Moved:
    """Leave no site a slice smaller than it can train (`need`), moving shards in place.

    A site whose whole pinned pool is smaller is topped up with shared shards other sites can
    spare; if none can, its pinned shards sit this round out. A site holding only a few small
    shared shards (an epoch's short last shard placed on an idle site) hands them to sites that
    train anyway; shards nobody can take go back to the pool for the next round.
    """
    notes: list[str] = []
    names = sorted(assigned)
    small = [n for n in names if 0 < load[n] < need.get(n, 0)]

    def shared_of(n: str) -> list[str]:
        return [i for i in assigned[n] if by_id[i].residency is None]

    def move(sid: str, src: str, dst: str) -> None:
        assigned[src].remove(sid)
        assigned[dst].append(sid)
        load[src] -= by_id[sid].tokens
        load[dst] += by_id[sid].tokens

    for n in [n for n in small if pinned_tokens[n]]:
        spare = sorted(
            ((by_id[i].tokens, i, d) for d in names if d != n for i in shared_of(d)), key=lambda x: (x[0], x[1])
        )
        for tok, sid, donor in spare:
            if load[n] >= need[n]:
                break
            if load[donor] - tok == 0 or load[donor] - tok >= need.get(donor, 0):
                move(sid, donor, n)
        if load[n] < need[n]:
            gone = [i for i in assigned[n] if by_id[i].residency is not None]
            notes.append(
                f"site {n!r}: its pinned data in this round ({pinned_tokens[n]} tokens, all it holds) is less than "
                f"the smallest slice it can train ({need[n]} tokens) and no shared shards were to spare; "
                f"{', '.join(gone)} not trained this round"
            )
            for sid in gone:
                assigned[n].remove(sid)
                load[n] -= by_id[sid].tokens
            pinned_tokens[n] = 0
    orphans: list[str] = []
    for n in [n for n in small if 0 < load[n] < need[n]]:
        for sid in sorted(shared_of(n), key=lambda i: (-by_id[i].tokens, i)):
            tok = by_id[sid].tokens
            takers = [m for m in names if m != n and load[m] >= max(1, need.get(m, 0))]
            if not takers:
                assigned[n].remove(sid)
                load[n] -= tok
                orphans.append(sid)
                continue
            best = min(takers, key=lambda m: ((load[m] + tok) / speed[m], sites[m].energy_weight, m))
            move(sid, n, best)
            notes.append(f"shared shard {sid} moved from {n!r} to {best!r}: alone it was less than {n!r} can train")
    if orphans:
        total = sum(by_id[i].tokens for i in orphans)
        fits = [m for m in names if load[m] + total >= need.get(m, 0)]
        if fits:
            best = min(fits, key=lambda m: ((load[m] + total) / speed[m], sites[m].energy_weight, m))
            assigned[best].extend(orphans)
            load[best] += total
            notes.append(
                f"shared shards {', '.join(orphans)} trained together by {best!r}: apart, no site could train them"
            )
            orphans = []
        else:
            notes.append(
                f"shared shards {', '.join(orphans)} ({total} tokens) are less than any site can train: "
                "moved to the next round"
            )
    return _Moved(notes, orphans)


def learned_throughput(declared: dict[str, float], tokens_per_second: dict[str, float]) -> dict[str, tuple[float, str]]:
    """Relative throughput each measured site showed, on the declared scale, with the reason.

    Declared throughputs are relative units; receipts give tokens/s. The median ratio
    (tokens/s per declared unit) over the measured sites converts one into the other, so a
    site that kept its promise keeps its number and one that ran at half speed gets half.
    """
    ratios = sorted(tokens_per_second[n] / declared[n] for n in tokens_per_second if tokens_per_second[n] > 0)
    if not ratios:
        return {}
    mid = len(ratios) // 2
    scale = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    out = {}
    for n, tps in sorted(tokens_per_second.items()):
        if tps > 0:
            eff = tps / scale
            out[n] = (
                eff,
                f"measured {tps:.0f} tokens/s = {eff / declared[n]:.2f} × its declared throughput {declared[n]:g}",
            )
    return out
