"""Property-based fuzzing of every parser of hostile input: thousands of generated inputs each, and
the only way any of them may fail is the parser's own clear error (never an unhandled exception)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedhpc.aggregation.compress import CompressionError, codec_from_metadata
from fedhpc.config.schema import ConfigError
from fedhpc.core.documents import SCHEMAS, DocumentError, check_document
from fedhpc.core.files import parse_json
from fedhpc.core.rawtensors import TensorReader
from fedhpc.core.tensorfile import TensorFileError, parse_header
from fedhpc.exchange.hub import TransferError, check_index
from fedhpc.stages.verify import check_update, curve_anomaly
from fedhpc.tasks.validation import load, validate
from fedhpc.trust.audit import AuditLog, verify_ledger
from fedhpc.trust.envelope import DataKey, EnvelopeError, new_envelope, open_envelope
from fedhpc.trust.signing import SignatureError, sign_document
from tests.test_hostile import good_header, safetensors_bytes
from tests.test_verify import RoundBuilder
from tests.workflow_util import tiny_config

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=os.environ.get("FEDHPC_FUZZ_RANDOM")
    != "1",  # the same thousands of inputs on every run: a finding reproduces, CI is not flaky
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
FUZZ_FILES = settings(FUZZ, max_examples=1000)  # inputs that go through a file, or a whole check
FUZZ_EACH = settings(FUZZ, max_examples=1000)  # per document kind: 6000 for the one document parser

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20
)


def mutate(doc, data) -> object:
    """`doc` with one randomly chosen place (key or item, at any depth) replaced, removed or added."""
    if not isinstance(doc, dict | list) or not doc or data.draw(st.integers(0, 5)) == 0:
        return data.draw(json_values)
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    key = data.draw(st.sampled_from(sorted(out) if isinstance(out, dict) else list(range(len(out)))))
    action = data.draw(st.sampled_from(["replace", "recurse", "delete", "add"]))
    if action == "delete":
        del out[key]
    elif action == "add" and isinstance(out, dict):
        out[data.draw(st.text(max_size=8))] = data.draw(json_values)
    elif action == "recurse":
        out[key] = mutate(out[key], data)
    else:
        out[key] = data.draw(json_values)
    return out


# ---------------------------------------------------------------- safetensors headers


tensor_entries = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F128", "", 3]),
            "shape": st.lists(st.integers(-2, 2**40) | st.just(1.5) | st.just(True), max_size=4) | json_values,
            "data_offsets": st.lists(st.integers(-8, 2**41), min_size=0, max_size=3) | json_values,
        }
    )
    | json_values
)


@st.composite
def safetensors_files(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "structured", "mutated"]))
    if kind == "random":
        return draw(st.binary(max_size=200))
    if kind == "mutated":
        raw = bytearray(safetensors_bytes(*good_header()))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] = draw(st.integers(0, 255))
        cut = draw(st.integers(0, len(raw)))
        return bytes(raw[:cut]) if draw(st.booleans()) else bytes(raw)
    header = draw(st.dictionaries(st.text(max_size=6), tensor_entries, max_size=4))
    if draw(st.booleans()):
        header["__metadata__"] = draw(json_values)
    data = draw(st.binary(max_size=80))
    length = draw(st.none() | st.integers(0, 2**64 - 1))
    return safetensors_bytes(header, data, length)


def _check_parsed(h, raw: bytes) -> None:
    assert h.data_start + sum(s.nbytes for s in h.specs.values()) == len(raw)
    assert all(h.data_start <= o <= len(raw) for o in h.offsets.values())


@FUZZ
@given(raw=safetensors_files())
def test_fuzz_safetensors_header(raw):
    try:
        h = parse_header("u.safetensors", raw[:8], lambda n, at: raw[at : at + n], len(raw))
    except TensorFileError as exc:
        assert str(exc).startswith("u.safetensors: ")
        return
    _check_parsed(h, raw)


_SCRATCH = Path(tempfile.mkdtemp(prefix="fedhpc-fuzz-"))


@FUZZ_FILES
@given(raw=safetensors_files())
def test_fuzz_the_aggregators_tensor_reader(raw):
    path = _SCRATCH / "u.safetensors"
    path.write_bytes(raw)
    try:
        reader = TensorReader(path)
    except TensorFileError:
        return
    with reader:
        for name, spec in reader.specs.items():
            n = 1
            for d in spec.shape:
                n *= d
            if n <= 1 << 16:
                assert reader.read(name, 0, n).numel() == n


# ---------------------------------------------------------------- JSON documents


@FUZZ
@given(raw=st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_fuzz_json_parser(raw):
    try:
        parse_json(raw, "f.json")
    except ValueError as exc:
        assert str(exc).startswith("f.json: not valid JSON")


VALID = {
    "receipt": {
        "run": "t",
        "round": 1,
        "site": "x",
        "base_sha256": "a" * 64,
        "update_sha256": "b" * 64,
        "tokens": 10,
        "steps": 2,
        "shards": ["x-shard"],
        "loss_before": 3.0,
        "loss_after": 2.0,
    },
    "plan": {"round": 0, "run": "t", "created": 1.0, "participants": ["x"], "sites": {"x": {"shards": ["s"]}}},
    "manifest": {
        "version": 1,
        "tokenizer": {"vocab_size": 257, "eos_id": 256, "sha256": "c" * 64},
        "shards": [
            {
                "id": "s-00000",
                "path": "data/shards/s-00000.zarr",
                "tokens": 5,
                "domain": "d",
                "sha256": "d" * 64,
                "dtype": "uint16",
                "residency": None,
            }
        ],
        "heldout": [{"domain": "d", "path": "data/heldout/d.zarr", "tokens": 5, "sha256": "e" * 64}],
    },
    "catalogue": {
        "version": 1,
        "site": "lumi",
        "tokenizer_sha256": "c" * 64,
        "shards": [
            {
                "id": "law-00000",
                "path": "data/sites/lumi/shards/law-00000.zarr",
                "tokens": 5,
                "domain": "law",
                "sha256": "d" * 64,
                "dtype": "uint16",
                "residency": "lumi",
            }
        ],
        "heldout": [
            {
                "domain": "law",
                "path": "data/sites/lumi/heldout/law.zarr",
                "tokens": 5,
                "sha256": "e" * 64,
                "residency": "lumi",
            }
        ],
        "created": 1.0,
    },
    "eval_part": {
        "holder": "lumi",
        "model_sha256": "a" * 64,
        "domains": {"law": {"loss": 2.5, "tokens": 64, "entropy_floor": None}},
        "guards": {},
    },
    "bundle_index": {"files": {"update.safetensors": {"sha256": "f" * 64, "bytes": 3}}, "created": 1.0},
    "global_meta": {"round": 1, "sha256": "0" * 64, "parent_sha256": None},
    "retention": {
        "run": "t",
        "round": 3,
        "pruned": {
            "rounds/r0001/candidate/model.safetensors": {"sha256": "0" * 64},
            "rounds/r0001/candidate/server_state.safetensors": {"sha256": None},
        },
    },
    "ledger_head": {"run": "t", "round": 0, "lines": 3, "hash": "1" * 64, "time": 2.0},
}


def test_the_valid_documents_of_the_fuzz_are_valid():
    assert set(VALID) == set(SCHEMAS)
    for kind, doc in VALID.items():
        assert check_document(kind, doc, kind) is doc


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_fuzz_documents(kind):
    @FUZZ_EACH
    @given(data=st.data())
    def run(data):
        doc = mutate(VALID[kind], data)
        try:
            check_document(kind, doc, "doc")
        except DocumentError as exc:
            assert str(exc).startswith("doc: ")

    run()


@pytest.fixture(scope="module")
def site_round(tmp_path_factory):
    b = RoundBuilder(tmp_path_factory.mktemp("fuzz"), ["x"])
    b.publish("x")
    return b


def test_fuzz_bundle_index(site_round):
    b = site_round
    key = b.trust.private_key("x")

    @FUZZ_FILES
    @given(data=st.data())
    def run(data):
        doc = mutate(VALID["bundle_index"], data)
        doc = sign_document(doc, "x", key) if isinstance(doc, dict) and data.draw(st.booleans()) else doc
        try:
            check_index(doc, b.trust, "x", "bundle.json")
        except (TransferError, SignatureError):
            pass

    run()


def test_fuzz_receipts_through_verification(site_round):
    """Signed (so the signature passes) mutations of a genuine receipt, through the whole check."""
    b = site_round
    key, path = b.trust.private_key("x"), b.layout.receipt(1, "x")
    genuine = json.loads(path.read_text())
    cfg = b.config()

    @FUZZ_FILES
    @given(data=st.data())
    def run(data):
        doc = mutate({k: v for k, v in genuine.items() if k != "signature"}, data)
        if isinstance(doc, dict) and data.draw(st.booleans()):
            doc = sign_document(doc, "x", key)
        path.write_text(json.dumps(doc))
        out = check_update(b.layout, b.trust, "t", 1, "x", b.base, cfg.verification)
        assert isinstance(out["reasons"], list) and all(isinstance(r, str) for r in out["reasons"])

    run()


@FUZZ_FILES
@given(
    lines=st.lists(
        st.dictionaries(st.sampled_from(["loss", "step", "x"]), json_values, max_size=3) | scalars, max_size=5
    )
)
def test_fuzz_training_curve(lines):
    path = _SCRATCH / "metrics.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got = curve_anomaly(path, 3.0)
    assert got is None or got.startswith("training curve: ")


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(["compression", "block", "topk_fraction", "x"]), st.text(max_size=8)))
def test_fuzz_update_codec_metadata(meta):
    try:
        codec_from_metadata(meta)
    except CompressionError:
        pass


def test_fuzz_ledger(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("step", i=i)
    good = log.path.read_text().splitlines()

    @FUZZ_FILES
    @given(data=st.data())
    def run(data):
        rows = list(good)
        i = data.draw(st.integers(0, len(rows) - 1))
        body = json.loads(rows[i])
        rows[i] = data.draw(
            st.sampled_from(["json", "text", "drop"]).map(
                lambda k: json.dumps(mutate(body, data)) if k == "json" else "" if k == "drop" else rows[i][:-3]
            )
        )
        (tmp_path / "audit.jsonl").write_text("\n".join(rows) + "\n")
        check = verify_ledger(tmp_path / "audit.jsonl")
        assert check.ok == (rows == good) or (check.ok and rows[i] == "")

    run()


def test_fuzz_envelopes():
    key = DataKey("lumi", b"k" * 32, "test")
    _, env = new_envelope("shards/a", [key])

    @FUZZ_FILES
    @given(data=st.data())
    def run(data):
        try:
            open_envelope(mutate(env, data), "shards/a", key, "shard a")
        except EnvelopeError:
            pass

    run()


# ---------------------------------------------------------------- configs


def test_fuzz_config_values(tmp_path):
    base = tiny_config(tmp_path)

    @FUZZ_FILES
    @given(data=st.data())
    def run(data):
        try:
            validate(mutate(base, data))
        except ConfigError:
            pass

    run()


@FUZZ_FILES
@given(
    text=st.text(max_size=80)
    | json_values.map(lambda v: yaml.safe_dump(v))
    | st.sampled_from(["? [a]\n", "1: 2\n", "null: x\n", ".nan\n", "&a [*a, *a]\n", "!!python/object:os.system ls\n"])
)
def test_fuzz_config_files(text):
    path = _SCRATCH / "config.yaml"
    path.write_text(text)
    try:
        load(path)
    except ConfigError as exc:
        assert str(exc).startswith(f"{path}: ")


def test_fuzz_scratch_files_stay_in_the_scratch_directory():
    assert {p.name for p in _SCRATCH.iterdir()} <= {"config.yaml", "metrics.jsonl", "u.safetensors"}
