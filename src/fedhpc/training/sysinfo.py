"""System diagnostics for training metrics: CPU and memory always, GPU via nvidia-smi/rocm-smi."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import psutil


def _nvidia() -> dict[str, float]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=utilization.gpu,power.draw,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    rows = [[float(x) for x in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    if not rows:
        return {}
    return {
        "gpu_util_pct": sum(r[0] for r in rows) / len(rows),
        "gpu_power_w": sum(r[1] for r in rows),
        "gpu_mem_used_mb": sum(r[2] for r in rows),
    }


def _rocm() -> dict[str, float]:
    out = subprocess.run(["rocm-smi", "--showuse", "--showpower", "--json"], capture_output=True, text=True, timeout=10)
    cards = json.loads(out.stdout or "{}")
    util, power = [], []
    for card in cards.values():
        for key, value in card.items():
            try:
                v = float(str(value).split()[0])
            except ValueError:
                continue
            if "GPU use" in key:
                util.append(v)
            elif "Power" in key:
                power.append(v)
    res = {}
    if util:
        res["gpu_util_pct"] = sum(util) / len(util)
    if power:
        res["gpu_power_w"] = sum(power)
    return res


class SystemProbe:
    """Samples at most every `min_interval` seconds, because the smi tools cost tens of ms."""

    def __init__(self, min_interval: float = 10.0):
        self.min_interval = min_interval
        self._last = 0.0
        self._cached: dict[str, float] = {}
        self._proc = psutil.Process()
        psutil.cpu_percent(None)
        self._gpu = _nvidia if shutil.which("nvidia-smi") else _rocm if shutil.which("rocm-smi") else None

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._last < self.min_interval and self._cached:
            return self._cached
        self._last = now
        res = {"cpu_pct": psutil.cpu_percent(None), "rss_mb": self._proc.memory_info().rss / 2**20}
        if self._gpu is not None:
            try:
                res.update(self._gpu())
            except (OSError, ValueError, subprocess.SubprocessError):
                pass  # a flaky smi tool must never stop training
        self._cached = res
        return res
