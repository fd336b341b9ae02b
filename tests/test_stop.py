"""A coordinator job that fails for good tells the sites at once (its stop notice); a rerun takes it back."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from fedhpc.core.files import read_json
from fedhpc.core.layout import RunLayout
from fedhpc.exchange.hub import STOPPED, announce_stop
from fedhpc.stages import stop
from fedhpc.stages.context import context
from fedhpc.stages.exchange import needed_round, stopped_before
from fedhpc.trust.identity import create_keypair
from tests.workflow_util import BIN, env, events, run_workflow, snakemake_cmd, tiny_config, write_config


@pytest.fixture
def ctx(tmp_path):
    c = context(str(write_config(tmp_path, tiny_config(tmp_path))), with_task=False)
    create_keypair(c.trust.keys_dir, "coordinator")
    return c


@pytest.mark.parametrize(
    ("stage", "which", "last_round"),
    [
        # round 2's candidate, or what promotes it, never comes: round 3's plan does not either
        ("aggregate", None, 2),
        ("verify", None, 2),
        ("evaluate_shared", "candidate", 2),
        ("merge_eval", "candidate", 2),
        ("promote", None, 2),
        # round 2's own plan never comes
        ("plan", None, 1),
        ("evaluate_shared", "global", 1),
    ],
)
def test_the_last_attempt_signs_a_notice_that_ends_exactly_the_waits_it_dooms(ctx, stage, which, last_round):
    assert not stop.run(ctx, stage, 2, which, 1, 2, 1, "logs/x.log")
    assert not (ctx.layout.root / STOPPED).exists(), "Snakemake runs it again: nobody is told"
    assert stop.run(ctx, stage, 2, which, 2, 2, 3, "logs/x.log")
    what = f"{stage} of round 2" + (f" ({which})" if which else "")
    for action in ("pull", "pull-candidate"):
        for r in range(4):
            why = stopped_before(ctx.layout, ctx.trust, action, r)
            if needed_round(action, r) > last_round:  # waits for something the failed job would have led to
                assert (
                    why
                    == f"round {last_round}: {what} failed on its last attempt (2 of 2, exit 3); its log: logs/x.log"
                )
            else:
                assert why is None, (action, r)
    assert [e["stage"] for e in events(ctx.layout.root) if e["event"] == "federation.stopped"] == [stage]
    stop.withdraw(ctx)
    assert not (ctx.layout.root / STOPPED).exists()


def test_gathers_own_reason_is_kept(ctx):
    announce_stop(ctx.cfg.exchange, ctx.layout, ctx.trust, 1, "quorum not met: 1 of 3 sites")
    assert not stop.run(ctx, "gather", 1, None, 1, 1, 1, "logs/gather/r0001.log")
    assert read_json(ctx.layout.root / STOPPED)["reason"] == "quorum not met: 1 of 3 sites"


def test_resident_sites_stop_when_aggregation_fails_for_good_and_a_rerun_finishes(tmp_path):
    # Every site resident and willing to wait 5 minutes for a plan; round 1's aggregation fails
    # (a stand-in `fedhpc` first on PATH). The sites must stop at once, and the rerun finish.
    cfg = tiny_config(tmp_path, rounds=2)
    for site in cfg["sites"].values():
        site.update(resident=True, resident_idle_minutes=5)
    write_config(tmp_path, cfg)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "fedhpc").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = aggregate ] && [ "$5" = 0001 ]; then echo "disk full" >&2; exit 7; fi\n'
        f'exec {BIN / "fedhpc"} "$@"\n'
    )
    (shim / "fedhpc").chmod(stat.S_IRWXU)
    t0 = time.monotonic()
    failed = subprocess.run(
        snakemake_cmd(tmp_path),
        capture_output=True,
        text=True,
        env={**env(), "PATH": f"{shim}{os.pathsep}{env()['PATH']}"},
        timeout=240,
    )
    assert failed.returncode != 0
    assert time.monotonic() - t0 < 150, "the resident jobs waited for a plan that would not come"
    run = Path(cfg["output_dir"]) / cfg["run"]
    notice = read_json(run / STOPPED)
    assert notice["round"] == 1 and notice["reason"].startswith(
        "aggregate of round 1 failed on its last attempt (1 of 1, exit 7); its log: "
    )
    logs = "".join(p.read_text() for p in (run / "logs" / "resident").glob("*.log"))
    assert "the coordinator stopped the federation (round 1: aggregate of round 1 failed" in logs
    run_workflow(tmp_path)
    assert not (run / STOPPED).exists()
    assert RunLayout.of(run).global_meta(2).exists()
