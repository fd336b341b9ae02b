"""Sites pack their own data and sign catalogues of it; the coordinator plans from them without the data."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fedhpc.config.schema import ConfigError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.catalogue import CatalogueError, load_data, write_catalogue
from fedhpc.data.synth import generate_corpus
from fedhpc.stages.init import init_global
from fedhpc.stages.plan import collect_catalogues, plan_round
from fedhpc.stages.shard import corpus_dir, prepare_data, prepare_site_data
from fedhpc.stages.train import TrainingError, _check_catalogue_unchanged
from fedhpc.tasks.validation import validate
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import SignatureError, TrustStore, sign_document
from tests.workflow_util import tiny_config


def federation(tmp_path: Path):
    """A run directory where the coordinator packed the shared domain and lumi and a100 their own."""
    cfg = validate(tiny_config(tmp_path))
    layout = RunLayout(Path(cfg.output_dir) / cfg.run)
    trust = TrustStore(layout.keys_dir)
    for name in ("coordinator", *cfg.sites):
        create_keypair(layout.keys_dir, name)
    for site in (None, "lumi", "a100"):
        mine = [d for d in cfg.data.synth.domains if d.site == site]
        generate_corpus(replace(cfg.data.synth, domains=mine), cfg.seed, corpus_dir(layout, site))
    prepare_data(cfg, layout, trust)
    for site in cfg.sites:
        prepare_site_data(cfg, layout, trust, site)
    return cfg, layout, trust


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    return federation(tmp_path_factory.mktemp("catalogue"))


def test_each_party_packs_only_its_own_data_and_the_coordinator_signs_only_the_shared(fed):
    cfg, layout, trust = fed
    manifest = read_json(layout.manifest)
    assert {s["domain"] for s in manifest["shards"]} == {"web"}
    assert {h["domain"] for h in manifest["heldout"]} == {"web"}
    # No pinned text, shard or held-out split sits in the coordinator's data directory.
    assert sorted(p.name for p in layout.corpus_dir.glob("*.jsonl")) == ["web.jsonl"]
    assert {p.name for p in (layout.data / "shards").iterdir()} == {f"{s['id']}.zarr" for s in manifest["shards"]}
    for site, domain in (("lumi", "law"), ("a100", "clinical")):
        cat = read_json(layout.catalogue(site))
        assert cat["signature"]["signer"] == site and cat["tokenizer_sha256"] == manifest["tokenizer"]["sha256"]
        assert {s["domain"] for s in cat["shards"]} == {domain} and [h["domain"] for h in cat["heldout"]] == [domain]
        for e in cat["shards"] + cat["heldout"]:
            assert e["residency"] == site and (layout.root / e["path"]).is_dir()
            assert e["path"].startswith(f"data/sites/{site}/")
    laptop = read_json(layout.catalogue("laptop"))
    assert laptop["shards"] == [] and laptop["heldout"] == []


def test_the_merged_view_lists_every_shard_once_with_who_holds_each_held_out_split(fed):
    cfg, layout, trust = fed
    data = load_data(layout, trust, sorted(cfg.sites))
    ids = [s["id"] for s in data["shards"]]
    assert len(ids) == len(set(ids))
    assert {s["residency"] for s in data["shards"]} == {None, "lumi", "a100"}
    assert {(h["domain"], h["holder"]) for h in data["heldout"]} == {
        ("web", "coordinator"),
        ("law", "lumi"),
        ("clinical", "a100"),
    }
    # Only the catalogues asked for: a site's view has the shared data and its own.
    assert {s["residency"] for s in load_data(layout, trust, ["lumi"])["shards"]} == {None, "lumi"}


def tampered(layout: RunLayout, site: str, edit, trust: TrustStore) -> dict:
    """Site `site`'s catalogue edited by `edit` and signed again by the site itself (a site
    that lies, rather than a file damaged on the way: its signature is valid)."""
    body = {k: v for k, v in read_json(layout.catalogue(site)).items() if k != "signature"}
    edit(body)
    return write_catalogue(
        layout, site, body["tokenizer_sha256"], body["shards"], body["heldout"], trust.private_key(site)
    )


@pytest.mark.parametrize(
    "attack, error",
    [
        (lambda b: b["shards"][0].update(residency="a100"), r"residency 'a100'; a site may list only data resident"),
        (lambda b: b["shards"][0].update(path="data/sites/a100/shards/x.zarr"), r"outside data/sites/lumi/"),
        # refused by the document schema before the residency checks even run
        (lambda b: b["heldout"][0].update(path="../../etc"), r"not a valid catalogue: heldout\[0\]\.path"),
        (lambda b: b.update(tokenizer_sha256="0" * 64), r"another tokenizer"),
    ],
    ids=["another-sites-residency", "another-sites-path", "path-traversal", "other-tokenizer"],
)
def test_a_catalogue_may_list_only_the_signers_own_data(tmp_path, attack, error):
    cfg, layout, trust = federation(tmp_path)
    tampered(layout, "lumi", attack, trust=trust)
    with pytest.raises(ValueError, match=error):  # CatalogueError, or the schema's DocumentError
        load_data(layout, trust, ["lumi"])


def test_a_catalogue_signed_by_another_site_or_edited_after_signing_is_refused(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    original = layout.catalogue("lumi").read_bytes()
    doc = json.loads(original)
    # a100 signs a catalogue in lumi's place (claiming lumi's data as listed by lumi).
    forged = {k: v for k, v in doc.items() if k != "signature"}
    write_json(layout.catalogue("lumi"), sign_document(forged, "a100", trust.private_key("a100")))
    with pytest.raises(SignatureError, match=r"signed by 'a100', expected 'lumi'"):
        load_data(layout, trust, ["lumi"])
    # lumi's own signature over a catalogue someone edited afterwards (a shard's hash swapped).
    doc["shards"][0]["sha256"] = "f" * 64
    write_json(layout.catalogue("lumi"), doc)
    with pytest.raises(SignatureError, match="signature does not verify"):
        load_data(layout, trust, ["lumi"])


def test_a_shard_id_listed_twice_is_refused_naming_both_listings(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    shared_id = read_json(layout.manifest)["shards"][0]["id"]
    tampered(layout, "lumi", lambda b: b["shards"][0].update(id=shared_id), trust=trust)
    with pytest.raises(CatalogueError, match=rf"shard id '{shared_id}' is also listed by the manifest"):
        load_data(layout, trust, ["lumi"])


def test_the_plan_leaves_out_a_site_whose_catalogue_is_refused_and_says_why(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    init_global(cfg, layout, trust, read_json(layout.manifest))
    tampered(layout, "a100", lambda b: b["shards"][0].update(residency="lumi"), trust=trust)
    plan = plan_round(cfg, layout, trust, 0)
    assert "a100" not in plan["sites"] and plan["catalogue_missing"] == ["a100"]
    assert any("'a100' not planned: its catalogue is refused" in n for n in plan["notes"])
    assert [e["site"] for e in AuditLog(layout.audit).events() if e["event"] == "catalogue.rejected"] == ["a100"]
    # The plan records which catalogue it was made from; a site whose catalogue changed since
    # (its data rebuilt) refuses to train on data the coordinator never saw listed.
    assert plan["catalogues"]["lumi"] and _check_catalogue_unchanged(layout, plan, "lumi") is None
    tampered(layout, "lumi", lambda b: b["shards"].pop(), trust=trust)
    with pytest.raises(TrainingError, match=r"changed since round 0 was planned"):
        _check_catalogue_unchanged(layout, plan, "lumi")


def test_a_coordinator_waits_once_for_a_missing_catalogue_then_plans_without_it(tmp_path):
    cfg, layout, trust = federation(tmp_path)
    layout.catalogue("a100").unlink()
    cfg.exchange.kind = "shared"  # sites publish into this directory: missing means not arrived yet
    cfg.rounds.deadline_minutes = 0.02
    t0 = time.time()
    found, missing, notes = collect_catalogues(cfg, layout, trust, ["a100", "lumi"], waited=[], poll_seconds=0.05)
    assert time.time() - t0 >= 1.0  # it waited for a100 until the deadline
    assert sorted(found) == ["lumi"] and missing == ["a100"]
    assert notes == ["site 'a100' has not published its data catalogue; not planned until it does"]
    # The next plan does not wait for a site an earlier plan waited for already.
    t0 = time.time()
    _, missing, _ = collect_catalogues(cfg, layout, trust, ["a100", "lumi"], waited=["a100"], poll_seconds=0.05)
    assert time.time() - t0 < 0.5 and missing == ["a100"]


def test_bpe_needs_shared_data_to_train_on(tmp_path):
    raw = tiny_config(tmp_path)
    raw["data"]["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    for d in raw["data"]["synth"]["domains"]:
        d["site"] = "lumi"
    with pytest.raises(ConfigError, match=r"bpe is trained by the coordinator on the shared data"):
        validate(raw)
