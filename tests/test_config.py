"""Config validation: every mistake is named by its dotted key together with what is allowed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from fedhpc.config.federation import Config, SiteConfig, TrainingConfig
from fedhpc.config.schema import ConfigError, config_schema
from fedhpc.tasks.validation import load, markdown_docs, validate

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "workflow" / "schemas" / "config.schema.json"

TRAINING_KEYS = (
    "batch_tokens, beta1, beta2, compression, device, grad_clip, keep_optimizer_state, local_eval_fraction, "
    "log_every, lr, lr_batch_scaling, max_micro_batch, min_lr_ratio, precision, warmup_fraction, weight_decay"
)
SITE_KEYS = (
    "accelerator, batch_tokens, compression, container, energy_weight, engine, gpu_memory_gb, gpus, memory_gb, "
    "nodes, ranks_per_node, resident, resident_idle_minutes, resident_margin_minutes, throughput, zero_stage"
)
TOP_KEYS = (
    "container, data, evaluation, exchange, model, output_dir, retention, rounds, run, seed, sites, strategy, task, tracking, training, trust, "
    "verification"
)


def minimal(**extra) -> dict:
    """The smallest valid config: two sites and a one-domain synthetic corpus."""
    raw = {
        "sites": {"lumi": {"accelerator": "rocm", "gpus": 8, "gpu_memory_gb": 64}, "laptop": {}},
        "data": {"synth": {"domains": [{"name": "web"}]}},
    }
    for key, value in extra.items():
        raw[key] = value
    return raw


def error_of(raw, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        validate(raw, **kw)
    return str(info.value)


def problems(msg: str) -> list[str]:
    """The '  - ...' lines of a ConfigError: one per problem."""
    return [line[4:] for line in msg.splitlines() if line.startswith("  - ")]


def test_minimal_config_validates_into_typed_dataclasses():
    cfg = validate(minimal(training={"lr": 1}))
    assert isinstance(cfg, Config)
    assert cfg.sites["lumi"] == SiteConfig(accelerator="rocm", gpus=8, gpu_memory_gb=64.0)
    assert cfg.sites["laptop"] == SiteConfig()  # every field defaulted
    assert cfg.data.synth.domains[0].name == "web" and cfg.data.synth.domains[0].site is None
    # An integer where a float is declared is accepted and becomes a float.
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)
    assert cfg.training.batch_tokens == TrainingConfig().batch_tokens


def test_unknown_top_level_key_is_named_with_the_allowed_keys():
    msg = error_of(minimal(round={"count": 3}))
    assert problems(msg) == [f"unknown key round; allowed keys here: {TOP_KEYS}"]


@pytest.mark.parametrize(
    "raw, dotted, allowed",
    [
        (minimal(training={"lr_schdule": "cosine"}), "training.lr_schdule", TRAINING_KEYS),
        ({**minimal(), "sites": {"lumi": {"gpu_mem": 64}}}, "sites.lumi.gpu_mem", SITE_KEYS),
        (
            {**minimal(), "data": {"synth": {"domains": [{"name": "web", "sight": "lumi"}]}}},
            "data.synth.domains[0].sight",
            "alphabet, concentration, generator, language, name, order, site, words",
        ),
    ],
)
def test_unknown_nested_key_is_named_by_its_dotted_path_with_the_allowed_keys(raw, dotted, allowed):
    msg = error_of(raw)
    assert problems(msg) == [f"unknown key {dotted}; allowed keys here: {allowed}"]


def test_every_unknown_key_is_reported_not_only_the_first():
    msg = error_of(minimal(foo=1, training={"lr_schdule": 1}))
    lines = problems(msg)
    assert len(lines) == 2
    assert lines[0].startswith("unknown key foo;") and lines[1].startswith("unknown key training.lr_schdule;")


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            {**minimal(), "sites": {"lumi": {"accelerator": "tpu"}}},
            "sites.lumi.accelerator: 'tpu' is not allowed; allowed values: rocm, cuda, cpu",
        ),
        (
            minimal(strategy={"weighting": "flops"}),
            "strategy.weighting: 'flops' is not allowed; allowed values: tokens, samples, uniform",
        ),
        (
            {**minimal(), "data": {"synth": {"domains": [{"name": "web", "generator": "gpt"}]}}},
            "data.synth.domains[0].generator: 'gpt' is not allowed; allowed values: markov, words, zipf",
        ),
    ],
)
def test_bad_enum_names_the_key_and_the_allowed_values(raw, expected):
    assert problems(error_of(raw)) == [expected]


@pytest.mark.parametrize(
    "raw, expected",
    [
        (minimal(model={"n_layer": "four"}), "model.n_layer: 'four' is not of type 'integer'"),
        (minimal(rounds={"count": 2.5}), "rounds.count: 2.5 is not of type 'integer'"),
        (minimal(rounds={"count": True}), "rounds.count: True is not of type 'integer'"),
        (minimal(tracking={"mlflow": "yes"}), "tracking.mlflow: 'yes' is not of type 'boolean'"),
        (minimal(sites=["lumi", "laptop"]), "sites: ['lumi', 'laptop'] is not of type 'object'"),
        # Nullable keys report the non-null alternative, i.e. what a value must look like.
        (
            minimal(verification={"max_update_norm": "big"}),
            "verification.max_update_norm: 'big' is not of type 'number'",
        ),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(raw, expected):
    assert problems(error_of(raw)) == [expected]


def test_value_out_of_range_names_the_key_and_the_limit():
    lines = problems(error_of(minimal(rounds={"quorum": 1.5}, training={"lr": 0})))
    assert lines == [
        "rounds.quorum: 1.5 is greater than the maximum of 1",
        "training.lr: 0 is less than or equal to the minimum of 0",
    ]


def test_synth_domain_pinned_to_an_unknown_site_names_the_key_and_the_known_sites():
    raw = {**minimal(), "data": {"synth": {"domains": [{"name": "web"}, {"name": "law", "site": "leonardo"}]}}}
    assert problems(error_of(raw)) == ["data.synth.domains[1].site: 'leonardo' is not a site; sites: laptop, lumi"]


def test_source_pinned_to_an_unknown_site_names_the_key_and_the_known_sites():
    src = {"name": "wiki", "format": "jsonl", "path": "wiki.jsonl", "domain": "web", "site": "lumi"}
    raw = {**minimal(), "data": {"sources": [src, {**src, "name": "pubmed", "site": "a100"}]}}
    assert problems(error_of(raw)) == ["data.sources[1].site: 'a100' is not a site; sites: laptop, lumi"]


def test_n_head_that_does_not_divide_d_model_is_rejected():
    assert problems(error_of(minimal(model={"n_head": 3, "d_model": 128}))) == [
        "model.n_head: 3 does not divide model.d_model (128)"
    ]
    assert validate(minimal(model={"n_head": 8, "d_model": 128})).model.n_head == 8


@pytest.mark.parametrize("data", [{}, {"synth": None}, {"synth": {}}, {"sources": []}])
def test_a_config_without_any_data_is_rejected(data):
    raw = {"sites": {"laptop": {}}, "data": data}
    assert problems(error_of(raw)) == ["data: no data; set data.synth or data.sources"]


@pytest.mark.parametrize(
    "tok", [{"kind": "pretrained"}, {"kind": "pretrained", "path": None}, {"kind": "pretrained", "path": ""}]
)
def test_pretrained_tokenizer_without_a_path_is_rejected(tok):
    raw = {**minimal(), "data": {"synth": {"domains": [{"name": "web"}]}, "tokenizer": tok}}
    assert problems(error_of(raw)) == ["data.tokenizer.path: required when data.tokenizer.kind is 'pretrained'"]
    tok_ok = {**tok, "path": "tok/tokenizer.json"}
    assert validate({**raw, "data": {**raw["data"], "tokenizer": tok_ok}}).data.tokenizer.path == "tok/tokenizer.json"


def test_several_semantic_problems_are_reported_together():
    raw = {
        "sites": {"a": {}},
        "model": {"n_head": 5},
        "data": {"synth": {"domains": [{"name": "x", "site": "b"}, {"name": "x"}]}},
    }
    lines = problems(error_of(raw))
    assert lines == [
        "data.synth.domains[0].site: 'b' is not a site; sites: a",
        "data.synth.domains[1].name: domain 'x' is defined twice",
        "model.n_head: 5 does not divide model.d_model (128)",
    ]


def test_a_config_without_sites_is_rejected():
    msg = error_of({"data": {"synth": {"domains": [{"name": "web"}]}}})
    assert "sites" in msg


def test_top_level_must_be_a_mapping():
    assert error_of(["sites"], origin="cfg.yaml") == "cfg.yaml: expected a mapping at the top level, got list"
    assert error_of(None, origin="cfg.yaml") == "cfg.yaml: expected a mapping at the top level, got NoneType"


def test_load_names_the_file_in_every_error(tmp_path):
    path = tmp_path / "federation.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"lr_schdule": 1})))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: invalid configuration:")
    assert "training.lr_schdule" in str(info.value)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("sites:\n  lumi: {gpus: 8\nrounds:\n  count: 2\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: cannot parse (")
    assert "line" in str(info.value)  # the parser's position comes along


def test_json_config_loads_like_yaml(tmp_path):
    raw = minimal(rounds={"count": 7})
    (tmp_path / "c.json").write_text(json.dumps(raw))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert load(tmp_path / "c.json") == load(tmp_path / "c.yaml") == validate(raw)
    assert load(tmp_path / "c.json").rounds.count == 7


def test_committed_schema_file_is_the_generated_schema():
    """workflow/schemas/config.schema.json must never drift from the dataclasses."""
    assert SCHEMA_FILE.read_text() == json.dumps(config_schema(), indent=2) + "\n", (
        "regenerate with `fedhpc config schema --write workflow/schemas/config.schema.json`"
    )


def test_committed_docs_are_the_generated_docs():
    assert (REPO / "docs" / "configuration.md").read_text() == markdown_docs(), (
        "regenerate with `fedhpc config docs --write docs/configuration.md`"
    )


def test_docs_document_every_key_of_every_section():
    docs = markdown_docs()
    for section, keys in (("TrainingConfig", TRAINING_KEYS), ("SiteConfig", SITE_KEYS), ("Config", TOP_KEYS)):
        body = docs.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert sorted(re.findall(r"^\| `(\w+)` \|", body, re.M)) == keys.split(", ")


def test_repository_config_yaml_validates():
    cfg = load(REPO / "config.yaml")
    assert sorted(cfg.sites) == ["a100", "laptop", "lumi"]
    assert [d.site for d in cfg.data.synth.domains] == ["lumi", "a100", "laptop", None]
    assert cfg.model.d_model % cfg.model.n_head == 0


@pytest.mark.parametrize(
    "raw",
    [
        minimal(rounds={"count": 3}),
        minimal(training={"lr_schdule": 1}, foo=2),
        {**minimal(), "sites": {"lumi": {"accelerator": "tpu"}}},
        minimal(model={"n_head": 3}),
    ],
)
def test_validating_with_the_schema_file_gives_the_same_result(raw):
    def outcome(**kw):
        try:
            return validate(raw, **kw)
        except ConfigError as exc:
            return f"ConfigError: {exc}"

    assert outcome(schema_file=SCHEMA_FILE) == outcome() == outcome(schema_file=str(SCHEMA_FILE))


def test_the_schema_file_is_what_validation_uses(tmp_path):
    """A schema file that differs from the code's schema changes the outcome, so it is really read."""
    schema = json.loads(SCHEMA_FILE.read_text())
    schema["properties"]["rounds"]["properties"]["count"]["maximum"] = 2
    stricter = tmp_path / "config.schema.json"
    stricter.write_text(json.dumps(schema))
    raw = minimal(rounds={"count": 3})
    assert validate(raw).rounds.count == 3
    assert problems(error_of(raw, schema_file=stricter)) == ["rounds.count: 3 is greater than the maximum of 2"]


