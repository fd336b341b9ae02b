"""The `fedhpc` command: one verb per workflow stage, plus status, audit and config tools."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import sys
from pathlib import Path

from fedhpc.cli.exchange import EXCHANGE_ACTIONS
from fedhpc.cli.tools import add_verbs as add_tool_verbs
from fedhpc.cli.trust import add_verbs as add_trust_verbs
from fedhpc.config.schema import ConfigError, config_schema
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import context
from fedhpc.tasks.validation import load, markdown_docs


def cmd_config(a: argparse.Namespace) -> int:
    if a.action == "check":
        cfg = load(a.file)
        print(f"{a.file}: valid; run {cfg.run!r}, {len(cfg.sites)} sites, {cfg.rounds.count} rounds")
        return 0
    text = json.dumps(config_schema(), indent=2) + "\n" if a.action == "schema" else markdown_docs()
    if a.write:
        Path(a.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_synth(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from fedhpc.data.synth import generate_corpus
    from fedhpc.stages.shard import corpus_dir

    ctx = context(a.config, with_task=False)
    if ctx.cfg.data.synth is None:
        raise SystemExit(f"{a.config}: data.synth is not set; nothing to generate")
    # Each party generates only the domains it holds: the shared ones, or a site's pinned ones.
    mine = [d for d in ctx.cfg.data.synth.domains if d.site == a.site]
    if not mine:
        raise SystemExit(f"{a.config}: no generated domain is held by {a.site or 'the coordinator (shared)'}")
    out = Path(a.out) if a.out else corpus_dir(ctx.layout, a.site)
    corpus = generate_corpus(replace(ctx.cfg.data.synth, domains=mine), ctx.cfg.seed, out)
    for name, d in corpus["domains"].items():
        print(
            f"{name}: {d['bytes']} bytes, {d['documents']} documents, entropy rate {d['entropy_rate_bits_per_byte']:.3f} bits/byte"
        )
    return 0


def cmd_shard(a: argparse.Namespace) -> int:
    from fedhpc.stages.shard import prepare_data, prepare_site_data

    ctx = context(a.config)
    if a.site:
        doc = prepare_site_data(ctx.cfg, ctx.layout, ctx.trust, a.site)
        where = f"site {a.site}: catalogue {ctx.layout.catalogue(a.site)}"
    else:
        doc = prepare_data(ctx.cfg, ctx.layout, ctx.trust)
        where = f"shared: manifest {ctx.layout.manifest}"
    print(f"{where}: {len(doc['shards'])} shards, held-out domains {', '.join(h['domain'] for h in doc['heldout'])}")
    return 0


def cmd_init(a: argparse.Namespace) -> int:
    from fedhpc.data.shards import load_manifest
    from fedhpc.stages.init import init_global

    ctx = context(a.config)
    meta = init_global(ctx.cfg, ctx.layout, ctx.trust, load_manifest(ctx.layout, ctx.trust))
    print(f"initial global model: {meta.get('parameters', 0):,} parameters, sha256 {meta['sha256'][:16]}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from fedhpc.stages.plan import plan_round

    ctx = context(a.config)
    plan = plan_round(ctx.cfg, ctx.layout, ctx.trust, a.round)
    for site, e in plan["sites"].items():
        print(f"round {a.round}: {site}: {len(e['shards'])} shards, {e['tokens']} tokens ({e['reason']})")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from fedhpc.training.sites import site_ranks

    ctx = context(a.config)
    site = ctx.cfg.sites.get(a.site)
    if site is None:
        raise SystemExit(
            f"fedhpc train: {a.site!r} is not a site of {a.config}; sites: {', '.join(sorted(ctx.cfg.sites))}"
        )
    if a.exited is not None:  # the job's shell, after the training process ended with this code
        from fedhpc.stages.failures import record_exit

        rec = record_exit(ctx.layout, a.round, a.site, a.exited, a.attempt, a.attempts)
        print(f"fedhpc train: attempt {a.attempt} of {a.attempts} failed: {rec['error']}", file=sys.stderr)
        return a.exited
    if os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) == "0":
        from fedhpc.stages.failures import record_start

        record_start(ctx.layout, a.round, a.site, a.attempt, a.attempts)  # before torch's import: seconds count
    from fedhpc.stages.train import local_spawn_argv, run_train_job
    from fedhpc.training import distributed  # torch: not needed to record a failure

    world = distributed.detect()
    ranks = site_ranks(site)
    if ranks > 1 and not world.distributed:
        if site.nodes > 1:
            raise SystemExit(
                f"fedhpc train: site {a.site!r} spans {site.nodes} nodes; launch it with srun "
                "inside a Slurm allocation (see profiles/ and docs/running-on-lumi.md)"
            )
        # No launcher gave us ranks: start them here, one node, CPU threads shared out.
        argv = [
            "train",
            "--config",
            a.config,
            "--round",
            str(a.round),
            "--site",
            a.site,
            "--threads",
            str(max(1, a.threads // ranks)),
            "--status",
            a.status,
            f"--attempt={a.attempt}",
            f"--attempts={a.attempts}",
        ]
        os.execv(sys.executable, local_spawn_argv(argv, ranks))
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", a.threads)) if world.launcher == "slurm" else a.threads
    status = run_train_job(
        ctx.cfg, ctx.layout, ctx.trust, a.round, a.site, threads, Path(a.status), a.attempt, a.attempts
    )
    if world.is_main:
        print(json.dumps(status))
    return 0


def cmd_gather(a: argparse.Namespace) -> int:
    from fedhpc.exchange.hub import announce_stop, withdraw_stop
    from fedhpc.stages.gather import QuorumError, gather

    ctx = context(a.config, with_task=False)
    staged = ctx.cfg.exchange.kind != "local"
    if staged:
        withdraw_stop(ctx.cfg.exchange, ctx.layout)
    try:
        rec = gather(ctx.cfg, ctx.layout, ctx.trust, a.round)
    except QuorumError as exc:
        if staged:
            announce_stop(ctx.cfg.exchange, ctx.layout, ctx.trust, a.round, str(exc))
        raise
    print(
        f"round {a.round}: arrived {', '.join(rec['arrived']) or 'none'}; missing {', '.join(rec['missing']) or 'none'}"
    )
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from fedhpc.stages.verify import verify_round
    from fedhpc.trust.checkpoints import load_global_meta

    ctx = context(a.config)
    base = load_global_meta(ctx.layout, ctx.trust, a.round)
    s = verify_round(ctx.cfg, ctx.layout, ctx.trust, a.round, base)
    print(f"round {a.round}: accepted {', '.join(s['accepted']) or 'none'}")
    for site, why in s["rejected"].items():
        print(f"round {a.round}: REJECTED {site}: {'; '.join(why)}")
    return 0


def cmd_aggregate(a: argparse.Namespace) -> int:
    from fedhpc.stages.aggregate import aggregate_round
    from fedhpc.trust.checkpoints import load_global_meta

    ctx = context(a.config)
    base = load_global_meta(ctx.layout, ctx.trust, a.round)
    rec = aggregate_round(ctx.cfg, ctx.layout, a.round, base, ctx.trust, threads=a.threads)
    if rec:  # rank 0 of an MPI aggregation (or the only process) reports
        eps = f", DP ε = {rec['privacy']['epsilon']:.3g}" if rec.get("privacy") else ""
        print(
            f"round {a.round}: {rec['strategy']}/{rec['rule']}, weights {json.dumps(rec['weights'])}, "
            f"{rec['bytes_read'] / 1e6:.1f} MB read in {rec['seconds']:.2f} s on {rec['ranks']} rank(s){eps}"
        )
    return 0


def _model_of(layout: RunLayout, r: int, which: str) -> Path:
    return layout.global_model(r) if which == "global" else layout.candidate(r)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from fedhpc.stages.evaluate import evaluate_part
    from fedhpc.trust.checkpoints import load_global_meta
    from fedhpc.trust.signing import COORDINATOR

    ctx = context(a.config)
    holder = a.site or COORDINATOR
    meta = load_global_meta(ctx.layout, ctx.trust, a.round)
    out = ctx.layout.eval_part(a.round, a.which, holder)
    model = _model_of(ctx.layout, a.round, a.which)
    doc = evaluate_part(ctx.cfg, ctx.layout, ctx.trust, model, meta, holder, out, a.threads)
    scores = ", ".join(f"{d} {v['loss']:.4f}" for d, v in doc["domains"].items() if v.get("loss") is not None)
    print(f"round {a.round} {a.which}, held out by {holder}: {scores or 'no held-out data here'}")
    return 0


def cmd_merge_eval(a: argparse.Namespace) -> int:
    from fedhpc.cli.exchange import eval_fetcher
    from fedhpc.stages.evaluate import gather_parts

    ctx = context(a.config, with_task=False)
    out = ctx.layout.global_eval(a.round) if a.which == "global" else ctx.layout.candidate_eval(a.round)
    model = _model_of(ctx.layout, a.round, a.which)
    res = gather_parts(ctx.cfg, ctx.layout, ctx.trust, a.round, a.which, model, eval_fetcher(ctx, a.round, a.which))
    write_json(out, res)
    print(
        f"round {a.round} {a.which}: held-out loss {res['loss']} over {', '.join(res['domains'])}"
        + (f"; missing scores from {', '.join(res['missing'])}" if res["missing"] else "")
    )
    return 0


def cmd_promote(a: argparse.Namespace) -> int:
    from fedhpc.stages.promote import promote_round
    from fedhpc.trust.checkpoints import load_global_meta

    ctx = context(a.config, with_task=False)
    meta = promote_round(ctx.cfg, ctx.layout, ctx.trust, a.round, load_global_meta(ctx.layout, ctx.trust, a.round))
    print(f"round {a.round + 1} global from {meta['source']}: {meta['reason']}")
    return 0


def cmd_track(a: argparse.Namespace) -> int:
    from fedhpc.stages.track import track_round

    ctx = context(a.config)
    rec = track_round(ctx.cfg, ctx.layout, a.round)
    print(f"round {a.round}: MLflow model version {rec['model_version']} at {rec['tracking_uri']}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from fedhpc.stages.report import write_report

    ctx = context(a.config)
    summary = write_report(ctx.cfg, ctx.layout)
    if ctx.cfg.tracking.mlflow:
        from fedhpc.stages.track import finish

        finish(ctx.cfg, ctx.layout, summary, ctx.layout.report_dir / "index.html")
    print(
        f"held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}; "
        f"report: {ctx.layout.report_dir / 'index.html'}"
    )
    return 0


def cmd_exchange(a: argparse.Namespace) -> int:
    from fedhpc.cli.exchange import exchange_action

    ctx = context(a.config, with_task=False)
    print(exchange_action(ctx.cfg, ctx.layout, ctx.trust, a.action, a.round, a.which))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedhpc", description=__doc__)
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, fn, help: str, config: bool = True, round: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        if config:
            sp.add_argument("--config", default="config.yaml", help="config file (YAML or JSON)")
        if round:
            sp.add_argument("--round", type=int, required=True)
        sp.set_defaults(fn=fn)
        return sp

    c = verb("config", cmd_config, "check a config, or print its schema or reference docs", config=False)
    c.add_argument("action", choices=["check", "schema", "docs"])
    c.add_argument("file", nargs="?", default="config.yaml")
    c.add_argument("--write", metavar="PATH", help="write schema/docs to PATH instead of stdout")
    add_trust_verbs(verb)
    s = verb("synth", cmd_synth, "generate the synthetic corpus: the shared domains, or a site's own (--site)")
    s.add_argument("--site", help="generate the domains pinned to this site (default: the shared ones)")
    s.add_argument("--out", help="output directory (default: <run>/data/corpus, or data/sites/<site>/corpus)")
    sh = verb("shard", cmd_shard, "pack the shared sources (manifest), or a site's own (--site: its catalogue)")
    sh.add_argument("--site", help="pack the sources pinned to this site and sign its catalogue")
    verb("init", cmd_init, "create the initial global model")
    verb("plan", cmd_plan, "assign shards to sites for a round", round=True)
    t = verb("train", cmd_train, "run one site's local round", round=True)
    t.add_argument("--site", required=True)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--status", required=True, help="where to write the job's status record")
    t.add_argument("--attempt", type=int, default=1, help="this job's attempt (Snakemake's retries count on)")
    t.add_argument("--attempts", type=int, default=1, help="attempts the workflow allows (its retries + 1)")
    t.add_argument(
        "--exited", type=int, metavar="CODE", help="record that this attempt's training process ended with CODE"
    )
    verb("gather", cmd_gather, "wait for updates until all arrive or the deadline", round=True)
    verb("verify", cmd_verify, "verify every arrived update", round=True)
    ag = verb("aggregate", cmd_aggregate, "aggregate accepted updates into the candidate model", round=True)
    ag.add_argument("--threads", type=int, default=1, help="worker threads (shared out over MPI ranks)")
    e = verb("evaluate", cmd_evaluate, "held-out evaluation of a round's global or candidate model", round=True)
    e.add_argument("--which", choices=["global", "candidate"], required=True)
    e.add_argument("--site", help="score on this site's own held-out data (default: the coordinator's shared)")
    e.add_argument("--threads", type=int, default=1)
    me = verb("merge-eval", cmd_merge_eval, "wait for every holder's held-out scores and merge them", round=True)
    me.add_argument("--which", choices=["global", "candidate"], required=True)
    verb("promote", cmd_promote, "gate the candidate: next global model, or roll back", round=True)
    verb("track", cmd_track, "log a finished round to MLflow", round=True)
    verb("report", cmd_report, "write summary.json and report/index.html")
    x = verb("exchange", cmd_exchange, "offer (coordinator), pull or publish (site) a round's signed bundle")
    x.add_argument("action", choices=sorted(EXCHANGE_ACTIONS))
    x.add_argument("--round", type=int, default=0)
    x.add_argument("--which", choices=["global", "candidate"], default="candidate")
    add_tool_verbs(verb)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        if args.verb != "run":
            p.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.snakemake_args = unknown + args.snakemake_args  # `fedhpc run --dry-run` needs no `--`
    # A mapped input truncated under a reader faults (SIGBUS): print where, not just the signal.
    with contextlib.suppress(AttributeError, ValueError, OSError):  # no real stderr (embedded, captured)
        faulthandler.enable()
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except (FedhpcError, PermissionError) as exc:
        if os.environ.get("FEDHPC_DEBUG"):
            raise
        print(f"fedhpc {args.verb}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
