"""`fedhpc doctor`: a preflight on the login node before the first submission; each failed check says what to do.

It reads the profile (`profiles/<p>/config.yaml`, `head.yaml`) and the experiment config and
checks, without submitting anything or writing outside a temporary file it removes: Slurm,
the partitions and account the profile names (ops/doctor_slurm.py), the container runtime and each
site's image (ops/doctor_images.py), the run directory's space and quota and the exchange hub
(ops/doctor_storage.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from fedhpc.ops.doctor_checks import Check, Setup
from fedhpc.ops.doctor_images import image_checks
from fedhpc.ops.doctor_slurm import slurm_checks
from fedhpc.ops.doctor_storage import hub_checks, run_dir_checks

# --- reading the profile and the config ---------------------------------------------------------


def load_setup(profile: str, configfile: str | None, directory: str, site: str | None) -> tuple[Setup, list[Check]]:
    from fedhpc.config.schema import ConfigError
    from fedhpc.tasks.validation import load

    workdir = Path(directory).resolve()
    prof = Path(profile)
    setup = Setup(prof.resolve(), workdir, workdir / "config.yaml", site=site)
    checks = []
    try:
        setup.profile = yaml.safe_load((prof / "config.yaml").read_text()) or {}
        if (prof / "head.yaml").exists():
            setup.head = yaml.safe_load((prof / "head.yaml").read_text()) or {}
        checks.append(Check("profile", "ok", f"{prof}: executor {setup.profile.get('executor', 'local')}"))
    except (OSError, yaml.YAMLError) as exc:
        checks.append(
            Check(
                "profile",
                "fail",
                f"{prof}/config.yaml: {exc}",
                "pass --profile the directory of a Snakemake profile, e.g. profiles/lumi",
            )
        )
    # As `fedhpc run`: --configfile, else the profile's configfile, else config.yaml in the directory.
    chosen = configfile or setup.profile.get("configfile")
    if chosen:
        setup.config_path = Path(chosen) if Path(chosen).is_absolute() else Path.cwd() / chosen
    try:
        setup.cfg = load(setup.config_path)
        names = ", ".join(sorted(setup.cfg.sites))
        if site and site not in setup.cfg.sites:
            raise ConfigError(f"{setup.config_path}: --site {site!r} is not one of its sites ({names})")
        checks.append(Check("config", "ok", f"{setup.config_path}: run {setup.cfg.run!r}, sites {names}"))
    except ConfigError as exc:
        setup.cfg = None
        checks.append(Check("config", "fail", str(exc), "fix the keys named above (every key: docs/configuration.md)"))
    return setup, checks


# --- running and reporting ----------------------------------------------------------------------


def doctor(profile: str, configfile: str | None, directory: str = ".", site: str | None = None) -> list[Check]:

    setup, checks = load_setup(profile, configfile, directory, site)
    if any(c.status == "fail" for c in checks):
        return checks  # without the profile and config, every further check would guess
    checks += slurm_checks(setup)
    checks += image_checks(setup)
    checks += run_dir_checks(setup)
    checks += hub_checks(setup)
    return checks


MARK = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skipped": "skip"}


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]:<5} {c.name:<{width}}  {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"{'':<5} {'':<{width}}  -> {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in MARK}
    words = {"ok": "ok", "warn": "warning(s)", "fail": "failed", "skipped": "skipped"}
    lines.append(", ".join(f"{n} {words[s]}" for s, n in counts.items() if n))
    return "\n".join(lines)


def report_json(checks: list[Check]) -> str:
    return json.dumps(
        {"ok": not any(c.status == "fail" for c in checks), "checks": [dataclasses.asdict(c) for c in checks]}, indent=2
    )