@pytest.mark.parametrize(
    "strategy, expected",
    [
        (
            {"rule": "krum", "faulty_sites": 1},
            "strategy.faulty_sites: krum needs n > 2f + 2 = 4 sites to tolerate f = 1; there are 2",
        ),
        (
            {"rule": "median", "faulty_sites": 1},
            "strategy.faulty_sites: median tolerates f faulty sites only with n ≥ 2f + 1 = 3 sites; there are 2",
        ),
        (
            {"rule": "mean", "faulty_sites": 1},
            "strategy.faulty_sites: the weighted mean has no breakdown point: one faulty site moves it arbitrarily "
            "(use median, trimmed_mean or krum)",
        ),
        (
            {"rule": "median", "privacy": {"noise_multiplier": 1.0}},
            "strategy.privacy.noise_multiplier: differential privacy is calibrated for the weighted mean of clipped "
            "updates; rule 'median' has another sensitivity",
        ),
        (
            {"name": "scaffold", "rule": "trimmed_mean"},
            "strategy.rule: scaffold's control variates need the weighted mean, not 'trimmed_mean'",
        ),
    ],
)
def test_a_strategy_that_cannot_keep_its_promise_is_refused_with_the_reason(strategy, expected):
    assert problems(error_of(minimal(strategy=strategy))) == [expected]


