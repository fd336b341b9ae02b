"""Shard packing, held-out split, the signed manifest and integrity checks."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedhpc.config.federation import DataConfig, SourceConfig, TokenizerConfig
from fedhpc.core.files import sha256_file
from fedhpc.core.layout import RunLayout
from fedhpc.data.ingest import DataError
from fedhpc.data.shards import (
    ShardIntegrityError,
    build_shards,
    load_manifest,
    load_run_tokenizer,
    read_heldout,
    read_shard,
    token_dtype,
)
from fedhpc.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer, load_tokenizer
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore

LETTERS = "abcdefghij"
DIGITS = "0123456789"


@pytest.fixture()
def trust(tmp_path: Path) -> TrustStore:
    create_keypair(tmp_path / "keys", COORDINATOR)
    return TrustStore(tmp_path / "keys")


def write_docs(path: Path, alphabet: str, n: int, seed: int) -> list[str]:
    """`n` distinct one-line documents drawn from `alphabet` (so each source is recognisable by its characters)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = "".join(rng.choice(list(alphabet), size=int(rng.integers(5, 60))))
        tag = "".join(alphabet[int(c)] for c in str(i))  # unique per document, same alphabet
        docs.append(f"{tag} {body}")
    path.write_text("\n".join(docs) + "\n")
    return docs


def split_docs(stream: np.ndarray, tok: Tokenizer) -> list[str]:
    """Documents of an eos-terminated token stream."""
    ends = np.flatnonzero(stream == tok.eos_id)
    assert len(ends) and ends[-1] == len(stream) - 1, "stream must end with eos"
    out, start = [], 0
    for e in ends:
        out.append(tok.decode(stream[start:e]))
        start = e + 1
    return out


def make_sources(tmp_path: Path) -> tuple[list[SourceConfig], dict[str, list[str]]]:
    docs = {
        "letters": write_docs(tmp_path / "letters.txt", LETTERS, 400, 1),
        "digits": write_docs(tmp_path / "digits.txt", DIGITS, 300, 2),
    }
    sources = [
        SourceConfig(
            name="letters",
            format="text",
            path=str(tmp_path / "letters.txt"),
            split="line",
            domain="alpha",
            language="en",
            licence="CC-BY-4.0",
            site="lumi",
            source="https://example.org/letters",
        ),
        SourceConfig(
            name="digits",
            format="text",
            path=str(tmp_path / "digits.txt"),
            split="line",
            domain="num",
            language="x-num",
            licence="CC0-1.0",
        ),
    ]
    return sources, docs


def build(
    tmp_path: Path,
    trust: TrustStore,
    sources: list[SourceConfig],
    *,
    run: str = "run",
    seed: int = 7,
    shard_tokens: int = 1000,
    frac: float = 0.1,
    tok: Tokenizer | None = None,
    entropy: dict[str, float | None] | None = None,
) -> tuple[RunLayout, dict]:
    layout = RunLayout.of(tmp_path / run)
    data = DataConfig(sources=sources, shard_tokens=shard_tokens, heldout_fraction=frac)
    manifest = build_shards(
        sources,
        data,
        tok or ByteTokenizer(),
        layout,
        seed,
        trust.private_key(COORDINATOR),
        entropy if entropy is not None else {},
    )
    return layout, manifest


def test_packing_conserves_tokens_and_separates_heldout(tmp_path: Path, trust: TrustStore) -> None:
    sources, docs = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources)
    tok = ByteTokenizer()
    assert m == load_manifest(layout, trust)

    for name, src_docs in docs.items():
        entries = [e for e in m["shards"] if e["id"].startswith(name + "-")]
        assert [e["id"] for e in entries] == [f"{name}-{i:05d}" for i in range(len(entries))]
        sizes = [e["tokens"] for e in entries]
        assert all(s == m["shard_tokens"] for s in sizes[:-1]) and 0 < sizes[-1] <= m["shard_tokens"]
        train = np.concatenate([read_shard(layout, e) for e in entries])
        assert len(train) == sum(sizes)
        train_docs = split_docs(train, tok)
        dom = sources[0].domain if name == "letters" else sources[1].domain
        held = read_heldout(layout, next(h for h in m["heldout"] if h["domain"] == dom))
        held_docs = split_docs(held, tok)
        assert set(train_docs).isdisjoint(held_docs)
        assert sorted(train_docs + held_docs) == sorted(src_docs)
        total = sum(len(d.encode()) + 1 for d in src_docs)  # every document plus its eos
        assert len(train) + len(held) == total
        assert 0 < len(held_docs) < len(src_docs) // 4

    # shards never mix sources: each holds only its source's characters (plus space and eos)
    for e in m["shards"]:
        text = ByteTokenizer().decode(read_shard(layout, e))
        allowed = set(LETTERS if e["id"].startswith("letters") else DIGITS) | {" "}
        assert set(text) <= allowed, e["id"]


