"""End to end: the Snakemake workflow runs a small federation on this machine, for real."""

from __future__ import annotations

import json
import subprocess
from collections import Counter

import pytest

from fedhpc.trust.audit import verify_ledger
from tests.workflow_util import BIN, env, events, run_workflow, summary

pytestmark = pytest.mark.e2e


def test_summary_reports_a_federation_that_learned(finished):
    tmp, cfg, run = finished
    s = summary(tmp, cfg)
    assert s["run"] == "tiny" and s["rounds_completed"] == 2 and s["sites"] == ["a100", "laptop", "lumi"]
    assert s["final_eval_loss"] < 0.8 * s["initial_eval_loss"]
    assert s["entropy_floor"] is not None and 0 < s["entropy_floor"] < s["final_eval_loss"]
    assert s["excluded_updates"] == []
    assert len(s["global_model_sha256"]) == 64 and s["wall_seconds"] > 0
    final = run / "rounds" / "r0002" / "global"
    assert json.loads((final / "model.json").read_text())["sha256"] == s["global_model_sha256"]


def test_every_site_trained_every_round_and_was_verified(finished):
    _, cfg, run = finished
    for r in ("r0000", "r0001"):
        plan = json.loads((run / "rounds" / r / "plan.json").read_text())
        assert sorted(plan["participants"]) == sorted(cfg["sites"])
        for site in cfg["sites"]:
            status = json.loads((run / "rounds" / r / "sites" / site / "status.json").read_text())
            assert status["state"] == "published"
            receipt = json.loads((run / "rounds" / r / "sites" / site / "receipt.json").read_text())
            assert receipt["signature"]["signer"] == site and receipt["steps"] > 0
            assert (run / "rounds" / r / "sites" / site / "metrics.jsonl").read_text().count("\n") >= 1
            verdict = json.loads((run / "rounds" / r / "verdicts" / f"{site}.json").read_text())
            assert verdict["accepted"], verdict
        agg = json.loads((run / "rounds" / r / "aggregate.json").read_text())
        assert abs(sum(agg["weights"].values()) - 1) < 1e-9 and set(agg["weights"]) == set(cfg["sites"])


def test_pinned_shards_stayed_with_their_owner(finished):
    _, cfg, run = finished
    # The coordinator's manifest lists only shared data; each site's catalogue only its own.
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    assert manifest["shards"] and {s["residency"] for s in manifest["shards"]} == {None}
    owner = {s["id"]: None for s in manifest["shards"]}
    for site in cfg["sites"]:
        catalogue = json.loads((run / "data" / "sites" / site / "catalogue.json").read_text())
        assert catalogue["signature"]["signer"] == site
        assert all(e["residency"] == site and e["path"].startswith(f"data/sites/{site}/") for e in catalogue["shards"])
        owner.update({s["id"]: site for s in catalogue["shards"]})
    pinned = {d["site"] for d in cfg["data"]["synth"]["domains"] if d.get("site")}
    assert {o for o in owner.values() if o} == pinned
    for r in ("r0000", "r0001"):
        plan = json.loads((run / "rounds" / r / "plan.json").read_text())
        for site, entry in plan["sites"].items():
            assert all(owner[sid] in (None, site) for sid in entry["shards"])


def test_audit_ledger_is_intact_and_tells_the_story(finished):
    _, _, run = finished
    assert verify_ledger(run / "audit.jsonl").ok
    kinds = Counter(e["event"] for e in events(run))
    assert kinds["round.planned"] == 2 and kinds["update.published"] == 6 and kinds["update.verdict"] == 6
    assert kinds["round.aggregated"] == 2 and kinds["global.published"] == 3  # init + 2 rounds
    out = subprocess.run([str(BIN / "fedhpc"), "audit", "verify", str(run)], capture_output=True, text=True, env=env())
    assert out.returncode == 0 and "intact" in out.stdout


def test_status_and_report_are_readable(finished):
    _, _, run = finished
    out = subprocess.run([str(BIN / "fedhpc"), "status", str(run)], capture_output=True, text=True, env=env())
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["round", "a100", "laptop", "lumi"]
    assert lines[2].startswith("r0000") and lines[2].count("accepted") == 3 and "done" in lines[2]
    html = (run / "report" / "index.html").read_text()
    assert html.count("<img") == 3 and "data:image/png;base64," in html and "http" not in html.replace("https://", "")


