"""`fedhpc status`: rounds × sites, each round's wall time and deadline, the sites' progress and the ETA.

Read from the blackboard only (see stages/progress.py), so it works for a run on Slurm, on this
machine, and in a site's own directory in multi-site mode (where it shows that site's rounds).
"""

from __future__ import annotations

import sys
import time

from fedhpc.core.layout import RunLayout
from fedhpc.stages.failures import read_failure
from fedhpc.stages.progress import (
    AuditTail,
    deadline_text,
    federation,
    federation_text,
    read_or_none,
    round_end,
    run_settings,
    site_progress,
    site_text,
    span,
)

_read = read_or_none


def _own_site(layout: RunLayout) -> str | None:
    """The site whose run directory this is, in multi-site mode (from the config snapshot)."""
    exchange = (_read(layout.config) or {}).get("exchange") or {}
    return exchange.get("site") if exchange.get("role") == "site" else None


def site_failure(layout: RunLayout, r: int, site: str, events: list[dict]) -> str | None:
    """Why a site's job of round r did not publish, as far as the blackboard says: the failure
    record its last failed attempt left (failure.json), the job's status record (status.json,
    the train rule's output) when it ended without training, or the coordinator's reason for
    dropping the site. The one place that says why a site failed."""
    if (rec := read_failure(layout, r, site)) is not None:
        retry = "" if rec.get("final") else ", to be retried"
        return f"attempt {rec['attempt']} of {rec['attempts']} failed{retry}: {rec['error']}"
    status = _read(layout.site_dir(r, site) / "status.json")
    if status is not None and status.get("state") not in (None, "published"):
        return status.get("detail") or status["state"]
    for e in events:
        if e.get("event") == "site.dropped" and e.get("round") == r and e.get("site") == site:
            return e.get("reason")
    return None


def _failed(layout: RunLayout, r: int, site: str) -> bool:
    """The site's job failed for good (its failure record says no attempt follows)."""
    return bool((read_failure(layout, r, site) or {}).get("final"))


def _site_cells(layout: RunLayout, r: int, plan: dict, started: set, site: str | None) -> dict[str, str]:
    if site is not None:  # a site's own directory: what it pulled, trained and published
        if site not in plan["participants"]:
            return {site: "-"}
        if (layout.site_dir(r, site) / "bundle.json").exists():
            return {site: "published"}
        if layout.receipt(r, site).exists():
            return {site: "trained"}
        return {site: "failed" if _failed(layout, r, site) else "training" if (r, site) in started else "pulled"}
    arrivals, verdicts = _read(layout.arrivals(r)), _read(layout.verdicts(r))
    cells = {}
    for s in sorted(plan["sites"]):
        if s not in plan["participants"]:
            cells[s] = "-"
        elif verdicts and s in verdicts["accepted"]:
            cells[s] = "accepted"
        elif verdicts and s in verdicts["rejected"]:
            cells[s] = "rejected"
        elif arrivals and s in arrivals["missing"]:
            cells[s] = "dropped"
        elif layout.receipt(r, s).exists():
            cells[s] = "published"
        elif _failed(layout, r, s):
            cells[s] = "failed"
        elif (r, s) in started:
            cells[s] = "training"
        else:
            cells[s] = "planned"
    return cells


def _round_state(layout: RunLayout, r: int, cells: dict, events: list[dict], site: str | None) -> str:
    nxt = _read(layout.global_meta(r + 1))
    if nxt is not None:
        return "rolled back" if nxt["source"] == "rollback" else "done"
    if site is not None:
        return "waiting for the coordinator" if cells[site] in ("published", "-") else "training"
    if layout.candidate(r).exists():
        return "evaluating"
    if layout.verdicts(r).exists():
        return "aggregating"
    if layout.arrivals(r).exists():
        return "verifying"
    mine = {e["event"] for e in events if e.get("round") == r}
    if "round.no_quorum" in mine:
        return "failed: no quorum"
    return "waiting for quorum" if "round.waiting_for_quorum" in mine else "training"


