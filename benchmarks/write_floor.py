"""How much of the aggregator's time budget writing its output file alone takes, on this machine.

Usage: python benchmarks/write_floor.py [--mib 256] [--sites 8] [--repeats 5] [--tmp DIR]

The aggregation benchmark's bandwidth goal (>= 50 % of the memory-bandwidth bound, in GB of
input per second) gives FedAvg of N site updates plus the base, (N + 1) × S bytes, a budget of
(N + 1) × S / (0.5 × bound) seconds. Whatever the arithmetic, the job must also write the
S-byte result into a new file. This measures, in one run: the bound (`torch.sum` over 1 GiB
of fp32, all threads, as benchmarks/aggregate.py does), and the time to write S bytes into a
new file on the given directory's filesystem with 1 and with all threads (the aggregator's
own writer: preallocated, pwrite of 1 MiB blocks at their offsets, fsync), and a warm `pread` of the same
bytes for comparison. Prints the write time as a fraction of the budget; medians of --repeats.
JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fedhpc.rawtensors import TensorWriter
from fedhpc.tensorfile import TensorSpec

MIB = 1 << 20


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_new(path: Path, size: int, workers: int) -> float:
    """Seconds to write `size` bytes into a new file the way the aggregator does: its TensorWriter
    (preallocated, pwrite of 1 MiB blocks at their offsets, writeback started as it goes, fsync,
    rename). The previous file is removed first, untimed: truncating its cached pages is not part
    of writing a round's new model."""
    path.unlink(missing_ok=True)
    os.sync()
    block = torch.ones(MIB, dtype=torch.uint8)
    w = TensorWriter(path, {"x": TensorSpec("U8", (size,))}, None)
    t0 = time.perf_counter()
    w.create()
    w.open()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: w.write("x", k * MIB, block), range(size // MIB)))
    w.close()
    w.commit()
    return time.perf_counter() - t0


def read_warm(path: Path, size: int) -> None:
    buf = bytearray(MIB)
    fd = os.open(path, os.O_RDONLY)
    try:
        for k in range(size // MIB):
            os.preadv(fd, [buf], k * MIB)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="output size S in MiB (the model)")
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tmp", default=None, help="directory on the filesystem the round directory lives on")
    a = ap.parse_args()
    size, threads = a.mib * MIB, torch.get_num_threads()
    x = torch.ones(1 << 28, dtype=torch.float32)
    x.sum()
    bound = x.nbytes / median_seconds(x.sum, a.repeats) / 1e9
    del x
    budget = (a.sites + 1) * size / (0.5 * bound * 1e9)
    with tempfile.TemporaryDirectory(dir=a.tmp) as d:
        out = Path(d) / "out.bin"
        write = {w: statistics.median(write_new(out, size, w) for _ in range(a.repeats)) for w in sorted({1, threads})}
        read_warm(out, size)
        read = median_seconds(lambda: read_warm(out, size), a.repeats)
    best = min(write.values())
    print(
        f"bound {bound:.1f} GB/s ({threads} threads); budget at 50 % for {a.sites}+1 files of {a.mib} MiB: {budget:.3f} s"
    )
    for w, s in write.items():
        print(f"write {a.mib} MiB into a new file, {w} thread(s): {s:.3f} s = {s / budget:.0%} of the budget")
    print(f"warm pread of the same bytes: {read:.3f} s ({size / read / 1e9:.1f} GB/s)")
    print(
        json.dumps(
            {
                "bound_gbps": bound,
                "budget_seconds": budget,
                "write_seconds": {str(k): v for k, v in write.items()},
                "write_fraction_of_budget": best / budget,
                "pread_seconds": read,
                "mib": a.mib,
                "sites": a.sites,
                "repeats": a.repeats,
                "filesystem_dir": a.tmp or tempfile.gettempdir(),
            }
        )
    )


if __name__ == "__main__":
    main()
