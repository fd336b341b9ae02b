"""Encryption at rest: data keys from files or the environment, sealed shards, and wrong keys refused."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from fedhpc.config.federation import DataConfig
from fedhpc.config.trust import EncryptionConfig
from fedhpc.core.files import sha256_tree
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import build_shards, read_heldout, read_shard
from fedhpc.data.tokenizer import ByteTokenizer
from fedhpc.trust.envelope import (
    DataKey,
    EnvelopeError,
    MissingDataKey,
    create_data_key,
    load_data_key,
    new_envelope,
    open_envelope,
    seal,
    unseal,
)
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, TrustStore
from tests.test_shards import make_sources

ENC = EncryptionConfig(shards=True)


def key(name: str, fill: int) -> DataKey:
    return DataKey(name, bytes([fill]) * 32, f"test key {fill}")


def test_seal_binds_ciphertext_to_its_context():
    k = bytes(range(32))
    blob = seal(k, b"tokens", b"shards/a/c/0")
    assert b"tokens" not in blob and unseal(k, blob, b"shards/a/c/0", "x") == b"tokens"
    with pytest.raises(EnvelopeError, match="^c/1: does not decrypt"):
        unseal(k, blob, b"shards/a/c/1", "c/1")  # a chunk moved to another place
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        unseal(k, blob[:-1] + bytes([blob[-1] ^ 1]), b"shards/a/c/0", "x")  # one flipped bit
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        unseal(bytes(32), blob, b"shards/a/c/0", "x")


def test_envelope_wraps_one_data_key_for_each_reader_and_names_a_wrong_one():
    lumi, a100 = key("lumi", 1), key("a100", 2)
    dek, env = new_envelope("shards/web-00000", [lumi, a100])
    assert open_envelope(env, "shards/web-00000", lumi, "w") == dek == open_envelope(env, "shards/web-00000", a100, "w")
    with pytest.raises(EnvelopeError) as info:
        open_envelope(env, "shards/web-00000", key("lumi", 9), "shard web-00000")
    msg = str(info.value)
    assert msg.startswith("shard web-00000: sealed for 'lumi' under the data key with fingerprint ")
    assert "the key from test key 9 has fingerprint" in msg and msg.endswith("wrong key")
    with pytest.raises(EnvelopeError, match=r"is not sealed for 'laptop' \(readers: lumi, a100\)"):
        open_envelope(env, "shards/web-00000", key("laptop", 3), "shard")
    # An envelope copied onto another shard does not open there.
    with pytest.raises(EnvelopeError, match="is not an AES-256-GCM envelope of 'shards/law-00000'"):
        open_envelope(env, "shards/law-00000", lumi, "shard")
    # A fingerprint forged to match still fails authentication.
    forged = {**env, "recipients": [{**env["recipients"][0], "fingerprint": key("lumi", 9).fingerprint}]}
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        open_envelope(forged, "shards/web-00000", key("lumi", 9), "shard")


def test_data_key_from_the_environment_wins_over_the_file_and_files_are_permission_checked(tmp_path):
    path = create_data_key(tmp_path / "keys" / "lumi.datakey")
    assert (os.stat(path).st_mode & 0o777) == 0o600
    from_file = load_data_key("lumi", None, "FEDHPC_DATA_KEY_{NAME}", tmp_path / "keys", environ={})
    assert from_file.source == f"file {path}" and len(from_file.key) == 32
    env_key = base64.b64encode(b"k" * 32).decode()
    got = load_data_key("lu-mi", None, "FEDHPC_DATA_KEY_{NAME}", tmp_path, environ={"FEDHPC_DATA_KEY_LU_MI": env_key})
    assert got.key == b"k" * 32 and got.source == "environment variable FEDHPC_DATA_KEY_LU_MI"
    with pytest.raises(EnvelopeError, match="environment variable FEDHPC_DATA_KEY_LUMI: not a data key"):
        load_data_key("lumi", None, "FEDHPC_DATA_KEY_{NAME}", tmp_path, environ={"FEDHPC_DATA_KEY_LUMI": "short"})
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="data key is readable by others"):
        load_data_key("lumi", None, "FEDHPC_DATA_KEY_{NAME}", tmp_path / "keys", environ={})
    with pytest.raises(MissingDataKey, match="set FEDHPC_DATA_KEY_A100 or create .*a100.datakey"):
        load_data_key("a100", None, "FEDHPC_DATA_KEY_{NAME}", tmp_path / "keys", environ={})
    with pytest.raises(FileExistsError, match="refusing to replace a data key"):
        create_data_key(path)


@pytest.fixture()
def sealed_run(tmp_path: Path):
    keys = tmp_path / "keys"
    for name in (COORDINATOR, "lumi", "a100"):
        create_keypair(keys, name)
        create_data_key(keys / f"{name}.datakey")
    trust = TrustStore(keys, encryption=ENC)
    sources, docs = make_sources(tmp_path)  # letters pinned to lumi, digits unpinned
    layout = RunLayout.of(tmp_path / "run")

    def readers(kind, residency):
        names = [COORDINATOR] if kind == "heldout" else ([residency] if residency else ["a100", "lumi"])
        return [trust.data_key(n) for n in names]

    data = DataConfig(sources=sources, shard_tokens=1000, heldout_fraction=0.1)
    manifest = build_shards(sources, data, ByteTokenizer(), layout, 7, trust.private_key(COORDINATOR), {}, readers)
    return layout, manifest, trust, docs


def test_sealed_shards_hold_no_plaintext_and_read_back_exactly(sealed_run, tmp_path):
    layout, m, trust, docs = sealed_run
    tok = ByteTokenizer()
    arrays = [p for d in ("shards", "heldout") for p in (layout.root / "data" / d).rglob("*") if p.is_file()]
    blob = b"".join(p.read_bytes() for p in arrays)
    assert b'"alpha"' not in blob and b"zarr_format" not in blob  # even zarr's metadata is sealed
    texts = []
    for e in m["shards"]:
        assert e["sealed_for"] == (["lumi"] if e["residency"] == "lumi" else ["a100", "lumi"])
        assert e["sha256"] == sha256_tree(layout.root / e["path"])  # the manifest pins the ciphertext
        tokens = read_shard(layout, e, trust=trust)
        raw = tokens.astype("<u2").tobytes()
        # No 16-byte run of the stored tokens, nor of the text, is anywhere on disk.
        for a in range(0, len(raw) - 16, 97):
            assert raw[a : a + 16] not in blob
        text = tok.decode(tokens)
        assert all(text.encode()[a : a + 16] not in blob for a in range(0, len(text) - 16, 97))
        texts.append(text)
    assert all(h["sealed_for"] == [COORDINATOR] for h in m["heldout"])
    held = [tok.decode(read_heldout(layout, h, trust=trust)) for h in m["heldout"]]
    joined = "".join(texts + held)
    assert all(d in joined for d in docs["letters"] + docs["digits"])


def test_a_sealed_shard_with_a_wrong_or_missing_key_is_a_clear_error_never_tokens(sealed_run, tmp_path):
    layout, m, trust, _ = sealed_run
    entry = next(e for e in m["shards"] if e["residency"] == "lumi")
    (trust.keys_dir / "lumi.datakey").unlink()
    create_data_key(trust.keys_dir / "lumi.datakey")  # lumi lost its key and made a new one
    with pytest.raises(EnvelopeError) as info:
        read_shard(layout, entry, trust=trust)
    assert f"shard {entry['id']}" in str(info.value) and "lumi.datakey has fingerprint" in str(info.value)
    assert "wrong key" in str(info.value)
    with pytest.raises(EnvelopeError, match="is sealed; reading it needs a data key"):
        read_shard(layout, entry)
    # a site that is not a reader (a100 for a shard pinned to lumi) holds no key that opens it
    a100_only = tmp_path / "a100-keys"
    a100_only.mkdir()
    (a100_only / "a100.datakey").write_bytes((trust.keys_dir / "a100.datakey").read_bytes())
    os.chmod(a100_only / "a100.datakey", 0o600)
    with pytest.raises(EnvelopeError, match="is sealed for lumi; no data key of theirs here"):
        read_shard(layout, entry, trust=TrustStore(a100_only, encryption=ENC))


def test_a_tampered_sealed_chunk_is_refused_even_without_the_tree_hash(sealed_run):
    layout, m, trust, _ = sealed_run
    entry = m["shards"][0]
    chunk = layout.root / entry["path"] / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 1
    chunk.write_bytes(bytes(data))
    with pytest.raises(EnvelopeError, match="does not decrypt"):
        read_shard(layout, entry, verify=False, trust=trust)


def test_sealing_a_whole_run_from_config_reads_keys_from_the_environment(tmp_path, monkeypatch):
    """`trust.encryption.shards` through the data stage, keys only in environment variables."""
    from fedhpc.stages.shard import sealing
    from fedhpc.tasks.validation import validate
    from tests.workflow_util import tiny_config

    cfg = validate({**tiny_config(tmp_path), "trust": {"encryption": {"shards": True}}})
    for name in (COORDINATOR, *cfg.sites):
        monkeypatch.setenv(f"FEDHPC_DATA_KEY_{name.upper()}", base64.b64encode(os.urandom(32)).decode())
    trust = TrustStore(tmp_path / "nokeys", encryption=cfg.trust.encryption)
    readers = sealing(cfg, trust)
    assert [k.name for k in readers("shard", None)] == sorted(cfg.sites)
    assert [k.source for k in readers("shard", "lumi")] == ["environment variable FEDHPC_DATA_KEY_LUMI"]
    assert [k.name for k in readers("heldout", None)] == [COORDINATOR]
    assert not (tmp_path / "nokeys").exists()  # nothing was written: the keys came from the environment
