"""`fedhpc provenance`: a global model traced to its rounds, sites, shards and verdicts, every link
checked, and a model card with the training-data summary."""

from __future__ import annotations

import shutil

import pytest

from fedhpc.cli.main import main
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.catalogue import catalogue_sites, load_data
from fedhpc.ops.provenance import ProvenanceError, locate, trace
from fedhpc.trust.signing import COORDINATOR, TrustStore, verify_document

pytestmark = pytest.mark.e2e


@pytest.fixture()
def run(finished, tmp_path):
    """A copy of the session's finished two-round federation, free to tamper with."""
    _, cfg, run_dir = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("mlflow"))
    return copy, cfg


def test_provenance_of_the_final_model_and_its_model_card(run, capsys):
    root, cfg = run
    model = root / "rounds" / "r0002" / "global" / "model.safetensors"
    assert main(["provenance", str(model)]) == 0
    assert "2 contributing rounds, sites a100, laptop, lumi" in capsys.readouterr().out
    rec = read_json(model.with_name("provenance.json"))
    verify_document(rec, TrustStore(root / "keys"), COORDINATOR, "provenance")
    assert [x["global"] for x in rec["lineage"]] == [2, 1, 0] and rec["lineage"][-1]["source"] == "init"
    assert [c["round"] for c in rec["rounds"]] == [0, 1]
    manifest = read_json(root / "data" / "manifest.json")
    for c in rec["rounds"]:
        agg = read_json(root / "rounds" / f"r{c['round']:04d}" / "aggregate.json")
        assert {k: v["weight"] for k, v in c["contributors"].items()} == agg["weights"]
        for v in c["contributors"].values():
            receipt = read_json(root / "rounds" / f"r{c['round']:04d}" / "sites" / v["site"] / "receipt.json")
            assert v["shards"] == receipt["shards"] and v["tokens"] == receipt["tokens"]
    d = rec["data"]
    assert d["tokens_trained"] == sum(v["tokens"] for c in rec["rounds"] for v in c["contributors"].values())
    assert {s["domain"] for s in d["sources"]} == {"law", "clinical", "web"}
    assert d["residency_violations"] == []
    # Pinned domains are listed by their sites' catalogues, the shared one by the manifest.
    data = load_data(RunLayout.of(root), TrustStore(root / "keys"), catalogue_sites(RunLayout.of(root)))
    owner = {s["domain"]: s["residency"] for s in data["shards"]}
    assert {s["residency"] for s in manifest["shards"]} == {None} and set(owner.values()) == {None, "lumi", "a100"}
    for s in d["sources"]:
        assert s["residency"] == owner[s["domain"]]
        if s["residency"]:
            assert s["trained_at"] == [s["residency"]]
    card = model.with_name("MODEL_CARD.md").read_text()
    assert "## Training data summary" in card and f"{d['tokens_trained']:,} tokens reached this model" in card
    for s in d["sources"]:
        assert f"| {s['source']} | {s['licence']} | {s['domain']} |" in card
    assert "Audit ledger: intact" in card and "2 coordinator-signed head(s)" in card
    # The round directory and the global directory name the same model.
    assert locate(root / "rounds" / "r0002") == locate(model.parent) == (root.resolve(), 2)


def test_a_receipt_edited_after_the_fact_breaks_the_provenance(run):
    root, _ = run
    path = root / "rounds" / "r0001" / "sites" / "lumi" / "receipt.json"
    doc = read_json(path)
    doc["tokens"] = 10 * doc["tokens"]
    write_json(path, doc)
    with pytest.raises(ProvenanceError, match="lumi/receipt.json: signature does not verify"):
        trace(root, 2, TrustStore(root / "keys"))


def test_a_swapped_candidate_breaks_the_provenance(run):
    root, _ = run
    shutil.copy(
        root / "rounds" / "r0000" / "global" / "model.safetensors",
        root / "rounds" / "r0000" / "candidate" / "model.safetensors",
    )
    with pytest.raises(ProvenanceError, match="r0000/candidate/model.safetensors: not the model"):
        trace(root, 2, TrustStore(root / "keys"))


def test_a_verdict_turned_around_breaks_the_provenance(run):
    root, _ = run
    path = root / "rounds" / "r0000" / "verdicts" / "a100.json"
    doc = read_json(path)
    doc["accepted"] = False
    write_json(path, doc)
    with pytest.raises(ProvenanceError, match="verdicts/a100.json: signature does not verify"):
        trace(root, 2, TrustStore(root / "keys"))


def test_a_path_that_is_not_a_global_model_is_refused(run, tmp_path):
    root, _ = run
    with pytest.raises(ProvenanceError, match="not a global model of a run"):
        locate(root / "rounds" / "r0001" / "candidate" / "model.safetensors")
    with pytest.raises(ProvenanceError, match="not a global model of a run"):
        locate(tmp_path / "model.safetensors")
