"""A throw-away sshd on 127.0.0.1 serving rsync, with its own host key and one client key, for tests."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


class SshdUnavailable(RuntimeError):
    """sshd, ssh-keygen or rsync is missing, or the server did not come up."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SshdHub:
    root: Path
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen | None = None

    @property
    def client_key(self) -> Path:
        return self.root / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.root / "known_hosts"

    def start(self) -> SshdHub:
        sshd = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
        for tool in ("ssh-keygen", "rsync", "ssh"):
            if shutil.which(tool) is None:
                raise SshdUnavailable(f"{tool} is not installed")
        if sshd is None:
            raise SshdUnavailable("sshd is not installed (Debian: openssh-server)")
        self.root.mkdir(parents=True, exist_ok=True)
        host_key = self.root / "host_ed25519"
        for key in (host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        auth = self.root / "authorized_keys"
        shutil.copy(f"{self.client_key}.pub", auth)
        os.chmod(auth, 0o600)
        self.port = _free_port()
        # sshd's privilege-separation directory; Debian creates it at boot, containers may not have it.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        conf = self.root / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
            f"AuthorizedKeysFile {auth}\nPidFile {self.root}/sshd.pid\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "Subsystem sftp internal-sftp\n"
        )
        pub = Path(f"{host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {pub[0]} {pub[1]}\n")
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL, stderr=open(self.root / "sshd.log", "w")
        )
        deadline = time.time() + 20
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SshdUnavailable(f"sshd exited: {(self.root / 'sshd.log').read_text()[-2000:]}")
            probe = subprocess.run([*self.ssh_argv(), f"{self.user}@127.0.0.1", "true"], capture_output=True)
            if probe.returncode == 0:
                return self
            time.sleep(0.3)
        self.stop()
        raise SshdUnavailable(f"sshd did not accept a login: {(self.root / 'sshd.log').read_text()[-2000:]}")

    def ssh_argv(self) -> list[str]:
        return [
            "ssh",
            "-p",
            str(self.port),
            "-i",
            str(self.client_key),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
        ]

    def remote(self, path: Path) -> str:
        return f"{self.user}@127.0.0.1:{path}"

    def exchange_config(self, hub_dir: Path) -> dict:
        return {
            "kind": "rsync",
            "hub": self.remote(hub_dir),
            "ssh_port": self.port,
            "ssh_key": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            "poll_seconds": 1,
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
