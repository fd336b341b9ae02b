"""A parallel build of the shared data (`data.shard_jobs`): part jobs tokenise file groups, the
gather packs and signs the same manifest one process makes; a killed part is redone alone."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from fedhpc.cli.main import main
from fedhpc.config.schema import ConfigError
from fedhpc.core.layout import RunLayout
from fedhpc.data import parts
from fedhpc.data.ingest import DataError
from fedhpc.data.shards import load_manifest
from fedhpc.stages.context import context
from fedhpc.tasks.validation import validate
from fedhpc.trust.signing import TrustStore
from tests.workflow_util import env, snakemake_cmd, tiny_config, write_config


def make_sources(d: Path) -> list[dict]:
    """Shared sources of every kind of file: 7 text files of uneven size, JSONL, pre-tokenised HDF5."""
    rng = np.random.default_rng(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    (d / "notes").mkdir()
    for i in range(7):
        lines = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(int(rng.integers(3, 40)))]
        (d / "notes" / f"{i}.txt").write_text("\n".join(lines) + "\n")
    (d / "cases.jsonl").write_text(
        "".join(json.dumps({"text": " ".join(rng.choice(words, 80))}) + "\n" for _ in range(9))
    )
    with h5py.File(d / "pretok.h5", "w") as f:
        f["tokens"] = rng.integers(0, 255, size=(5, 70), dtype=np.int32)
    return [
        {"name": "notes", "format": "text", "path": str(d / "notes" / "*.txt"), "domain": "notes", "split": "line"},
        {"name": "cases", "format": "jsonl", "path": str(d / "cases.jsonl"), "domain": "law"},
        {"name": "pretok", "format": "hdf5", "path": str(d / "pretok.h5"), "domain": "law"},
    ]


def write_run(d: Path, sources: list[dict], kind: str, jobs: int) -> Path:
    d.mkdir()
    cfg = {
        "run": "parts",
        "output_dir": str(d / "results"),
        "sites": {"a": {}, "b": {}},
        "data": {
            "sources": sources,
            "tokenizer": {"kind": kind, "vocab_size": 300},
            "shard_tokens": 300,
            "heldout_fraction": 0.2,
            "shard_jobs": jobs,
        },
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16},
        # One keys directory: the same signer, so the signatures must match too.
        "trust": {"keys_dir": str(d.parent / "keys")},
    }
    path = d / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["keys", "ensure", "--config", str(path)]) == 0
    return path


@pytest.mark.parametrize("kind", ["bpe", "byte"])
def test_part_jobs_make_the_manifest_one_process_makes(tmp_path, kind):
    sources = make_sources(tmp_path)
    one = write_run(tmp_path / "one", sources, kind, 1)
    assert main(["shard", "--config", str(one)]) == 0
    many = write_run(tmp_path / "many", sources, kind, 4)
    assert main(["shard-tokenizer", "--config", str(many)]) == 0
    for part in range(4):
        # One part with two worker processes, so that path is the same too.
        assert main(["shard-part", "--config", str(many), "--part", str(part), "--workers", str(1 + part % 2)]) == 0
    assert main(["shard", "--config", str(many)]) == 0

    a, b = (RunLayout.of(d / "results" / "parts") for d in (tmp_path / "one", tmp_path / "many"))
    for name in ("manifest.json", "manifest.sig", "tokenizer.json"):
        assert (b.data / name).read_bytes() == (a.data / name).read_bytes(), name
    manifest = load_manifest(b, TrustStore(tmp_path / "keys"))
    assert len(manifest["shards"]) > 4 and {s["source"] for s in manifest["shards"]} >= {str(tmp_path / "cases.jsonl")}
    shards_of = lambda layout: sorted(p.name for p in (layout.data / "shards").iterdir())  # noqa: E731
    assert shards_of(b) == shards_of(a)


def test_file_groups_are_consecutive_files_of_about_equal_size(tmp_path):
    from fedhpc.config.federation import SourceConfig

    sources = [SourceConfig(**{k: v for k, v in s.items()}) for s in make_sources(tmp_path)]
    groups = parts.file_groups(sources, 3)
    flat = [f for g in groups for f in g]
    assert [(f.source, f.path) for f in flat] == [(i, p) for i, s in enumerate(sources) for p in parts.source_files(s)]
    sizes = [sum(f.size for f in g) for g in groups]
    largest = max(f.size for f in flat)
    assert max(sizes) - min(sizes) <= 2 * largest
    assert parts.file_groups(sources, 3) == groups
    # More jobs than files: the spare groups are empty, not an error.
    assert sum(1 for g in parts.file_groups(sources, 40) if g) == len(flat)


@pytest.mark.parametrize("bad", [0, -2, "two", 2.5])
def test_a_bad_shard_jobs_names_the_key(bad):
    cfg = {"run": "x", "sites": {"a": {}}, "data": {"shard_jobs": bad}}
    with pytest.raises(ConfigError, match=r"data\.shard_jobs"):
        validate(cfg, "config.yaml")


def test_a_part_killed_midway_leaves_nothing_and_the_gather_names_it(tmp_path, monkeypatch):
    sources = make_sources(tmp_path)
    config = write_run(tmp_path / "run", sources, "byte", 3)
    assert main(["shard-tokenizer", "--config", str(config)]) == 0
    ctx = context(str(config))
    real = parts.tokenise_file
    calls = []

    def dies_on_the_second_file(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a signal would, after one file is written
        return real(*args)

    monkeypatch.setattr(parts, "tokenise_file", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        parts.tokenise_part(ctx.layout, ctx.cfg.data.sources, 3, 1, 1)
    monkeypatch.setattr(parts, "tokenise_file", real)
    root = ctx.layout.data / "parts"
    assert list(root.iterdir()) == [], "a killed part must leave nothing behind"
    # SIGKILL leaves the hidden directory: the part's next run clears it.
    (root / ".1.999.tmp").mkdir()
    (root / ".1.999.tmp" / "00000.ids").write_bytes(b"\0" * 10)
    for part in (0, 2):
        assert main(["shard-part", "--config", str(config), "--part", str(part)]) == 0
    with pytest.raises(DataError, match=r"parts/1/part\.json: missing; part 1 of 3"):
        main_raising(["shard", "--config", str(config)], monkeypatch)
    assert main(["shard-part", "--config", str(config), "--part", "1"]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["0", "1", "2"]
    # A part's tokens cut short on disk (after its record) is refused, naming the file.
    ids = next((root / "2").glob("*.ids"))
    ids.write_bytes(ids.read_bytes()[:-2])
    with pytest.raises(DataError, match=rf"{ids}: .* tokenise the part again"):
        main_raising(["shard", "--config", str(config)], monkeypatch)
    assert not ctx.layout.manifest.exists()
    assert main(["shard-part", "--config", str(config), "--part", "2"]) == 0
    assert main(["shard", "--config", str(config)]) == 0


def main_raising(argv: list[str], monkeypatch) -> None:
    monkeypatch.setenv("FEDHPC_DEBUG", "1")  # the CLI re-raises instead of printing
    try:
        main(argv)
    finally:
        monkeypatch.delenv("FEDHPC_DEBUG")


def data_jobs(tmp: Path, *args: str) -> tuple[dict[str, str], str]:
    """Snakemake's job counts of the data stage's rules for `args`, and its output."""
    proc = subprocess.run(snakemake_cmd(tmp, *args), capture_output=True, text=True, env=env(), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    counts = dict(line.split()[:2] for line in out.splitlines() if line.startswith(("shard", "keys", "synth")))
    return counts, out


def test_the_dag_has_a_job_per_file_group_and_a_rerun_redoes_only_a_missing_part(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["data"]["shard_jobs"] = 3
    write_config(tmp_path, cfg)
    run = tmp_path / "results" / "tiny"
    manifest = str(run / "data" / "manifest.json")
    counts, out = data_jobs(tmp_path, "--dry-run", manifest)
    assert counts == {"keys": "1", "synth": "1", "shard_tokenizer": "1", "shard_part": "3", "shard": "1"}, out

    # Parts 0 and 2 done, part 1 killed halfway (its hidden directory left): only part 1 is redone.
    targets = [str(run / "data" / "parts" / p) for p in ("0", "2")] + [str(run / "keys" / "a100.pub")]
    data_jobs(tmp_path, "--notemp", *targets)
    (run / "data" / "parts" / ".1.4242.tmp").mkdir()
    counts, out = data_jobs(tmp_path, "--dry-run", manifest)
    assert counts == {"shard_part": "1", "shard": "1"}, out
    assert "wildcards: part=1" in out and "wildcards: part=0" not in out
