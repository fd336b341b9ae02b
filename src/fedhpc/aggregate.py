"""Streaming aggregation: read accepted updates tensor by tensor, write the candidate model."""

from __future__ import annotations

import contextlib
import os
import time

from .audit import AuditLog
from .config import Config
from .errors import FedhpcError
from .files import read_json, sha256_file, write_json
from .layout import RunLayout
from .strategies import fedavg, site_weights
from .tensorfile import open_tensors, read_specs, write_tensors


class AggregationError(FedhpcError, RuntimeError):
    """The inputs of aggregation are not the ones verification accepted."""


def aggregate_round(cfg: Config, layout: RunLayout, r: int, base: dict) -> dict:
    """FedAvg of the accepted updates onto global r → rounds/r/candidate/model.safetensors.

    Memory holds the output tensor and one input tensor at a time, whatever the number of
    sites: inputs are memory-mapped and each output tensor is written as soon as it is done.
    """
    t0 = time.perf_counter()
    verdicts = read_json(layout.verdicts(r))
    accepted = sorted(verdicts["accepted"])
    for s in accepted:
        # The file must still be the one that was verified: nothing may swap it in between.
        if sha256_file(layout.update(r, s)) != verdicts["update_sha256"][s]:
            raise AggregationError(f"{layout.update(r, s)} changed after verification; refusing to aggregate round {r}")
    receipts = {s: read_json(layout.receipt(r, s)) for s in accepted}
    weights = site_weights(receipts, cfg.strategy.weighting)
    specs = read_specs(layout.global_model(r))
    with contextlib.ExitStack() as stack:
        base_t = stack.enter_context(open_tensors(layout.global_model(r)))
        updates = [stack.enter_context(open_tensors(layout.update(r, s))) for s in accepted]
        w = [weights[s] for s in accepted]

        def produce(name: str):
            if not updates:
                return base_t[name]
            # A generator: each site's tensor is read, added and dropped before the next one.
            return fedavg(base_t[name], (u[name] for u in updates), w, cfg.strategy.server_lr)

        write_tensors(layout.candidate(r), specs, produce, {"run": cfg.run, "round": str(r), "source": "fedavg"})
    record = {
        "round": r,
        "strategy": cfg.strategy.name,
        "weighting": cfg.strategy.weighting,
        "server_lr": cfg.strategy.server_lr,
        "weights": weights,
        "excluded": verdicts["rejected"],
        "missing": read_json(layout.arrivals(r))["missing"],
        "base_sha256": base["sha256"],
        "output_sha256": sha256_file(layout.candidate(r)),
        "bytes_read": sum(layout.update(r, s).stat().st_size for s in accepted) + layout.global_model(r).stat().st_size,
        "seconds": time.perf_counter() - t0,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "note": None if accepted else "no accepted updates: the candidate equals the base model",
    }
    write_json(layout.aggregate_record(r), record)
    AuditLog(layout.audit).append(
        "round.aggregated",
        round=r,
        weights=weights,
        excluded=sorted(verdicts["rejected"]),
        output_sha256=record["output_sha256"],
    )
    return record
