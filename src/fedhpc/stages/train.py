"""One site's job in one round: pull the global model and plan, train, publish update + receipt."""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedhpc.aggregation.compress import Codec, codec_metadata, encode_with_feedback
from fedhpc.config.federation import Config, SiteConfig
from fedhpc.core.files import append_jsonl, exclusive_lock, finite_or_none, read_json, sha256_file, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.core.tensorfile import load_state, save_state
from fedhpc.data.allocation import stable_seed
from fedhpc.data.catalogue import load_data
from fedhpc.data.shards import read_shard
from fedhpc.data.taskdata import verified_file
from fedhpc.stages.context import Ctx
from fedhpc.stages.failures import clear_failure, is_deterministic, record_failure
from fedhpc.stages.progress import train_line
from fedhpc.tasks import RoundContext, load_task
from fedhpc.tasks.lm import TrainingError
from fedhpc.training import distributed, site_state
from fedhpc.training.devices import pick_device
from fedhpc.training.distributed import World
from fedhpc.training.sites import site_ranks
from fedhpc.training.sysinfo import SystemProbe
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.checkpoints import load_global_meta, load_plan
from fedhpc.trust.scrub import outgoing_receipt
from fedhpc.trust.signing import SignatureError, TrustStore, sign_document, verify_document

__all__ = ["TrainingError", "train_site", "run_train_job", "run"]


def accelerator_env(accelerator: str, world: World, tmp: str | None = None) -> dict[str, str]:
    """Per-job, per-rank MIOpen caches on ROCm: the default shared cache in $HOME is a SQLite
    file that concurrent ranks and jobs corrupt or lock (a known LUMI pitfall)."""
    if accelerator != "rocm":
        return {}
    base = (
        Path(tmp or os.environ.get("TMPDIR", "/tmp"))
        / f"miopen-{os.environ.get('SLURM_JOB_ID', os.getpid())}-{world.rank}"
    )
    return {"MIOPEN_USER_DB_PATH": str(base), "MIOPEN_CUSTOM_CACHE_DIR": str(base)}


def existing_receipt(layout: RunLayout, trust: TrustStore, r: int, site: str, base_sha: str) -> dict | None:
    """A receipt this site already published for this round and base, whose update is intact."""
    path = layout.receipt(r, site)
    if not path.exists():
        return None
    try:
        receipt = read_json(path)
        verify_document(receipt, trust, site, str(path))
    except (ValueError, SignatureError):
        return None
    if receipt.get("base_sha256") != base_sha or not layout.update(r, site).exists():
        return None
    return receipt if sha256_file(layout.update(r, site)) == receipt.get("update_sha256") else None


