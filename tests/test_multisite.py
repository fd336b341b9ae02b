"""Multi-site mode: a coordinator and two sites, each its own `fedhpc run` in its own directory,
sharing nothing but the coordinator's run directory reached with rsync over SSH (loopback sshd)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedhpc.audit import verify_ledger
from fedhpc.exchange import INDEX, SITE_FILES, complete
from fedhpc.files import read_json, sha256_file
from fedhpc.layout import RunLayout
from fedhpc.signing import TrustStore

from .workflow_util import BIN, REPO, env, tiny_config, write_config

pytestmark = pytest.mark.e2e

SITES = ("lumi", "a100")


def start(side: Path, *extra: str) -> subprocess.Popen:
    argv = [str(BIN / "fedhpc"), "run", "--profile", str(REPO / "profiles/local"), "--directory", str(side)]
    log = open(side / "run.log", "w")
    return subprocess.Popen(
        [*argv, "--configfile", str(side / "config.yaml"), *extra],
        stdout=log,
        stderr=log,
        env=env(),
        start_new_session=True,  # its own process group, so a test can kill the whole side
    )


def wait(proc: subprocess.Popen, side: Path, timeout: float) -> None:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"{side.name} did not finish:\n{(side / 'run.log').read_text()[-4000:]}") from None
    assert code == 0, f"{side.name} failed ({code}):\n{(side / 'run.log').read_text()[-6000:]}"


def keys(side: Path, name: str) -> Path:
    d = side / "results/tiny/keys"
    subprocess.run([str(BIN / "fedhpc"), "keys", "init", "--site", name, "--dir", str(d)], check=True, env=env())
    return d


def test_a_federation_across_a_coordinator_and_two_sites_over_rsync(tmp_path, sshd_hub):
    coord = tmp_path / "coordinator"
    sides = {s: tmp_path / s for s in SITES}
    hub = coord / "results/tiny"
    cfg = tiny_config(tmp_path, rounds=2)
    cfg["output_dir"] = "results"  # each side's own directory
    del cfg["sites"]["laptop"]
    cfg["sites"]["lumi"]["batch_tokens"] = 128  # enough steps to be killed in the middle of them
    cfg["trust"] = {"generate_missing": False}  # identities are made where they live, public halves swapped
    cfg["exchange"] = sshd_hub.exchange_config(hub)
    for side in (coord, *sides.values()):
        side.mkdir()
        write_config(side, cfg)

    # Identities: each side makes its own key pair; only public keys travel, out of band.
    ckeys = keys(coord, "coordinator")
    for s, side in sides.items():
        skeys = keys(side, s)
        shutil.copy(skeys / f"{s}.pub", ckeys)
        shutil.copy(ckeys / "coordinator.pub", skeys)

    coordinator = start(coord, "--role", "coordinator")
    try:
        # The demo corpus is generated on the coordinator; a real site holds its data before
        # the federation starts. Hand each site the shards it may train on: its own domain and
        # the shared one, never another site's.
        deadline = time.time() + 300
        while not (hub / "data" / INDEX).exists():
            assert coordinator.poll() is None, (coord / "run.log").read_text()[-4000:]
            assert time.time() < deadline, "the coordinator never offered its data manifest"
            time.sleep(1)
        manifest = read_json(hub / "data/manifest.json")
        held = {}
        for s, side in sides.items():
            mine = [e for e in manifest["shards"] if e["residency"] in (None, s)]
            assert mine and any(e["residency"] == s for e in mine)
            for e in mine:
                shutil.copytree(
                    hub / "data/shards" / f"{e['id']}.zarr", side / "results/tiny/data/shards" / f"{e['id']}.zarr"
                )
            held[s] = {e["id"] for e in mine}
        procs = {s: start(side, "--site", s) for s, side in sides.items()}
        # Fault: lumi's whole side (Snakemake and its training job) is SIGKILLed mid-round,
        # once its training has logged progress; rerunning the same command resumes it.
        metrics = sides["lumi"] / "results/tiny/rounds/r0000/sites/lumi/metrics.jsonl"
        deadline = time.time() + 300
        while not metrics.exists():
            assert procs["lumi"].poll() is None, (sides["lumi"] / "run.log").read_text()[-4000:]
            assert time.time() < deadline, "lumi never started training"
            time.sleep(0.02)
        assert not metrics.with_name("receipt.json").exists(), "lumi finished training before it could be killed"
        os.killpg(procs["lumi"].pid, signal.SIGKILL)
        procs["lumi"].wait()
        procs["lumi"] = start(sides["lumi"], "--site", "lumi")
        for s, p in procs.items():
            wait(p, sides[s], timeout=900)
        wait(coordinator, coord, timeout=300)
    finally:
        for p in [coordinator, *locals().get("procs", {}).values()]:
            if p.poll() is None:
                p.kill()

    layout = RunLayout(hub)
    trust = TrustStore(hub / "keys")
    summary = read_json(layout.summary)
    assert summary["rounds_completed"] == 2
    for r in range(2):
        arrivals = read_json(layout.arrivals(r))
        assert sorted(arrivals["arrived"]) == sorted(SITES) and arrivals["missing"] == []
        assert sorted(read_json(layout.verdicts(r))["accepted"]) == sorted(SITES)
        for s, side in sides.items():
            there = RunLayout(side / "results/tiny")
            # What the site trained from is bit for bit the coordinator's global model and plan.
            assert sha256_file(there.global_model(r)) == sha256_file(layout.global_model(r))
            assert read_json(there.plan(r)) == read_json(layout.plan(r))
            # What the hub received is complete against the site's signed index, and is
            # exactly the update the site wrote.
            assert complete(layout.site_dir(r, s), trust, s)
            assert sha256_file(layout.update(r, s)) == sha256_file(there.update(r, s))
            # Only the published names reach the hub: no status, logs, site state or data.
            assert {p.name for p in layout.site_dir(r, s).iterdir()} <= {*SITE_FILES, INDEX}
            planned = set(read_json(layout.plan(r))["sites"][s]["shards"])
            assert planned <= held[s], f"{s} was planned shards it does not hold"
    assert verify_ledger(layout.audit).ok
    # The killed round counted once: one receipt, no drop, no late update.
    events = [json.loads(x) for x in layout.audit.read_text().splitlines()]
    assert not [e for e in events if e["event"] in ("site.dropped", "update.late")]
    verdicts = [e for e in events if e["event"] == "update.verdict" and e["round"] == 0 and e["site"] == "lumi"]
    assert len(verdicts) == 1 and verdicts[0]["accepted"]
    # The site's own ledger tells its side: training started twice in round 0, published once.
    lumi = [json.loads(x) for x in (sides["lumi"] / "results/tiny/audit.jsonl").read_text().splitlines()]
    assert [e["event"] for e in lumi if e["round"] == 0] == ["train.started", "train.started", "update.published"]
    assert verify_ledger(sides["lumi"] / "results/tiny/audit.jsonl").ok

    # No raw data ever leaves a site: nothing under a site's data directory, whole file or
    # any 64-byte piece of it, is in what the site published.
    for s, side in sides.items():
        published = [p for r in range(2) for p in RunLayout(hub).site_dir(r, s).iterdir()]
        blobs = [p.read_bytes() for p in published]
        hashes = {sha256_file(p) for p in published}
        data_files = [p for p in (side / "results/tiny/data/shards").rglob("*") if p.is_file()]
        assert data_files
        for f in data_files:
            raw = f.read_bytes()
            assert sha256_file(f) not in hashes
            for i in range(0, max(1, len(raw) - 64), 4096):
                piece = raw[i : i + 64]
                if len(piece) == 64 and len(set(piece)) > 4:  # headers of zeros prove nothing
                    assert not any(piece in b for b in blobs), f"{f} leaked into {s}'s publications"
