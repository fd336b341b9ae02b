"""`fedhpc status`: a rounds × sites table of what state every site-round is in, from the blackboard."""

from __future__ import annotations

from .audit import AuditLog
from .files import read_json
from .layout import RunLayout


def _read(path):
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def _own_site(layout: RunLayout) -> str | None:
    """The site whose run directory this is, in multi-site mode (from the config snapshot)."""
    exchange = (_read(layout.config) or {}).get("exchange") or {}
    return exchange.get("site") if exchange.get("role") == "site" else None


def _site_view(layout: RunLayout, site: str, started: set) -> list[dict]:
    """A site's own rounds: what it pulled, trained and published (it sees no other site)."""
    rows = []
    for r in layout.rounds_present():
        plan = _read(layout.plan(r))
        if plan is None:
            continue
        if site not in plan["participants"]:
            cell = "-"
        elif (layout.site_dir(r, site) / "bundle.json").exists():
            cell = "published"
        elif layout.receipt(r, site).exists():
            cell = "trained"
        elif (r, site) in started:
            cell = "training"
        else:
            cell = "pulled"
        nxt = _read(layout.global_meta(r + 1))
        if nxt is not None:
            state = "rolled back" if nxt["source"] == "rollback" else "done"
        else:
            state = "waiting for the coordinator" if cell in ("published", "-") else "training"
        rows.append({"round": r, "state": state, "sites": {site: cell}, "eval_loss": None})
    return rows


def round_states(layout: RunLayout) -> list[dict]:
    started = {(e["round"], e["site"]) for e in AuditLog(layout.audit).events() if e["event"] == "train.started"}
    if (site := _own_site(layout)) is not None:
        return _site_view(layout, site, started)
    rows = []
    for r in layout.rounds_present():
        plan = _read(layout.plan(r))
        if plan is None:
            continue
        arrivals, verdicts = _read(layout.arrivals(r)), _read(layout.verdicts(r))
        nxt = _read(layout.global_meta(r + 1))
        cells = {}
        for site in sorted(plan["sites"]):
            if site not in plan["participants"]:
                cells[site] = "-"
            elif verdicts and site in verdicts["accepted"]:
                cells[site] = "accepted"
            elif verdicts and site in verdicts["rejected"]:
                cells[site] = "rejected"
            elif arrivals and site in arrivals["missing"]:
                cells[site] = "dropped"
            elif layout.receipt(r, site).exists():
                cells[site] = "published"
            elif (r, site) in started:
                cells[site] = "training"
            else:
                cells[site] = "planned"
        if nxt is not None:
            state = "rolled back" if nxt["source"] == "rollback" else "done"
        elif layout.candidate(r).exists():
            state = "evaluating"
        elif verdicts is not None:
            state = "aggregating"
        elif arrivals is not None:
            state = "verifying"
        else:
            state = "training"
        ev = _read(layout.global_eval(r + 1)) if nxt is not None else None
        rows.append({"round": r, "state": state, "sites": cells, "eval_loss": ev["loss"] if ev else None})
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "no rounds planned yet"
    sites = sorted({s for row in rows for s in row["sites"]})
    head = ["round", *sites, "round state", "held-out loss"]
    body = [
        [
            f"r{row['round']:04d}",
            *(row["sites"].get(s, "") for s in sites),
            row["state"],
            "" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}",
        ]
        for row in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])
