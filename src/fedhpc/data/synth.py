"""Generate the multi-domain demo corpus from stochastic sources whose entropy rate is known exactly."""

from __future__ import annotations

import hashlib
import json
import math
import string
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from fedhpc.config.federation import SourceConfig, SynthConfig, SynthDomainConfig
from fedhpc.core.files import atomic_path, write_json

# Letters, then digits, then punctuation: small alphabets stay readable, and no space, which the
# `words` source reserves as its delimiter.
ALPHABET = string.ascii_letters + string.digits + string.punctuation
ZIPF_EXPONENT = 1.2
# Mixed into every transition row so each chain is irreducible and aperiodic: the stationary
# distribution is then unique and the declared entropy is the one the sampled text realises.
EPSILON = 1e-6
WORD_LENGTHS = (2, 8)
MAX_TABLE = 1 << 21  # transition-table entries; bounds memory and the stationary solve
_DENSE_STATES = 2048  # up to here solve for the stationary distribution exactly
_POWER_ITERS = 20_000
_UNIFORM_BLOCK = 1 << 16
_TO_ASCII = bytes(ALPHABET, "ascii").ljust(256, b"?")
_FROM_ASCII = np.full(256, -1, dtype=np.int64)
_FROM_ASCII[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(len(ALPHABET))


class Source(Protocol):
    """A stochastic text source with an exactly known entropy rate."""

    generator: str

    def params(self) -> dict: ...

    def entropy_rate(self) -> float:
        """Bits per byte of the stationary source."""

    def sample(self, lengths: Sequence[int], rng: np.random.Generator) -> list[str]:
        """One document per target length, each started from the stationary distribution."""

    def code_length(self, text: str) -> tuple[float, int]:
        """(bits, bytes) of `text` under the true model, over the bytes whose full context lies inside `text`."""


def _uniforms(rng: np.random.Generator) -> Iterator[float]:
    # Sequential samplers draw in fixed-size blocks: scalar draws cost a numpy call each
    # (benchmarks/README.md), and a fixed block size keeps the stream (hence the output)
    # independent of how it is consumed.
    while True:
        yield from rng.random(_UNIFORM_BLOCK).tolist()


def _cumulative(p: np.ndarray) -> np.ndarray:
    c = np.cumsum(p, axis=-1)
    c /= c[..., -1:]
    c[..., -1] = 1.0  # uniforms are < 1, so bisect can never run past the last symbol
    return c


def _dirichlet_rows(rng: np.random.Generator, n: int, k: int, concentration: float) -> np.ndarray:
    rows = rng.dirichlet(np.full(k, concentration), size=n)
    if not np.isfinite(rows).all():
        raise ValueError(f"Dirichlet({concentration}) rows are not finite; raise the concentration")
    rows /= rows.sum(axis=1, keepdims=True)
    return (1.0 - EPSILON) * rows + EPSILON / k


def _row_entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log2(p)).sum(axis=-1)


def _stationary_dense(t: np.ndarray) -> np.ndarray:
    n = len(t)
    a = t.T - np.eye(n)
    a[-1] = 1.0  # replace one (redundant) balance equation by the normalisation
    b = np.zeros(n)
    b[-1] = 1.0
    pi = np.clip(np.linalg.solve(a, b), 0.0, None)
    return pi / pi.sum()


def _check_table(entries: int, what: str) -> None:
    if entries > MAX_TABLE:
        raise ValueError(f"{what} needs {entries:,} transition probabilities (limit {MAX_TABLE:,}); make it smaller")