def local_spawn_argv(argv: list[str], ranks: int) -> list[str]:
    """Re-launch `fedhpc train` as `ranks` local processes (no Slurm step to provide them)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={ranks}",
        "-m",
        "fedhpc",
        *argv,
    ]


# What the ledger's `update.published` says, all of it from the signed receipt.
PUBLISHED_FIELDS = ("update_sha256", "tokens", "steps", "ranks", "engine", "loss_before", "loss_after")


def audit_published(audit: AuditLog, r: int, site: str, receipt: dict, **extra: Any) -> None:
    audit.append("update.published", round=r, site=site, **{k: receipt.get(k) for k in PUBLISHED_FIELDS}, **extra)


def recorded_publish(layout: RunLayout, r: int, site: str, receipt: dict) -> None:
    """Put a published update found in place (its receipt intact) in the ledger, unless it is there:
    a job killed between writing its receipt and its ledger line left the update published but
    unrecorded, and the job that finds it is the one that can say so. Only on this rare path is
    the whole ledger read."""
    audit = AuditLog(layout.audit)
    if any(e["event"] == "update.published" and (e.get("round"), e.get("site")) == (r, site) for e in audit.events()):
        return
    audit_published(audit, r, site, receipt, recorded_late=True)


def _precheck(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, site: str) -> dict | None:
    """A final status when there is nothing to train, else None. Taken by rank 0 alone."""
    if layout.arrivals(r).exists():
        return {"state": "round-closed", "detail": "the coordinator closed this round before the job ran"}
    entry = load_plan(layout, trust, r)["sites"].get(site)
    if not entry or not entry["shards"]:
        return {"state": "not-planned"}
    trust.private_key(site)  # fail now, not after training, when this site cannot sign its receipt
    base = load_global_meta(layout, trust, r)
    if (done := existing_receipt(layout, trust, r, site, base["sha256"])) is not None:
        recorded_publish(layout, r, site, done)
        return {"state": "published", "reused": True, "update_sha256": done["update_sha256"]}
    return None


def _check_catalogue_unchanged(layout: RunLayout, plan: dict, site: str) -> None:
    """The shards this site trains are the ones the plan was made from: a catalogue rebuilt
    since (other shards under the same ids) would train on data the coordinator never saw listed."""
    planned = plan.get("catalogues", {}).get(site)
    if planned is not None and sha256_file(layout.catalogue(site)) != planned:
        raise TrainingError(
            f"site {site!r}: {layout.catalogue(site)} changed since round {plan['round']} was planned "
            "(data rebuilt?); the coordinator must plan from the new catalogue"
        )


def _single_process_group_for_deepspeed(world: World, device: torch.device | None = None) -> None:
    # DeepSpeed always wants a process group, even for one rank; on a GPU with NCCL for ZeRO's
    # device tensors beside gloo, as a site of several ranks has (distributed.backend).
    if world.distributed or torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(distributed.backend(device or torch.device("cpu")), rank=0, world_size=1)


def train_site(cfg: Config, layout: RunLayout, trust: TrustStore, r: int, site: str, threads: int) -> dict:
    """Run site `site`'s local round `r` on every rank; rank 0 publishes and returns the status."""
    world = distributed.detect()
    device = join_ranks(cfg, site, world)
    status = distributed.broadcast(_precheck(cfg, layout, trust, r, site) if world.is_main else None, world)
    if status is not None:
        return status
    plan = load_plan(layout, trust, r)
    entry = plan["sites"][site]
    base = load_global_meta(layout, trust, r, check_hash=world.is_main)
    torch.set_num_threads(threads)
    torch.manual_seed(stable_seed(cfg.seed, "train", r, site))
    audit = AuditLog(layout.audit)
    if world.is_main:
        audit.append(
            "train.started",
            round=r,
            site=site,
            shards=entry["shards"],
            ranks=world.size,
            engine=cfg.sites[site].engine,
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_cluster=os.environ.get("SLURM_CLUSTER_NAME"),
        )
    global_state = load_state(layout.global_model(r))
    started = time.time()
    result = _local_round(cfg, layout, trust, r, site, threads, world, device, plan, base, global_state)
    distributed.barrier(world)
    if not world.is_main:
        return {"state": "published", "rank": world.rank}
    trained = Trained(result, world, device, threads, started)
    return publish_update(cfg, layout, trust, r, site, plan, base, global_state, trained, audit)


def join_ranks(cfg: Config, site: str, world: World, timeout: float | None = None) -> torch.device:
    """This rank's caches, device and process group (kept when it exists: a resident job's)."""
    for key, value in accelerator_env(cfg.sites[site].accelerator, world).items():
        os.environ.setdefault(key, value)
        Path(value).mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.training.device, site, cfg.sites[site].accelerator, world)
    distributed.init(world, device, timeout)
    return device


def _local_round(
    cfg: Config,
    layout: RunLayout,
    trust: TrustStore,
    r: int,
    site: str,
    threads: int,
    world: World,
    device: torch.device,
    plan: dict,
    base: dict,
    global_state: dict,
):
    """The task's local round on the shards the plan gave this site, logging each step's metrics."""
    site_cfg = cfg.sites[site]
    data = load_data(layout, trust, [site])
    _check_catalogue_unchanged(layout, plan, site)
    entry = plan["sites"][site]
    shards = {s["id"]: s for s in data["shards"]}
    task = load_task(cfg)
    if site_cfg.engine == "deepspeed":
        _single_process_group_for_deepspeed(world, device)
    probe = SystemProbe()
    metrics_path = layout.metrics(r, site)
    if world.is_main:
        metrics_path.unlink(missing_ok=True)  # a killed earlier attempt leaves a partial log

    def log(rec: dict) -> None:
        if world.is_main:
            append_jsonl(metrics_path, {"round": r, "site": site, "time": time.time(), **rec, **probe.sample()})
            print(train_line(r, site, rec), flush=True)  # stdout is the job's train.log: a person reads it

    return task.train_round(
        RoundContext(
            cfg=cfg,
            layout=layout,
            site=site,
            site_cfg=site_cfg,
            round=r,
            world=world,
            device=device,
            threads=threads,
            global_state=global_state,
            global_meta=base,
            plan_entry=entry,
            shards=[shards[sid] for sid in entry["shards"]],
            read_shard=lambda s: (
                read_shard(layout, s, trust=trust) if task.uses_tokens else verified_file(layout, s, f"shard {s['id']}")
            ),
            log=log,
            seed=lambda purpose: stable_seed(cfg.seed, purpose, r, site),
            progress=lambda f: (r + f) / cfg.rounds.count,
        )
    )