def test_mlflow_has_parent_child_runs_and_model_versions(finished):
    from mlflow.tracking import MlflowClient

    _, cfg, run = finished
    client = MlflowClient(f"sqlite:///{run / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fedhpc")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("fedhpc.kind") == "federation"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2 * len(cfg["sites"])
    assert any(m.startswith("loss") for m in children[0].data.metrics)
    assert "eval_loss" in parents[0].data.metrics
    versions = client.search_model_versions("name = 'fedhpc-tiny'")
    assert sorted(int(v.tags["fedhpc.round"]) for v in versions) == [0, 1, 2]


def test_second_invocation_has_nothing_to_do(finished):
    tmp, _, _ = finished
    proc = run_workflow(tmp, "--dry-run")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_a_wrong_config_stops_the_workflow_before_any_work(tmp_path):
    from tests.workflow_util import snakemake_cmd, tiny_config, write_config

    cfg = tiny_config(tmp_path)
    cfg["training"]["lr_schdule"] = 0.1
    cfg["sites"]["lumi"]["accelerator"] = "tpu"
    write_config(tmp_path, cfg)
    proc = subprocess.run(snakemake_cmd(tmp_path), capture_output=True, text=True, env=env(), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "config.yaml" in out and "unknown key training.lr_schdule" in out and "allowed keys here:" in out
    assert "sites.lumi.accelerator: 'tpu' is not allowed; allowed values: rocm, cuda, cpu" in out
    assert not (tmp_path / "results").exists()


def test_optimizer_state_stays_at_the_site_and_carries_across_rounds(finished):
    _, cfg, run = finished
    for site in cfg["sites"]:
        r1 = json.loads((run / "rounds" / "r0001" / "sites" / site / "receipt.json").read_text())
        assert r1["optimizer_state_from_round"] == 0
        assert [p.name for p in (run / "site-state" / site).glob("*.pt")] == ["optimizer-r0001-rank0-of1.pt"]
    assert not list((run / "rounds").rglob("*.pt")), "optimizer state must never be published"


def test_resetting_optimizer_state_is_a_config_choice(finished, tmp_path):
    import shutil

    from fedhpc.stages.context import context
    from fedhpc.stages.train import train_site

    _, cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = {
        **cfg,
        "output_dir": str(tmp_path),
        "run": "run",
        "training": {**cfg["training"], "keep_optimizer_state": False},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    ctx = context(str(tmp_path / "c.json"))
    for name in ("receipt.json", "update.safetensors"):
        (copy / "rounds" / "r0001" / "sites" / "a100" / name).unlink()
    (copy / "rounds" / "r0001" / "arrivals.json").unlink()
    shutil.rmtree(copy / "site-state" / "a100")
    status = train_site(ctx.cfg, ctx.layout, ctx.trust, 1, "a100", threads=1)
    receipt = json.loads((copy / "rounds" / "r0001" / "sites" / "a100" / "receipt.json").read_text())
    assert status["state"] == "published" and not status["reused"]
    assert receipt["optimizer_state_from_round"] is None
    assert not (copy / "site-state" / "a100").exists()


def test_a_two_rank_deepspeed_zero3_site_publishes_one_full_update(finished, tmp_path):
    """ZeRO-3 shards the parameters themselves; the published update must still be the whole model."""
    import shutil

    from fedhpc.core.tensorfile import read_specs
    from tests.workflow_util import BIN, env

    _, cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg = {**cfg, "output_dir": str(tmp_path), "run": "run"}
    cfg["sites"] = {
        **cfg["sites"],
        "laptop": {**cfg["sites"]["laptop"], "engine": "deepspeed", "zero_stage": 3, "ranks_per_node": 2},
    }
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    site_dir = copy / "rounds" / "r0001" / "sites" / "laptop"
    for name in ("receipt.json", "update.safetensors", "status.json"):
        (site_dir / name).unlink()
    (copy / "rounds" / "r0001" / "arrivals.json").unlink()
    proc = subprocess.run(
        [
            str(BIN / "fedhpc"),
            "train",
            "--config",
            str(tmp_path / "c.json"),
            "--round",
            "1",
            "--site",
            "laptop",
            "--threads",
            "2",
            "--status",
            str(site_dir / "status.json"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    receipt = json.loads((site_dir / "receipt.json").read_text())
    assert (receipt["engine"], receipt["zero_stage"], receipt["ranks"], receipt["launcher"]) == (
        "deepspeed",
        3,
        2,
        "torchrun",
    )
    assert read_specs(site_dir / "update.safetensors") == read_specs(
        copy / "rounds" / "r0001" / "global" / "model.safetensors"
    )
    assert receipt["loss_after"] < receipt["loss_before"]


def test_a_second_job_of_a_site_round_drops_its_update_when_the_first_published(finished, tmp_path, monkeypatch):
    """A Slurm requeue and a Snakemake retry of one failure can both train a site-round; the one
    that publishes second keeps the first one's update and receipt untouched."""
    import shutil

    import fedhpc.stages.train
    from fedhpc.stages.context import context
    from fedhpc.stages.train import train_site

    _, cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (tmp_path / "c.json").write_text(json.dumps({**cfg, "output_dir": str(tmp_path), "run": "run"}))
    ctx = context(str(tmp_path / "c.json"))
    site_dir = copy / "rounds" / "r0001" / "sites" / "a100"
    before = {p.name: p.read_bytes() for p in site_dir.iterdir() if p.is_file()}
    lines = len((copy / "audit.jsonl").read_text().splitlines())
    # This job started before the other one published: its own precheck found nothing to reuse.
    monkeypatch.setattr(fedhpc.stages.train, "_precheck", lambda *a, **k: None)
    status = train_site(ctx.cfg, ctx.layout, ctx.trust, 1, "a100", threads=1)
    assert status["state"] == "published" and status["reused"]
    assert status["update_sha256"] == json.loads(before["receipt.json"])["update_sha256"]
    for name in ("update.safetensors", "receipt.json"):
        assert (site_dir / name).read_bytes() == before[name], name
    new = [json.loads(x) for x in (copy / "audit.jsonl").read_text().splitlines()[lines:]]
    assert [e["event"] for e in new] == ["train.started", "update.duplicate_dropped"]


def test_an_update_published_by_a_job_killed_before_its_ledger_line_is_recorded_by_the_next(finished, tmp_path):
    """SIGKILL between a job's receipt and its ledger line leaves the update published but unrecorded;
    the rerun reuses it and puts it in the ledger, once."""
    import shutil

    from fedhpc.stages.context import context
    from fedhpc.stages.train import train_site
    from fedhpc.trust.audit import verify_ledger

    _, cfg, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (tmp_path / "c.json").write_text(json.dumps({**cfg, "output_dir": str(tmp_path), "run": "run"}))
    ctx = context(str(tmp_path / "c.json"))
    # The ledger as the killed job left it: up to (not including) a100's round-1 publication.
    rows = (copy / "audit.jsonl").read_text().splitlines()
    cut = next(
        i
        for i, x in enumerate(rows)
        if (e := json.loads(x))["event"] == "update.published" and (e["round"], e["site"]) == (1, "a100")
    )
    (copy / "audit.jsonl").write_text("".join(x + "\n" for x in rows[:cut]))
    receipt = json.loads((copy / "rounds" / "r0001" / "sites" / "a100" / "receipt.json").read_text())
    # The closed round's arrivals would stop the rerun earlier: the job ran before the round closed.
    (copy / "rounds" / "r0001" / "arrivals.json").unlink()
    for _ in range(2):  # the rerun, and another after it
        status = train_site(ctx.cfg, ctx.layout, ctx.trust, 1, "a100", threads=1)
        assert status["state"] == "published" and status["reused"]
    new = [json.loads(x) for x in (copy / "audit.jsonl").read_text().splitlines()[cut:]]
    published = [e for e in new if e["event"] == "update.published"]
    assert (
        len(published) == 1
        and published[0]["recorded_late"]
        and (published[0]["round"], published[0]["site"]) == (1, "a100")
    )
    assert published[0]["update_sha256"] == receipt["update_sha256"] and published[0]["tokens"] == receipt["tokens"]
    assert verify_ledger(copy / "audit.jsonl").ok


def test_the_publish_lock_makes_a_second_holder_wait(tmp_path):
    import subprocess
    import sys
    import threading
    import time

    from fedhpc.core.files import exclusive_lock

    lock = tmp_path / "locks" / "publish.lock"
    # The holder keeps the lock until told to let go, so the wait does not depend on timing.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedhpc.core.files import exclusive_lock\n"
            f"with exclusive_lock({str(lock)!r}) as held:\n"
            "    print(held, flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "True"
    got: list[bool] = []

    def second() -> None:
        with exclusive_lock(lock) as held:
            got.append(held)

    waiter = threading.Thread(target=second)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and got == [], "the second holder did not wait"
    holder.stdin.write("\n")
    holder.stdin.close()
    holder.wait(timeout=10)
    waiter.join(timeout=10)
    assert got == [True]
