"""Hostile input: one test per attack. Each is a clear, audited rejection; the round goes on without
the attacker, the coordinator does not crash, and nothing outside the run directory is touched."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from fedhpc.config.schema import ConfigError
from fedhpc.core.documents import DocumentError
from fedhpc.core.files import read_json, sha256_file, write_json
from fedhpc.core.rawtensors import TensorReader
from fedhpc.core.tensorfile import TensorFileError, TensorSpec, read_header
from fedhpc.data.shards import load_manifest
from fedhpc.exchange.hub import INDEX, complete, write_index
from fedhpc.stages.aggregate import aggregate_round
from fedhpc.stages.train import load_plan
from fedhpc.tasks.validation import load
from fedhpc.trust.audit import AuditLog, verify_ledger
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import COORDINATOR, TrustStore, sign_bytes, sign_document
from tests.test_verify import GOOD, RoundBuilder

# ---------------------------------------------------------------- crafting hostile files


def safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def good_header() -> tuple[dict, bytes]:
    """The header and data of a correct update of RoundBuilder's model (b: F32[3], w: F32[4, 3])."""
    return (
        {
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
            "w": {"dtype": "F32", "shape": [4, 3], "data_offsets": [12, 60]},
        },
        torch.full((15,), 1e-3).numpy().tobytes(),
    )


