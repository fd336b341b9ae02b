"""A throw-away single-host Slurm cluster (munged + slurmctld + slurmd) for tests, started by hand.

No systemd and no accounting database: everything lives in one directory, on its own
ports, with its own munge socket, so several clusters can run side by side.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "# written by fedhpc tests/slurm_cluster.py"
CONF = (
    MARKER
    + """
ClusterName={name}
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge.socket
CryptoType=crypto/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=defer
MinJobAge=600
InactiveLimit=0
KillWait=5
Waittime=0
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
)


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is not installed, or the cluster did not come up."""


@dataclass
class SlurmCluster:
    root: Path
    name: str = "fedhpc-ci"
    cpus: int = 8  # more than the machine has: jobs share cores, which is what a test wants
    mem_mb: int = 16000
    partition: str = "debug"
    ctld_port: int = 16817
    d_port: int = 16818
    procs: list[subprocess.Popen] = field(default_factory=list)

    # The default place: Snakemake's job-step executor clears SLURM_* (SLURM_CONF too) before
    # it runs srun inside a job, so a config elsewhere is lost there (plugin issue #164).
    conf: Path = Path("/etc/slurm/slurm.conf")

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> SlurmCluster:
        missing = [b for b in ("munged", "mungekey", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)")
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        if self.conf.exists() and MARKER not in self.conf.read_text():
            raise SlurmUnavailable(f"{self.conf} belongs to a real cluster; refusing to overwrite it")
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            CONF.format(
                name=self.name,
                host=host,
                dir=self.root,
                cpus=self.cpus,
                mem_mb=self.mem_mb,
                partition=self.partition,
                ctld_port=self.ctld_port,
                d_port=self.d_port,
            )
        )
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"], check=True, capture_output=True)
        key.chmod(0o600)
        self._spawn(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.root}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={self.root}/munged.pid",
                f"--log-file={self.root}/munged.log",
                f"--seed-file={self.root}/munged.seed",
            ]
        )
        self._wait(lambda: (self.root / "munge.socket").exists(), timeout, "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._node_ready, timeout, "the node never became idle")
        return self

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.root / f"{Path(argv[0]).name}.out", "ab")
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        )

    def _node_ready(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise SlurmUnavailable(f"{p.args[0]} exited with {p.returncode}; see {self.root}/*.log and *.out")
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env())
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                raise SlurmUnavailable(f"{what} within {timeout:.0f} s; see {self.root}")
            time.sleep(0.3)

    def stop(self) -> None:
        # Only our own controller's jobs: with none running, scancel would reach another cluster.
        if any(p.args[0] == "slurmctld" and p.poll() is None for p in self.procs):
            subprocess.run(["scancel", "--user", "root"], capture_output=True, env=self.env())
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        self.procs.clear()
        # A config naming a controller that no longer runs makes every later Snakemake start wait
        # 9 s: the Slurm executor plugin asks `scontrol show config` even for local runs.
        if self.conf.exists() and MARKER in self.conf.read_text():
            self.conf.unlink()
