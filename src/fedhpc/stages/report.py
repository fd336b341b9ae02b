"""The run's results: summary.json for programs and report/index.html (plots inline) for people."""

from __future__ import annotations

import base64
import html
import io
import json
import time

from fedhpc.config.federation import Config
from fedhpc.core.files import read_json, write_bytes, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import Ctx
from fedhpc.stages.status import format_table, round_states
from fedhpc.tasks import load_task
from fedhpc.tasks.evaluators import flat_metrics
from fedhpc.trust.audit import AuditLog, verify_ledger


def build_summary(cfg: Config, layout: RunLayout) -> dict:
    rounds = [r for r in range(cfg.rounds.count) if layout.global_meta(r + 1).exists()]
    last = rounds[-1] + 1 if rounds else 0
    first_eval, final_eval = read_json(layout.global_eval(0)), read_json(layout.global_eval(last))
    excluded, history = [], []
    for r in rounds:
        agg = read_json(layout.aggregate_record(r))
        excluded += [{"round": r, "site": s, "reasons": why} for s, why in sorted(agg["excluded"].items())]
        meta = read_json(layout.global_meta(r + 1))
        history.append(
            {
                "round": r,
                "eval_loss": read_json(layout.global_eval(r + 1))["loss"],
                "candidate_loss": read_json(layout.candidate_eval(r))["loss"],
                "source": meta["source"],
                "weights": agg["weights"],
                "strategy": agg["strategy"],
                "rule": agg.get("rule", "mean"),
                "update_bytes": agg.get("update_bytes", {}),
                "bytes_sent": sum(agg.get("update_bytes", {}).values()),
                "metrics": flat_metrics(read_json(layout.global_eval(r + 1))),
                "dp_epsilon": (agg.get("privacy") or {}).get("epsilon"),
                "missing": agg["missing"],
                "excluded": sorted(agg["excluded"]),
            }
        )
    events = AuditLog(layout.audit).events()
    ledger = verify_ledger(layout.audit)
    return {
        "run": cfg.run,
        "rounds_completed": len(rounds),
        "rounds_planned": cfg.rounds.count,
        "sites": sorted(cfg.sites),
        "initial_eval_loss": first_eval["loss"],
        "final_eval_loss": final_eval["loss"],
        "entropy_floor": final_eval["entropy_floor"],
        "final_gap_to_floor": final_eval["gap_to_floor"],
        "final_eval_by_domain": {d: v["loss"] for d, v in final_eval["domains"].items()},
        "task": cfg.task.name,
        "initial_eval_metrics": flat_metrics(first_eval),
        "final_eval_metrics": flat_metrics(final_eval),
        "final_guards": final_eval.get("guards") or {},
        "excluded_updates": excluded,
        "strategy": {"name": cfg.strategy.name, "rule": cfg.strategy.rule},
        "update_bytes_total": {s: sum(h["update_bytes"].get(s, 0) for h in history) for s in sorted(cfg.sites)},
        "bytes_per_round": [h["bytes_sent"] for h in history],
        "dp_epsilon": history[-1]["dp_epsilon"] if history else None,
        "rollbacks": [h["round"] for h in history if h["source"] == "rollback"],
        "global_model_sha256": read_json(layout.global_meta(last))["sha256"],
        "global_model": str(layout.global_model(last)),
        "wall_seconds": (time.time() - events[0]["time"]) if events else 0.0,
        "audit": {"events": len(events), "intact": ledger.ok, "head": events[-1]["hash"] if events else None},
        "history": history,
    }


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(cfg: Config, layout: RunLayout, summary: dict) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for site in sorted(cfg.sites):
        xs, ys = [], []
        for r in range(summary["rounds_completed"]):
            path = layout.metrics(r, site)
            for line in path.read_bytes().splitlines() if path.exists() else []:
                try:
                    rec = json.loads(line)
                    x, y = float(rec["progress"]) * cfg.rounds.count, float(rec["loss"])
                except (ValueError, TypeError, KeyError, RecursionError):
                    continue  # a torn or hostile record: not plotted
                xs.append(x)
                ys.append(y)
        if xs:
            ax.plot(xs, ys, label=site, lw=1.2)
    ax.set(xlabel="round", ylabel="training loss", title="Local training loss per site")
    ax.legend()
    out.append(("Training loss per site", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    xs = list(range(summary["rounds_completed"] + 1))
    evals = [read_json(layout.global_eval(r)) for r in xs]
    ax.plot(xs, [e["loss"] for e in evals], "o-", color="black", label="overall")
    for dom in evals[0]["domains"]:
        ax.plot(xs, [e["domains"].get(dom, {}).get("loss") for e in evals], ".--", lw=1, label=dom)
    if summary["entropy_floor"] is not None:
        ax.axhline(summary["entropy_floor"], color="red", lw=1, label="entropy floor")
    ax.set(xlabel="global model after round", ylabel="held-out loss", title="Held-out loss per round")
    ax.legend(fontsize=8)
    out.append(("Held-out loss against the entropy floor", _png(fig)))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.2))
    bottom = [0.0] * len(summary["history"])
    for site in sorted(cfg.sites):
        ws = [h["weights"].get(site, 0.0) for h in summary["history"]]
        ax.bar([h["round"] for h in summary["history"]], ws, bottom=bottom, label=site)
        bottom = [b + w for b, w in zip(bottom, ws)]
    ax.set(xlabel="round", ylabel="weight", title="Aggregation weights")
    ax.legend(fontsize=8)
    out.append(("Aggregation weights", _png(fig)))
    plt.close(fig)
    return out


