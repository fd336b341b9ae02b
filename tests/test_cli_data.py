"""`fedhpc keys/shard/init` on real files of every input format, driven by a config like a user's:
the coordinator packs the shared sources, each site (`shard --site`) its own."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from fedhpc.cli.main import main
from fedhpc.core.layout import RunLayout
from fedhpc.data.catalogue import load_data
from fedhpc.data.shards import load_manifest, load_run_tokenizer, read_shard
from fedhpc.trust.signing import TrustStore


def make_inputs(d: Path) -> None:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    para = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    (d / "notes").mkdir()
    for i in range(6):
        (d / "notes" / f"{i}.txt").write_text(para(200))
    (d / "cases.jsonl").write_text("".join(json.dumps({"body": para(150), "id": i}) + "\n" for i in range(8)))
    pq.write_table(pa.table({"content": [para(120) for _ in range(8)]}), d / "web.parquet", row_group_size=3)
    with h5py.File(d / "pretok.h5", "w") as f:
        f["ids"] = rng.integers(0, 255, size=(6, 300), dtype=np.int32)


def test_shard_every_format_with_a_trained_bpe_tokenizer(tmp_path, monkeypatch, capsys):
    make_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = {
        "run": "formats",
        "output_dir": "results",
        "sites": {"hospital": {}, "court": {}},
        "data": {
            "sources": [
                {
                    "name": "notes",
                    "format": "text",
                    "path": "notes/*.txt",
                    "domain": "notes",
                    "site": "hospital",
                    "licence": "proprietary",
                    "language": "en",
                },
                {
                    "name": "cases",
                    "format": "jsonl",
                    "path": "cases.jsonl",
                    "field": "body",
                    "domain": "law",
                    "site": "court",
                    "source": "court archive 2024",
                },
                {
                    "name": "web",
                    "format": "parquet",
                    "path": "web.parquet",
                    "field": "content",
                    "domain": "web",
                    "licence": "CC-BY-4.0",
                },
                {"name": "pretok", "format": "hdf5", "path": "pretok.h5", "dataset": "ids", "domain": "web"},
            ],
            "tokenizer": {"kind": "bpe", "vocab_size": 300},
            "shard_tokens": 500,
            "heldout_fraction": 0.2,
        },
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["keys", "ensure", "--config", "config.yaml"]) == 0
    assert main(["shard", "--config", "config.yaml"]) == 0
    layout = RunLayout.of(tmp_path / "results" / "formats")
    trust = TrustStore(layout.keys_dir)
    # The coordinator's manifest holds only the shared data; the tokenizer was trained on it.
    shared = load_manifest(layout, trust)
    assert {s["id"].rsplit("-", 1)[0] for s in shared["shards"]} == {"web", "pretok"}
    assert not (layout.data / "sites").exists()
    for site in ("hospital", "court"):
        assert main(["shard", "--config", "config.yaml", "--site", site]) == 0
    assert main(["init", "--config", "config.yaml"]) == 0

    manifest = load_data(layout, trust, ["hospital", "court"])
    tok = load_run_tokenizer(layout, manifest)
    assert manifest["tokenizer"]["kind"] == "bpe" and tok.vocab_size <= 300
    # Each site's data is packed under its own directory and listed only in its catalogue.
    for s in manifest["shards"]:
        assert s["path"].startswith(f"data/sites/{s['residency']}/" if s["residency"] else "data/shards/")
    by_source = {}
    for s in manifest["shards"]:
        by_source.setdefault(s["id"].rsplit("-", 1)[0], []).append(s)
    assert set(by_source) == {"notes", "cases", "web", "pretok"}
    assert {s["residency"] for s in by_source["notes"]} == {"hospital"}
    assert {s["residency"] for s in by_source["cases"]} == {"court"}
    assert {s["residency"] for s in by_source["web"] + by_source["pretok"]} == {None}
    assert by_source["cases"][0]["source"] == "court archive 2024" and by_source["notes"][0]["licence"] == "proprietary"
    # Text sources really went through the trained BPE: decoding gives the words back.
    text = tok.decode(read_shard(layout, by_source["cases"][0])[:50])
    assert any(w in text for w in ("alpha", "beta", "gamma", "delta"))
    # Pre-tokenised ids are kept as given (plus end-of-document tokens).
    ids = read_shard(layout, by_source["pretok"][0])
    assert ids.max() < 300 and (ids == tok.eos_id).sum() >= 1
    assert sorted(h["domain"] for h in manifest["heldout"]) == ["law", "notes", "web"]
    meta = json.loads(layout.global_meta(0).read_text())
    assert meta["vocab_size"] == tok.vocab_size and meta["signature"]["signer"] == "coordinator"


def test_a_missing_input_file_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = {
        "run": "x",
        "sites": {"a": {}},
        "data": {"sources": [{"name": "gone", "format": "jsonl", "path": "nowhere/*.jsonl", "domain": "d"}]},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["keys", "ensure", "--config", "config.yaml"]) == 0
    assert main(["shard", "--config", "config.yaml"]) == 1
    err = capsys.readouterr().err
    assert "fedhpc shard: error:" in err and "nowhere/*.jsonl" in err and "gone" in err
    assert "Traceback" not in err
