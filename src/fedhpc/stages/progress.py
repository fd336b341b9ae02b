"""Where a federation stands in time: round wall times, sites' steps and speed, deadlines, the ETA.

Everything is read from the blackboard (plans, metrics.jsonl, receipts, the audit log, the
config snapshot), never from a process, so it reads the same on Slurm, on one machine and in
a site's own directory in multi-site mode.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from fedhpc.core.files import last_line, read_json
from fedhpc.core.layout import RunLayout


def read_or_none(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


def last_record(path: Path) -> dict | None:
    """The last complete line of a JSON-lines file (None: no file, no complete line yet, or not a
    record). Reads only the file's end: a long round's metrics are not parsed again at every look."""
    try:
        line, _ = last_line(path)
        rec = json.loads(line) if line is not None else None
    except (FileNotFoundError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


class AuditTail:
    """The audit log's events, read incrementally: each look parses only what was appended since."""

    def __init__(self, path: Path):
        self.path, self.offset, self.events = Path(path), 0, []

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as fh:
                if fh.seek(0, os.SEEK_END) < self.offset:  # repaired (a torn line cut): read again
                    self.offset, self.events = 0, []
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.events
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].splitlines():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                continue  # a line the verifier (`fedhpc audit verify`) will name; not ours to judge
        self.offset += complete
        return self.events


def run_settings(layout: RunLayout) -> dict:
    """From the config snapshot: rounds planned, the deadline and log_every (None where unknown)."""
    cfg = read_or_none(layout.config) or {}
    rounds, training = cfg.get("rounds") or {}, cfg.get("training") or {}
    return {
        "rounds": rounds.get("count"),
        "deadline_minutes": rounds.get("deadline_minutes"),
        "log_every": training.get("log_every"),
    }


def round_end(layout: RunLayout, r: int, events: list[dict]) -> float | None:
    """When round r ended: its next global model was published (or the round rolled back).

    The coordinator's ledger says so; a site's own directory has no such event, but the next
    round's plan (signed, with its creation time) or the next global's file says it too."""
    for e in events:
        if e.get("event") in ("global.published", "round.rolled_back") and e.get("from_round") == r:
            return e["time"]
    nxt = read_or_none(layout.plan(r + 1))
    if nxt is not None and "created" in nxt:
        return nxt["created"]
    try:
        return layout.global_meta(r + 1).stat().st_mtime
    except FileNotFoundError:
        return None


def site_progress(layout: RunLayout, r: int, site: str) -> dict | None:
    """A site's step/steps, tokens/s and time of its last record in round r (None: nothing yet).

    Its published receipt is final; until then, the last line of its metrics.jsonl."""
    receipt = read_or_none(layout.receipt(r, site))
    if receipt is not None and "steps" in receipt:
        return {
            "step": receipt["steps"],
            "steps": receipt["steps"],
            "tokens_per_s": receipt.get("tokens_per_second"),
            "time": receipt.get("finished_at"),
        }
    rec = last_record(layout.metrics(r, site))
    if rec is None or rec.get("round", r) != r:
        return None
    return {k: rec.get(k) for k in ("step", "steps", "tokens_per_s", "time")}


def federation(rows: list[dict], total: int | None) -> dict:
    """Rounds done and left, the median round's wall time and the ETA (rounds left × that median)."""
    walls = [row["wall_s"] for row in rows if row.get("ended") is not None]
    done = len(walls)
    failed = next((row for row in rows if row["state"].startswith("failed")), None)
    median = statistics.median(walls) if walls else None
    left = None if total is None else max(0, total - done)
    eta = None if left is None or median is None or failed else left * median
    return {
        "rounds_total": total,
        "rounds_done": done,
        "rounds_left": left,
        "median_round_s": median,
        "eta_s": 0.0 if left == 0 else eta,
        "finished": left == 0,
        "failed": failed["round"] if failed else None,
    }


def span(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3 min 05 s, 2 h 07 min."""
    s = round(abs(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def speed(tokens_per_s: float | None) -> str:
    return "" if tokens_per_s is None else f"{tokens_per_s:,.0f} tokens/s"


def deadline_text(row: dict, now: float) -> str:
    """Time left to an open round's deadline (nothing for a closed round)."""
    if row.get("closed") or row.get("deadline") is None:
        return ""
    left = row["deadline"] - now
    return f"in {span(left)}" if left >= 0 else f"passed {span(left)} ago"


def eta_text(fed: dict) -> str:
    if fed["finished"]:
        return f"all {fed['rounds_total']} rounds done, median round {span(fed['median_round_s'] or 0)}"
    if fed["failed"] is not None:
        return f"stopped: round {fed['failed']} failed"
    if fed["eta_s"] is None:
        return "ETA after the first round" if fed["rounds_total"] is not None else "ETA unknown (no config.json)"
    return (
        f"ETA {span(fed['eta_s'])} ({fed['rounds_left']} round{'s' * (fed['rounds_left'] != 1)} left"
        f" × median {span(fed['median_round_s'])})"
    )


def site_text(cell: str, prog: dict | None) -> str:
    """One site in one round: its state, and while it trains, its step/steps and speed."""
    if prog is None or prog.get("step") is None:
        return cell
    parts = [cell, f"{prog['step']}/{prog['steps']}"] if cell == "training" else [cell]
    return " ".join(parts + ([speed(prog["tokens_per_s"])] if prog.get("tokens_per_s") is not None else []))


def compact_line(rows: list[dict], fed: dict, now: float) -> str:
    """One line for `fedhpc run`: the latest round, each site's step/steps and speed, the deadline, the ETA."""
    if not rows:
        return "fedhpc: no round planned yet"
    row = rows[-1]
    total = fed["rounds_total"]
    head = f"fedhpc: round {row['round']}{f'/{total}' if total else ''} {row['state']} ({span(row['wall_s'])})"
    sites = ", ".join(
        f"{s} {site_text(cell, row['progress'].get(s))}" for s, cell in row["sites"].items() if cell != "-"
    )
    tail = [x for x in (deadline_text(row, now), eta_text(fed)) if x]
    if tail and tail[0].startswith(("in ", "passed")):
        tail[0] = "deadline " + tail[0]
    return "; ".join([f"{head}: {sites}" if sites else head, *tail])


def federation_text(fed: dict) -> str:
    if fed["finished"]:
        return f"federation: {eta_text(fed)}"
    total = fed["rounds_total"] if fed["rounds_total"] is not None else "?"
    return f"federation: {fed['rounds_done']} of {total} rounds done; {eta_text(fed)}"


def train_line(r: int, site: str, rec: dict) -> str:
    """The plain line a site's train.log gets with every metrics record (every `training.log_every` steps)."""
    parts = [f"round {r} {site}: step {rec.get('step')}/{rec.get('steps')}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.3g}")
    if rec.get("tokens_per_s") is not None:
        parts.append(speed(rec["tokens_per_s"]))
    if rec.get("elapsed_s") is not None:
        parts.append(f"{span(rec['elapsed_s'])} in")
    return ", ".join(parts)
