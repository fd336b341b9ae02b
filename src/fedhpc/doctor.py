"""`fedhpc doctor`: a preflight on the login node before the first submission; each failed check says what to do.

It reads the profile (`profiles/<p>/config.yaml`, `head.yaml`) and the experiment config and
checks, without submitting anything or writing outside a temporary file it removes: Slurm,
the partitions and account the profile names (doctor_slurm.py), the container runtime and each
site's image (doctor_images.py), the run directory's space and quota and the exchange hub
(doctor_storage.py).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

Status = Literal["ok", "warn", "fail", "skipped"]
TIMEOUT = 30  # seconds for one Slurm query: a controller that takes longer is as good as down


@dataclass
class Check:
    """One check's outcome; `fix` is one sentence of what to do whenever it is not ok."""

    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Setup:
    """What the checks read: the profile, the config, and where the run would work."""

    profile_dir: Path
    workdir: Path
    config_path: Path
    profile: dict[str, Any] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    cfg: Any = None  # fedhpc.config.Config once it loaded
    site: str | None = None  # --site: this side trains only that site (multi-site mode)

    @property
    def on_slurm(self) -> bool:
        return self.profile.get("executor") == "slurm"

    def trained_sites(self) -> list[str]:
        """The sites whose jobs this side runs."""
        ex = self.cfg.exchange
        if self.site:
            return [self.site]
        if ex.role == "coordinator":
            return []
        return [ex.site] if ex.role == "site" and ex.site else sorted(self.cfg.sites)

    def where(self, name: str) -> str:
        return str(self.profile_dir / name)


def run_command(argv: list[str], timeout: float = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """argv's result; a missing program or a timeout come back as a failed process, not an exception."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]} did not answer within {timeout:.0f} s")


def first_line(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or proc.stdout or "").strip()
    return text.splitlines()[0] if text else f"exit code {proc.returncode}"


# --- reading the profile and the config ---------------------------------------------------------


def load_setup(profile: str, configfile: str | None, directory: str, site: str | None) -> tuple[Setup, list[Check]]:
    from .config_schema import ConfigError, load

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
    from .doctor_images import image_checks
    from .doctor_slurm import slurm_checks
    from .doctor_storage import hub_checks, run_dir_checks

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
