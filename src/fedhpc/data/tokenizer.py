"""Tokenizers that turn document text into token ids: raw bytes, corpus-trained BPE, or a local tokenizer.json."""

from __future__ import annotations

import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from fedhpc.config.federation import TokenizerConfig
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import write_bytes

# Marks our saved file: the HuggingFace JSON cannot carry extra keys (its parser rejects them),
# so the kind and the end-of-document token travel in a small wrapper around it.
FILE_FORMAT = "fedhpc-tokenizer"
FILE_VERSION = 1

BYTE_VOCAB = 257
BYTE_EOS = 256


class TokenizerError(FedhpcError, ValueError):
    """A tokenizer cannot be built, found or loaded."""


class Tokenizer(ABC):
    """Maps text to int64 token ids and back; `eos_id` ends every document."""

    kind: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (no end-of-document token appended)."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; end-of-document tokens are dropped."""

    eos: str | None = None  # the eos token's text, where the tokenizer has one

    def hf_json(self) -> dict[str, Any] | None:
        """The HuggingFace tokenizer definition, for tokenizers that have one."""
        return None

    def to_json(self) -> dict[str, Any]:
        """The saved form (see `save_tokenizer`)."""
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "eos": self.eos,
            "hf": self.hf_json(),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes, 256 is end-of-document: no training, no unknown tokens."""

    kind = "byte"
    vocab_size = BYTE_VOCAB
    eos_id = BYTE_EOS

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        # Sampled ids can form invalid UTF-8; show that as U+FFFD instead of failing.
        return arr[(arr >= 0) & (arr < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFWrapped(Tokenizer):
    """A HuggingFace `tokenizers` tokenizer (trained `bpe` or `pretrained`) with a known eos token."""

    def __init__(self, hf: HFTokenizer, kind: str, eos: str):
        if hf.token_to_id(eos) is None:
            hf.add_special_tokens([eos])
        # A document that happens to contain the eos string must not end itself early.
        hf.encode_special_tokens = True
        self.hf = hf
        self.kind = kind
        self.eos = eos
        self.eos_id = int(hf.token_to_id(eos))
        # Vocabularies may have holes; the embedding must cover the largest id, not just the count.
        self.vocab_size = max(hf.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # The batch call runs on all cores in Rust; it matters for corpora of millions of documents.
        encs = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def hf_json(self) -> dict[str, Any]:
        return json.loads(self.hf.to_str())


def train_bpe(texts: Iterable[str], vocab_size: int, eos: str) -> HFWrapped:
    """Byte-level BPE trained on `texts`: every byte is in the base alphabet, so nothing is unknown."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    tok = HFWrapped(hf, "bpe", eos)
    if tok.vocab_size < vocab_size:
        print(
            f"tokenizer: corpus supports only {tok.vocab_size} of the requested {vocab_size} BPE tokens",
            file=sys.stderr,
        )
    return tok


def _resolve_pretrained(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise TokenizerError(
            f"data.tokenizer.path: {p} does not exist (expected a tokenizer.json file or a directory holding one)"
        )
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(f"data.tokenizer.path: no tokenizer.json at {p}")
    return p


def load_pretrained(path: str | os.PathLike, eos: str) -> HFWrapped:
    """A local `tokenizer.json` (file or directory holding one); our own saved files are accepted too."""
    p = _resolve_pretrained(path)
    try:
        text = p.read_text(encoding="utf-8")
        obj = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{p}: not a readable tokenizer.json ({exc})") from None
    if isinstance(obj, dict) and obj.get("format") == FILE_FORMAT:
        if obj.get("hf") is None:
            raise TokenizerError(f"{p}: a saved byte tokenizer, not a pretrained one; use data.tokenizer.kind: byte")
        text = json.dumps(obj["hf"])
    try:
        hf = HFTokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise TokenizerError(f"{p}: not a valid HuggingFace tokenizer.json ({exc})") from None
    return HFWrapped(hf, "pretrained", eos)


def build_tokenizer(cfg: TokenizerConfig, texts: Iterable[str]) -> Tokenizer:
    """The tokenizer `cfg` asks for; `texts` is only consumed when a BPE is trained on it."""
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "bpe":
        return train_bpe(texts, cfg.vocab_size, cfg.eos)
    if cfg.kind == "pretrained":
        if not cfg.path:
            raise TokenizerError("data.tokenizer.path is required when data.tokenizer.kind is 'pretrained'")
        return load_pretrained(cfg.path, cfg.eos)
    raise TokenizerError(f"data.tokenizer.kind: unknown kind {cfg.kind!r}")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` atomically as JSON (sorted keys, so equal tokenizers give equal bytes)."""
    write_bytes(path, (json.dumps(tok.to_json(), sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a file written by `save_tokenizer`; ids match those of the saved tokenizer."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(f"{p}: no such tokenizer file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{p}: not a readable tokenizer file ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != FILE_FORMAT:
        raise TokenizerError(
            f"{p}: not a fedhpc tokenizer file (a plain tokenizer.json is used via data.tokenizer.kind: pretrained)"
        )
    if obj.get("version") != FILE_VERSION:
        raise TokenizerError(f"{p}: tokenizer file version {obj.get('version')!r}, expected {FILE_VERSION}")
    kind = obj.get("kind")
    if kind == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif kind in ("bpe", "pretrained") and isinstance(obj.get("hf"), dict) and isinstance(obj.get("eos"), str):
        try:
            hf = HFTokenizer.from_str(json.dumps(obj["hf"]))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{p}: embedded tokenizer does not load ({exc})") from None
        tok = HFWrapped(hf, kind, obj["eos"])
    else:
        raise TokenizerError(f"{p}: malformed tokenizer file (kind {kind!r})")
    if tok.vocab_size != obj.get("vocab_size") or tok.eos_id != obj.get("eos_id"):
        raise TokenizerError(
            f"{p}: reloaded tokenizer has vocab_size {tok.vocab_size}, eos_id {tok.eos_id}; "
            f"file says {obj.get('vocab_size')}, {obj.get('eos_id')}"
        )
    return tok