def test_site_side_strategies_refuse_sharded_engines_naming_the_site():
    raw = minimal(strategy={"name": "fedprox"})
    raw["sites"]["lumi"]["engine"] = "fsdp"
    assert problems(error_of(raw)) == [
        "sites.lumi.engine: strategy 'fedprox' corrects local gradients and needs engine 'ddp', not 'fsdp'"
    ]


def test_a_robust_configuration_with_enough_sites_validates():
    raw = minimal(strategy={"rule": "multikrum", "faulty_sites": 1, "multikrum_select": 3})
    raw["sites"].update({f"s{i}": {} for i in range(3)})  # n = 5 > 2f + 2
    cfg = validate(raw)
    assert (cfg.strategy.rule, cfg.strategy.faulty_sites, cfg.strategy.multikrum_select) == ("multikrum", 1, 3)
    assert cfg.strategy.server_lr is None and cfg.strategy.privacy.noise_multiplier == 0.0


@pytest.mark.parametrize(
    "exchange, message",
    [
        ({"kind": "rsync", "role": "site", "site": "mars", "hub": "h:/x"}, "exchange.site: role 'site' needs one of"),
        ({"role": "coordinator"}, "exchange.kind: role 'coordinator' needs a hub"),
        ({"kind": "shared", "role": "site", "site": "laptop"}, "exchange.hub: required when a site exchanges"),
        ({"kind": "rsync", "hub": "/just/a/path"}, "exchange.hub: '/just/a/path' is not `[user@]host:/path`"),
        ({"kind": "s3", "hub": "lumidata.eu/bucket"}, "exchange.hub: 'lumidata.eu/bucket' is not `s3://bucket/prefix`"),
        ({"kind": "s3", "role": "coordinator"}, "exchange.hub: required when a site exchanges through 's3'"),
    ],
)
def test_multi_site_settings_that_cannot_work_are_refused_naming_the_key(exchange, message):
    raw = minimal(exchange=exchange)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(raw)


def test_run_role_and_site_become_a_nested_config_override():
    from fedhpc.ops.run import role_config

    assert role_config(None, None) == []
    assert role_config(None, "lumi") == ["--config", 'exchange={"role": "site", "site": "lumi"}']
    assert role_config("coordinator", None) == ["--config", 'exchange={"role": "coordinator"}']
    with pytest.raises(SystemExit, match="needs --site"):
        role_config("site", None)