def tree(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def round_(tmp_path):
    """Round 1 with three honest sites and attacker `x`; a file outside the run that must stay as it is."""
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("untouched")
    b = RoundBuilder(tmp_path, GOOD + ["x"])
    for s in GOOD:
        b.publish(s)
    before = tree(tmp_path / "outside")
    yield b
    assert tree(tmp_path / "outside") == before, "something outside the run directory changed"


def publish_raw(b: RoundBuilder, site: str, raw: bytes, **receipt) -> None:
    """A site that signs whatever bytes it wrote: the receipt's hash matches the hostile file."""
    path = b.layout.update(b.r, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    b.publish(site, **receipt)
    path.write_bytes(raw)
    rec = read_json(b.layout.receipt(b.r, site))
    rec["update_sha256"] = sha256_file(path)
    write_json(b.layout.receipt(b.r, site), sign_document(rec, site, b.trust.private_key(site)))


def rejected(b: RoundBuilder, cfg_kw: dict | None = None) -> str:
    """Run verification and aggregation as the coordinator would; x's one-line reason."""
    b.write_arrivals()
    summary = b.verify(**(cfg_kw or {}))
    assert summary["accepted"] == GOOD, summary
    assert list(summary["rejected"]) == ["x"]
    verdict = [e for e in AuditLog(b.layout.audit).events() if e["event"] == "update.verdict" and e["site"] == "x"]
    assert verdict and verdict[-1]["accepted"] is False and verdict[-1]["reasons"] == summary["rejected"]["x"]
    record = aggregate_round(b.config(**(cfg_kw or {})), b.layout, b.r, load_global_meta(b.layout, b.trust, b.r))
    assert sorted(record["weights"]) == GOOD and record["excluded"] == summary["rejected"]
    assert verify_ledger(b.layout.audit).ok
    return "; ".join(summary["rejected"]["x"])


# ---------------------------------------------------------------- identities


def test_unknown_signer(round_, tmp_path):
    create_keypair(tmp_path / "ghost-keys", "ghost")
    ghost = TrustStore(tmp_path / "ghost-keys").private_key("ghost")
    round_.publish("x")
    rec = read_json(round_.layout.receipt(1, "x"))
    write_json(round_.layout.receipt(1, "x"), sign_document(rec, "ghost", ghost))
    assert rejected(round_) == "receipt: receipt of x: signed by 'ghost' (an unknown signer), expected 'x'"


def test_a_site_can_never_publish_under_another_sites_name(round_):
    """good1 holds only its own key: whatever it writes into x's place is refused."""
    b = round_
    b.publish("x", signer="good1")  # honest about being good1
    assert rejected(b).startswith("receipt: receipt of x: signed by 'good1', expected 'x'")
    b.publish("x", key_of="good1")  # claims to be x, signs with good1's key
    assert "receipt: receipt of x: signature does not verify" in rejected(b)
    b.publish("x", site="good1", signer="good1")  # good1's own receipt, copied into x's directory
    assert "signed by 'good1', expected 'x'" in rejected(b)
    # Staged transfer: a bundle index in x's directory signed by good1 is never an arrival of x.
    b.publish("x")
    write_index(
        b.layout.site_dir(1, "x"), ["update.safetensors", "receipt.json"], "good1", b.trust.private_key("good1")
    )
    assert not complete(b.layout.site_dir(1, "x"), b.trust, "x")
    write_index(b.layout.site_dir(1, "x"), ["update.safetensors", "receipt.json"], "x", b.trust.private_key("x"))
    assert complete(b.layout.site_dir(1, "x"), b.trust, "x")


def test_replay_of_an_earlier_rounds_genuine_submission(round_):
    b = round_
    b.publish("x", round=0, base_round=0, base_sha256=b.globals[0]["sha256"])
    assert rejected(b).startswith("receipt is for round 0, expected 1 (replayed or misplaced)")


def test_replay_from_another_run(round_):
    assert rejected_with(round_, run="other-federation").startswith("receipt is for run 'other-federation'")


def rejected_with(b: RoundBuilder, **receipt) -> str:
    b.publish("x", **receipt)
    return rejected(b)


def test_update_built_on_the_wrong_base(round_):
    assert rejected_with(round_, base_sha256=round_.globals[0]["sha256"]) == (
        "update was trained on a different global model (stale or wrong base)"
    )


def test_tampered_tensor_after_signing(round_):
    round_.publish("x")
    path = round_.layout.update(1, "x")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    assert rejected(round_) == "update.safetensors does not match the sha256 in its receipt (corrupt or tampered)"


def test_duplicate_submission_of_an_update_already_accepted(tmp_path):
    """x re-submits, under a fresh, correct receipt, the update it had accepted in round 0."""
    b = RoundBuilder(tmp_path, GOOD + ["x"], r=0)
    for s in b.sites:
        b.publish(s)
    b.write_arrivals()
    assert b.verify()["accepted"] == GOOD + ["x"]
    old = b.layout.update(0, "x").read_bytes()
    b2 = RoundBuilder.__new__(RoundBuilder)
    b2.__dict__.update(b.__dict__)
    b2.r, b2.base = 1, publish_next_global(b)
    for s in GOOD:
        b2.publish(s, b2.good_update(s, scale=2e-2))
    publish_raw(b2, "x", old)
    assert rejected(b2) == "duplicate submission: the same update as x's of round 0 (replayed)"


def publish_next_global(b: RoundBuilder) -> dict:
    from fedhpc.core.tensorfile import save_state
    from fedhpc.trust.checkpoints import publish_global
    from tests.test_verify import small_state

    save_state(b.layout.global_model(1), small_state(101), {"run": b.run, "round": "1"})
    meta = publish_global(b.layout, b.trust, 1, b.layout.global_model(1), {"run": b.run, "vocab_size": 16})
    plan = read_json(b.layout.plan(0)) | {"round": 1}
    write_json(b.layout.plan(1), sign_document(plan, COORDINATOR, b.trust.private_key(COORDINATOR)))
    return meta


def test_duplicate_submission_copied_from_another_site(round_):
    b = round_
    b.publish("x", b.good_update("good2"))
    b.write_arrivals()
    summary = b.verify()
    assert summary["accepted"] == ["good1", "good3"]
    assert summary["rejected"] == {
        "good2": ["duplicate submission: byte-identical to x's update this round"],
        "x": ["duplicate submission: byte-identical to good2's update this round"],
    }


def test_more_tokens_claimed_than_planned_would_buy_the_aggregate(round_):
    assert rejected_with(round_, tokens=10**12) == "receipt claims 1000000000000 tokens trained; the plan gave 1000"


def test_shards_claimed_that_the_plan_did_not_give(round_):
    assert rejected_with(round_, shards=["good1-shard"]).startswith("receipt names shards ['good1-shard']")


# ---------------------------------------------------------------- receipts as hostile JSON


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("tokens", "1000", "tokens: '1000' is not of type 'integer'"),
        ("tokens", -5, "tokens: -5 is less than the minimum of 0"),
        ("steps", 10**30, "steps: 1000000000000000000000000000000 is greater than the maximum"),
        ("loss_after", 1e301, "loss_after"),
        ("shards", "../../outside/precious.txt", "shards: '../../outside/precious.txt' is not of type 'array'"),
        ("update_sha256", "../../etc/passwd", "update_sha256: '../../etc/passwd' does not match"),
    ],
)
def test_absurd_or_mistyped_receipt_values(round_, field, value, reason):
    got = rejected_with(round_, **{field: value})
    assert got.startswith("receipt: receipt of x: not a valid receipt: ") and reason in got


