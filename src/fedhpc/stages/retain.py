"""The retention stage: once round r is promoted, delete the models and updates the policy no longer keeps.

What goes, decided from the config and the round number alone (so a killed job redoes the
same work): the site updates and the candidate of round r - keep_rounds (and an update that
reached an older round after its turn, a leftover a rerun may no longer list), and the global of
round r - s (s: how far back late updates are still verified, 0 when they are dropped) unless
its round is a multiple of globals_every. Never touched: the global just promoted, the audit
trail and any signed record (plans, receipts, verdicts, aggregation records, model metadata,
evaluations), so `fedhpc provenance` still checks every link; the hashes of deleted files
are in the coordinator-signed `retention.json` each round leaves.

A promoted global is a symlink to the file it was promoted from (stages/promote.py): the
candidate's, or on rollback the previous global's. Such a file therefore stays while any
kept global still names it, and goes with the last one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout, round_index
from fedhpc.stages.context import Ctx
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.signing import COORDINATOR, TrustStore, sign_document


@dataclass(frozen=True)
class Policy:
    """`retention:` with what late updates still need."""

    keep_rounds: int | None
    globals_every: int | None
    staleness: int  # rounds back a late update is still verified against its own global

    @classmethod
    def of(cls, cfg: Config) -> Policy:
        fold = cfg.rounds.late_updates == "fold"
        return cls(cfg.retention.keep_rounds, cfg.retention.globals_every, cfg.rounds.max_staleness if fold else 0)

    def round_pruned(self, j: int, r: int) -> bool:
        """Whether round j's updates and candidate are gone once round r is promoted."""
        return self.keep_rounds is not None and 0 <= j <= r - self.keep_rounds

    def global_pruned(self, g: int, r: int) -> bool:
        """Whether global g is gone once round r is promoted (global r + 1, the newest, never is)."""
        m = self.globals_every
        return m is not None and 0 < g <= r - self.staleness and g % m != 0


def _sha(path: Path, key: str) -> str | None:
    return read_json(path).get(key) if path.exists() else None


def pruned_now(layout: RunLayout, policy: Policy, r: int) -> dict[Path, str | None]:
    """The files retention deletes after round r's promotion, each with the sha256 its signed record gives."""
    out: dict[Path, str | None] = {}
    if policy.keep_rounds is not None and (last := r - policy.keep_rounds) >= 0:
        # Round `last`'s updates go now; an update that lands in an older round after its turn (a
        # site whose job finished that late) is past every late-update window, and goes at the next pass.
        for j in range(last + 1):
            sites = layout.round_dir(j) / "sites"
            for site in sorted(p.name for p in sites.iterdir()) if sites.is_dir() else []:
                receipt = layout.receipt(j, site)
                for path, key in (
                    (layout.update(j, site), "update_sha256"),
                    (layout.control_update(j, site), "control_sha256"),
                ):
                    if j == last or os.path.lexists(path):
                        out[path] = _sha(receipt, key)
        out[layout.candidate(last)] = _sha(layout.aggregate_record(last), "output_sha256")
        out[layout.candidate_state(last)] = None
    g = r - policy.staleness
    if policy.global_pruned(g, r):
        out[layout.global_model(g)] = _sha(layout.global_meta(g), "sha256")
        out[layout.server_state(g)] = None
    return out


def _source(layout: RunLayout, g: int) -> str | None:
    return read_json(layout.global_meta(g)).get("source") if layout.global_meta(g).exists() else None


def backing(layout: RunLayout, g: int, state: bool = False) -> Path:
    """The file global g's model (or server state) is stored in: the candidate it was promoted from,
    or, for a rollback, the file of the global before it. From the signed metadata, not the link,
    so it is known after the link is gone."""
    while g > 0 and _source(layout, g) == "rollback":
        g -= 1
    if g == 0:
        return layout.server_state(0) if state else layout.global_model(0)
    return layout.candidate_state(g - 1) if state else layout.candidate(g - 1)


def _named_by_kept_global(layout: RunLayout, policy: Policy, j: int, r: int, state: bool) -> bool:
    """Whether a global kept after round r's promotion is stored in round j's candidate file: global
    j + 1 if promoted from it, and the rollbacks that follow it."""
    for g in range(j + 1, r + 2):
        if g > j + 1 and _source(layout, g) != "rollback":
            return False
        if g == j + 1 and _source(layout, g) != "aggregate":
            return False
        if not policy.global_pruned(g, r):
            return True
    return False


def _delete(path: Path) -> int:
    """Remove a file or a symlink (dangling or not); the bytes it freed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0
    path.unlink()
    return 0 if stat.S_ISLNK(st.st_mode) else st.st_size


def apply(layout: RunLayout, policy: Policy, r: int, pruned: dict[Path, str | None]) -> int:
    """Delete `pruned` (names of files; links go, a file a kept global still names stays). Bytes freed."""
    freed = 0
    for path in pruned:
        state = path.name == "server_state.safetensors"
        if path.parent.name == "global":
            # The link (a copy, in a run made before globals were links), then the file behind it.
            freed += _delete(path)
            path = backing(layout, round_index(path.parent.parent.name), state)
        if path.parent.name == "candidate":
            j = round_index(path.parent.parent.name)
            if policy.round_pruned(j, r) and not _named_by_kept_global(layout, policy, j, r, state):
                freed += _delete(path)
        elif path.parent.name != "global":  # global 0, the initial model, is never deleted
            freed += _delete(path)
    return freed


def retain_round(cfg: Config, layout: RunLayout, trust: TrustStore, r: int) -> dict:
    policy = Policy.of(cfg)
    pruned = pruned_now(layout, policy, r)
    record = {
        "run": cfg.run,
        "round": r,
        "policy": {"keep_rounds": policy.keep_rounds, "globals_every": policy.globals_every},
        "pruned": {str(p.relative_to(layout.root)): {"sha256": sha} for p, sha in pruned.items()},
    }
    freed = apply(layout, policy, r, pruned)
    AuditLog(layout.audit).append("retention.pruned", round=r, files=len(pruned), bytes_freed=freed)
    write_json(layout.retention(r), sign_document(record, COORDINATOR, trust.private_key(COORDINATOR)))
    return {**record, "bytes_freed": freed}


def run(ctx: Ctx, r: int) -> dict:
    """The retention stage: after round r's promotion, what the policy no longer keeps is deleted."""
    return retain_round(ctx.cfg, ctx.layout, ctx.trust, r)
