"""`retention:`: a long federation keeps the last rounds' updates and candidates and every M-th global,
resumes after SIGKILL, and its provenance still checks out."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.config.schema import ConfigError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.promote import _place
from fedhpc.stages.retain import Policy, apply, pruned_now
from fedhpc.tasks.validation import validate
from tests.workflow_util import events, kill_when, run_stages, run_workflow, tiny_config, write_config

SCHEMA = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.json"


def _regular_models(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*.safetensors") if not p.is_symlink()}


def _expected(layout: RunLayout, policy: Policy, r: int, sites: list[str]) -> tuple[set[str], set[int]]:
    """(regular files that must remain, globals that must remain) once round r is promoted, from the
    policy's definition rather than the code under test: updates and candidates of the last K rounds,
    globals every M rounds, the newest and those late updates still need; and each kept global's file."""
    K, M, s = policy.keep_rounds, policy.globals_every, policy.staleness
    kept_globals = {g for g in range(r + 2) if g % M == 0 or g > r - s}
    files = {f"rounds/r{j:04d}/candidate/model.safetensors" for j in range(max(0, r - K + 1), r + 1)}
    files |= {f"rounds/r{j:04d}/sites/{s_}/update.safetensors" for j in range(max(0, r - K + 1), r + 1) for s_ in sites}
    for g in kept_globals:
        files.add(str(Path(os.path.realpath(layout.global_model(g))).relative_to(layout.root.resolve())))
    return files, kept_globals


def _fake_round(layout: RunLayout, r: int, rollback: bool) -> None:
    """What train, aggregate and promote leave on disk for round r (no training)."""
    for site in ("a", "b"):
        write_json(layout.receipt(r, site), {"update_sha256": f"{r:064x}"})
        layout.update(r, site).write_bytes(b"u" * 10)
    layout.candidate(r).parent.mkdir(parents=True, exist_ok=True)
    layout.candidate(r).write_bytes(b"c" * 100)
    write_json(layout.aggregate_record(r), {"output_sha256": f"{r + 1:064x}"})
    _place(layout.global_model(r) if rollback else layout.candidate(r), layout.global_model(r + 1))
    write_json(layout.global_meta(r + 1), {"source": "rollback" if rollback else "aggregate", "sha256": "0" * 64})


