"""The operator verbs of `fedhpc`: run, submit, doctor, status, container, export and serve."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import context


def cmd_export(a: argparse.Namespace) -> int:
    from fedhpc.ops.export import export_model

    ctx = context(a.config)
    rec = export_model(ctx.cfg, ctx.layout, ctx.trust, Path(a.model), Path(a.out))
    print(f"exported round {rec['round']} ({rec['sha256'][:16]}) as {rec.get('architecture')} to {rec['out']}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from fedhpc.ops.serve import load_served, make_server

    served = load_served(a.model_dir, a.threads)
    server = make_server(served, a.host, a.port)
    host, port = server.server_address[:2]
    print(f"serving {a.model_dir} on http://{host}:{port}{served.route}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from fedhpc.cli import warm
    from fedhpc.ops.run import dry_run, run

    extra = a.snakemake_args[1:] if a.snakemake_args[:1] == ["--"] else a.snakemake_args
    with warm.started(Path(a.directory) / ".snakemake" / "log", enabled=not (a.cold or dry_run(extra))) as env:
        return run(a.profile, a.configfile, a.directory, extra, a.role, a.site, a.progress_every, env)


def cmd_submit(a: argparse.Namespace) -> int:
    from fedhpc.ops.submit import submit

    job = submit(a.profile, a.configfile, a.directory, a.logs)
    print(f"submitted the head process as Slurm job {job.job_id}")
    print(f"  stdout: {job.paths.stdout}")
    print(f"  stderr: {job.paths.stderr}")
    print(f"follow it with: squeue -j {job.job_id}; tail -f {job.paths.stdout}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from fedhpc.ops.doctor import doctor, format_report, report_json

    checks = doctor(a.profile, a.configfile, a.directory, a.site)
    print(report_json(checks) if a.json else format_report(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_container(a: argparse.Namespace) -> int:
    from fedhpc.ops.containers import DEFINITIONS, build, problems

    names = list(DEFINITIONS) if a.name == "all" else [a.name]
    if a.action == "check":
        found = [p for n in names for p in problems(n)]
        for p in found:
            print(p, file=sys.stderr)
        print(f"checked {', '.join(names)}: {'ok' if not found else f'{len(found)} problem(s)'}")
        return 1 if found else 0
    for n in names:
        print(f"built {build(n, Path(a.out), a.mode, Path(a.tmpdir) if a.tmpdir else None)}")
    return 0


def cmd_status(a: argparse.Namespace) -> int:
    import time

    from fedhpc.stages.status import format_status, snapshot, watch

    layout = RunLayout.of(a.run_dir)
    if not layout.root.is_dir():
        raise SystemExit(f"fedhpc status: {a.run_dir} is no run directory (expected results/<run>/)")
    if a.watch:
        return watch(layout, a.interval)
    now = time.time()
    print(format_status(*snapshot(layout, now), now))
    return 0


def add_verbs(verb) -> None:
    """Register the operator verbs with `verb(name, fn, help, config=...)` of cli.parser."""
    ex_ = verb("export", cmd_export, "export a global model as a Hugging Face directory (+ model card)")
    ex_.add_argument("model", help="a global model, e.g. results/<run>/rounds/r0004/global/model.safetensors")
    ex_.add_argument("out", help="directory to write")
    sv = verb(
        "serve",
        cmd_serve,
        "serve an exported model: POST /v1/completions (causal LM) or /v1/embeddings (sentence embeddings)",
        config=False,
    )
    sv.add_argument("model_dir", help="a directory written by `fedhpc export`")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free one; the address is printed)")
    sv.add_argument("--threads", type=int, default=1)
    rn = verb("run", cmd_run, "run the workflow (rerun the same command to resume after any crash)", config=False)
    rn.add_argument("--profile", default="profiles/local", help="Snakemake profile (default: profiles/local)")
    rn.add_argument("--configfile", help="config file (default: the workflow's config.yaml)")
    rn.add_argument("--directory", default=".", help="working directory (default: .)")
    rn.add_argument("--role", choices=["all", "coordinator", "site"], help="multi-site mode: what this side runs")
    rn.add_argument("--site", help="multi-site mode: the site this side is (implies --role site)")
    rn.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="S",
        help="a progress line when a round starts or ends and every S s in between (0: none; default 60)",
    )
    rn.add_argument(
        "--cold",
        action="store_true",
        help="every job on this host starts its own Python (default: a warm process with torch imported forks them)",
    )
    rn.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="further arguments, passed to snakemake")
    sb = verb("submit", cmd_submit, "run the workflow's head process as its own Slurm job (submitit)", config=False)
    sb.add_argument("--profile", required=True, help="Snakemake profile; its head.yaml sets the head job")
    sb.add_argument("--configfile", help="config file (default: the workflow's config.yaml)")
    sb.add_argument("--directory", default=".", help="working directory (default: .)")
    sb.add_argument("--logs", default="logs/head", help="where the head job's logs go (default: logs/head)")
    dr = verb(
        "doctor", cmd_doctor, "check Slurm, account, images, storage and hub before the first submission", config=False
    )
    dr.add_argument("--profile", default="profiles/local", help="Snakemake profile (default: profiles/local)")
    dr.add_argument("--configfile", help="config file (default: config.yaml in --directory)")
    dr.add_argument("--directory", default=".", help="working directory (default: .)")
    dr.add_argument("--site", help="multi-site mode: check only what this site runs")
    dr.add_argument("--json", action="store_true", help="print the checks as JSON")
    from fedhpc.ops.containers import BUILD_MODES

    ct = verb("container", cmd_container, "check or build the Apptainer images (rocm, cuda, cpu)", config=False)
    ct.add_argument("action", choices=["check", "build"])
    ct.add_argument("name", nargs="?", default="all", choices=["rocm", "cuda", "cpu", "all"])
    ct.add_argument("--out", default="containers/images", help="where built .sif images go")
    ct.add_argument(
        "--mode",
        choices=BUILD_MODES,
        default="auto",
        help="how to build without root: fakeroot, proot (SingularityCE; LUMI, after `module load systools`), "
        "root; auto (default): root if you are, proot if SingularityCE finds it, else fakeroot",
    )
    ct.add_argument(
        "--tmpdir",
        help="the build's cache and temp dirs go under it (default: exported *_CACHEDIR/*_TMPDIR, else $TMPDIR "
        "or /tmp; never under $HOME)",
    )
    st = verb("status", cmd_status, "rounds × sites, wall times, deadlines, the sites' steps, the ETA", config=False)
    st.add_argument("run_dir", help="the run directory, results/<run>/ (a site's own one in multi-site mode)")
    st.add_argument("--watch", action="store_true", help="refresh until the federation is done (Ctrl-C stops)")
    st.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
