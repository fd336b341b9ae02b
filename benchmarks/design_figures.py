"""The small measurements behind design choices the code's comments point to, each against its baseline in one run.

Usage: python benchmarks/design_figures.py [--repeats 5] [--mib 256] [--tmp DIR]

  torch import   `python -c "import torch"` against `python -c "import numpy"` (a fresh interpreter
                 each): why planning and config checks never import torch (fedhpc/tasks/lm.py).
  block draws    200,000 uniforms drawn one numpy call each against the same drawn in blocks of
                 4096 (fedhpc/data/synth.py's samplers).
  fallocate      a --mib file written by 2 MiB pwrites after fallocate against after ftruncate (a
                 sparse file), each fsynced (fedhpc/core/rawtensors.py's writer).

Prints one line per figure (medians of --repeats), then a JSON object on the last line.
The aggregator's chunk size is measured by `benchmarks/aggregate.py --chunk-mb N`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interpreter(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def scalar_draws(n: int = 200_000) -> None:
    rng = np.random.default_rng(0)
    for _ in range(n):
        rng.random()


def block_draws(n: int = 200_000, block: int = 4096) -> None:
    rng = np.random.default_rng(0)
    drawn = 0
    while drawn < n:
        for _ in rng.random(block).tolist():
            drawn += 1
            if drawn == n:
                break


def written(path: Path, mib: int, reserve: bool) -> None:
    """Write `mib` MiB in 2 MiB pwrites into a file sized first by fallocate or by ftruncate."""
    libc = ctypes.CDLL(None, use_errno=True)
    size, chunk = mib << 20, b"\1" * (2 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if not reserve or libc.fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) != 0:
            os.ftruncate(fd, size)
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--tmp", default=None, help="directory for the fallocate file (default: the system's)")
    a = ap.parse_args()
    out = {}
    torch_s = median_seconds(lambda: interpreter("import torch"), a.repeats)
    numpy_s = median_seconds(lambda: interpreter("import numpy"), a.repeats)
    out["torch_import_s"], out["numpy_import_s"], out["torch_over_numpy"] = torch_s, numpy_s, torch_s / numpy_s
    print(f"torch import: {torch_s:.2f} s, numpy import {numpy_s:.2f} s: {torch_s / numpy_s:.1f}x")
    scalar_s, block_s = median_seconds(scalar_draws, a.repeats), median_seconds(block_draws, a.repeats)
    out["scalar_draws_s"], out["block_draws_s"], out["scalar_over_block"] = scalar_s, block_s, scalar_s / block_s
    print(
        f"200,000 uniforms: one call each {scalar_s:.3f} s, blocks of 4096 {block_s:.3f} s: {scalar_s / block_s:.1f}x"
    )
    with tempfile.TemporaryDirectory(dir=a.tmp) as tmp:
        path = Path(tmp) / "file"
        sparse_s = median_seconds(lambda: written(path, a.mib, reserve=False), a.repeats)
        reserved_s = median_seconds(lambda: written(path, a.mib, reserve=True), a.repeats)
    out["ftruncate_write_s"], out["fallocate_write_s"] = sparse_s, reserved_s
    out["ftruncate_over_fallocate"] = sparse_s / reserved_s
    print(
        f"{a.mib} MiB written after ftruncate {sparse_s:.3f} s, after fallocate {reserved_s:.3f} s: "
        f"{sparse_s / reserved_s:.2f}x"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
