"""The demo corpus: declared entropy rates are the true ones, output is deterministic and well-formed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedhpc.config.federation import SynthConfig, SynthDomainConfig
from fedhpc.data.synth import domain_sources, generate_corpus, make_source


def _docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _monte_carlo_bits_per_byte(domain: SynthDomainConfig, seed: int, out: Path) -> float:
    source = make_source(domain, seed)
    bits = nbytes = 0.0
    for text in _docs(out / f"{domain.name}.jsonl"):
        b, n = source.code_length(text)
        bits += b
        nbytes += n
    return bits / nbytes


@pytest.mark.parametrize(
    "domain",
    [
        SynthDomainConfig(name="mk", generator="markov", alphabet=24, order=2, concentration=0.3),
        SynthDomainConfig(name="mk3", generator="markov", alphabet=12, order=3, concentration=0.5),
        SynthDomainConfig(name="wd", generator="words", alphabet=20, words=300, concentration=0.3),
        SynthDomainConfig(name="zf", generator="zipf", alphabet=40),
    ],
    ids=lambda d: d.name,
)
def test_declared_entropy_matches_monte_carlo(domain: SynthDomainConfig, tmp_path: Path) -> None:
    corpus = generate_corpus(SynthConfig(bytes_per_domain=200_000, domains=[domain]), 7, tmp_path)
    declared = corpus["domains"][domain.name]["entropy_rate_bits_per_byte"]
    measured = _monte_carlo_bits_per_byte(domain, 7, tmp_path)
    assert measured == pytest.approx(declared, rel=0.02)
    assert corpus["domains"][domain.name]["entropy_rate_nats_per_byte"] == pytest.approx(declared * math.log(2))


def test_zipf_two_symbols_is_exact() -> None:
    p = np.array([1.0, 2.0**-1.2])
    p /= p.sum()
    expected = float(-(p * np.log2(p)).sum())
    source = make_source(SynthDomainConfig(name="z", generator="zipf", alphabet=2), 0)
    assert source.entropy_rate() == pytest.approx(expected, abs=1e-12)


def test_markov_with_uniform_rows_reaches_log_alphabet() -> None:
    source = make_source(SynthDomainConfig(name="u", generator="markov", alphabet=8, order=2, concentration=1e5), 3)
    assert source.entropy_rate() == pytest.approx(3.0, abs=1e-3)
    assert source.entropy_rate() <= 3.0 + 1e-12


def test_markov_large_state_space_uses_power_iteration() -> None:
    # 24**3 = 13824 states is above the dense-solve limit; the iterated pi must still be stationary.
    source = make_source(SynthDomainConfig(name="big", generator="markov", alphabet=24, order=3), 5)
    flow = (source.pi[:, None] * source.p).reshape(24, -1, 24).sum(axis=0).ravel()
    assert np.abs(flow - source.pi).sum() < 1e-9
    assert 0 < source.entropy_rate() < math.log2(24)


def test_concentration_changes_entropy() -> None:
    low = make_source(SynthDomainConfig(name="a", generator="markov", concentration=0.1), 1).entropy_rate()
    high = make_source(SynthDomainConfig(name="a", generator="markov", concentration=5.0), 1).entropy_rate()
    assert high - low > 1.0
    assert high < math.log2(24)


def _cfg(*domains: SynthDomainConfig) -> SynthConfig:
    return SynthConfig(bytes_per_domain=20_000, doc_bytes=500, domains=list(domains))


MK = SynthDomainConfig(name="mk", generator="markov", site="lumi", language="x-mk")
WD = SynthDomainConfig(name="wd", generator="words")
ZF = SynthDomainConfig(name="zf", generator="zipf", alphabet=30)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_deterministic_per_seed_and_per_domain(tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / x for x in "abcd")
    generate_corpus(_cfg(MK, WD, ZF), 11, a)
    generate_corpus(_cfg(MK, WD, ZF), 11, b)
    assert _files(a) == _files(b)
    generate_corpus(_cfg(MK, WD, ZF), 12, c)
    for name in ("mk.jsonl", "wd.jsonl", "zf.jsonl"):
        assert _files(a)[name] != _files(c)[name]
    # Adding (and reordering) domains leaves the others byte-identical.
    extra = SynthDomainConfig(name="extra", generator="markov", order=1)
    generate_corpus(_cfg(extra, ZF, MK), 11, d)
    for name in ("mk.jsonl", "zf.jsonl"):
        assert _files(d)[name] == _files(a)[name]
    assert not list(a.glob(".*.part"))  # atomic writes leave no temporaries behind


def test_corpus_json_is_consistent(tmp_path: Path) -> None:
    cfg = _cfg(MK, WD, ZF)
    corpus = generate_corpus(cfg, 3, tmp_path)
    assert json.loads((tmp_path / "corpus.json").read_text()) == corpus
    assert corpus["seed"] == 3
    assert set(corpus["domains"]) == {"mk", "wd", "zf"}
    for name, info in corpus["domains"].items():
        assert set(info) == {
            "generator",
            "params",
            "documents",
            "bytes",
            "entropy_rate_bits_per_byte",
            "entropy_rate_nats_per_byte",
            "site",
            "language",
            "file",
        }
        path = tmp_path / info["file"]
        assert info["file"] == f"{name}.jsonl"
        lines = path.read_text().splitlines()
        texts = _docs(path)
        assert info["documents"] == len(lines) == len(texts)
        assert info["bytes"] == sum(len(t.encode()) for t in texts)
        assert all(t and t.isascii() and t.isprintable() for t in texts)
        assert abs(info["bytes"] - cfg.bytes_per_domain) <= 9  # words end on a whole word
        lengths = [len(t) for t in texts]
        assert np.mean(lengths) == pytest.approx(cfg.doc_bytes, rel=0.25)
        assert max(lengths[:-1]) <= 1.5 * cfg.doc_bytes + 16
    assert corpus["domains"]["mk"]["params"] == {"alphabet": 24, "order": 2, "concentration": 0.3, "epsilon": 1e-6}
    assert corpus["domains"]["mk"]["site"] == "lumi" and corpus["domains"]["wd"]["site"] is None
    assert " " in _docs(tmp_path / "wd.jsonl")[0] and " " not in _docs(tmp_path / "mk.jsonl")[0]
    # zipf: the first character is the most frequent, as the law says.
    zf = "".join(_docs(tmp_path / "zf.jsonl"))
    assert max(set(zf), key=zf.count) == "a"


def test_domain_sources_carry_site_and_language(tmp_path: Path) -> None:
    corpus = generate_corpus(_cfg(MK, WD), 0, tmp_path)
    sources = {s.name: s for s in domain_sources(corpus, tmp_path)}
    assert set(sources) == {"mk", "wd"}
    mk, wd = sources["mk"], sources["wd"]
    assert (mk.site, mk.language, mk.domain) == ("lumi", "x-mk", "mk")
    assert (wd.site, wd.language) == (None, "x-synth")
    assert mk.format == "jsonl" and mk.field == "text" and mk.licence == "CC0-1.0"
    assert mk.source == "fedhpc synth (markov)" and wd.source == "fedhpc synth (words)"
    assert Path(mk.path) == tmp_path / "mk.jsonl" and Path(mk.path).is_file()


def test_rejects_bad_configs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        generate_corpus(_cfg(MK, MK), 0, tmp_path)
    with pytest.raises(ValueError, match="transition probabilities"):
        make_source(SynthDomainConfig(name="x", generator="markov", alphabet=90, order=4), 0)
    with pytest.raises(ValueError, match="distinct words"):
        make_source(SynthDomainConfig(name="x", generator="words", alphabet=2, words=600), 0)
    assert not (tmp_path / "corpus.json").exists()
