"""FedAvg over N site updates on disk: fedhpc's streaming aggregator against Flower's, one run.

Usage: python benchmarks/aggregate.py [--sizes 256,1024] [--sites 8] [--repeats R]
                                      [--chunk-mb MiB] [--flower-python PY] [--tmp DIR]

For each model size (MiB of fp32) a child process writes a seeded GPT-like model (d = 1024:
64 MB of token embeddings, 8 MB of position embeddings, per layer a 12 MB QKV matrix, a 4 MB
projection, two 16 MB MLP matrices, biases and layer norms) and N site updates Δ_i with
`fedhpc.core.tensorfile.save_state` into a temporary directory on disk, deleted afterwards. Then,
with the page cache warm (every input file read once right before each timed run) and no
dirty pages left by the previous run (each output is fsynced after its run, untimed):

  ours    `fedhpc.aggregation.streaming.aggregate(base, inputs, out)` (FedAvg, weights n_i / Σ n, the
          aggregator's default chunk size unless --chunk-mb): base + the N update files
          -> the next model file, fsynced before it is renamed into place.
  flower  what a Flower server does with the same N files: `safetensors.numpy.load_file`
          each, `flwr.server.strategy.aggregate.aggregate([(arrays, n_i), ...])`, then
          `safetensors.numpy.save_file` of the result (not fsynced). Flower averages the
          files as models; ours adds their average to the base: the same arithmetic per
          element, checked after the runs (max |ours − base − flower|, fp32 rounding only).
          The aggregate() call alone is reported too.

Each contender runs in its own subprocess (Flower's with the interpreter that can import
flwr, see --flower-python), so its peak RSS (ru_maxrss) is its own; the delta is that peak
minus the child's RSS right before the work starts. The parent never imports torch: Linux
carries ru_maxrss across exec, so a child inherits at most the parent's few tens of MiB.
Throughput = GB (1e9 bytes) of input, the N update files plus the base, per second, for both
contenders, so the speedup is the ratio of wall times. The memory-bandwidth bound is measured
in the same run: the median time of `torch.sum` over a 1 GiB fp32 tensor, all torch threads
(one thread reported alongside), -> GB/s. Beside it, the read floor: the median time to
pread the same N + 1 input files once (1 MiB blocks, --workers threads, no arithmetic, no
output), the most any aggregator that reads these files can reach on this machine; ours is
reported as a fraction of both. Two more floors say where the time goes: the mapped read
(the aggregator's own reader on fresh mappings, each chunk view summed, no output) and writing
the output alone (the aggregator's writer, fsynced); their sum is set against the time the
bandwidth goal allows.

Medians of --repeats runs (default 5 for sizes up to 512 MiB, 3 above), contenders alternating
order, the bound measured once per repeat. Other load on the machine is reported (1-minute
load average). Prints a table, then one JSON object on the last line.
Goals: >= 10x Flower's throughput, <= 1/4 of its peak RSS, >= 50 % of the bandwidth bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"speedup": 10.0, "rss_ratio": 0.25, "fraction_of_bandwidth": 0.5}
MIB = 1 << 20


# ---------------------------------------------------------------- children: one process per measurement


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ours(job: dict) -> dict:
    import inspect

    from fedhpc.aggregation.streaming import SiteInput, aggregate

    inputs = [SiteInput(s, Path(p), w) for s, p, w in zip(job["sites"], job["paths"], job["weights"], strict=True)]
    chunk = job["chunk_bytes"] or inspect.signature(aggregate).parameters["chunk_bytes"].default
    before = _rss_mb()
    t0 = time.perf_counter()
    aggregate(Path(job["base"]), inputs, Path(job["out"]), chunk_bytes=chunk, workers=job["workers"])
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "rss_before_mb": before,
        "peak_rss_mb": _peak_mb(),
        "chunk_bytes": chunk,
        "workers": job["workers"],
    }


def child_flower(job: dict) -> dict:
    import flwr
    from flwr.server.strategy.aggregate import aggregate
    from safetensors.numpy import load_file, save_file

    before = _rss_mb()
    t0 = time.perf_counter()
    loaded = [load_file(p) for p in job["paths"]]
    names = sorted(loaded[0])
    results = [([d[k] for k in names], n) for d, n in zip(loaded, job["examples"], strict=True)]
    t1 = time.perf_counter()
    averaged = aggregate(results)
    t2 = time.perf_counter()
    save_file(dict(zip(names, averaged, strict=True)), job["out"])
    t3 = time.perf_counter()
    return {
        "seconds": t3 - t0,
        "load_seconds": t1 - t0,
        "aggregate_seconds": t2 - t1,
        "save_seconds": t3 - t2,
        "rss_before_mb": before,
        "peak_rss_mb": _peak_mb(),
        "flwr_version": flwr.__version__,
    }


def child_bandwidth(job: dict) -> dict:
    """STREAM-like read bound: torch.sum over 1 GiB of fp32 (pages touched first)."""
    import torch

    x = torch.ones(1 << 28, dtype=torch.float32)
    out = {}
    for key, threads in (("gbps", torch.get_num_threads()), ("gbps_1_thread", 1)):
        torch.set_num_threads(threads)
        x.sum()
        times = []
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            x.sum()
            times.append(time.perf_counter() - t0)
        out[key] = x.nbytes / statistics.median(times) / 1e9
        out.setdefault("threads", threads)
    return out


def child_read_floor(job: dict) -> dict:
    """The fastest any file-based aggregator can get its input: pread every input file once in
    1 MiB blocks into reused per-thread buffers, no arithmetic, no output (page cache warm)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    fds = [os.open(p, os.O_RDONLY) for p in job["paths"]]
    blocks = [(fd, off) for fd in fds for off in range(0, os.fstat(fd).st_size, MIB)]
    local = threading.local()

    def read(block: tuple[int, int]) -> None:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(MIB)
        os.preadv(block[0], [buf], block[1])

    times = []
    try:
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            if job["workers"] <= 1:
                for b in blocks:
                    read(b)
            else:
                with ThreadPoolExecutor(job["workers"]) as pool:
                    list(pool.map(read, blocks, chunksize=16))
            times.append(time.perf_counter() - t0)
    finally:
        for fd in fds:
            os.close(fd)
    return {"seconds": statistics.median(times)}