def test_manifest_metadata(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources, entropy={"alpha": 2.0, "num": None})
    assert m["version"] == 1 and m["shard_tokens"] == 1000
    assert m["tokenizer"] == {"kind": "byte", "vocab_size": 257, "eos_id": 256, "sha256": sha256_file(layout.tokenizer)}
    letters = [e for e in m["shards"] if e["id"].startswith("letters-")]
    digits = [e for e in m["shards"] if e["id"].startswith("digits-")]
    assert letters and digits
    for e in letters:
        assert (e["domain"], e["language"], e["licence"], e["residency"]) == ("alpha", "en", "CC-BY-4.0", "lumi")
        assert e["source"] == "https://example.org/letters" and e["dtype"] == "uint16"
        assert e["path"] == f"data/shards/{e['id']}.zarr" and (layout.root / e["path"]).is_dir()
    for e in digits:
        assert (e["domain"], e["language"], e["licence"], e["residency"]) == ("num", "x-num", "CC0-1.0", None)
        assert e["source"] == sources[1].path  # provenance defaults to the path
    held = {h["domain"]: h for h in m["heldout"]}
    assert held["alpha"]["residency"] == "lumi" and held["num"]["residency"] is None
    assert held["alpha"]["path"] == "data/heldout/alpha.zarr"
    for h in held.values():
        docs = split_docs(read_heldout(layout, h), ByteTokenizer())
        assert h["tokens"] == sum(len(d.encode()) + 1 for d in docs)
        assert h["bytes_per_token"] == pytest.approx(sum(len(d.encode()) for d in docs) / h["tokens"])
    assert held["alpha"]["entropy_floor_nats_per_token"] == pytest.approx(2.0 * held["alpha"]["bytes_per_token"])
    assert held["num"]["entropy_floor_nats_per_token"] is None
    # the manifest file is exactly what was signed and returned
    assert json.loads(layout.manifest.read_text()) == m


def test_bpe_manifest_and_tokenizer_reload(tmp_path: Path, trust: TrustStore) -> None:
    sources, docs = make_sources(tmp_path)
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), docs["letters"] + docs["digits"])
    layout, m = build(tmp_path, trust, sources, tok=tok, entropy={"alpha": 1.5})
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 300
    again = load_run_tokenizer(layout, m)
    for d in docs["letters"][:50]:
        np.testing.assert_array_equal(again.encode(d), tok.encode(d))
    h = next(h for h in m["heldout"] if h["domain"] == "alpha")
    held_docs = split_docs(read_heldout(layout, h), again)
    assert h["bytes_per_token"] == pytest.approx(sum(len(d.encode()) for d in held_docs) / h["tokens"])
    assert h["bytes_per_token"] > 1.0  # merges compress
    assert h["entropy_floor_nats_per_token"] == pytest.approx(1.5 * h["bytes_per_token"])
    # a swapped tokenizer file is refused
    layout.tokenizer.write_text(layout.tokenizer.read_text().replace('"bpe"', '"bpe" '))
    with pytest.raises(ShardIntegrityError, match="tokenizer"):
        load_run_tokenizer(layout, m)


def test_hdf5_source_ids_taken_as_given(tmp_path: Path, trust: TrustStore) -> None:
    rows = np.random.default_rng(0).integers(0, 256, size=(50, 30))
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["tokens"] = rows
    src = SourceConfig(name="pre", format="hdf5", path=str(tmp_path / "t.h5"), domain="code")
    layout, m = build(tmp_path, trust, [src], shard_tokens=256, frac=0.2, entropy={"code": 1.0})
    train = np.concatenate([read_shard(layout, e) for e in m["shards"]])
    held = read_heldout(layout, m["heldout"][0])
    got = [tuple(r) for r in np.split(train, np.flatnonzero(train == 256) + 1)[:-1]]
    got += [tuple(r) for r in np.split(held, np.flatnonzero(held == 256) + 1)[:-1]]
    assert sorted(got) == sorted(tuple(r) + (256,) for r in rows.tolist())
    assert m["heldout"][0]["bytes_per_token"] is None and m["heldout"][0]["entropy_floor_nats_per_token"] is None


def test_hdf5_id_outside_vocab_names_file(tmp_path: Path, trust: TrustStore) -> None:
    rows = np.ones((4, 5), dtype=np.int32)
    rows[2, 3] = 300
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["tokens"] = rows
    src = SourceConfig(name="pre", format="hdf5", path=str(tmp_path / "t.h5"), domain="code")
    with pytest.raises(
        DataError, match=r"t\.h5:tokens row 2: token id 300 .*outside the tokenizer vocabulary 0\.\.256"
    ):
        build(tmp_path, trust, [src])
    assert not RunLayout.of(tmp_path / "run").manifest.exists()


def test_small_sources_keep_train_and_heldout(tmp_path: Path, trust: TrustStore) -> None:
    (tmp_path / "two.txt").write_text("first doc\nsecond doc\n")
    (tmp_path / "one.txt").write_text("only doc\n")
    sources = [
        SourceConfig(name="two", format="text", path=str(tmp_path / "two.txt"), split="line", domain="a"),
        SourceConfig(name="one", format="text", path=str(tmp_path / "one.txt"), split="line", domain="b"),
    ]
    for seed in range(8):
        for frac in (0.01, 0.5):
            layout, m = build(tmp_path, trust, sources, seed=seed, frac=frac, run=f"r{seed}-{frac}")
            two = [e for e in m["shards"] if e["id"].startswith("two-")]
            assert sum(e["tokens"] for e in two) in (10, 11)
            assert [h["domain"] for h in m["heldout"]] == ["a"]  # one-document source trains, holds nothing out
            assert [e["tokens"] for e in m["shards"] if e["id"].startswith("one-")] == [9]


