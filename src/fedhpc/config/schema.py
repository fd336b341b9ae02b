"""Turn the config dataclasses into a JSON-Schema and Markdown docs, and check a config against them.

The task's and evaluators' own checks live a layer up (`fedhpc.tasks.validation`), which
passes them in as a `TaskCheck`: the config layer imports no task."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import jsonschema
import yaml

from fedhpc.config.federation import Config
from fedhpc.config.tolerance import tolerance_problem
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import parse_json

# The task a config names, loaded, and its problems (the task's own and its evaluators').
TaskCheck = Callable[[Config], tuple[Any, list[str]]]


class ConfigError(FedhpcError, ValueError):
    """The configuration is wrong; the message names every offending key and what is allowed."""


def _is_dataclass(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_schema(tp: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return {}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        assert len(inner) == 1, tp
        sub = _type_schema(inner[0])
        return {"anyOf": [sub, {"type": "null"}]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict and args[1] is Any:
        return {"type": "object"}  # free-form: checked by the component it configures (task/evaluator options)
    if origin is dict:
        return {
            "type": "object",
            "additionalProperties": _type_schema(args[1]),
            "propertyNames": {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
        }
    if _is_dataclass(tp):
        return dataclass_schema(tp)
    return {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}[tp]


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # Resolving the annotations (strings, under `from __future__ import annotations`) was a fifth of
    # a small job's config check, once per dataclass per job.
    return typing.get_type_hints(cls)


def dataclass_schema(cls: type) -> dict[str, Any]:
    hints = _hints(cls)
    props, required = {}, []
    for f in dataclasses.fields(cls):
        sub = _type_schema(hints[f.name])
        constraints = f.metadata.get("schema", {})
        if constraints:
            # Constraints apply to the value, not to the null alternative.
            target = sub["anyOf"][0] if "anyOf" in sub else sub
            target.update(constraints)
        sub["description"] = f.metadata.get("doc", "")
        props[f.name] = sub
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    schema = {
        "type": "object",
        "description": (cls.__doc__ or "").strip(),
        "properties": props,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


def config_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fedhpc config.yaml",
        **dataclass_schema(Config),
    }


def _dotted(path: typing.Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _describe(err: jsonschema.ValidationError, prefix: str = "") -> str:
    path = [*prefix.split("."), *err.absolute_path] if prefix else list(err.absolute_path)
    where = _dotted(path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed))
        keys = ", ".join(f"{where}.{k}" if path else k for k in extra)
        return f"unknown key {keys}; allowed keys here: {', '.join(allowed) or '(none)'}"
    if err.validator == "enum":
        return f"{where}: {err.instance!r} is not allowed; allowed values: {', '.join(map(str, err.validator_value))}"
    if err.validator == "anyOf":
        # Report the non-null branch, which says what a value must look like.
        sub = [e for e in err.context if e.validator != "type" or e.validator_value != "null"]
        if sub:
            return _describe(sub[0], prefix)
    if err.validator == "required":
        return f"{where}: {err.message}"
    return f"{where}: {err.message}"


def describe_errors(errors: list[jsonschema.ValidationError], prefix: str = "") -> str:
    """One line per schema error, each naming its key (under `prefix`, e.g. `task.options`)."""
    return "\n".join(f"  - {_describe(e, prefix)}" for e in errors)


def from_mapping(cls: type, data: dict[str, Any]) -> Any:
    """A (schema-valid) mapping as the dataclass `cls`, nested dataclasses included."""
    return _build(cls, data)


def _build(cls: type, data: dict[str, Any]) -> Any:
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        return None
    if origin in (Union, types.UnionType):
        return _convert(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [_convert(args[0], v) for v in value]
    if origin is dict:
        return {k: _convert(args[1], v) for k, v in value.items()}
    if _is_dataclass(tp):
        return _build(tp, value)
    if tp is float:
        return float(value)
    return value


def _semantic_problems(cfg: Config, task_check: TaskCheck | None) -> list[str]:
    problems = []
    sites = set(cfg.sites)
    domains: dict[str, str] = {}
    synth_domains = cfg.data.synth.domains if cfg.data.synth else []
    for i, d in enumerate(synth_domains):
        if d.site is not None and d.site not in sites:
            problems.append(
                f"data.synth.domains[{i}].site: {d.site!r} is not a site; sites: {', '.join(sorted(sites))}"
            )
        if d.name in domains:
            problems.append(f"data.synth.domains[{i}].name: domain {d.name!r} is defined twice")
        domains[d.name] = "synth"
    names = set()
    for i, s in enumerate(cfg.data.sources):
        if s.site is not None and s.site not in sites:
            problems.append(f"data.sources[{i}].site: {s.site!r} is not a site; sites: {', '.join(sorted(sites))}")
        if s.name in names:
            problems.append(f"data.sources[{i}].name: source {s.name!r} is defined twice")
        names.add(s.name)
    # Loading the task imports it (for the built-in ones: torch); a job that only reads the
    # blackboard re-reads a config the workflow already checked whole, and skips that.
    task, task_problems = task_check(cfg) if task_check else (None, [])
    if task is not None and task.uses_tokens and not synth_domains and not cfg.data.sources:
        problems.append("data: no data; set data.synth or data.sources")
    if "coordinator" in sites:
        problems.append("sites.coordinator: that name is the coordinator's identity; give the site another name")
    shared = [d for d in synth_domains if d.site is None] + [s for s in cfg.data.sources if s.site is None]
    if cfg.data.tokenizer.kind == "bpe" and not shared and (synth_domains or cfg.data.sources):
        problems.append(
            "data.tokenizer.kind: bpe is trained by the coordinator on the shared data (sources without `site`), "
            "and every source is pinned to a site; use kind: byte, or pretrained with a tokenizer trained elsewhere"
        )
    if cfg.data.tokenizer.kind == "pretrained" and not cfg.data.tokenizer.path:
        problems.append("data.tokenizer.path: required when data.tokenizer.kind is 'pretrained'")
    if cfg.task.name == "gpt" and cfg.model.d_model % cfg.model.n_head:
        problems.append(f"model.n_head: {cfg.model.n_head} does not divide model.d_model ({cfg.model.d_model})")
    return (
        problems
        + task_problems
        + _strategy_problems(cfg, task)
        + _exchange_problems(cfg)
        + _trust_problems(cfg)
        + _secagg_problems(cfg)
        + _retention_problems(cfg)
    )


def _retention_problems(cfg: Config) -> list[str]:
    keep, staleness = cfg.retention.keep_rounds, cfg.rounds.max_staleness
    if cfg.retention.enabled and cfg.exchange.role != "all":
        return [
            f"retention: not for exchange.role {cfg.exchange.role!r} yet; a site that falls behind still pulls old "
            "rounds' models from the hub, so the coordinator cannot tell which it may delete"
        ]
    if keep is not None and cfg.rounds.late_updates == "fold" and keep < staleness:
        return [
            f"retention.keep_rounds: {keep} is less than rounds.max_staleness ({staleness}); a late update is "
            f"folded up to {staleness} rounds after its own, so its round's updates must still be on disk"
        ]
    return []


def _exchange_problems(cfg: Config) -> list[str]:
    ex, problems = cfg.exchange, []
    if ex.role == "site" and ex.site not in cfg.sites:
        problems.append(
            f"exchange.site: role 'site' needs one of the sites ({', '.join(sorted(cfg.sites))}), not {ex.site!r}"
        )
    if ex.role != "all" and ex.kind == "local":
        problems.append(f"exchange.kind: role {ex.role!r} needs a hub to exchange through ('shared' or 'rsync')")
    if ex.kind != "local" and (ex.role == "site" or ex.kind == "s3") and not ex.hub:
        problems.append(f"exchange.hub: required when a site exchanges through {ex.kind!r}")
    if ex.kind == "s3" and ex.hub and not ex.hub.startswith("s3://"):
        problems.append(f"exchange.hub: {ex.hub!r} is not `s3://bucket/prefix`")
    if ex.kind == "rsync" and ex.hub and ":" not in ex.hub:
        problems.append(f"exchange.hub: {ex.hub!r} is not `[user@]host:/path` (rsync over SSH)")
    return problems


def _strategy_problems(cfg: Config, task: Any = None) -> list[str]:

    st, problems = cfg.strategy, []
    if st.name in ("fedprox", "scaffold") and task is not None and not task.corrects_gradients:
        problems.append(
            f"strategy.name: {st.name!r} corrects the sites' gradients, which task {cfg.task.name!r} does not support"
        )
    why = tolerance_problem(st.rule, len(cfg.sites), st.faulty_sites, st.multikrum_select)
    if why:
        problems.append(f"strategy.faulty_sites: {why}")
    if st.name in ("fedprox", "scaffold"):
        # Their correction is added to whole local gradients; sharded engines hold only a slice.
        for name, site in sorted(cfg.sites.items()):
            if site.engine != "ddp":
                problems.append(
                    f"sites.{name}.engine: strategy {st.name!r} corrects local gradients and needs engine 'ddp', "
                    f"not {site.engine!r}"
                )
    if st.privacy.noise_multiplier > 0 and st.rule != "mean":
        problems.append(
            f"strategy.privacy.noise_multiplier: differential privacy is calibrated for the weighted mean of clipped "
            f"updates; rule {st.rule!r} has another sensitivity"
        )
    if st.name == "scaffold" and st.rule != "mean":
        problems.append("strategy.rule: scaffold's control variates need the weighted mean, not " + repr(st.rule))
    return problems


def _trust_problems(cfg: Config) -> list[str]:
    import base64
    import binascii
    import re

    t, problems = cfg.trust, []
    for name, text in sorted(t.public_keys.items()):
        try:
            ok = len(base64.b64decode(text.strip(), validate=True)) == 32
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            problems.append(f"trust.public_keys.{name}: not a base64 Ed25519 public key (32 bytes)")
    if t.public_keys and "coordinator" not in t.public_keys:
        problems.append("trust.public_keys: the trust list must include the coordinator's key (`coordinator: ...`)")
    for i, pattern in enumerate(t.scrub.patterns):
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append(f"trust.scrub.patterns[{i}]: not a regular expression ({exc})")
    for key in ("key_file", "key_env"):
        template = getattr(t.encryption, key) or ""
        try:
            template.format(name="x", NAME="X")
        except (KeyError, IndexError, ValueError):
            problems.append(f"trust.encryption.{key}: {template!r} may only use {{name}} and {{NAME}}")
    return problems


def _secagg_problems(cfg: Config) -> list[str]:
    """Secure aggregation hides every single update: refuse what needs to see one."""
    if not cfg.strategy.secure_aggregation.enabled:
        return []
    st, why = cfg.strategy, "with strategy.secure_aggregation the coordinator only sees the sum of the updates"
    problems = []
    if st.rule != "mean":
        problems.append(f"strategy.rule: {st.rule!r} needs every update on its own; {why} (use rule 'mean')")
    for key, on, need in (
        ("clip_norm", st.clip_norm is not None, "clip each update"),
        ("layerwise_norm", st.layerwise_norm, "measure each update's tensors"),
        ("heterogeneity_aware", st.heterogeneity_aware, "weigh updates by the others' effort after the fact"),
        ("domain_cap", st.domain_cap is not None, "re-weigh updates by domain after the fact"),
        ("privacy.noise_multiplier", st.privacy.noise_multiplier > 0, "clip each update to bound DP sensitivity"),
    ):
        if on:
            problems.append(f"strategy.{key}: cannot {need}; {why}")
    if st.name == "scaffold":
        problems.append(f"strategy.name: scaffold's control variates are sent in the clear beside the update; {why}")
    schemes = {cfg.training.compression.scheme} | {s.compression for s in cfg.sites.values() if s.compression}
    if schemes - {"none"}:
        problems.append(
            f"training.compression: masks are added to the fp32 update; compressed updates ({', '.join(sorted(schemes - {'none'}))}) "
            "would not cancel in the sum"
        )
    if cfg.rounds.late_updates == "fold":
        problems.append(
            "rounds.late_updates: a late site's masks were revealed when it was declared dropped, so folding its "
            "update later would expose it; set 'drop'"
        )
    if cfg.exchange.role != "all" or cfg.exchange.kind != "local":
        problems.append(
            "exchange: secure aggregation's seed reveals are not carried over a hub yet; it runs with "
            "exchange.kind 'local' (one machine or one cluster)"
        )
    if len(cfg.sites) < st.secure_aggregation.min_sites:
        problems.append(
            f"sites: secure aggregation needs at least strategy.secure_aggregation.min_sites = "
            f"{st.secure_aggregation.min_sites} sites"
        )
    return problems


def _not_plain(value: Any, path: tuple) -> tuple[tuple, str] | None:
    """(key path, problem) of the first value plain JSON cannot hold: a NaN or infinity (YAML has
    `.nan` and `.inf`) or a key that is not a string (YAML allows `? [a]`, `1:` and `null:`)."""
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return path or ("(top level)",), "not a finite number"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                return (*path, repr(k)), "keys must be strings"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if (found := _not_plain(v, (*path, k))) is not None:
            return found
    return None


@functools.cache
def config_validator(schema_text: str | None = None) -> jsonschema.Draft202012Validator:
    """The validator of a schema's text (None: the dataclasses'), built once per process: building
    it was as much of a job's config check as the checking (the warm process builds it for all its
    jobs; see `fedhpc.cli.warm`)."""
    return jsonschema.Draft202012Validator(json.loads(schema_text) if schema_text is not None else config_schema())


def check_config(
    raw: Any, origin: str = "config", schema_file: str | Path | None = None, task_check: TaskCheck | None = None
) -> Config:
    """Check a parsed config against the schema and the cross-key rules (and `task_check`'s, when
    given); return it typed.

    `schema_file` (the workflow's `schemas/config.schema.json`) is used when given; it is
    generated from the same dataclasses, and a test keeps the two identical.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    if bad := _not_plain(raw, ()):
        raise ConfigError(f"{origin}: invalid configuration:\n  - {_dotted(bad[0])}: {bad[1]}")
    validator = config_validator(Path(schema_file).read_text() if schema_file else None)
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError(f"{origin}: invalid configuration:\n" + describe_errors(errors))
    cfg = _build(Config, raw)
    problems = _semantic_problems(cfg, task_check)
    if problems:
        raise ConfigError(f"{origin}: invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def parse_config_file(path: str | Path) -> Any:
    """A config file (YAML, or JSON for `.json`) parsed, not yet checked."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        raw = parse_json(text, str(path)) if path.suffix == ".json" else yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: cannot parse (nested too deeply)") from None
    return raw


def as_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict and args[1] is Any:
        return "mapping"
    if origin is dict:
        return f"map of name → {_type_name(args[1])}"
    if _is_dataclass(tp):
        return f"[{tp.__name__}](#{tp.__name__.lower()})"
    return tp.__name__


def config_markdown(options: Sequence[type] = ()) -> str:
    """docs/configuration.md, generated so it can never drift from the code; `options` are the
    built-in tasks' and evaluators' option classes, documented after the config's own."""
    out = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `src/fedhpc/config/federation.py`, `strategy.py` and `trust.py` by `fedhpc config docs`; do not edit by hand.",
        "Unknown keys, wrong types and values outside the allowed set stop the run before any",
        "work, with a message naming the key and what is allowed.",
        "",
    ]
    seen: list[type] = []

    def visit(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            for cand in (tp, *typing.get_args(tp)):
                for c in (cand, *typing.get_args(cand)):
                    if _is_dataclass(c):
                        visit(c)

    visit(Config)
    for cls in options:
        visit(cls)
    for cls in seen:
        hints = typing.get_type_hints(cls)
        out += [
            f"## {cls.__name__}",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f"`{json.dumps(f.default)}`"
            elif f.default_factory is not dataclasses.MISSING:
                made = f.default_factory()
                default = "see below" if _is_dataclass(type(made)) else f"`{json.dumps(made)}`"
            else:
                default = "required"
            limits = ", ".join(f"{k} {v}" for k, v in f.metadata.get("schema", {}).items() if k != "pattern")
            doc = f.metadata.get("doc", "") + (f" ({limits})" if limits else "")
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {default} | {doc} |")
        out.append("")
    return "\n".join(out)