def test_receipt_with_nan_literal_oversized_or_deeply_nested(round_):
    b = round_
    b.publish("x")
    path = b.layout.receipt(1, "x")
    text = path.read_text()
    path.write_text(text.replace('"loss_after": 2.5', '"loss_after": NaN'))
    assert "not valid JSON (NaN is not a JSON value)" in rejected(b)
    path.write_text(text[:-2] + ', "pad": "' + "x" * (1 << 21) + '"}')
    assert "bytes is more than the 1048576 such a file may have" in rejected(b)
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert "not valid JSON (nested too deeply)" in rejected(b)


def test_training_curve_that_is_not_records(round_):
    round_.publish("x")
    round_.layout.metrics(1, "x").write_text('[1, 2]\n"loss"\n')
    assert rejected(round_) == "training curve: a record is not a JSON object"


# ---------------------------------------------------------------- update files as hostile safetensors


def _header(**change) -> bytes:
    h, data = good_header()
    for name, entry in change.items():
        if entry is None:
            h.pop(name)
        else:
            h[name] = entry
    return safetensors_bytes(h, data)


HOSTILE_UPDATES = {
    "truncated file": (safetensors_bytes(*good_header())[:-7], "spans bytes 12..60 but needs 48 within the file"),
    "oversized header length": (
        safetensors_bytes(*good_header(), length=1 << 40),
        "header length 1099511627776 is larger than the file or implausible",
    ),
    "oversized tensor": (
        _header(w={"dtype": "F32", "shape": [1 << 30, 1 << 20], "data_offsets": [12, 60]}),
        "spans bytes 12..60 but needs 4503599627370496",
    ),
    "unknown dtype": (_header(w={"dtype": "F128", "shape": [4, 3], "data_offsets": [12, 60]}), "has dtype 'F128'"),
    "wrong dtype": (
        _header(w={"dtype": "I32", "shape": [4, 3], "data_offsets": [12, 60]}),
        "tensor names/shapes/dtypes differ from the global model: w: I32[4, 3] vs expected F32[4, 3]",
    ),
    "shape mismatch": (
        _header(w={"dtype": "F32", "shape": [2, 6], "data_offsets": [12, 60]}),
        "w: F32[2, 6] vs expected F32[4, 3]",
    ),
    "negative or fractional shape": (
        _header(w={"dtype": "F32", "shape": [4, -3], "data_offsets": [12, 60]}),
        "not a list of at most 16 ints >= 0",
    ),
    "overlapping tensors": (
        _header(b={"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}),
        "overlapping or gapped tensors",
    ),
    "appended bytes": (safetensors_bytes(*good_header()) + b"\0" * 64, "64 bytes after the last tensor"),
    "path traversal in a tensor name": (
        _header(**{"../../outside/precious.txt": {"dtype": "F32", "shape": [0], "data_offsets": [60, 60]}}),
        "differ from the global model: ../../outside/precious.txt",
    ),
    "control characters in a name": (
        _header(**{"w\n": {"dtype": "F32", "shape": [4, 3], "data_offsets": [12, 60]}, "w": None}),
        "has control characters",
    ),
    "metadata that is not strings": (
        safetensors_bytes({**good_header()[0], "__metadata__": {"compression": ["int8"]}}, good_header()[1]),
        "__metadata__ must map strings to strings",
    ),
    "header that is not JSON": (struct.pack("<Q", 8) + b"{'a': 1}" + b"\0" * 4, "header is not valid JSON"),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_UPDATES))
def test_hostile_update_file(round_, attack):
    raw, reason = HOSTILE_UPDATES[attack]
    publish_raw(round_, "x", raw)
    got = rejected(round_)
    assert reason in got, got


@pytest.mark.parametrize("attack", sorted(HOSTILE_UPDATES))
def test_the_aggregators_reader_refuses_the_same_files(tmp_path, attack):
    raw, reason = HOSTILE_UPDATES[attack]
    path = tmp_path / "u.safetensors"
    path.write_bytes(raw)
    if "differ from the global model" in reason or "vs expected" in reason:
        # Well-formed files of another model: they parse, and verification's comparison refuses them.
        with TensorReader(path) as reader:
            assert reader.specs != {"b": TensorSpec("F32", (3,)), "w": TensorSpec("F32", (4, 3))}
        return
    for parse in (read_header, TensorReader):
        with pytest.raises(TensorFileError, match="u.safetensors: "):
            parse(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38])
