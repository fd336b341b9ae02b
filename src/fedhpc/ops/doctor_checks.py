"""What every `fedhpc doctor` check works with: its outcome, what it reads, a soft-failing command.

Its outcome (Check), what it reads (Setup) and a command run that fails softly.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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
    cfg: Any = None  # fedhpc.config.federation.Config once it loaded
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