def _eps(epsilon: float | None) -> str:
    return "—" if epsilon is None else f"{epsilon:.3g}"


def _metrics_table(summary: dict) -> str:
    """The final model's evaluation beyond the loss (task metrics, evaluators, guards) next to the initial one."""
    first, final = summary["initial_eval_metrics"], summary["final_eval_metrics"]
    if not final:
        return ""
    esc = html.escape
    rows = "".join(
        f"<tr><td><code>{esc(k)}</code></td><td>{first.get(k, float('nan')):.4g}</td><td>{v:.4g}</td></tr>"
        for k, v in sorted(final.items())
    )
    guards = "".join(
        f"<li><code>{esc(name)}</code>: {'ok' if g.get('ok', True) else '<b>FAILED</b>'} {esc(g.get('reason') or '')}</li>"
        for name, g in sorted(summary["final_guards"].items())
    )
    return (
        "<h2>Evaluation of the final model</h2><table><tr><th>metric</th><th>initial</th><th>final</th></tr>"
        f"{rows}</table>" + (f"<p>Guards:</p><ul>{guards}</ul>" if guards else "")
    )


def write_report(cfg: Config, layout: RunLayout) -> dict:
    summary = build_summary(cfg, layout)
    esc = html.escape
    floor = summary["entropy_floor"]
    rows = "".join(
        f"<tr><td>r{h['round']:04d}</td><td>{h['eval_loss']:.4f}</td><td>{h['source']}</td>"
        f"<td>{esc(', '.join(h['excluded']) or '—')}</td><td>{esc(', '.join(h['missing']) or '—')}</td>"
        f"<td>{esc(', '.join(f'{s} {b / 1e6:.2f}' for s, b in sorted(h['update_bytes'].items())) or '—')}</td>"
        f"<td>{_eps(h['dp_epsilon'])}</td></tr>"
        for h in summary["history"]
        if h["eval_loss"] is not None
    )
    plots = "".join(
        f"<h2>{esc(t)}</h2><img alt='{esc(t)}' src='data:image/png;base64,{b}'>"
        for t, b in _plots(cfg, layout, summary)
    )
    gap = summary["final_gap_to_floor"]
    floor_text = "" if floor is None else f"(entropy floor {floor:.4f}, gap {gap:.4f})"
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>fedhpc · {esc(cfg.run)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}td,th{{padding:.2em .8em;text-align:left}}
pre{{background:#f4f4f4;padding:1em}}img{{max-width:100%}}</style></head><body>
<h1>Federation <code>{esc(cfg.run)}</code></h1>
<p>{summary["rounds_completed"]} of {summary["rounds_planned"]} rounds, sites {esc(", ".join(summary["sites"]))}.
Held-out loss {summary["initial_eval_loss"]:.4f} → <b>{summary["final_eval_loss"]:.4f}</b>{" nats/token" if load_task(cfg).uses_tokens else ""}
{floor_text}.
Final global model <code>{summary["global_model_sha256"][:16]}…</code>; audit ledger
{"intact" if summary["audit"]["intact"] else "<b>BROKEN</b>"} ({summary["audit"]["events"]} events).</p>
<h2>Rounds × sites</h2><pre>{esc(format_table(round_states(layout)))}</pre>
<p>Task <code>{esc(cfg.task.name)}</code>. Strategy <code>{esc(cfg.strategy.name)}</code>, rule <code>{esc(cfg.strategy.rule)}</code>.</p>
<table><tr><th>round</th><th>held-out loss</th><th>global from</th><th>excluded</th><th>missing</th>
<th>update MB sent per site</th><th>DP ε (δ={cfg.strategy.privacy.delta:g})</th></tr>{rows}</table>
{_metrics_table(summary)}
{plots}</body></html>"""
    write_bytes(layout.report_dir / "index.html", doc.encode())
    write_json(layout.summary, summary)
    return summary


def run(ctx: Ctx) -> dict:
    """The report stage: summary.json and report/index.html (and, with MLflow, the run closed
    with the report attached); returns the summary."""
    summary = write_report(ctx.cfg, ctx.layout)
    if ctx.cfg.tracking.mlflow:
        from fedhpc.stages.track import finish  # mlflow: imported only when tracking is on

        finish(ctx.cfg, ctx.layout, summary, ctx.layout.report_dir / "index.html")
    return summary