def round_states(
    layout: RunLayout, now: float | None = None, audit: AuditTail | None = None, done: dict | None = None
) -> list[dict]:
    """One row per planned round: its state, each site's cell and progress, wall time and deadline.

    `done` (round -> row), kept by a caller that looks again and again, holds the rows of ended
    rounds, which do not change: only the open round's files are read again."""
    now = time.time() if now is None else now
    events = (audit or AuditTail(layout.audit)).read()
    started = {(e["round"], e["site"]) for e in events if e.get("event") == "train.started"}
    site = _own_site(layout)
    deadline_minutes = run_settings(layout)["deadline_minutes"]
    rows = []
    for r in layout.rounds_present():
        if done and r in done:
            rows.append(done[r])
            continue
        plan = _read(layout.plan(r))
        if plan is None:
            continue
        cells = _site_cells(layout, r, plan, started, site)
        state = _round_state(layout, r, cells, events, site)
        ended = round_end(layout, r, events) if state in ("done", "rolled back") else None
        ev = _read(layout.global_eval(r + 1)) if ended is not None else None
        created = plan.get("created", now)
        rows.append(
            {
                "round": r,
                "state": state,
                "sites": cells,
                "eval_loss": ev["loss"] if ev else None,
                "started": created,
                "ended": ended,
                "wall_s": (ended if ended is not None else now) - created,
                "deadline": None if deadline_minutes is None else created + deadline_minutes * 60,
                # Closed: the coordinator stopped waiting (or, at a site, the site's part is done).
                "closed": layout.arrivals(r).exists() or ended is not None or state.startswith("failed"),
                "progress": {s: p for s in cells if cells[s] != "-" and (p := site_progress(layout, r, s))},
                "why": {s: w for s in cells if cells[s] in ("dropped", "failed", "training", "pulled", "planned")
                        and (w := site_failure(layout, r, s, events))},
            }
        )  # fmt: skip
        if done is not None and ended is not None and layout.plan(r + 1).exists():
            done[r] = rows[-1]  # the next round is planned: nothing of this one changes any more
    return rows


def format_table(rows: list[dict], now: float | None = None) -> str:
    if not rows:
        return "no rounds planned yet"
    now = time.time() if now is None else now
    sites = sorted({s for row in rows for s in row["sites"]})
    head = ["round", *sites, "round state", "wall", "deadline", "held-out loss"]
    body = [
        [
            f"r{row['round']:04d}",
            *(row["sites"].get(s, "") for s in sites),
            row["state"],
            span(row["wall_s"]) if "wall_s" in row else "",
            deadline_text(row, now),
            "" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}",
        ]
        for row in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)]
    return "\n".join(line.rstrip() for line in lines)


def format_round(row: dict, now: float) -> str:
    """The sites of one round, one line each: state, step/steps, tokens/s, and how fresh that is."""
    when = f"{'' if row['ended'] is not None else 'so far '}{span(row['wall_s'])}"
    left = deadline_text(row, now)
    lines = [f"round {row['round']} ({row['state']}, {when}{f'; deadline {left}' if left else ''}):"]
    width = max(len(s) for s in row["sites"])
    for s, cell in row["sites"].items():
        prog = row["progress"].get(s)
        text = site_text(cell, prog)
        if cell != "training" and prog and prog.get("step") is not None:
            text = f"{cell} {prog['step']}/{prog['steps']} steps{text[len(cell) :]}"
        if cell == "training" and prog and prog.get("time") is not None:
            text += f", last record {span(now - prog['time'])} ago"
        if row["why"].get(s):
            text += f" ({row['why'][s]})"
        lines.append(f"  {s:<{width}}  {text}")
    return "\n".join(lines)


def snapshot(
    layout: RunLayout, now: float | None = None, audit: AuditTail | None = None, done: dict | None = None
) -> tuple[list[dict], dict]:
    """The rounds' rows and the federation's standing (rounds done, median round, ETA) at `now`."""
    rows = round_states(layout, now, audit, done)
    return rows, federation(rows, run_settings(layout)["rounds"])


def format_status(rows: list[dict], fed: dict, now: float) -> str:
    """What `fedhpc status` prints: the table, the latest round's sites, and the federation's ETA."""
    if not rows:
        return format_table(rows)
    return "\n".join([format_table(rows, now), "", format_round(rows[-1], now), federation_text(fed)])


def watch(layout: RunLayout, interval: float, out=None) -> int:
    """Reprint the status every `interval` s until the federation is done (0) or stopped by a
    failed round (1); Ctrl-C ends it (130)."""
    out = out or sys.stdout
    audit, done = AuditTail(layout.audit), {}
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""  # a terminal shows one screen; a pipe gets blocks
    try:
        while True:
            now = time.time()
            rows, fed = snapshot(layout, now, audit, done)
            out.write(f"{clear}{format_status(rows, fed, now)}\n{'' if clear else chr(10)}")
            out.flush()
            if fed["finished"] or fed["failed"] is not None:
                return 0 if fed["finished"] else 1
            time.sleep(interval)
    except KeyboardInterrupt:
        return 130


__all__ = ["format_round", "format_status", "format_table", "round_states", "snapshot", "watch"]
