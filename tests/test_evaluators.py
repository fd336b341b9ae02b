"""Pluggable evaluators: the built-in perplexities, a user's evaluator, and the gate on them."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from fedhpc.config.schema import ConfigError
from fedhpc.core.files import write_json
from fedhpc.core.layout import RunLayout
from fedhpc.stages.evaluate import evaluate_model
from fedhpc.stages.promote import promote_round
from fedhpc.tasks.evaluators import flat_metrics
from fedhpc.tasks.validation import validate
from fedhpc.trust.checkpoints import load_global_meta
from fedhpc.trust.signing import TrustStore

pytestmark = pytest.mark.e2e  # uses the session's finished federation

USER_EVALUATOR = '''
from dataclasses import dataclass
from fedhpc.config.federation import opt
from fedhpc.tasks.evaluators import Evaluator
from fedhpc.core.tensorfile import load_state

@dataclass(kw_only=True)
class Opts:
    max_norm: float = opt(1e9, "largest allowed parameter norm")

class WeightNorm(Evaluator):
    """A compliance-style check: the model's parameter norm must stay under a limit."""
    Options = Opts
    def evaluate(self, task, ec, result):
        norm = sum(float((t.double() ** 2).sum()) for t in load_state(ec.model_file).values()) ** 0.5
        ok = norm <= self.options.max_norm
        return {"norm": norm, "ok": ok, "reason": "" if ok else f"norm {norm:.3g} > {self.options.max_norm:g}"}
'''


def config_with(finished, evaluators):
    _, cfg, run = finished
    raw = json.loads((run / "config.json").read_text())
    raw["evaluation"]["evaluators"] = evaluators
    return validate(raw), RunLayout.of(run)


def test_builtin_perplexities_match_the_held_out_losses(finished):
    cfg, layout = config_with(finished, [{"name": "domain_perplexity"}, {"name": "language_perplexity"}])
    trust = TrustStore(layout.keys_dir)
    res = evaluate_model(cfg, layout, trust, layout.global_model(2), load_global_meta(layout, trust, 2))
    by_domain = res["evaluators"]["domain_perplexity"]["groups"]
    assert set(by_domain) == set(res["domains"]) == {"law", "clinical", "web"}
    for d, v in by_domain.items():
        assert v["perplexity"] == pytest.approx(math.exp(res["domains"][d]["loss"]), rel=1e-12)
    # Every generated domain is tagged x-synth: one language, pooled over all domains by tokens.
    by_language = res["evaluators"]["language_perplexity"]["groups"]
    assert list(by_language) == ["x-synth"] and by_language["x-synth"]["tokens"] == res["tokens"]
    assert by_language["x-synth"]["loss"] == pytest.approx(res["loss"], rel=1e-12)
    assert res["guards"] == {}
    flat = flat_metrics(res)
    assert flat["evaluators.language_perplexity.groups.x-synth.perplexity"] == by_language["x-synth"]["perplexity"]


def test_a_gating_evaluator_that_fails_rolls_the_round_back(finished, tmp_path):
    (tmp_path / "checks.py").write_text(USER_EVALUATOR)
    _, _, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    cfg, _ = config_with(
        finished,
        [
            {"name": f"{tmp_path}/checks.py:WeightNorm", "options": {"max_norm": 1.0}, "gate": True},
            {"name": "domain_perplexity", "options": {"max_perplexity": 1e6}, "gate": True},
        ],
    )
    layout, trust = RunLayout.of(copy), TrustStore(copy / "keys")
    base = load_global_meta(layout, trust, 1)
    res = evaluate_model(cfg, layout, trust, layout.candidate(1), base)
    assert res["evaluators"]["WeightNorm"]["norm"] > 1.0
    assert res["guards"]["WeightNorm"]["ok"] is False and res["guards"]["domain_perplexity"]["ok"] is True
    write_json(layout.candidate_eval(1), res)
    meta = promote_round(cfg, layout, trust, 1, base)
    assert meta["source"] == "rollback" and meta["reason"].startswith("guard WeightNorm failed: norm ")
    assert meta["sha256"] == base["sha256"]  # the previous global is kept


def test_evaluator_options_are_checked(finished):
    with pytest.raises(ConfigError, match=r"evaluation.evaluators\[0\].options.max_ppl"):
        config_with(finished, [{"name": "domain_perplexity", "options": {"max_ppl": 3}}])
    with pytest.raises(ConfigError, match=r"evaluation.evaluators\[0\].name: 'nope' is neither a built-in"):
        config_with(finished, [{"name": "nope"}])


def test_an_evaluator_without_evaluate_is_named(finished, tmp_path):
    (tmp_path / "lazy.py").write_text(
        "from fedhpc.tasks.evaluators import Evaluator\nclass Lazy(Evaluator):\n    pass\n"
    )
    with pytest.raises(
        ConfigError, match=r"evaluation.evaluators\[0\].name: '.*lazy.py:Lazy' does not implement evaluate"
    ):
        config_with(finished, [{"name": f"{tmp_path}/lazy.py:Lazy"}])