def _chunk_items(specs: dict, chunk_bytes: int) -> list[tuple[str, int, int]]:
    """(tensor, first, end) element ranges of the fp32 tensors in `specs`, as the aggregator splits them."""
    chunk = chunk_bytes // 4
    return [
        (n, a, min(a + chunk, s.nbytes // 4)) for n, s in sorted(specs.items()) for a in range(0, s.nbytes // 4, chunk)
    ]


def child_mapped_floor(job: dict) -> dict:
    """Reading the inputs the aggregator's way with no arithmetic and no output: fresh mappings
    (fedhpc.core.rawtensors.TensorReader) handing out chunk views on --workers threads, each view
    summed once so its pages are touched (page cache warm, the run itself times the warm-up)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fedhpc.core.rawtensors import TensorReader

    torch.set_num_threads(1)
    times = []
    for _ in range(job["repeats"]):
        warm(job["paths"])
        readers = [TensorReader(p) for p in job["paths"]]
        items = _chunk_items(readers[0].specs, job["chunk_bytes"])

        def read(item: tuple[str, int, int], readers: list = readers) -> float:
            return sum(float(r.read(*item).sum()) for r in readers)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(job["workers"]) as pool:
            list(pool.map(read, items))
        times.append(time.perf_counter() - t0)
        for r in readers:
            r.close()
    return {"seconds": statistics.median(times)}


def child_write_floor(job: dict) -> dict:
    """Writing the output alone: the aggregator's TensorWriter with the base's layout, chunk
    ranges of a constant filled on --workers threads, fsync and rename (nothing read, nothing
    computed). The previous file is removed and the disk synced first, untimed."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from fedhpc.core.rawtensors import TensorReader, TensorWriter

    with TensorReader(job["base"]) as r:
        specs = r.specs
    block = torch.ones(job["chunk_bytes"] // 4, dtype=torch.float32)
    items = _chunk_items(specs, job["chunk_bytes"])
    times = []
    for _ in range(job["repeats"]):
        Path(job["out"]).unlink(missing_ok=True)
        os.sync()
        w = TensorWriter(job["out"], specs, None)
        t0 = time.perf_counter()
        w.create()
        w.open()
        with ThreadPoolExecutor(job["workers"]) as pool:
            list(pool.map(lambda it, w=w: w.write(it[0], it[1], block[: it[2] - it[1]]), items))
        w.close()
        w.commit()
        times.append(time.perf_counter() - t0)
    Path(job["out"]).unlink(missing_ok=True)
    return {"seconds": statistics.median(times)}


def child_workload(job: dict) -> dict:
    """Write the base and N site updates, seeded, into job["dir"]."""
    import torch

    from fedhpc.core.tensorfile import save_state

    tmp, seed = Path(job["dir"]), job["seed"]
    shapes = {k: tuple(v) for k, v in job["shapes"].items()}

    def state(gen_seed: int, std: float) -> dict:
        g = torch.Generator().manual_seed(gen_seed)
        return {k: torch.randn(s, generator=g).mul_(std) for k, s in shapes.items()}

    base = tmp / "base.safetensors"
    save_state(base, state(seed, 0.02))
    sites = [f"site{i:02d}" for i in range(job["sites"])]
    paths = [tmp / f"{s}.safetensors" for s in sites]
    for i, p in enumerate(paths):
        save_state(p, state(seed + 1 + i, 1e-3))
    examples = [int(x) for x in torch.randint(1000, 5000, (len(sites),), generator=torch.Generator().manual_seed(seed))]
    os.sync()  # no writeback of the inputs in the background of the timed runs
    return {
        "base": str(base),
        "sites": sites,
        "paths": [str(p) for p in paths],
        "examples": examples,
        "weights": [n / sum(examples) for n in examples],
    }


def child_check(job: dict) -> dict:
    """Largest |(ours − base) − flower| over all elements."""
    from fedhpc.core.tensorfile import open_tensors

    worst = 0.0
    with open_tensors(job["base"]) as b, open_tensors(job["ours"]) as o, open_tensors(job["flower"]) as f:
        for k in b:
            worst = max(worst, float(((o[k] - b[k]) - f[k]).abs().max()))
    return {"max_abs_diff": worst}


CHILDREN = {
    "ours": child_ours,
    "flower": child_flower,
    "bandwidth": child_bandwidth,
    "read_floor": child_read_floor,
    "mapped_floor": child_mapped_floor,
    "write_floor": child_write_floor,
    "workload": child_workload,
    "check": child_check,
}


def run_child(python: str, kind: str, job: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [python, __file__, "--child", kind, "--job", json.dumps(job)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the parent


def model_shapes(target_mib: int) -> dict[str, tuple[int, ...]]:
    """A GPT-like fp32 state dict of about `target_mib` MiB (d = 256 below 128 MiB, for trying things out)."""
    d, vocab, ctx = (1024, 16000, 2048) if target_mib >= 128 else (256, 4000, 2048)
    fixed = {"tok_emb.weight": (vocab, d), "pos_emb.weight": (ctx, d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    layer = {
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "mlp.fc.weight": (4 * d, d),
        "mlp.fc.bias": (4 * d,),
        "mlp.proj.weight": (d, 4 * d),
        "mlp.proj.bias": (d,),
        "ln1.weight": (d,),
        "ln1.bias": (d,),
        "ln2.weight": (d,),
        "ln2.bias": (d,),
    }

    def nbytes(shapes: dict[str, tuple[int, ...]]) -> int:
        total = 0
        for shape in shapes.values():
            n = 4
            for k in shape:
                n *= k
            total += n
        return total

    shapes = dict(fixed)
    for i in range(max(1, round((target_mib * MIB - nbytes(fixed)) / nbytes(layer)))):
        shapes.update({f"h.{i:02d}.{k}": v for k, v in layer.items()})
    return shapes


def warm(paths: list[str]) -> None:
    """Read every file once so the timed run finds it in the page cache."""
    buf = bytearray(16 * MIB)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def flush(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mem_available_mb() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def find_flower_python(given: str | None) -> str:
    cands = [given] if given else [sys.executable, str(ROOT / ".venv-bench" / "bin" / "python")]
    probe = "import flwr.server.strategy.aggregate, safetensors.numpy"
    for c in cands:
        if c and Path(c).exists() and subprocess.run([c, "-c", probe], capture_output=True).returncode == 0:
            return c
    sys.exit(f"no interpreter among {cands} imports flwr and safetensors.numpy: install flwr or pass --flower-python")


def bench_size(a: argparse.Namespace, size_mib: int, flower_py: str, tmp_root: Path) -> dict:
    shapes = model_shapes(size_mib)
    repeats = a.repeats or (5 if size_mib <= 512 else 3)
    runs: dict[str, list[dict]] = {"ours": [], "flower": []}
    bounds: list[dict] = []
    floors: list[float] = []
    mapped: list[float] = []  # seconds
    writes: list[float] = []  # seconds
    with tempfile.TemporaryDirectory(prefix="fedhpc-aggbench-", dir=tmp_root) as tmpdir:
        tmp = Path(tmpdir)
        t0 = time.perf_counter()
        w = run_child(sys.executable, "workload", {"dir": str(tmp), "shapes": shapes, "sites": a.sites, "seed": 0})
        files = [w["base"], *w["paths"]]
        model_bytes = Path(w["base"]).stat().st_size
        in_bytes = sum(Path(p).stat().st_size for p in files)
        print(
            f"\n== {size_mib} MiB model: {len(shapes)} tensors, {model_bytes / 1e9:.3f} GB a file, {a.sites} sites, "
            f"input {in_bytes / 1e9:.2f} GB (written in {time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        # Flower holds the N loaded arrays and, inside aggregate(), N weighted copies and the running sum.
        need_mb = (2 * a.sites + 1) * model_bytes / MIB + 1024
        outs = {"ours": str(tmp / "ours.safetensors"), "flower": str(tmp / "flower.safetensors")}
        jobs = {
            "ours": (
                sys.executable,
                {
                    **w,
                    "out": outs["ours"],
                    "chunk_bytes": int(a.chunk_mb * MIB) if a.chunk_mb else None,
                    "workers": a.workers,
                },
            ),
            "flower": (flower_py, {**w, "out": outs["flower"]}),
        }
        load = [os.getloadavg()[0]]
        for i in range(repeats):
            for who in ("ours", "flower") if i % 2 == 0 else ("flower", "ours"):
                Path(outs[who]).unlink(missing_ok=True)  # the previous output's pages go with it
                if who == "flower" and mem_available_mb() < need_mb:
                    raise SystemExit(
                        f"Flower needs about {need_mb:.0f} MiB for {a.sites} x {size_mib} MiB, "
                        f"only {mem_available_mb():.0f} MiB are available"
                    )
                warm(files)
                python, job = jobs[who]
                r = run_child(python, who, job)
                runs[who].append(r)
                flush(outs[who])  # Flower does not fsync: its writeback must not run into the next timing
                detail = (
                    f"  (load {r['load_seconds']:.2f} s, aggregate() {r['aggregate_seconds']:.2f} s, "
                    f"save {r['save_seconds']:.2f} s)"
                    if who == "flower"
                    else ""
                )
                print(
                    f"repeat {i} {who:6s} {r['seconds']:7.2f} s {in_bytes / r['seconds'] / 1e9:6.2f} GB/s  "
                    f"peak RSS {r['peak_rss_mb']:6.0f} MiB (+{r['peak_rss_mb'] - r['rss_before_mb']:.0f}){detail}",
                    flush=True,
                )
            bounds.append(run_child(sys.executable, "bandwidth", {"repeats": 5}))
            print(
                f"repeat {i} bound  torch.sum 1 GiB: {bounds[-1]['gbps']:.2f} GB/s ({bounds[-1]['threads']} threads), "
                f"{bounds[-1]['gbps_1_thread']:.2f} GB/s (1 thread); load average {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            warm(files)
            floor_job = {"paths": files, "repeats": 5, "workers": a.workers}
            floors.append(in_bytes / run_child(sys.executable, "read_floor", floor_job)["seconds"] / 1e9)
            print(f"repeat {i} floor  pread of the inputs alone: {floors[-1]:.2f} GB/s", flush=True)
            part = {"repeats": 3, "workers": a.workers, "chunk_bytes": runs["ours"][-1]["chunk_bytes"]}
            mapped.append(run_child(sys.executable, "mapped_floor", {**part, "paths": files})["seconds"])
            writes.append(
                run_child(
                    sys.executable,
                    "write_floor",
                    {**part, "base": w["base"], "out": str(tmp / "write_floor.safetensors")},
                )["seconds"]
            )
            print(
                f"repeat {i} floor  mapped read of the inputs alone: {in_bytes / mapped[-1] / 1e9:.2f} GB/s "
                f"({mapped[-1]:.3f} s); writing the output alone: {writes[-1]:.3f} s",
                flush=True,
            )
        load.append(os.getloadavg()[0])
        max_err = run_child(sys.executable, "check", {"base": w["base"], **outs})["max_abs_diff"]

    def med(who: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[who])

    def med_delta(who: str) -> float:
        return statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs[who])

    ours_s, flower_s, agg_s = med("ours", "seconds"), med("flower", "seconds"), med("flower", "aggregate_seconds")
    bound = statistics.median(b["gbps"] for b in bounds)
    res = {
        "model_bytes": model_bytes,
        "input_bytes": in_bytes,
        "tensors": len(shapes),
        "repeats": repeats,
        "ours_gbps": in_bytes / ours_s / 1e9,
        "flower_gbps": in_bytes / flower_s / 1e9,
        "speedup": flower_s / ours_s,
        "ours_peak_rss_mb": med("ours", "peak_rss_mb"),
        "flower_peak_rss_mb": med("flower", "peak_rss_mb"),
        "rss_ratio": med("ours", "peak_rss_mb") / med("flower", "peak_rss_mb"),
        "bandwidth_gbps": bound,
        "fraction_of_bandwidth": in_bytes / ours_s / 1e9 / bound,
        "read_floor_gbps": statistics.median(floors),
        "read_floor_fraction_of_bandwidth": statistics.median(floors) / bound,
        "fraction_of_read_floor": in_bytes / ours_s / 1e9 / statistics.median(floors),
        "mapped_read_floor_gbps": in_bytes / statistics.median(mapped) / 1e9,
        "write_floor_seconds": statistics.median(writes),
        # What the bandwidth goal allows, against reading alone plus writing alone (no arithmetic).
        "goal_budget_seconds": in_bytes / (GOALS["fraction_of_bandwidth"] * bound * 1e9),
        "read_plus_write_floor_seconds": statistics.median(mapped) + statistics.median(writes),
        "ours_seconds": ours_s,
        "flower_seconds": flower_s,
        "flower_load_seconds": med("flower", "load_seconds"),
        "flower_aggregate_call_seconds": agg_s,
        "flower_save_seconds": med("flower", "save_seconds"),
        "flower_aggregate_call_gbps": in_bytes / agg_s / 1e9,
        "speedup_vs_aggregate_call": agg_s / ours_s,
        "ours_peak_rss_delta_mb": med_delta("ours"),
        "flower_peak_rss_delta_mb": med_delta("flower"),
        "rss_delta_ratio": med_delta("ours") / med_delta("flower"),
        "bandwidth_1_thread_gbps": statistics.median(b["gbps_1_thread"] for b in bounds),
        "bandwidth_threads": bounds[0]["threads"],
        "ours_chunk_bytes": runs["ours"][0]["chunk_bytes"],
        "ours_workers": runs["ours"][0]["workers"],
        "flwr_version": runs["flower"][0]["flwr_version"],
        "max_abs_diff_vs_flower": max_err,
        "loadavg_1min_start_end": load,
    }
    res["met"] = {
        "speedup": res["speedup"] >= GOALS["speedup"],
        "rss_ratio": res["rss_ratio"] <= GOALS["rss_ratio"],
        "fraction_of_bandwidth": res["fraction_of_bandwidth"] >= GOALS["fraction_of_bandwidth"],
    }
    return res


def table(results: dict[str, dict]) -> None:
    print(f"\n{'MiB':>5} {'contender':26s} {'s':>7} {'GB/s':>7} {'peak RSS MiB':>13} {'Δ RSS MiB':>10}")
    for size, r in results.items():
        rows = [
            ("fedhpc aggregate()", r["ours_seconds"], r["ours_peak_rss_mb"], r["ours_peak_rss_delta_mb"]),
            ("flower load+aggregate+save", r["flower_seconds"], r["flower_peak_rss_mb"], r["flower_peak_rss_delta_mb"]),
            ("flower aggregate() alone", r["flower_aggregate_call_seconds"], None, None),
        ]
        for name, s, peak, delta in rows:
            mem = f"{peak:13.0f} {delta:10.0f}" if peak is not None else ""
            print(f"{size:>5} {name:26s} {s:7.2f} {r['input_bytes'] / s / 1e9:7.2f} {mem}")
        print(f"{size:>5} {'bound: torch.sum, 1 GiB':26s} {'':7s} {r['bandwidth_gbps']:7.2f}")
        print(
            f"{size:>5} {'floor: pread of the inputs':26s} {'':7s} {r['read_floor_gbps']:7.2f}  "
            f"({r['read_floor_fraction_of_bandwidth']:.0%} of the bound: the most any reader of these files reaches; "
            f"ours is {r['fraction_of_read_floor']:.0%} of it)"
        )
        print(
            f"{size:>5} {'floor: mapped read':26s} {'':7s} {r['mapped_read_floor_gbps']:7.2f}  (the aggregator's reader, "
            f"no arithmetic); writing the output alone {r['write_floor_seconds']:.3f} s; the two together "
            f"{r['read_plus_write_floor_seconds']:.3f} s against the {GOALS['fraction_of_bandwidth']:.0%} goal's "
            f"{r['goal_budget_seconds']:.3f} s, ours {r['ours_seconds']:.3f} s"
        )
        met = {k: "met" if v else "MISSED" for k, v in r["met"].items()}
        print(
            f"{size:>5} speedup {r['speedup']:.1f}x ({met['speedup']}; {r['speedup_vs_aggregate_call']:.1f}x the "
            f"aggregate() call alone), RSS ratio {r['rss_ratio']:.3f} ({met['rss_ratio']}; Δ ratio "
            f"{r['rss_delta_ratio']:.4f}), {r['fraction_of_bandwidth']:.0%} of the bound "
            f"({met['fraction_of_bandwidth']}); max |ours − base − flower| {r['max_abs_diff_vs_flower']:.1e}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,1024", help="model sizes in MiB, comma-separated")
    ap.add_argument("--sites", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=0, help="0: 5 for sizes up to 512 MiB, 3 above")
    ap.add_argument("--chunk-mb", type=float, default=None, help="our chunk_bytes in MiB (default: the aggregator's)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="our worker threads (default: all cores)")
    ap.add_argument("--flower-python", default=None, help="interpreter for Flower (default: first that imports flwr)")
    ap.add_argument("--tmp", default=None, help="directory for the model files (on disk, not tmpfs)")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(CHILDREN[a.child](json.loads(a.job))))
        return

    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    flower_py = find_flower_python(a.flower_python)
    tmp_root = Path(a.tmp or tempfile.gettempdir())
    need = max(sizes) * MIB * (a.sites + 3) * 1.1
    if shutil.disk_usage(tmp_root).free < need:
        sys.exit(f"{tmp_root}: {shutil.disk_usage(tmp_root).free / 1e9:.1f} GB free, need {need / 1e9:.1f} (--tmp)")
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_root)], capture_output=True, text=True).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        print(f"warning: {tmp_root} is {fs}: the model files take RAM; pass --tmp on a disk", flush=True)
    print(f"ours: {sys.executable}; flower: {flower_py}; files under {tmp_root} ({fs})", flush=True)
    results = {str(s): bench_size(a, s, flower_py, tmp_root) for s in sizes}
    table(results)
    print(
        json.dumps(
            {
                "sites": a.sites,
                "flower_python": flower_py,
                "flower_timed_work": "safetensors.numpy.load_file x N + flwr aggregate() + safetensors.numpy.save_file",
                "ours_timed_work": "fedhpc.aggregation.streaming.aggregate(): base + N update files -> fsynced output file",
                "throughput": "GB (1e9 B) of input (N update files + base) per second, both contenders",
                "bandwidth": "median torch.sum over 1 GiB fp32, all torch threads",
                "read_floor": "median pread of the N + 1 input files in 1 MiB blocks, --workers threads, nothing else",
                "mapped_read_floor": "fresh TensorReader mappings, chunk views summed, --workers threads, no output",
                "write_floor": "TensorWriter of the base's layout filled with a constant, fsynced and renamed",
                "goals": GOALS,
                "sizes": results,
                "all_met": all(all(r["met"].values()) for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
