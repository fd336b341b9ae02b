"""The `fedhpc` command: one verb per workflow stage, plus status, audit and config tools."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import functools
import json
import os
import sys
from pathlib import Path

from fedhpc.cli.tools import add_verbs as add_tool_verbs
from fedhpc.cli.trust import add_verbs as add_trust_verbs
from fedhpc.config.schema import ConfigError, config_schema
from fedhpc.core.errors import FedhpcError
from fedhpc.stages.context import context
from fedhpc.stages.exchange import EXCHANGE_ACTIONS
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
    from fedhpc.stages import shard

    corpus = shard.run_synth(context(a.config, with_task=False), a.site, Path(a.out) if a.out else None)
    for name, d in corpus["domains"].items():
        print(
            f"{name}: {d['bytes']} bytes, {d['documents']} documents, entropy rate {d['entropy_rate_bits_per_byte']:.3f} bits/byte"
        )
    return 0


def cmd_shard(a: argparse.Namespace) -> int:
    from fedhpc.stages import shard

    ctx = context(a.config)
    doc = shard.run(ctx, a.site)
    where = (
        f"site {a.site}: catalogue {ctx.layout.catalogue(a.site)}"
        if a.site
        else f"shared: manifest {ctx.layout.manifest}"
    )
    print(f"{where}: {len(doc['shards'])} shards, held-out domains {', '.join(h['domain'] for h in doc['heldout'])}")
    return 0


def cmd_shard_tokenizer(a: argparse.Namespace) -> int:
    from fedhpc.stages import shard

    ctx = context(a.config)
    tok = shard.run_tokenizer(ctx)
    print(f"tokenizer {ctx.layout.tokenizer}: {tok.kind}, {tok.vocab_size} ids")
    return 0


def cmd_shard_part(a: argparse.Namespace) -> int:
    from fedhpc.stages import shard

    rec = shard.run_part(context(a.config), a.part, a.workers)
    docs, tokens = sum(f["docs"] for f in rec["files"]), sum(f["tokens"] for f in rec["files"])
    print(f"part {a.part} of {rec['jobs']}: {len(rec['files'])} files, {docs} documents, {tokens} tokens")
    return 0


def cmd_init(a: argparse.Namespace) -> int:
    from fedhpc.stages import init

    meta = init.run(context(a.config))
    print(f"initial global model: {meta.get('parameters', 0):,} parameters, sha256 {meta['sha256'][:16]}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from fedhpc.stages import plan

    doc = plan.run(context(a.config), a.round)
    for site, e in doc["sites"].items():
        print(f"round {a.round}: {site}: {len(e['shards'])} shards, {e['tokens']} tokens ({e['reason']})")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from fedhpc.stages.failures import record_exit, record_start

    ctx = context(a.config)
    if a.site not in ctx.cfg.sites:
        raise SystemExit(
            f"fedhpc train: {a.site!r} is not a site of {a.config}; sites: {', '.join(sorted(ctx.cfg.sites))}"
        )
    if a.exited is not None:  # the job's shell, after the training process ended with this code
        rec = record_exit(ctx.layout, a.round, a.site, a.exited, a.attempt, a.attempts)
        print(f"fedhpc train: attempt {a.attempt} of {a.attempts} failed: {rec['error']}", file=sys.stderr)
        return a.exited
    if os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0")) == "0":
        record_start(ctx.layout, a.round, a.site, a.attempt, a.attempts)  # before torch's import: seconds count
    from fedhpc.stages import train

    status = train.run(ctx, a.round, a.site, a.threads, Path(a.status), a.attempt, a.attempts, a.config)
    if status is not None:
        print(json.dumps(status))
    return 0


def cmd_resident(a: argparse.Namespace) -> int:
    from fedhpc.stages import resident

    ctx = context(a.config)
    spec = ctx.cfg.sites.get(a.site)
    if spec is None or not spec.resident:
        raise SystemExit(f"fedhpc resident: {a.site!r} is not a resident site of {a.config} (sites.<name>.resident)")
    if a.exited is not None:  # the job's shell, after the worker ended with this code
        rec = resident.record_exited(ctx, a.site, a.round, a.exited, a.attempt, a.attempts)
        where = f"round {rec['round']}" if rec else "between rounds"
        print(
            f"fedhpc resident: attempt {a.attempt} of {a.attempts} ended with code {a.exited} ({where})",
            file=sys.stderr,
        )
        return a.exited
    rec = resident.run(
        ctx, a.site, a.round, a.threads, Path(a.record), a.walltime_minutes, a.attempt, a.attempts, a.evaluate, a.config
    )
    if rec is not None:  # rank 0's
        print(json.dumps(rec))
    return 0


def cmd_gather(a: argparse.Namespace) -> int:
    from fedhpc.stages import gather

    rec = gather.run(context(a.config, with_task=False), a.round)
    print(
        f"round {a.round}: arrived {', '.join(rec['arrived']) or 'none'}; missing {', '.join(rec['missing']) or 'none'}"
    )
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from fedhpc.stages import verify

    s = verify.run(context(a.config), a.round)
    print(f"round {a.round}: accepted {', '.join(s['accepted']) or 'none'}")
    for site, why in s["rejected"].items():
        print(f"round {a.round}: REJECTED {site}: {'; '.join(why)}")
    return 0


def cmd_aggregate(a: argparse.Namespace) -> int:
    from fedhpc.stages import aggregate

    rec = aggregate.run(context(a.config), a.round, a.threads)
    if rec:  # rank 0 of an MPI aggregation (or the only process) reports
        eps = f", DP ε = {rec['privacy']['epsilon']:.3g}" if rec.get("privacy") else ""
        print(
            f"round {a.round}: {rec['strategy']}/{rec['rule']}, weights {json.dumps(rec['weights'])}, "
            f"{rec['bytes_read'] / 1e6:.1f} MB read in {rec['seconds']:.2f} s on {rec['ranks']} rank(s){eps}"
        )
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from fedhpc.stages import evaluate

    doc = evaluate.run(context(a.config), a.round, a.which, a.site, a.threads)
    scores = ", ".join(f"{d} {v['loss']:.4f}" for d, v in doc["domains"].items() if v.get("loss") is not None)
    print(f"round {a.round} {a.which}, held out by {doc['holder']}: {scores or 'no held-out data here'}")
    return 0


def cmd_merge_eval(a: argparse.Namespace) -> int:
    from fedhpc.stages import evaluate

    res = evaluate.run_merge(context(a.config, with_task=False), a.round, a.which)
    print(
        f"round {a.round} {a.which}: held-out loss {res['loss']} over {', '.join(res['domains'])}"
        + (f"; missing scores from {', '.join(res['missing'])}" if res["missing"] else "")
    )
    return 0


def cmd_promote(a: argparse.Namespace) -> int:
    from fedhpc.stages import promote

    meta = promote.run(context(a.config, with_task=False), a.round)
    print(f"round {a.round + 1} global from {meta['source']}: {meta['reason']}")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    from fedhpc.stages import stop

    ctx = context(a.config, with_task=False)
    if stop.run(ctx, a.stage, a.round, a.which, a.attempt, a.attempts, a.exited, a.log):
        print(f"{a.stage} of round {a.round} failed for good: the sites were told the federation stopped")
    # The job failed, and must still fail after this.
    return a.exited or 1


def cmd_retain(a: argparse.Namespace) -> int:
    from fedhpc.stages import retain

    rec = retain.run(context(a.config, with_task=False), a.round)
    print(f"round {a.round}: {len(rec['pruned'])} files past retention, {rec['bytes_freed']} bytes freed")
    return 0


def cmd_track(a: argparse.Namespace) -> int:
    from fedhpc.stages import track

    rec = track.run(context(a.config), a.round)
    print(f"round {a.round}: MLflow model version {rec['model_version']} at {rec['tracking_uri']}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from fedhpc.stages import report

    ctx = context(a.config)
    summary = report.run(ctx)
    print(
        f"held-out loss {summary['initial_eval_loss']:.4f} -> {summary['final_eval_loss']:.4f}; "
        f"report: {ctx.layout.report_dir / 'index.html'}"
    )
    return 0


def cmd_exchange(a: argparse.Namespace) -> int:
    from fedhpc.stages import exchange

    print(exchange.run(context(a.config, with_task=False), a.action, a.round, a.which))
    return 0


@functools.cache
def parser() -> argparse.ArgumentParser:
    """The command line's parser, built once per process: building it (31 verbs) was a third of what
    a small served command took (the warm process builds it for all its jobs; see `fedhpc.cli.warm`)."""
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
    verb("shard-tokenizer", cmd_shard_tokenizer, "write the run's tokenizer before the part jobs (data.shard_jobs > 1)")
    sp = verb("shard-part", cmd_shard_part, "tokenise one file group of the shared sources for `shard` to pack")
    sp.add_argument("--part", type=int, required=True, help="which group: 0 .. data.shard_jobs - 1")
    sp.add_argument("--workers", type=int, default=1, help="worker processes, each tokenising one file at a time")
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
    rs = verb("resident", cmd_resident, "train a resident site's rounds from --round on in this one job", round=True)
    rs.add_argument("--site", required=True)
    rs.add_argument("--threads", type=int, default=1)
    rs.add_argument("--record", required=True, help="where to write the segment record when the job ends")
    rs.add_argument(
        "--walltime-minutes", type=float, default=0.0, help="the job's time limit (0: none, or Slurm's end time)"
    )
    rs.add_argument("--attempt", type=int, default=1, help="this job's attempt (Snakemake's retries count on)")
    rs.add_argument("--attempts", type=int, default=1, help="attempts the workflow allows (its retries + 1)")
    rs.add_argument("--exited", type=int, metavar="CODE", help="record that the worker ended with CODE")
    rs.add_argument("--evaluate", action="store_true", help="also score each candidate on the site's held-out data")
    verb("gather", cmd_gather, "wait for updates until all arrive or the deadline", round=True)
    verb("verify", cmd_verify, "verify every arrived update", round=True)
    ag = verb("aggregate", cmd_aggregate, "aggregate accepted updates into the candidate model", round=True)
    ag.add_argument("--threads", type=int, default=1, help="worker threads (shared out over MPI ranks)")
    so = verb("stop", cmd_stop, "after a coordinator job failed: on its last attempt, tell the sites", round=True)
    so.add_argument("--stage", required=True, help="the rule that failed")
    so.add_argument("--which", choices=["global", "candidate"], help="the model an evaluation job scored")
    so.add_argument("--attempt", type=int, required=True)
    so.add_argument("--attempts", type=int, required=True)
    so.add_argument("--exited", type=int, required=True, help="the failed command's exit status (returned)")
    so.add_argument("--log", default="", help="the failed job's log, named in the notice")
    e = verb("evaluate", cmd_evaluate, "held-out evaluation of a round's global or candidate model", round=True)
    e.add_argument("--which", choices=["global", "candidate"], required=True)
    e.add_argument("--site", help="score on this site's own held-out data (default: the coordinator's shared)")
    e.add_argument("--threads", type=int, default=1)
    me = verb("merge-eval", cmd_merge_eval, "wait for every holder's held-out scores and merge them", round=True)
    me.add_argument("--which", choices=["global", "candidate"], required=True)
    verb("promote", cmd_promote, "gate the candidate: next global model, or roll back", round=True)
    verb("retain", cmd_retain, "delete the models and updates `retention:` no longer keeps", round=True)
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
