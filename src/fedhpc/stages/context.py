"""What every stage is handed: the validated config, the run's layout and its trust store."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.layout import RunLayout
from fedhpc.tasks.validation import load
from fedhpc.trust.signing import TrustStore


@dataclass
class Ctx:
    """A stage's world: the config, the round directory's paths and the keys it may trust."""

    cfg: Config
    layout: RunLayout
    trust: TrustStore


def blackboard_poll(cfg: Config) -> float:
    """Seconds between a waiting stage's looks at the blackboard. In one run directory a look is a
    stat() per site, so ten a second cost nothing (a Lustre metadata server answers thousands) and
    cut the wait after the last arrival, which a short round pays at each of its waits; in a
    multi-site run each look fetches from the hub, so once a second."""
    return 0.1 if cfg.exchange.kind == "local" else 1.0


def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.run


def context(config_path: str, with_task: bool = True) -> Ctx:
    """The config (`with_task`: also the task's own checks, which import it), run layout and trust."""
    cfg = load(config_path, with_task)
    layout = RunLayout.of(run_dir(cfg))
    return Ctx(cfg, layout, trust_store(cfg, layout))


def trust_store(cfg: Config, layout: RunLayout) -> TrustStore:
    t = cfg.trust
    return TrustStore(t.keys_dir or layout.keys_dir, t.public_keys, t.encryption)