@pytest.mark.parametrize("keep,every,staleness", [(2, 10, 1), (1, 3, 0), (3, 4, 2)])
def test_each_round_keeps_exactly_the_policy_through_rollbacks_and_a_killed_job(tmp_path, keep, every, staleness):
    layout = RunLayout.of(tmp_path)
    policy = Policy(keep, every, staleness)
    layout.global_model(0).parent.mkdir(parents=True)
    layout.global_model(0).write_bytes(b"g" * 100)
    write_json(layout.global_meta(0), {"source": "init", "sha256": "0" * 64})
    rollbacks = {1, 4, 5, 11, 12, 13, 20}
    for r in range(30):
        _fake_round(layout, r, r in rollbacks)
        if r == 15:  # a site's update of round 1, long pruned, lands now (its job finished that late)
            write_json(layout.receipt(1, "c"), {"update_sha256": "c" * 64})
            layout.update(1, "c").write_bytes(b"late")
        pruned = pruned_now(layout, policy, r)
        if r == 15:
            assert pruned[layout.update(1, "c")] == "c" * 64
        if r % 7 == 3:  # a job killed halfway through, then run again: the same deletions, nothing lost
            apply(layout, policy, r, dict(list(pruned.items())[: len(pruned) // 2]))
            assert pruned_now(layout, policy, r) == pruned
        apply(layout, policy, r, pruned)
        files, kept = _expected(layout, policy, r, ["a", "b"])
        assert _regular_models(tmp_path) == files | {"rounds/r0000/global/model.safetensors"}, f"after round {r}"
        present = {g for g in range(r + 2) if os.path.lexists(layout.global_model(g))}
        assert present == kept, f"after round {r}"
        for g in kept:  # no kept global dangles, and it still has the bytes it was promoted with
            assert layout.global_model(g).read_bytes() in (b"c" * 100, b"g" * 100)


def test_a_promoted_global_is_a_link_to_its_candidate_not_a_copy(finished):
    _, _, run = finished
    layout = RunLayout.of(run)
    assert layout.global_model(2).is_symlink()
    assert os.path.samefile(layout.global_model(2), layout.candidate(1))
    assert os.readlink(layout.global_model(2)) == "../../r0001/candidate/model.safetensors"  # the run dir may move


def test_retention_keys_are_checked_against_late_updates_and_the_role(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["retention"] = {"keep_rounds": 1}
    cfg["rounds"]["max_staleness"] = 2
    with pytest.raises(ConfigError, match=r"retention.keep_rounds: 1 is less than rounds.max_staleness \(2\)"):
        validate(cfg, "config.yaml", str(SCHEMA))
    cfg["rounds"]["late_updates"] = "drop"
    validate(cfg, "config.yaml", str(SCHEMA))
    cfg["exchange"] = {"role": "coordinator", "kind": "shared", "hub": str(tmp_path / "hub")}
    with pytest.raises(ConfigError, match="retention: not for exchange.role 'coordinator'"):
        validate(cfg, "config.yaml", str(SCHEMA))
    cfg = tiny_config(tmp_path)
    cfg["retention"] = {"globals_every": 0}
    with pytest.raises(ConfigError, match="retention.globals_every"):
        validate(cfg, "config.yaml", str(SCHEMA))


def _small(tmp: Path, rounds: int) -> dict:
    cfg = tiny_config(tmp, rounds=rounds)
    cfg["sites"] = {"laptop": cfg["sites"]["laptop"], "a100": cfg["sites"]["a100"]}
    cfg["data"]["synth"]["domains"] = [d for d in cfg["data"]["synth"]["domains"] if d.get("site") != "lumi"]
    cfg["data"]["synth"]["bytes_per_domain"] = 12000
    cfg["rounds"]["tokens_per_round"] = 4000
    cfg["evaluation"]["tokens_per_domain"] = 128
    return cfg


@pytest.mark.e2e
def test_thirty_rounds_keep_two_rounds_and_every_tenth_global_and_provenance_verifies(tmp_path, capsys):
    cfg = _small(tmp_path, 30)
    cfg["data"]["synth"]["domains"] = [d for d in cfg["data"]["synth"]["domains"] if d.get("site") is None]
    cfg["retention"] = {"keep_rounds": 2, "globals_every": 10}
    path = write_config(tmp_path, cfg)
    run_stages(path, 30, sorted(cfg["sites"]), synth=True)
    run = Path(cfg["output_dir"]) / cfg["run"]
    layout = RunLayout.of(run)

    files, kept = _expected(layout, Policy(2, 10, 1), 29, [])
    updates = {str(p.relative_to(run)) for p in run.rglob("update.safetensors")}
    assert {u.split("/")[1] for u in updates} == {"r0028", "r0029"}
    assert _regular_models(run) - updates == files | {"rounds/r0000/global/model.safetensors"}
    assert {g for g in range(31) if layout.global_model(g).exists()} == {0, 10, 20, 29, 30} == kept
    freed = sum(e["bytes_freed"] for e in events(run) if e["event"] == "retention.pruned")
    assert freed > 20 * layout.global_model(30).stat().st_size  # 20 candidates and 2 × 28 updates at least

    for g in (30, 10):
        assert main(["provenance", str(layout.global_model(g)), "--config", str(path)]) == 0
        record = read_json(layout.global_model(g).parent / "provenance.json")
        assert [x["global"] for x in record["lineage"]] == list(range(g, -1, -1))
        assert record["ledger"]["intact"]
    stored = {c["round"]: all(x["update_stored"] for x in c["contributors"].values()) for c in record["rounds"]}
    assert stored == {r: False for r in range(10)}
    final = read_json(layout.global_model(30).parent / "provenance.json")
    assert [x["global"] for x in final["lineage"] if x["stored"]] == [30, 29, 20, 10, 0]

    # A deleted global cannot be exported; the error names the record that deleted it.
    assert main(["export", str(layout.global_model(15)), str(tmp_path / "hf"), "--config", str(path)]) == 1
    assert "deleted by `retention:`" in (err := capsys.readouterr().err) and "r0016/retention.json" in err

    # A retention record edited after the fact, or a file gone without one, breaks the provenance.
    record = read_json(layout.retention(15))
    record["pruned"].pop("rounds/r0013/candidate/model.safetensors")
    write_json(layout.retention(15), record)
    assert main(["provenance", str(layout.global_model(30)), "--config", str(path)]) == 1
    assert "retention.json" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_killed_federation_with_retention_resumes_and_keeps_exactly_the_policy(tmp_path):
    cfg = _small(tmp_path, 2)
    cfg["rounds"]["tokens_per_round"] = 8000
    cfg["retention"] = {"keep_rounds": 1, "globals_every": 2}
    cfg["rounds"]["late_updates"] = "drop"
    write_config(tmp_path, cfg)
    run = Path(cfg["output_dir"]) / cfg["run"]
    layout = RunLayout.of(run)

    # Killed once round 0's retention ran, while round 1 runs; round 1's then deletes round 0's files.
    kill_when(tmp_path, layout.retention(0))
    assert not layout.retention(1).exists()
    run_workflow(tmp_path)

    published = Counter((e["round"], e["site"]) for e in events(run) if e["event"] == "update.published")
    assert set(published.values()) == {1}, f"a finished site-round was trained again: {published}"
    assert {r for r, _ in published} == {0, 1}
    files, kept = _expected(layout, Policy(1, 2, 0), 1, [])
    updates = {str(p.relative_to(run)) for p in run.rglob("update.safetensors")}
    assert {u.split("/")[1] for u in updates} == {"r0001"}
    assert _regular_models(run) - updates == files | {"rounds/r0000/global/model.safetensors"}
    assert {g for g in range(3) if os.path.lexists(layout.global_model(g))} == {0, 2} == kept
    # Deleted files are not missing outputs: Snakemake has nothing left to do.
    dry = run_workflow(tmp_path, "-n")
    assert "Nothing to be done" in dry.stdout + dry.stderr
    assert main(["provenance", str(layout.global_model(2)), "--config", str(tmp_path / "config.yaml")]) == 0
