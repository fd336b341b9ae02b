"""What leaves a site: metrics, receipts and logs scrubbed of user names, host names and paths.

The values come from the machine itself (the login and effective user, `$USER`/`$LOGNAME`,
`$HOME`, the host name in its short and qualified forms, Slurm's node name) plus configured
patterns (`trust.scrub`). Names are replaced as whole words; absolute paths are replaced whole,
so a path's user, project and host parts go with it. Structural fields a coordinator needs
(site name, hashes, shard ids) are never touched.
"""

from __future__ import annotations

import getpass
import json
import os
import pwd
import re
import socket
from pathlib import Path
from typing import Any

from fedhpc.config.trust import ScrubConfig
from fedhpc.core.files import write_bytes

# Receipt fields that are identifiers, not free text: they must reach the coordinator as they are.
STRUCTURAL = {
    "run",
    "site",
    "shards",
    "base_sha256",
    "update_sha256",
    "control_sha256",
    "compression",
    "engine",
    "launcher",
    "secure_aggregation",
    "signature",
}
# An absolute path: a slash not preceded by a word character, ':' (URLs) or another path character.
_PATH = re.compile(r"(?<![\w:/.~-])/(?:[\w.@+~%=-]+/?)+")


def _user_names() -> set[str]:
    names = {os.environ.get(k) for k in ("USER", "LOGNAME", "SUDO_USER")}
    try:
        names.add(getpass.getuser())
    except (KeyError, OSError):
        pass
    for uid in {os.getuid(), os.geteuid()}:
        try:
            names.add(pwd.getpwuid(uid).pw_name)
        except KeyError:
            pass
    return {n for n in names if n}


def _host_names() -> set[str]:
    names = {socket.gethostname(), os.environ.get("HOSTNAME"), os.environ.get("SLURMD_NODENAME")}
    try:
        names.add(socket.getfqdn())
    except OSError:
        pass
    names |= {n.split(".")[0] for n in names if n}
    return {n for n in names if n and n != "localhost"}


def _words(names: set[str]) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9_-])(?:{alternatives})(?![A-Za-z0-9_-])")


class Scrubber:
    """Replaces what identifies people and machines in text; built once per process."""

    def __init__(self, cfg: ScrubConfig, users: set[str] | None = None, hosts: set[str] | None = None):
        self.rules: list[tuple[re.Pattern, str]] = []
        users = _user_names() if users is None else users
        hosts = _host_names() if hosts is None else hosts
        if cfg.user_names:
            homes = sorted({os.path.expanduser("~")} | {f"/home/{u}" for u in users}, key=len, reverse=True)
            homes = [re.escape(h.rstrip("/")) for h in homes if h not in ("/", "~")]
            if homes:  # a home directory and whatever path follows it
                self.rules.append((re.compile(rf"(?:{'|'.join(homes)})(?![\w.@+~%=-])(?:/[\w.@+~%=-]*)*"), "[path]"))
        if cfg.paths:
            self.rules.append((_PATH, "[path]"))
        if cfg.host_names and (h := _words(hosts)):
            self.rules.append((h, "[host]"))
        if cfg.user_names and (u := _words(users)):
            self.rules.append((u, "[user]"))
        self.rules += [(re.compile(p), "[scrubbed]") for p in cfg.patterns]

    def text(self, s: str) -> str:
        for pattern, replacement in self.rules:
            s = pattern.sub(replacement, s)
        return s

    def value(self, v: Any) -> Any:
        if isinstance(v, str):
            return self.text(v)
        if isinstance(v, dict):
            return {k: self.value(x) for k, x in v.items()}
        if isinstance(v, list):
            return [self.value(x) for x in v]
        return v

    def receipt(self, receipt: dict) -> dict:
        return {k: v if k in STRUCTURAL else self.value(v) for k, v in receipt.items()}

    def record(self, rec: dict) -> dict:
        return {k: v if k == "site" else self.value(v) for k, v in rec.items()}

    def jsonl(self, path: Path) -> None:
        """Rewrite a metrics file scrubbed (atomically); torn lines of a killed job are dropped."""
        if not path.exists():
            return
        out = []
        for line in path.read_bytes().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            out.append(json.dumps(self.record(rec) if isinstance(rec, dict) else self.value(rec), sort_keys=True))
        write_bytes(path, "".join(x + "\n" for x in out).encode())

    def file(self, src: Path, dest: Path) -> None:
        """A scrubbed copy of a text file (a log) at `dest`."""
        write_bytes(dest, self.text(src.read_bytes().decode("utf-8", "replace")).encode())


def outgoing_receipt(cfg: ScrubConfig, metrics: Path, receipt: dict) -> dict:
    """The receipt as it may leave the site, after its metrics file was scrubbed in place."""
    s = Scrubber(cfg)
    s.jsonl(metrics)
    return s.receipt(receipt)