@dataclass
class Trained:
    """A finished local round and where it ran, as rank 0 publishes it."""

    result: Any  # tasks.LocalResult
    world: World
    device: torch.device
    threads: int
    started: float


def publish_update(
    cfg: Config,
    layout: RunLayout,
    trust: TrustStore,
    r: int,
    site: str,
    plan: dict,
    base: dict,
    global_state: dict,
    trained: Trained,
    audit: AuditLog,
) -> dict:
    """Rank 0 publishes the update (local - global, encoded or masked), SCAFFOLD's control
    variate and, last, the signed receipt; unless another job of this site-round already did."""
    with exclusive_lock(layout.publish_lock(r, site)) as locked:
        if not locked:
            print(f"warning: no flock on {layout.publish_lock(r, site).parent}; publishing unlocked", file=sys.stderr)
        # Another job of this site-round (Slurm's requeue and Snakemake's retry of one failure)
        # may have published while this one trained: its update and receipt stand and ours is
        # dropped, so update, receipt, control variates and error-feedback residual come from one
        # job (the optimizer state, saved while training, is from whichever of the two ended last).
        if (done := existing_receipt(layout, trust, r, site, base["sha256"])) is not None:
            recorded_publish(layout, r, site, done)
            audit.append("update.duplicate_dropped", round=r, site=site, kept_sha256=done["update_sha256"])
            return {"state": "published", "reused": True, "update_sha256": done["update_sha256"]}
        result = trained.result
        local = result.state
        update = {k: local[k] - global_state[k].float() for k in local}
        codec = site_codec(cfg, site)
        meta = {"run": cfg.run, "round": str(r), "site": site, "base_sha256": base["sha256"], **codec_metadata(codec)}
        outgoing: dict = {}
        if cfg.strategy.secure_aggregation.enabled:
            from fedhpc.aggregation.secure import masked_update

            tensors, masked_meta, outgoing = masked_update(
                cfg, trust, plan, site, update, result.tokens, result.samples
            )
            meta.update(masked_meta)
        else:
            tensors = encode_update(cfg, layout, site, r, update, codec)
        save_state(layout.update(r, site), tensors, meta)
        control = {}
        if result.correction is not None and result.correction.scaffold:
            c_new, c_delta = result.correction.control_update()
            save_state(layout.control_update(r, site), c_delta, meta)
            site_state.save_tensors(layout, site, "control", r, c_new)
            control = {
                "control_sha256": sha256_file(layout.control_update(r, site)),
                "control_bytes": layout.control_update(r, site).stat().st_size,
            }
        receipt = receipt_of(cfg, layout, r, site, plan["sites"][site], base, codec, trained, control, outgoing)
        receipt = outgoing_receipt(cfg.trust.scrub, layout.metrics(r, site), receipt)  # no user, host or path leaves
        receipt = sign_document(receipt, site, trust.private_key(site))
        write_json(layout.receipt(r, site), receipt)  # last: its presence means "update published"
        site_state.prune(layout, site, keep_from=r)
        site_state.prune_tensors(layout, site, keep_from=r)
        audit_published(audit, r, site, receipt)
        return {
            "state": "published",
            "reused": False,
            "update_sha256": receipt["update_sha256"],
            "ranks": trained.world.size,
        }


def receipt_of(
    cfg: Config,
    layout: RunLayout,
    r: int,
    site: str,
    entry: dict,
    base: dict,
    codec: Codec,
    trained: Trained,
    control: dict,
    outgoing: dict,
) -> dict:
    """The receipt of a published update, before scrubbing and signing: what was trained on
    what, how, where and how fast, with the update's hash."""
    result, world = trained.result, trained.world
    return {
        "run": cfg.run,
        "round": r,
        "site": site,
        "base_round": r,
        "base_sha256": base["sha256"],
        "update_sha256": sha256_file(layout.update(r, site)),
        "update_bytes": layout.update(r, site).stat().st_size,
        "compression": codec.scheme,
        **control,
        "shards": entry["shards"],
        "task": cfg.task.name,
        "tokens": result.tokens,
        "sequences": result.samples,
        "steps": result.steps,
        "ranks": world.size,
        "launcher": world.launcher,
        **result.receipt,
        "lr_first": result.lr_first,
        "lr_last": result.lr_last,
        "lr_sum": result.lr_sum,
        "loss_before": finite_or_none(result.loss_before),
        "loss_after": finite_or_none(result.loss_after),
        "train_loss_last": finite_or_none(result.train_loss_last),
        "tokens_per_second": result.tokens / max(result.seconds, 1e-9),
        "train_seconds": result.seconds,
        "started_at": trained.started,
        "finished_at": time.time(),
        "device": str(trained.device),
        "threads": trained.threads,
        "accelerator_declared": cfg.sites[site].accelerator,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_cluster": os.environ.get("SLURM_CLUSTER_NAME"),
        "host": socket.gethostname(),
        **outgoing,
    }


