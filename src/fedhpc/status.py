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


def round_states(layout: RunLayout) -> list[dict]:
    started = {(e["round"], e["site"]) for e in AuditLog(layout.audit).events() if e["event"] == "train.started"}
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