class MarkovSource:
    """Order-k character chain; H = sum_s pi(s) H(P(.|s)) over the k-gram states."""

    generator = "markov"

    def __init__(self, cfg: SynthDomainConfig, rng: np.random.Generator) -> None:
        self.a, self.k, self.concentration = cfg.alphabet, cfg.order, cfg.concentration
        self.states = self.a**self.k
        _check_table(self.states * self.a, f"markov alphabet={self.a} order={self.k}")
        self.p = _dirichlet_rows(rng, self.states, self.a, self.concentration)
        self.pi = self._stationary()
        self._cum = _cumulative(self.p).tolist()
        self._pi_cum = _cumulative(self.pi).tolist()

    def _next_states(self) -> np.ndarray:
        return (np.arange(self.states)[:, None] * self.a + np.arange(self.a)) % self.states

    def _stationary(self) -> np.ndarray:
        if self.states <= _DENSE_STATES:
            t = np.zeros((self.states, self.states))
            t[np.arange(self.states)[:, None], self._next_states()] = self.p
            return _stationary_dense(t)
        # Too big to solve densely: power-iterate the lazy chain (same pi, never periodic),
        # using that the successor of (h, r) on symbol c is (r, c) whatever the oldest symbol h.
        pi = np.full(self.states, 1.0 / self.states)
        for _ in range(_POWER_ITERS):
            flow = (pi[:, None] * self.p).reshape(self.a, self.states // self.a, self.a).sum(axis=0)
            nxt = 0.5 * (pi + flow.ravel())
            if np.abs(nxt - pi).sum() < 1e-13:
                return nxt / nxt.sum()
            pi = nxt
        raise ValueError(f"markov chain (alphabet={self.a}, order={self.k}) mixes too slowly; raise concentration")

    def params(self) -> dict:
        return {"alphabet": self.a, "order": self.k, "concentration": self.concentration, "epsilon": EPSILON}

    def entropy_rate(self) -> float:
        return float(self.pi @ _row_entropy(self.p))

    def sample(self, lengths: Sequence[int], rng: np.random.Generator) -> list[str]:
        u, a, k, n_states, cum = _uniforms(rng), self.a, self.k, self.states, self._cum
        docs = []
        for n in lengths:
            s = bisect_right(self._pi_cum, next(u))
            codes = [(s // a ** (k - 1 - i)) % a for i in range(k)]  # the start state's k-gram, oldest first
            for _ in range(max(n, k) - k):
                c = bisect_right(cum[s], next(u))
                codes.append(c)
                s = (s * a + c) % n_states
            docs.append(bytes(codes).translate(_TO_ASCII).decode("ascii"))
        return docs

    def code_length(self, text: str) -> tuple[float, int]:
        codes = _codes(text)
        n = len(codes) - self.k
        if n <= 0:
            return 0.0, 0
        states = np.zeros(n, dtype=np.int64)
        for i in range(self.k):
            states = states * self.a + codes[i : i + n]
        return float(-np.log2(self.p[states, codes[self.k :]]).sum()), n


class WordsSource:
    """Order-1 Markov chain over a random vocabulary; words are joined by single spaces.

    Entropy rate per byte, by renewal-reward: the byte stream is a one-to-one function of the word
    sequence (the space delimits words, so it is uniquely decodable), so n words and their bytes
    carry the same information, n * H_words. Those n words span n * E_pi[len(w) + 1] bytes on
    average (the +1 is the space), hence H_bytes = H_words / E_pi[len(w) + 1].
    """

    generator = "words"

    def __init__(self, cfg: SynthDomainConfig, rng: np.random.Generator) -> None:
        self.a, self.n, self.concentration = cfg.alphabet, cfg.words, cfg.concentration
        lo, hi = WORD_LENGTHS
        if self.n > sum(self.a**length for length in range(lo, hi + 1)):
            raise ValueError(f"cannot spell {self.n} distinct words of length {lo}..{hi} over {self.a} characters")
        _check_table(self.n * self.n, f"words vocabulary of {self.n}")
        seen: set[str] = set()
        self.vocab: list[str] = []
        while len(self.vocab) < self.n:
            codes = rng.integers(0, self.a, size=int(rng.integers(lo, hi + 1)))
            word = bytes(codes.astype(np.uint8)).translate(_TO_ASCII).decode("ascii")
            if word not in seen:
                seen.add(word)
                self.vocab.append(word)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.lengths = np.array([len(w) for w in self.vocab], dtype=np.float64)
        self.p = _dirichlet_rows(rng, self.n, self.n, self.concentration)
        self.pi = _stationary_dense(self.p)  # MAX_TABLE keeps the vocabulary small enough to solve exactly
        self._cum = _cumulative(self.p).tolist()
        self._pi_cum = _cumulative(self.pi).tolist()

    def params(self) -> dict:
        lo, hi = WORD_LENGTHS
        return {
            "alphabet": self.a,
            "words": self.n,
            "concentration": self.concentration,
            "epsilon": EPSILON,
            "min_word_length": lo,
            "max_word_length": hi,
        }

    def entropy_rate(self) -> float:
        return float(self.pi @ _row_entropy(self.p)) / float(self.pi @ (self.lengths + 1.0))

    def sample(self, lengths: Sequence[int], rng: np.random.Generator) -> list[str]:
        u, vocab, cum = _uniforms(rng), self.vocab, self._cum
        docs, overshoot = [], 0
        for n in lengths:
            # Documents end on a whole word; carrying the overshoot keeps the domain total on target.
            target = n - overshoot
            w = bisect_right(self._pi_cum, next(u))
            parts, size = [vocab[w]], len(vocab[w])
            while size < target:
                w = bisect_right(cum[w], next(u))
                parts.append(vocab[w])
                size += len(vocab[w]) + 1
            overshoot = size - target
            docs.append(" ".join(parts))
        return docs

    def code_length(self, text: str) -> tuple[float, int]:
        # Summed over a word and the space before it, the per-byte log-probs telescope (chain rule)
        # to log p(word | previous word), so scoring per word is exact per byte.
        ids = np.array([self.index[w] for w in text.split(" ")], dtype=np.int64)
        bits = float(-np.log2(self.p[ids[:-1], ids[1:]]).sum())
        return bits, int((self.lengths[ids[1:]] + 1).sum())


class ZipfSource:
    """I.i.d. characters with p_i proportional to 1 / i**1.2; H = H(p)."""

    generator = "zipf"

    def __init__(self, cfg: SynthDomainConfig, rng: np.random.Generator) -> None:
        del rng  # nothing random in the model itself
        self.a = cfg.alphabet
        w = 1.0 / np.arange(1, self.a + 1, dtype=np.float64) ** ZIPF_EXPONENT
        self.p = w / w.sum()

    def params(self) -> dict:
        return {"alphabet": self.a, "exponent": ZIPF_EXPONENT}

    def entropy_rate(self) -> float:
        return float(_row_entropy(self.p))

    def sample(self, lengths: Sequence[int], rng: np.random.Generator) -> list[str]:
        codes = np.searchsorted(_cumulative(self.p), rng.random(int(sum(lengths))), side="right")
        text = codes.astype(np.uint8).tobytes().translate(_TO_ASCII).decode("ascii")
        ends = np.cumsum(lengths).tolist()
        return [text[s:e] for s, e in zip([0, *ends[:-1]], ends)]

    def code_length(self, text: str) -> tuple[float, int]:
        return float(-np.log2(self.p[_codes(text)]).sum()), len(text)


_SOURCES: dict[str, type[MarkovSource] | type[WordsSource] | type[ZipfSource]] = {
    "markov": MarkovSource,
    "words": WordsSource,
    "zipf": ZipfSource,
}


def _codes(text: str) -> np.ndarray:
    codes = _FROM_ASCII[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
    if (codes < 0).any():
        raise ValueError("text contains characters outside the synth alphabet")
    return codes


def _domain_rngs(seed: int, name: str) -> tuple[np.random.Generator, np.random.Generator]:
    # A stable hash (not hash(), which is salted per process) of (seed, name) alone, so adding,
    # removing or reordering domains never changes another domain's text. The model and the text
    # get separate streams so a source can be rebuilt without regenerating its text.
    digest = hashlib.sha256(f"fedhpc.synth\0{seed}\0{name}".encode()).digest()
    model, text = np.random.SeedSequence(int.from_bytes(digest[:16], "little")).spawn(2)
    return np.random.default_rng(model), np.random.default_rng(text)


def make_source(cfg: SynthDomainConfig, seed: int) -> Source:
    """The exact source `generate_corpus` samples this domain from (for scoring text under the true model)."""
    return _SOURCES[cfg.generator](cfg, _domain_rngs(seed, cfg.name)[0])


def _doc_lengths(total: int, mean: int, rng: np.random.Generator) -> list[int]:
    lo, hi = max(1, mean // 2), max(1, (3 * mean) // 2)
    if total <= lo:
        return [total]
    lengths = rng.integers(lo, hi + 1, size=total // lo + 1)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, total)) + 1
    out = lengths[:n].tolist()
    out[-1] = total - (int(ends[n - 2]) if n > 1 else 0)
    if out[-1] < lo and n > 1:  # no tiny last document: fold the remainder into the previous one
        tail = out.pop()
        out[-1] += tail
    return out


def generate_corpus(cfg: SynthConfig, seed: int, out_dir: Path) -> dict:
    """Write <out_dir>/<domain>.jsonl for every domain plus <out_dir>/corpus.json; return the corpus.json dict.

    Each domain's documents ({"text": ...} per line, printable ASCII) have lengths uniform in
    [doc_bytes/2, 3*doc_bytes/2] and total about `bytes_per_domain`. The declared entropy rate is
    that of the stationary source and ignores document boundaries (restarts cost the model
    extra bits at each document start), so it is a lower bound on the achievable loss per byte.
    Same cfg and seed give byte-identical files.
    """
    names = [d.name for d in cfg.domains]
    if not names:
        raise ValueError("synth needs at least one domain")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate synth domain names: {sorted({n for n in names if names.count(n) > 1})}")
    out_dir = Path(out_dir)
    domains: dict[str, dict] = {}
    for d in cfg.domains:
        model_rng, text_rng = _domain_rngs(seed, d.name)
        source = _SOURCES[d.generator](d, model_rng)
        docs = source.sample(_doc_lengths(cfg.bytes_per_domain, cfg.doc_bytes, text_rng), text_rng)
        payload = "".join(json.dumps({"text": t}) + "\n" for t in docs).encode("ascii")
        with atomic_path(out_dir / f"{d.name}.jsonl") as tmp:
            tmp.write_bytes(payload)
        bits = source.entropy_rate()
        domains[d.name] = {
            "generator": d.generator,
            "params": source.params(),
            "documents": len(docs),
            "bytes": sum(len(t) for t in docs),
            "entropy_rate_bits_per_byte": bits,
            "entropy_rate_nats_per_byte": bits * math.log(2),
            "site": d.site,
            "language": d.language,
            "file": f"{d.name}.jsonl",
        }
    corpus = {"seed": seed, "domains": domains}
    # Written last: its presence means every domain file is complete.
    write_json(out_dir / "corpus.json", corpus)
    return corpus


def domain_sources(corpus: dict, corpus_dir: Path) -> list[SourceConfig]:
    """SourceConfig (format jsonl, field text, licence CC0-1.0, source 'fedhpc synth (<generator>)') for each domain, carrying its site and language."""
    return [
        SourceConfig(
            name=name,
            format="jsonl",
            path=str(Path(corpus_dir) / info["file"]),
            field="text",
            domain=name,
            language=info["language"],
            source=f"fedhpc synth ({info['generator']})",
            licence="CC0-1.0",
            site=info["site"],
        )
        for name, info in corpus["domains"].items()
    ]