def site_codec(cfg: Config, site: str) -> Codec:
    c = cfg.training.compression
    return Codec(scheme=cfg.sites[site].compression or c.scheme, block=c.block, topk_fraction=c.topk_fraction)


def encode_update(
    cfg: Config, layout: RunLayout, site: str, r: int, update: dict[str, torch.Tensor], codec: Codec
) -> dict[str, torch.Tensor]:
    """The tensors the site sends; what lossy compression drops is kept here for the next round."""
    if codec.scheme == "none":
        return update
    feedback = cfg.training.compression.error_feedback
    residual = site_state.latest_tensors(layout, site, "residual", r)[0] if feedback else {}
    parts, kept = {}, {}
    for name, delta in update.items():
        enc, res = encode_with_feedback(name, delta, codec, residual.get(name) if feedback else None)
        parts.update(enc)
        if res is not None:
            kept[name] = res
    if feedback and kept:
        # Saved before the receipt: a job killed in between redoes the round from the older residual.
        site_state.save_tensors(layout, site, "residual", r, kept)
    return parts


def run_train_job(
    cfg: Config,
    layout: RunLayout,
    trust: TrustStore,
    r: int,
    site: str,
    threads: int,
    status_path: Path,
    attempt: int = 1,
    attempts: int = 1,
    keep_group: bool = False,
) -> dict:
    """Train and write the job's status. A failure is recorded for the coordinator (stages/failures.py);
    a deterministic one (bad data, config, a round the site cannot train) ends the job with
    status "failed" and success, so that no retry or requeue repeats it; any other is raised.
    The ranks' process group ends with the job, unless `keep_group` (a resident job's next round)."""
    t0 = time.time()
    main = distributed.detect().is_main
    try:
        status = train_site(cfg, layout, trust, r, site, threads)
    except Exception as exc:
        deterministic = is_deterministic(exc)
        error = str(exc) if deterministic else f"{type(exc).__name__}: {exc}"
        if main:  # another rank's own failure is recorded by the job's shell (record_exit)
            record_failure(layout, r, site, error, deterministic, attempt, attempts)
        if not deterministic:
            raise
        print(f"fedhpc train: error (deterministic, so not retried): {error}", file=sys.stderr)
        status = {"state": "failed", "error": error, "deterministic": True, "attempt": attempt}
        if not main:
            status["rank"] = distributed.detect().rank
    finally:
        if not keep_group:
            distributed.shutdown()
    if main and status["state"] == "published":
        clear_failure(layout, r, site)  # an earlier attempt's failure is history (the audit log keeps it)
    if status.get("rank", 0) == 0:
        status.update(round=r, site=site, seconds=time.time() - t0, slurm_job_id=os.environ.get("SLURM_JOB_ID"))
        write_json(status_path, status)
    return status


def run(
    ctx: Ctx, r: int, site: str, threads: int, status: Path, attempt: int, attempts: int, config: str
) -> dict | None:
    """The train stage: `site`'s job in round r. A multi-rank site that no launcher gave ranks
    (one node, no srun) re-executes itself as that many local ranks, each with its share of the
    threads; otherwise this rank trains, and rank 0 returns the job's status."""
    argv = ["train", "--config", config, "--round", str(r), "--site", site, "--status", str(status)]
    threads = start_ranks(site, ctx.cfg.sites[site], [*argv, f"--attempt={attempt}", f"--attempts={attempts}"], threads)
    result = run_train_job(ctx.cfg, ctx.layout, ctx.trust, r, site, threads, status, attempt, attempts)
    return result if distributed.detect().is_main else None


def start_ranks(site: str, spec: SiteConfig, argv: list[str], threads: int) -> int:
    """A multi-rank site that no launcher gave ranks (one node, no srun): re-execute the command
    `fedhpc <argv>` as that many local ranks, each with its share of the threads. Otherwise this
    process is a rank: the threads it may use (srun's cores per task under Slurm)."""
    ranks = site_ranks(spec)
    world = distributed.detect()
    if ranks > 1 and not world.distributed:
        if spec.nodes > 1:
            raise SystemExit(
                f"fedhpc {argv[0]}: site {site!r} spans {spec.nodes} nodes; launch it with srun "
                "inside a Slurm allocation (see profiles/ and docs/running-on-lumi.md)"
            )
        os.execv(sys.executable, local_spawn_argv([*argv, "--threads", str(max(1, threads // ranks))], ranks))
    if world.launcher == "slurm":
        return int(os.environ.get("SLURM_CPUS_PER_TASK", threads))
    return threads
