"""Read the documents of one data source (text, JSONL, Parquet or pre-tokenised HDF5), streaming."""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedhpc.config.federation import SourceConfig
from fedhpc.core.errors import FedhpcError

# Rows per Parquet record batch and per HDF5 block: bounded memory whatever the file size.
_BATCH_ROWS = 1024


class DataError(FedhpcError, ValueError):
    """Input data is missing or malformed; the message names the file and the place in it."""


class Document(NamedTuple):
    """One document and where it came from (`file`, `file:line N`, `file row N`), for error messages."""

    data: str | np.ndarray
    origin: str


def _where(source: SourceConfig) -> str:
    return f"data.sources[{source.name}]"


def source_files(source: SourceConfig) -> list[Path]:
    """The files of `source`: the path itself, or the sorted matches of a glob pattern."""
    pattern = source.path
    if glob.has_magic(pattern):
        matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataError(f"{_where(source)}: no files match {pattern!r}")
        return files
    p = Path(pattern)
    if p.is_dir():
        raise DataError(
            f"{_where(source)}: {pattern!r} is a directory; give a file or a glob such as '{pattern.rstrip('/')}/*'"
        )
    if not p.is_file():
        raise DataError(f"{_where(source)}: no such file {pattern!r}")
    return [p]


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    # Decoding line by line (not through a buffered text stream) keeps the reported line number exact.
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 at byte {exc.start} of the line ({exc.reason})"
                ) from None


def _read_text(source: SourceConfig, path: Path) -> Iterator[Document]:
    if source.split == "file":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not valid UTF-8 at byte {exc.start} ({exc.reason})") from None
        if text.strip():
            yield Document(text, str(path))
        return
    if source.split == "line":
        for lineno, line in _text_lines(path):
            doc = line.rstrip("\r\n")
            if doc.strip():
                yield Document(doc, f"{path}:{lineno}")
        return
    if source.split == "blank_line":
        para: list[str] = []
        start = 0
        for lineno, line in _text_lines(path):
            if line.strip():
                if not para:
                    start = lineno
                para.append(line.rstrip("\r\n"))
            elif para:
                yield Document("\n".join(para), f"{path}:{start}")
                para = []
        if para:
            yield Document("\n".join(para), f"{path}:{start}")
        return
    raise DataError(f"{_where(source)}: unknown split {source.split!r} (expected file, line or blank_line)")


def _read_jsonl(source: SourceConfig, path: Path) -> Iterator[Document]:
    key = source.field
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        if key not in obj:
            keys = ", ".join(sorted(obj)[:20]) or "none"
            raise DataError(f"{path}:{lineno}: no field {key!r} (keys present: {keys})")
        text = obj[key]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {key!r} is {type(text).__name__}, expected a string")
        if text.strip():
            yield Document(text, f"{path}:{lineno}")


def _read_parquet(source: SourceConfig, path: Path) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = source.field
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    if key not in names:
        raise DataError(f"{path}: no column {key!r} (columns present: {', '.join(names) or 'none'})")
    col_type = pf.schema_arrow.field(key).type
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or pa.types.is_string_view(col_type)):
        raise DataError(f"{path}: column {key!r} has type {col_type}, expected a string column")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, columns=[key]):
            for text in batch.column(0).to_pylist():
                if text is None:
                    raise DataError(f"{path}: row {row}: column {key!r} is null")
                if text.strip():
                    yield Document(text, f"{path} row {row}")
                row += 1
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: Parquet read failed near row {row} ({exc})") from None


def _hdf5_datasets(fh: object) -> list[str]:
    import h5py

    found: list[str] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append(name)

    fh.visititems(visit)  # type: ignore[attr-defined]
    return found


def _check_ids(block: np.ndarray, path: Path, dataset: str, first_row: int | None) -> None:
    if block.dtype.kind == "i" and block.size and block.min() < 0:
        bad = np.argwhere(block < 0)[0]
        place = (
            f"row {first_row + int(bad[0])}, column {int(bad[1])}" if first_row is not None else f"index {int(bad[0])}"
        )
        raise DataError(f"{path}: dataset {dataset!r} has negative token id {int(block[tuple(bad)])} at {place}")


def _read_hdf5(source: SourceConfig, path: Path) -> Iterator[Document]:
    import h5py

    name = source.dataset
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: not a readable HDF5 file ({exc})") from None
    with fh:
        if name not in fh or not isinstance(fh[name], h5py.Dataset):
            present = ", ".join(_hdf5_datasets(fh)) or "none"
            raise DataError(f"{path}: no dataset {name!r} (datasets present: {present})")
        ds = fh[name]
        if ds.dtype.kind not in "iu":
            raise DataError(f"{path}: dataset {name!r} has dtype {ds.dtype}, expected integer token ids")
        if ds.ndim == 1:
            ids = np.asarray(ds[()])
            _check_ids(ids, path, name, None)
            if ids.size:
                yield Document(ids.astype(np.int64), f"{path}:{name}")
            return
        if ds.ndim == 2:
            for start in range(0, ds.shape[0], _BATCH_ROWS):
                block = np.asarray(ds[start : start + _BATCH_ROWS])
                _check_ids(block, path, name, start)
                for i, row in enumerate(block.astype(np.int64)):
                    if row.size:
                        yield Document(row, f"{path}:{name} row {start + i}")
            return
        raise DataError(
            f"{path}: dataset {name!r} is {ds.ndim}-D; expected 1-D (one token stream) or 2-D (one document per row)"
        )


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hdf5": _read_hdf5}


def iter_file(source: SourceConfig, path: Path) -> Iterator[Document]:
    """Documents of one file of `source` with their origin; empty documents skipped."""
    reader = _READERS.get(source.format)
    if reader is None:
        raise DataError(f"{_where(source)}: unknown format {source.format!r} (expected {', '.join(_READERS)})")
    try:
        yield from reader(source, path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_source(source: SourceConfig) -> Iterator[Document]:
    """Documents of `source` with their origin, file by file in sorted order; empty documents skipped."""
    if source.format not in _READERS:
        raise DataError(f"{_where(source)}: unknown format {source.format!r} (expected {', '.join(_READERS)})")
    for path in source_files(source):
        yield from iter_file(source, path)


def iter_documents(source: SourceConfig) -> Iterator[str | np.ndarray]:
    """Documents of `source`: `str` for text formats, int64 id arrays for pre-tokenised HDF5."""
    for doc in iter_source(source):
        yield doc.data


def iter_texts(sources: Iterable[SourceConfig]) -> Iterator[str]:
    """Text documents of every text-bearing source (what a BPE tokenizer is trained on)."""
    for source in sources:
        if source.format != "hdf5":
            for doc in iter_source(source):
                assert isinstance(doc.data, str)
                yield doc.data


def is_pretokenised(source: SourceConfig) -> bool:
    return source.format == "hdf5"


__all__ = [
    "DataError",
    "Document",
    "iter_documents",
    "iter_file",
    "iter_source",
    "iter_texts",
    "is_pretokenised",
    "source_files",
]
