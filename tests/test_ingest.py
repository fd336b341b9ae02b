"""Document readers of every format, their error messages, and the tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedhpc.config.federation import SourceConfig, TokenizerConfig
from fedhpc.data.ingest import DataError, iter_documents, iter_source, iter_texts
from fedhpc.data.tokenizer import (
    ByteTokenizer,
    TokenizerError,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)


def src(path: Path | str, fmt: str, **kw: object) -> SourceConfig:
    return SourceConfig(name=kw.pop("name", "s"), format=fmt, path=str(path), domain="d", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- text


def test_text_split_file_whole_file_per_doc_sorted_glob(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second\nfile\n")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "c.txt").write_text("  \n\n")  # whitespace-only: skipped
    docs = list(iter_documents(src(tmp_path / "*.txt", "text", split="file")))
    assert docs == ["first file", "second\nfile\n"]


def test_text_split_line(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("one\n\ntwo\r\n   \nthree")
    assert list(iter_documents(src(tmp_path / "x.txt", "text", split="line"))) == ["one", "two", "three"]


def test_text_split_blank_line(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("\n\npara one\nstill one\n\n\n  \npara two\n\npara three\n")
    docs = list(iter_documents(src(tmp_path / "x.txt", "text", split="blank_line")))
    assert docs == ["para one\nstill one", "para two", "para three"]


def test_text_origin_names_line(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("a\n\nb\n")
    origins = [d.origin for d in iter_source(src(tmp_path / "x.txt", "text", split="line"))]
    assert origins == [f"{tmp_path / 'x.txt'}:1", f"{tmp_path / 'x.txt'}:3"]


def test_glob_matching_nothing_names_source_and_pattern(tmp_path: Path) -> None:
    pattern = str(tmp_path / "x" / "*.jsonl")
    with pytest.raises(DataError, match=r"data\.sources\[web\]: no files match '.*x/\*\.jsonl'"):
        list(iter_documents(src(pattern, "jsonl", name="web")))


def test_missing_plain_file_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.sources\[s\]: no such file '.*nope\.txt'"):
        list(iter_documents(src(tmp_path / "nope.txt", "text")))


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(DataError, match=r"bad\.txt:2: not valid UTF-8"):
        list(iter_documents(src(tmp_path / "bad.txt", "text", split="line")))


# ---------------------------------------------------------------- jsonl


def test_jsonl_custom_field(tmp_path: Path) -> None:
    lines = [json.dumps({"body": "héllo", "id": 1}), "", json.dumps({"body": "world"}), json.dumps({"body": ""})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    assert list(iter_documents(src(tmp_path / "d.jsonl", "jsonl", field="body"))) == ["héllo", "world"]


def test_jsonl_bad_json_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: invalid JSON"):
        list(iter_documents(src(tmp_path / "d.jsonl", "jsonl")))


def test_jsonl_missing_field_names_file_line_and_key(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: no field 'text' \(keys present: content\)"):
        list(iter_documents(src(tmp_path / "d.jsonl", "jsonl")))


def test_jsonl_non_string_field(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' is int, expected a string"):
        list(iter_documents(src(tmp_path / "d.jsonl", "jsonl")))


def test_jsonl_non_object_line(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text('["text"]\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: expected a JSON object"):
        list(iter_documents(src(tmp_path / "d.jsonl", "jsonl")))


# ---------------------------------------------------------------- parquet


def test_parquet_custom_column_in_batches(tmp_path: Path) -> None:
    texts = [f"doc {i}" for i in range(3000)]  # more rows than one record batch
    table = pa.table({"content": texts, "n": list(range(3000))})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=700)
    docs = list(iter_documents(src(tmp_path / "p.parquet", "parquet", field="content")))
    assert docs == texts


def test_parquet_missing_column_lists_columns(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["a"], "n": [1]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: no column 'text' \(columns present: body, n\)"):
        list(iter_documents(src(tmp_path / "p.parquet", "parquet")))


def test_parquet_non_string_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: column 'text' has type int64"):
        list(iter_documents(src(tmp_path / "p.parquet", "parquet")))


def test_parquet_null_names_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p\.parquet: row 1: column 'text' is null"):
        list(iter_documents(src(tmp_path / "p.parquet", "parquet")))


def test_parquet_not_parquet(tmp_path: Path) -> None:
    (tmp_path / "p.parquet").write_text("nope")
    with pytest.raises(DataError, match=r"p\.parquet: not a readable Parquet file"):
        list(iter_documents(src(tmp_path / "p.parquet", "parquet")))


# ---------------------------------------------------------------- hdf5


def test_hdf5_1d_is_one_stream(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["ids"] = np.arange(10, dtype=np.uint16)
    docs = list(iter_documents(src(tmp_path / "t.h5", "hdf5", dataset="ids")))
    assert len(docs) == 1
    assert isinstance(docs[0], np.ndarray) and np.issubdtype(docs[0].dtype, np.integer)
    np.testing.assert_array_equal(docs[0], np.arange(10))


def test_hdf5_2d_one_doc_per_row(tmp_path: Path) -> None:
    rows = np.arange(3000 * 4, dtype=np.int32).reshape(3000, 4)  # more rows than one block
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh.create_group("g")["toks"] = rows
    docs = list(iter_documents(src(tmp_path / "t.h5", "hdf5", dataset="g/toks")))
    assert len(docs) == 3000
    np.testing.assert_array_equal(np.stack(docs), rows)


def test_hdf5_missing_dataset_lists_datasets(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["a"] = np.arange(3)
        fh.create_group("g")["b"] = np.arange(3)
    with pytest.raises(DataError, match=r"t\.h5: no dataset 'tokens' \(datasets present: a, g/b\)"):
        list(iter_documents(src(tmp_path / "t.h5", "hdf5")))


def test_hdf5_float_dtype_rejected(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["tokens"] = np.ones(4, dtype=np.float32)
    with pytest.raises(DataError, match=r"t\.h5: dataset 'tokens' has dtype float32, expected integer"):
        list(iter_documents(src(tmp_path / "t.h5", "hdf5")))


def test_hdf5_negative_ids_name_row(tmp_path: Path) -> None:
    rows = np.ones((5, 3), dtype=np.int64)
    rows[3, 1] = -7
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["tokens"] = rows
    with pytest.raises(DataError, match=r"t\.h5: dataset 'tokens' has negative token id -7 at row 3"):
        list(iter_documents(src(tmp_path / "t.h5", "hdf5")))


def test_hdf5_not_hdf5(tmp_path: Path) -> None:
    (tmp_path / "t.h5").write_text("nope")
    with pytest.raises(DataError, match=r"t\.h5: not a readable HDF5 file"):
        list(iter_documents(src(tmp_path / "t.h5", "hdf5")))


def test_iter_texts_skips_pretokenised(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x\ny\n")
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh["tokens"] = np.arange(3)
    sources = [src(tmp_path / "a.txt", "text", split="line"), src(tmp_path / "t.h5", "hdf5", name="h")]
    assert list(iter_texts(sources)) == ["x", "y"]


# ---------------------------------------------------------------- tokenizers

SAMPLE = "Grüße, 世界! naïve café — emoji 🚀\n\ttabs  and  spaces\n"


def corpus(n: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["the", "quick", "brown", "fox", "jumps", "über", "lazy", "dög", "日本語", "données", "and", "of"]
    return [" ".join(rng.choice(words, size=30)) + f" {i}." for i in range(n)]


def test_byte_tokenizer_roundtrips_utf8() -> None:
    tok = build_tokenizer(TokenizerConfig(kind="byte"), [])
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.kind) == (257, 256, "byte")
    ids = tok.encode(SAMPLE)
    assert len(ids) == len(SAMPLE.encode("utf-8")) and ids.max() < 256
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(np.append(ids, tok.eos_id)) == SAMPLE


def test_bpe_trains_to_requested_size_and_roundtrips(tmp_path: Path) -> None:
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, eos="<eos>"), corpus())
    assert tok.kind == "bpe" and tok.vocab_size == 300
    assert 0 <= tok.eos_id < tok.vocab_size
    ids = tok.encode(SAMPLE)
    assert ids.max() < tok.vocab_size
    assert tok.decode(ids) == SAMPLE
    text = corpus()[0]
    assert len(tok.encode(text)) < len(text.encode())  # merges were learned


def test_bpe_does_not_split_documents_on_literal_eos_text() -> None:
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, eos="<eos>"), corpus())
    ids = tok.encode("before <eos> after")
    assert tok.eos_id not in ids.tolist()
    assert tok.decode(ids) == "before <eos> after"


def test_saved_tokenizers_reload_identically(tmp_path: Path) -> None:
    for cfg in (TokenizerConfig(kind="byte"), TokenizerConfig(kind="bpe", vocab_size=320)):
        tok = build_tokenizer(cfg, corpus())
        path = tmp_path / cfg.kind / "data" / "tokenizer.json"
        save_tokenizer(tok, path)
        again = load_tokenizer(path)
        assert (again.kind, again.vocab_size, again.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
        for text in [SAMPLE, *corpus(20)]:
            np.testing.assert_array_equal(again.encode(text), tok.encode(text))
        assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_saved_bpe_loads_as_pretrained_from_directory(tmp_path: Path) -> None:
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus())
    save_tokenizer(tok, tmp_path / "tk" / "tokenizer.json")
    pre = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "tk")), [])
    assert pre.kind == "pretrained" and (pre.vocab_size, pre.eos_id) == (tok.vocab_size, tok.eos_id)
    for text in [SAMPLE, *corpus(20)]:
        np.testing.assert_array_equal(pre.encode(text), tok.encode(text))
    # ...and a plain HuggingFace tokenizer.json file works as well
    assert isinstance(tok, type(pre))
    (tmp_path / "plain.json").write_text(tok.hf.to_str())  # type: ignore[attr-defined]
    plain = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "plain.json")), [])
    np.testing.assert_array_equal(plain.encode(SAMPLE), tok.encode(SAMPLE))


def test_pretrained_adds_missing_eos(tmp_path: Path) -> None:
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300, eos="<eos>"), corpus())
    (tmp_path / "tokenizer.json").write_text(tok.hf.to_str())  # type: ignore[attr-defined]
    pre = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path), eos="<|doc|>"), [])
    assert pre.eos_id == 300 and pre.vocab_size == 301
    save_tokenizer(pre, tmp_path / "saved.json")
    again = load_tokenizer(tmp_path / "saved.json")
    assert (again.eos_id, again.vocab_size) == (300, 301)
    np.testing.assert_array_equal(again.encode(SAMPLE), pre.encode(SAMPLE))


def test_pretrained_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"data\.tokenizer\.path: .*missing does not exist"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "missing")), [])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json at .*empty/tokenizer\.json"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "empty")), [])
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match=r"bad\.json: not a valid HuggingFace tokenizer\.json"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "bad.json")), [])
    (tmp_path / "junk.json").write_text("{{{")
    with pytest.raises(TokenizerError, match=r"junk\.json: not a readable tokenizer\.json"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "junk.json")), [])
    with pytest.raises(TokenizerError, match=r"data\.tokenizer\.path is required"):
        build_tokenizer(TokenizerConfig(kind="pretrained"), [])


def test_load_tokenizer_rejects_plain_hf_file(tmp_path: Path) -> None:
    tok = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), corpus())
    (tmp_path / "plain.json").write_text(tok.hf.to_str())  # type: ignore[attr-defined]
    with pytest.raises(TokenizerError, match=r"plain\.json: not a fedhpc tokenizer file"):
        load_tokenizer(tmp_path / "plain.json")