def test_nan_inf_and_absurd_values_in_an_update(round_, value):
    u = round_.good_update("x")
    u["w"][0, 0] = value
    round_.publish("x", u)
    got = rejected(round_)
    assert ("tensor w has NaN or Inf values" in got) if value != 3e38 else got.startswith("outlier: update norm 3e+38")


# ---------------------------------------------------------------- manifests, plans, configs


def test_manifest_with_a_path_leaving_the_run_directory_is_refused_even_signed(tmp_path):
    b = RoundBuilder(tmp_path, ["a"])
    manifest = {
        "version": 1,
        "tokenizer": {"kind": "byte", "vocab_size": 257, "eos_id": 256, "sha256": "0" * 64},
        "shards": [
            {
                "id": "a-00000",
                "path": "../../outside/precious",
                "tokens": 10,
                "domain": "d",
                "sha256": "0" * 64,
                "dtype": "uint16",
                "residency": None,
            }
        ],
        "heldout": [],
    }
    body = json.dumps(manifest).encode()
    b.layout.manifest.parent.mkdir(parents=True, exist_ok=True)
    b.layout.manifest.write_bytes(body)
    b.layout.manifest_sig.write_text(sign_bytes(b.trust.private_key(COORDINATOR), body))
    with pytest.raises(DocumentError, match=r"shards\[0\].path: '../../outside/precious' does not match"):
        load_manifest(b.layout, b.trust)


def test_plan_with_a_malformed_site_entry_is_refused_even_signed(tmp_path):
    b = RoundBuilder(tmp_path, ["a"])
    plan = read_json(b.layout.plan(1))
    plan["sites"]["a"]["shards"] = "a-shard"
    write_json(b.layout.plan(1), sign_document(plan, COORDINATOR, b.trust.private_key(COORDINATOR)))
    with pytest.raises(DocumentError, match=r"plan.json: not a valid plan: sites.a.shards: 'a-shard' is not of type"):
        load_plan(b.layout, b.trust, 1)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("rounds: {count: .nan}\nsites: {a: {}}\n", "rounds.count: not a finite number"),
        ("training: {lr: .inf}\nsites: {a: {}}\n", "training.lr: not a finite number"),
        ("[" * 5000 + "]" * 5000, "cannot parse"),
        ("sites: {a: {}}\nrounds: {count: 'many'}\n", "rounds.count: 'many' is not of type 'integer'"),
        ("sites: {'../../outside': {}}\n", "does not match"),
        ("\xff\xfe", "cannot parse"),
        ("? [a, b]\n: 1\nsites: {a: {}}\n", "found unhashable key"),
        ("null: 1\nsites: {a: {}}\n", "None: keys must be strings"),
        ("sites: {1: {}}\n", "sites.1: keys must be strings"),
    ],
)
def test_hostile_config(tmp_path, text, reason):
    path = tmp_path / "config.yaml"
    path.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
    with pytest.raises(ConfigError) as info:
        load(path)
    assert reason in str(info.value)


def test_the_coordinators_metrics_replay_skips_hostile_records(tmp_path):
    """Tracking replays every arrival's metrics, rejected ones too: malformed records are skipped."""
    from fedhpc.stages.track import site_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"time": 1, "step": 2, "loss": 3.0, "note": "x"}\n[1]\n{"time": "x", "step": 1, "loss": 1}\n'
        '{"time": 1, "step": 3, "loss": NaN, "lr": 1e400, "ok": true}\n' + "[" * 5000 + "\n"
    )
    assert [(m.key, m.value, m.step) for m in site_metrics(path)] == [("loss", 3.0, 2)]


def test_a_malformed_bundle_index_is_not_an_arrival_and_does_not_stop_the_coordinator(round_):
    b = round_
    b.publish("x")
    d = b.layout.site_dir(1, "x")
    for files in ({"../../outside/precious.txt": {"sha256": "0" * 64, "bytes": 1}}, {"receipt.json": "x"}, ["a"]):
        write_json(d / INDEX, sign_document({"files": files}, "x", b.trust.private_key("x")))
        assert complete(d, b.trust, "x") is False
