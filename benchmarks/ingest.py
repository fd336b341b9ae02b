"""Data preparation throughput: `fedhpc shard` against the tokenizer alone and against reading the text alone.

Text: deterministic random words (a Zipf-weighted vocabulary of 20 000 made-up words), one
document per line of about 2 kB, written as --files files under a temporary directory, deleted
afterwards. The same text, the same tokenizer and the same number of cores for every contender:

- read: the files read and split into UTF-8 lines, nothing else (fedhpc's own reader, `iter_source`);
- tokenizer: the documents already in memory, encoded in batches of 512 (the batch fedhpc uses);
  only the encode calls are timed. BPE: HF `tokenizers`' `encode_batch_fast` of a byte-level BPE
  trained by fedhpc's `train_bpe` (vocabulary 8192, trained on the first 4 MB), its Rust threads
  limited to the cores (RAYON_NUM_THREADS). Byte: fedhpc's `ByteTokenizer.encode_batch` (UTF-8
  bytes to ids), one process per core, each on its share of the files;
- fedhpc: the real commands in fresh processes, with the same tokenizer file (kind `pretrained`
  for the BPE): `fedhpc shard` alone (run 1x1:C, data.shard_jobs 1, HF's Rust threads limited
  to C), or (J > 1) `fedhpc shard-tokenizer`, J `fedhpc shard-part` processes side by side with
  --workers W (one core each), then the `fedhpc shard` that gathers, packs and signs: what the
  workflow's `shard_tokenizer`, `shard_part` and `shard` jobs run, Snakemake's own start-up not
  included. Includes process start-up, reading, tokenising, the held-out split, zarr packing,
  hashing, fsync and signing.

tokens/s counts the text's tokens (end-of-document tokens not included) over each contender's
wall time; "per core" divides by the cores it was given. The goal (issue 21, item 2): fedhpc per
core >= 0.8x the tokenizer alone per core. On a machine shared with other work wall times say
little, so CPU seconds are shown too (every thread and process of the contender: getrusage of
the reaped commands, process_time around the encode calls) and their ratio, tokenizer CPU
seconds / fedhpc CPU seconds: what one core does when it has the core to itself.

Usage: python benchmarks/ingest.py [--size-mb 200] [--files 8] [--kinds bpe byte]
                                   [--runs 1x1:1 1x1:2 2x1:2] [--repeats 3] [--tmp DIR]
A run JxW:C is J jobs of W workers on C cores. Prints a table and, on the last line, a JSON object.
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
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import yaml

BIN = Path(sys.executable).parent
DOC_BYTES = 2000
BATCH = 512


def make_text(root: Path, size_mb: int, files: int, seed: int = 0) -> list[Path]:
    """`files` files of about `size_mb` MB in all, one document per line, drawn from a pool of documents."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    vocab = ["".join(rng.choice(letters, rng.integers(2, 10))) for _ in range(20_000)]
    weights = 1.0 / np.arange(1, len(vocab) + 1)
    weights /= weights.sum()
    # A pool of distinct documents, drawn from again for every file: generating 1 GB word by
    # word would take longer than the benchmark; tokenizers see the same words either way.
    pool = []
    for _ in range(4000):
        words = rng.choice(len(vocab), DOC_BYTES // 6, p=weights)
        pool.append((" ".join(vocab[i] for i in words) + "\n").encode())
    per_file = size_mb * 1_000_000 // files
    paths = []
    for f in range(files):
        path = root / f"part-{f:03d}.txt"
        with open(path, "wb") as fh:
            written = 0
            while written < per_file:
                doc = pool[int(rng.integers(len(pool)))]
                fh.write(doc)
                written += len(doc)
        paths.append(path)
    return paths


def source(files_glob: str):
    from fedhpc.config.federation import SourceConfig

    return SourceConfig(name="bench", format="text", path=files_glob, domain="bench", split="line")


def read_alone(files_glob: str) -> tuple[float, int]:
    from fedhpc.data.ingest import iter_source

    t = time.perf_counter()
    docs = sum(1 for _ in iter_source(source(files_glob)))
    return time.perf_counter() - t, docs


def _encode_files(paths: list[str], kind: str, tok_path: str) -> tuple[float, float, int]:
    """Encode-only wall and CPU seconds (every thread of the process) and text tokens of `paths`
    (the documents read first, untimed)."""
    from fedhpc.data.tokenizer import ByteTokenizer, load_tokenizer

    tok = ByteTokenizer() if kind == "byte" else load_tokenizer(tok_path)
    spent, cpu, tokens = 0.0, 0.0, 0
    for p in paths:
        docs = [line.rstrip("\n") for line in Path(p).read_text().splitlines() if line.strip()]
        for i in range(0, len(docs), BATCH):
            t, c = time.perf_counter(), time.process_time()
            ids = tok.encode_batch(docs[i : i + BATCH])
            spent += time.perf_counter() - t
            cpu += time.process_time() - c
            tokens += sum(len(x) for x in ids)
    return spent, cpu, tokens


def tokenizer_alone(paths: list[Path], kind: str, tok_path: Path, cores: int) -> tuple[float, float, int]:
    """Wall and CPU seconds of encoding alone on `cores` cores, and the text's token count."""
    if kind == "bpe":
        # One process, HF's own batch encoding on `cores` Rust threads (read when its pool starts).
        code = (
            "import json,sys; sys.path.insert(0, sys.argv[1]); from ingest import _encode_files; "
            "print(json.dumps(_encode_files(json.loads(sys.argv[2]), 'bpe', sys.argv[3])))"
        )
        env = {**os.environ, "RAYON_NUM_THREADS": str(cores)}
        args = [
            sys.executable,
            "-c",
            code,
            str(Path(__file__).parent),
            json.dumps([str(p) for p in paths]),
            str(tok_path),
        ]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
        spent, cpu, tokens = json.loads(out.strip().splitlines()[-1])
        return spent, cpu, tokens
    shares = [[str(p) for p in paths[i::cores]] for i in range(cores)]
    with ProcessPoolExecutor(cores) as pool:
        results = list(pool.map(_encode_files, shares, [kind] * cores, [str(tok_path)] * cores))
    # The shares run side by side: the slowest is the wall time.
    return max(r[0] for r in results), sum(r[1] for r in results), sum(r[2] for r in results)


def write_config(work: Path, files_glob: str, kind: str, tok_path: Path, jobs: int) -> Path:
    tokenizer = {"kind": "byte"} if kind == "byte" else {"kind": "pretrained", "path": str(tok_path)}
    data: dict = {
        "sources": [{"name": "bench", "format": "text", "path": files_glob, "domain": "bench", "split": "line"}],
        "tokenizer": tokenizer,
        "shard_tokens": 10_000_000,
        "heldout_fraction": 0.01,
    }
    if jobs > 1:
        data["shard_jobs"] = jobs
    cfg = {
        "run": "ingest",
        "output_dir": str(work / "results"),
        "sites": {"a": {}, "b": {}},
        "data": data,
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16},
    }
    path = work / f"config-{kind}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def run_fedhpc(work: Path, config: Path, jobs: int, workers: int, cores: int) -> tuple[float, float, float]:
    """Wall and CPU seconds (every process) of the shard commands, from a run directory holding
    only the keys, and the CPU seconds of the critical path: the tokenizer job, the part job that
    took most, the gather. With a free core per worker, the wall time would be about that."""
    shutil.rmtree(work / "results" / "ingest" / "data", ignore_errors=True)
    env = {**os.environ, "RAYON_NUM_THREADS": str(cores), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    fedhpc = str(BIN / "fedhpc")
    subprocess.run([fedhpc, "keys", "ensure", "--config", str(config)], env=env, check=True, capture_output=True)
    t, c = time.perf_counter(), _children_cpu()
    slowest_part = 0.0
    if jobs > 1:
        subprocess.run([fedhpc, "shard-tokenizer", "--config", str(config)], env=env, check=True, capture_output=True)
        before_parts = _children_cpu()
        # The scatter: the part jobs side by side, as Snakemake starts them (each worker of a
        # part has one Rust thread: J jobs x W workers use J x W cores).
        procs = [
            subprocess.Popen(
                [fedhpc, "shard-part", "--config", str(config), "--part", str(i), "--workers", str(workers)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in range(jobs)
        ]
        for p in procs:
            err = p.stderr.read() if p.stderr else b""
            # wait4, not wait: each part's own CPU time (its workers included), for the critical path.
            _, status, use = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode:
                raise RuntimeError(f"shard-part failed: {err.decode()[-2000:]}")
            slowest_part = max(slowest_part, use.ru_utime + use.ru_stime)
        parts_cpu = _children_cpu() - before_parts
    proc = subprocess.run([fedhpc, "shard", "--config", str(config)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"fedhpc shard failed: {proc.stderr[-2000:]}")
    total = _children_cpu() - c
    return time.perf_counter() - t, total, total - (parts_cpu - slowest_part if jobs > 1 else 0.0)


def manifest_tokens(work: Path) -> int:
    m = json.loads((work / "results" / "ingest" / "data" / "manifest.json").read_text())
    return sum(s["tokens"] for s in m["shards"]) + sum(h["tokens"] for h in m["heldout"])


def parse_run(text: str) -> tuple[int, int, int]:
    jw, _, cores = text.partition(":")
    jobs, _, workers = jw.partition("x")
    if int(jobs) == 1 and int(workers) > 1:
        raise SystemExit(f"--runs {text}: workers belong to part jobs, which need data.shard_jobs > 1 (J > 1)")
    return int(jobs), int(workers), int(cores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=200, help="MB of text (1000 for the issue's 1 GB)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--kinds", nargs="+", default=["bpe", "byte"], choices=["bpe", "byte"])
    ap.add_argument("--runs", nargs="+", default=["1x1:1", "1x1:2"], help="fedhpc runs JOBSxWORKERS:CORES")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of read and tokenizer (the medians are shown)")
    ap.add_argument("--shard-repeats", type=int, default=1, help="repeats of each fedhpc run")
    ap.add_argument("--tmp", default=None, help="where the text goes (default: the system temp dir)")
    a = ap.parse_args()
    runs = [parse_run(r) for r in a.runs]
    work = Path(tempfile.mkdtemp(prefix="fedhpc-ingest-", dir=a.tmp))
    results: dict = {"size_mb": a.size_mb, "files": a.files, "runs": {}}
    try:
        t = time.perf_counter()
        paths = make_text(work, a.size_mb, a.files)
        files_glob = str(work / "part-*.txt")
        print(f"text: {a.size_mb} MB in {a.files} files, generated in {time.perf_counter() - t:.1f} s", flush=True)
        from fedhpc.data.tokenizer import save_tokenizer, train_bpe

        sample = paths[0].read_text()[:4_000_000].splitlines()
        tok_path = work / "bpe.json"
        save_tokenizer(train_bpe(sample, 8192, "<|endoftext|>"), tok_path)

        reads = [read_alone(files_glob) for _ in range(a.repeats)]
        read_s = statistics.median(r[0] for r in reads)
        results["read_s"] = read_s
        results["docs"] = reads[0][1]
        print(f"read alone: {read_s:.2f} s, {a.size_mb / read_s:.0f} MB/s, {reads[0][1]} documents", flush=True)
        for kind in a.kinds:
            for cores in sorted({c for _, _, c in runs}):
                measured = [tokenizer_alone(paths, kind, tok_path, cores) for _ in range(a.repeats)]
                tok_s = statistics.median(m[0] for m in measured)
                tok_cpu = statistics.median(m[1] for m in measured)
                tokens = measured[0][2]
                results["runs"][f"{kind} tokenizer:{cores}"] = {"s": tok_s, "cpu_s": tok_cpu, "tokens": tokens}
                print(
                    f"{kind} tokenizer alone, {cores} cores: {tok_s:.2f} s ({tok_cpu:.2f} CPU s), "
                    f"{tokens / tok_s / 1e6:.2f} M tokens/s ({tokens} tokens; reading alone would be "
                    f"{tokens / read_s / 1e6:.1f} M tokens/s)",
                    flush=True,
                )
            for jobs, workers, cores in runs:
                config = write_config(work, files_glob, kind, tok_path, jobs)
                measured = [run_fedhpc(work, config, jobs, workers, cores) for _ in range(a.shard_repeats)]
                secs = statistics.median(m[0] for m in measured)
                cpu = statistics.median(m[1] for m in measured)
                critical = statistics.median(m[2] for m in measured)
                base = results["runs"][f"{kind} tokenizer:{cores}"]
                tokens = base["tokens"]
                # Per core on the same cores: (tokens / secs / cores) / (tokens / base / cores).
                ratio, ratio_cpu = base["s"] / secs, base["cpu_s"] / cpu
                results["runs"][f"{kind} fedhpc {jobs}x{workers}:{cores}"] = {
                    "s": secs,
                    "cpu_s": cpu,
                    "critical_path_cpu_s": critical,
                    "manifest_tokens": manifest_tokens(work),
                    "ratio_per_core": ratio,
                    "ratio_per_cpu_second": ratio_cpu,
                }
                print(
                    f"{kind} fedhpc shard {jobs} job(s) x {workers} worker(s), {cores} cores: {secs:.2f} s "
                    f"({cpu:.2f} CPU s, critical path {critical:.2f}), {tokens / secs / 1e6:.2f} M tokens/s, {tokens / secs / cores / 1e6:.2f} per core; "
                    f"against the tokenizer alone: {ratio:.2f}x per core, {ratio_cpu:.2f}x per CPU second (goal >= 0.8x)",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