def test_tampered_shard_and_heldout_detected(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources, shard_tokens=600)
    entry = m["shards"][1]
    root = layout.root / entry["path"]
    files = sorted(p for p in root.rglob("*") if p.is_file())
    assert len(files) >= 2
    for f in files:
        original = f.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        f.write_bytes(bytes(flipped))
        with pytest.raises(ShardIntegrityError, match=rf"shard {entry['id']}: .*{entry['id']}\.zarr"):
            read_shard(layout, entry)
        f.write_bytes(original)
        read_shard(layout, entry)  # restored

    h = m["heldout"][0]
    chunk = next(p for p in (layout.root / h["path"]).rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes() + b"x")
    with pytest.raises(ShardIntegrityError, match=rf"held-out split {h['domain']}"):
        read_heldout(layout, h)


def test_unverified_read_still_catches_corrupt_chunk(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources)
    entry = m["shards"][0]
    chunk = layout.root / entry["path"] / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[-5] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=entry["id"]):
        read_shard(layout, entry, verify=False)


def test_missing_shard_detected(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources)
    entry = m["shards"][0]
    import shutil

    shutil.rmtree(layout.root / entry["path"])
    with pytest.raises(ShardIntegrityError, match=f"shard {entry['id']}: .* is missing"):
        read_shard(layout, entry)


def test_manifest_signature(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, m = build(tmp_path, trust, sources)
    body = layout.manifest.read_bytes()
    layout.manifest.write_bytes(body.replace(b'"CC-BY-4.0"', b'"CC0-1.0"'))
    with pytest.raises(SignatureError, match=r"manifest\.json"):
        load_manifest(layout, trust)
    layout.manifest.write_bytes(body)
    assert load_manifest(layout, trust) == m
    # a manifest signed by another key is refused
    create_keypair(tmp_path / "other", COORDINATOR)
    with pytest.raises(SignatureError, match=r"manifest\.json"):
        load_manifest(layout, TrustStore(tmp_path / "other"))
    layout.manifest_sig.unlink()
    with pytest.raises(SignatureError, match=r"manifest\.json: unsigned"):
        load_manifest(layout, trust)


def test_deterministic(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    _, a = build(tmp_path, trust, sources, run="a", seed=3)
    _, b = build(tmp_path, trust, sources, run="b", seed=3)
    _, c = build(tmp_path, trust, sources, run="c", seed=4)
    assert [e["sha256"] for e in a["shards"]] == [e["sha256"] for e in b["shards"]]
    assert [h["sha256"] for h in a["heldout"]] == [h["sha256"] for h in b["heldout"]]
    assert a == b
    assert [h["sha256"] for h in a["heldout"]] != [h["sha256"] for h in c["heldout"]]


def test_rebuild_replaces_old_shards(tmp_path: Path, trust: TrustStore) -> None:
    sources, _ = make_sources(tmp_path)
    layout, small = build(tmp_path, trust, sources, shard_tokens=300)
    layout, big = build(tmp_path, trust, sources, shard_tokens=100_000)
    assert len(small["shards"]) > len(big["shards"]) == 2
    on_disk = sorted(p.name for p in (layout.data / "shards").iterdir())
    assert on_disk == sorted(f"{e['id']}.zarr" for e in big["shards"])  # no stale or temporary directories
    assert sorted(p.name for p in (layout.data / "heldout").iterdir()) == ["alpha.zarr", "num.zarr"]
    assert sorted(p.name for p in layout.data.iterdir()) == [
        "heldout",
        "manifest.json",
        "manifest.sig",
        "shards",
        "tokenizer.json",
    ]
    for e in big["shards"]:
        read_shard(layout, e)
    np.testing.assert_array_equal(load_tokenizer(layout.tokenizer).encode("héllo"), ByteTokenizer().encode("héllo"))


def test_progress_and_input_errors(tmp_path: Path, trust: TrustStore, capsys: pytest.CaptureFixture[str]) -> None:
    sources, _ = make_sources(tmp_path)
    build(tmp_path, trust, sources)
    err = capsys.readouterr().err
    assert "letters: 400 docs" in err and "digits: 300 docs" in err and "shards" in err
    with pytest.raises(DataError, match="duplicate source names"):
        build(tmp_path, trust, [sources[0], sources[0]])
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = SourceConfig(name="e", format="text", path=str(tmp_path / "empty.txt"), split="line", domain="a")
    with pytest.raises(DataError, match=r"data\.sources\[e\]: no non-empty documents"):
        build(tmp_path, trust, [empty])


def test_token_dtype() -> None:
    assert token_dtype(257) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32
