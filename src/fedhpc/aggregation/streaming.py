"""The streaming (and optionally MPI-parallel) aggregator: N update files → next model + server state.

Memory holds a few chunks per site plus the output chunk (per worker thread), whatever N and
the model size: every tensor is read in element ranges (views of the memory-mapped inputs,
rawtensors.TensorReader), combined in fp32 and written at its place in a preallocated output
file. Chunks are independent work items: `workers` threads share them on a node, and MPI
ranks split the tensors by bytes and write their own ranges of the same files. Every
per-chunk computation and every reduction order is the same whoever runs it, so the files
are bitwise identical to the serial run's.

Speed: the work is memory-bound (the page cache read once, one multiply-add per site and
element, one copy out). Chunks are 2 MiB: with mapped inputs the per-chunk Python and
dispatch cost is what is left to save; smaller chunks pay it more often, larger ones spill the
cache. torch's intra-op threads are pinned to one while the aggregator runs: splitting each
add over OpenMP threads saves little, and with more runnable threads than cores (a loaded
node) every OpenMP barrier can wait a whole scheduler time slice. Parallelism comes from the
worker threads instead. The figures behind both choices are in benchmarks/README.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedhpc.aggregation import strategies as st
from fedhpc.aggregation.compress import Codec, codec_from_metadata, decode_range, stored_specs
from fedhpc.core.rawtensors import TensorReader, TensorWriter
from fedhpc.core.tensorfile import DTYPE_NAMES, TensorSpec


@dataclass(frozen=True)
class ServerOpt:
    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def step(self, x: torch.Tensor, delta: torch.Tensor, state) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """strategies.server_step with these settings."""
        return st.server_step(
            self.name,
            x,
            delta,
            state,
            lr=self.lr,
            momentum=self.momentum,
            beta1=self.beta1,
            beta2=self.beta2,
            tau=self.tau,
        )


@dataclass(frozen=True)
class Combine:
    rule: str = "mean"
    faulty: int = 0
    select: int | None = None  # Multi-Krum
    clip: float | None = None
    layerwise: bool = False
    noise_multiplier: float = 0.0
    noise_key: bytes = b""
    secure: object | None = None  # secure.SecureSum: the inputs are masked, only their sum is meaningful

    @property
    def needs_stats(self) -> bool:
        return self.clip is not None or self.layerwise or self.rule in ("krum", "multikrum")


@dataclass
class SiteInput:
    site: str
    path: Path
    weight: float  # normalised share p_i
    coef: float | None = None  # multiplier of the site's update in a mean (p_i, or FedNova's p_i τ / a_i)
    control: Path | None = None  # SCAFFOLD: the site's control-variate delta


@dataclass
class Result:
    norms: dict[str, float] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)  # clip factor applied to each site
    selected: list[str] = field(default_factory=list)
    coefficients: dict[str, float] = field(default_factory=dict)
    noise_std: float = 0.0
    bytes_read: int = 0
    seconds: float = 0.0


class UpdateFile:
    """One site's update file, decoded to fp32 element ranges."""

    def __init__(self, path: Path):
        self.reader = TensorReader(path)
        self.codec: Codec = codec_from_metadata(self.reader.metadata)

    def read(self, name: str, numel: int, a: int, b: int) -> torch.Tensor:
        if self.codec.scheme == "none":
            t = self.reader.read(name, a, b)
            return t if t.dtype == torch.float32 else t.to(torch.float32)
        return decode_range(
            self.reader.read,
            name,
            numel,
            self.codec,
            a,
            b,
        )

    def close(self) -> None:
        self.reader.close()


def expected_specs(global_specs: dict[str, TensorSpec], codec: Codec) -> dict[str, TensorSpec]:
    """The stored tensors an update of the global model must hold under `codec`."""
    out = {}
    for name, spec in global_specs.items():
        for stored, (dtype, shape) in stored_specs(name, spec.shape, codec).items():
            out[stored] = TensorSpec(DTYPE_NAMES[dtype], shape)
    return out


def partition(specs: dict[str, TensorSpec], parts: int) -> list[list[str]]:
    """Sorted tensor names cut into `parts` contiguous groups of about equal bytes."""
    names = sorted(specs)
    total = sum(specs[n].nbytes for n in names) or 1
    groups: list[list[str]] = [[] for _ in range(parts)]
    done = 0
    for n in names:
        # A tensor goes to the part its middle byte falls in.
        k = min(parts - 1, int((done + specs[n].nbytes / 2) * parts / total))
        groups[k].append(n)
        done += specs[n].nbytes
    return groups


def _chunks(numel: int, chunk: int):
    for a in range(0, numel, chunk):
        yield a, min(numel, a + chunk)


def _noise(key: bytes, name: str, a: int, n: int, std: float) -> torch.Tensor:
    # Seeded per (tensor, chunk start), so serial and parallel runs draw the same numbers,
    # and by a coordinator secret, so sites cannot predict (and subtract) the noise.
    seed = int.from_bytes(hashlib.blake2b(f"{name}@{a}".encode(), key=key[:64], digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed & (2**63 - 1))
    return torch.randn(n, generator=g, dtype=torch.float32).mul_(std)


@contextlib.contextmanager
def _one_intra_op_thread():
    """torch's intra-op threads at 1 for the duration (restored after); see the module docstring."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


def aggregate(
    base: Path,
    inputs: list[SiteInput],
    out_model: Path,
    *,
    server: ServerOpt = ServerOpt(),
    combine: Combine = Combine(),
    state_in: Path | None = None,
    state_out: Path | None = None,
    control_scale: float = 0.0,
    chunk_bytes: int = 2 << 20,
    metadata: dict[str, str] | None = None,
    comm=None,
    workers: int = 1,
) -> Result:
    """Aggregate `inputs` onto `base`; write `out_model` (base's dtypes) and, when the server
    optimiser keeps state, `state_out` (fp32, tensors named `<tensor>@<key>`).

    `comm`: an mpi4py communicator (None: serial). Every rank passes the same arguments.
    """
    t0 = time.perf_counter()
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    res = Result()
    inputs = sorted(inputs, key=lambda i: i.site)
    chunk = max(1, chunk_bytes // 4)
    keys = st.SERVER_STATE[server.name]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_intra_op_thread())
        base_r = stack.enter_context(TensorReader(base))
        specs = base_r.specs
        ups = []
        for i in inputs:
            u = UpdateFile(i.path)
            stack.callback(u.close)
            ups.append(u)
        _check_update_specs(ups, specs, secure=combine.secure is not None)
        ctrls = [stack.enter_context(TensorReader(i.control)) for i in inputs if i.control is not None]
        if keys == ("control",) and len(ctrls) != len(inputs):
            raise ValueError("scaffold needs a control-variate delta from every site")
        state_r = stack.enter_context(TensorReader(state_in)) if state_in is not None and state_in.exists() else None
        mine = partition(specs, size)[rank]
        numel = {n: math.prod(specs[n].shape) for n in specs}
        items = [(name, a, b) for name in mine for a, b in _chunks(numel[name], chunk)]

        # Pass 1 (only for rules that need it): per-site, per-tensor squared norms and Gram matrices.
        stats = _norm_stats(ups, items, numel, combine, workers, comm) if combine.needs_stats and ups else {}
        scale, res.norms, res.scales = _site_scales(inputs, specs, stats, combine)
        chosen, coef = _choose(inputs, stats, scale, combine)
        res.selected = [inputs[i].site for i in chosen]
        res.coefficients = {inputs[i].site: c for i, c in coef.items()}
        if combine.noise_multiplier > 0 and ups:
            res.noise_std = _noise_std(combine, coef)

        out = TensorWriter(out_model, specs, metadata)
        state_specs = {f"{n}@{k}": TensorSpec("F32", specs[n].shape) for n in specs for k in keys}
        sout = TensorWriter(state_out, state_specs, {"optimizer": server.name}) if keys and state_out else None
        writers = [x for x in (out, sout) if x is not None]
        if rank == 0:
            for x in writers:
                x.create()
        if comm is not None:
            comm.Barrier()
        for x in writers:
            x.open()

        def emit(item: tuple[str, int, int]) -> None:
            name, a, b = item
            if combine.secure is not None and ups:
                delta = _secure_mean(combine.secure, ups, name, a, b)
            else:
                delta = _combine(combine.rule, combine.faulty, ups, chosen, coef, scale, name, numel[name], a, b)
            if res.noise_std > 0:
                delta += _noise(combine.noise_key, name, a, b - a, res.noise_std)
            prev = {}
            if state_r is not None:
                prev = {k: state_r.read(f"{name}@{k}", a, b).clone() for k in keys if k != "control"}
            x = base_r.read(name, a, b)
            if not ups:
                # Nothing arrived: the model (bit for bit, signed zeros included) and the
                # server state stay as they were; momentum must not move an empty round.
                out.write(name, a, x.clone())
                for k in keys if sout is not None else ():
                    old = prev.get(k) if k != "control" else None
                    if old is None and state_r is not None and f"{name}@{k}" in state_r.specs:
                        old = state_r.read(f"{name}@{k}", a, b).clone()
                    sout.write(f"{name}@{k}", a, old if old is not None else torch.zeros(b - a))
                return
            new_x, new_state = server.step(x, delta, prev)
            if keys == ("control",):
                c = state_r.read(f"{name}@control", a, b).clone() if state_r else torch.zeros(b - a)
                for r in ctrls:
                    c.add_(r.read(name, a, b).to(torch.float32), alpha=control_scale)
                new_state = {"control": c}
            out.write(name, a, new_x.to(x.dtype))
            for k, v in new_state.items() if sout is not None else ():
                sout.write(f"{name}@{k}", a, v)

        try:
            _map(emit, items, workers)
            for x in writers:
                x.close()
        except BaseException:
            for x in writers:
                x.abort()
            raise
        if comm is not None:
            comm.Barrier()
        if rank == 0:
            for x in writers:
                x.commit()
        res.bytes_read = sum(u.reader.path.stat().st_size for u in ups) + base.stat().st_size
    res.seconds = time.perf_counter() - t0
    return res


def _check_update_specs(ups: list[UpdateFile], specs: dict[str, TensorSpec], secure: bool) -> None:
    """Every update holds the base model's tensors under its codec (masked: as int64)."""
    for u in ups:
        # Verification checked this; the engine is also a library, so it refuses to guess.
        want = expected_specs(specs, u.codec)
        f32 = {n: TensorSpec("F32", s.shape) for n, s in specs.items()} if u.codec.scheme == "none" else want
        if secure:
            want = f32 = {n: TensorSpec("I64", s.shape) for n, s in specs.items()}
        if u.reader.specs not in (want, f32, specs):
            raise ValueError(f"{u.reader.path}: tensors do not match the base model under codec {u.codec.scheme!r}")


def _norm_stats(
    ups: list[UpdateFile],
    items: list[tuple[str, int, int]],
    numel: dict[str, int],
    combine: Combine,
    workers: int,
    comm,
) -> dict[str, tuple[list[float], list[list[float]] | None]]:
    """Per tensor, each site's squared norm and (Krum) the sites' Gram matrix, over every rank's tensors."""
    want_gram = combine.rule in ("krum", "multikrum")

    def chunk_stats(item: tuple[str, int, int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        name, a, b = item
        xs = torch.stack([u.read(name, numel[name], a, b).to(torch.float64) for u in ups])
        return (xs * xs).sum(dim=1), (xs @ xs.T if want_gram else None)

    sums: dict[str, list] = {}
    # Partial sums are added in chunk order whatever thread computed them: reproducible.
    for (name, _, _), (sq, gram) in zip(items, _map(chunk_stats, items, workers)):
        acc = sums.setdefault(name, [torch.zeros(len(ups), dtype=torch.float64), None])
        acc[0] += sq
        if gram is not None:
            acc[1] = gram if acc[1] is None else acc[1] + gram
    stats = {n: (v[0].tolist(), v[1].tolist() if v[1] is not None else None) for n, v in sums.items()}
    if comm is not None:
        merged: dict = {}
        for part in comm.allgather(stats):
            merged.update(part)
        stats = merged
    return stats


def _noise_std(combine: Combine, coef: dict[int, float]) -> float:
    """Differential privacy's noise std on the combined update: multiplier x clip x the largest weight."""
    if combine.clip is None:
        raise ValueError("differential privacy needs a clip norm (the sensitivity is unbounded otherwise)")
    if not combine.noise_key:
        # The seeds are the tensor names and offsets: without a secret anyone could redraw the noise.
        raise ValueError("differential privacy needs a secret noise_key (unkeyed noise can be redrawn and subtracted)")
    return combine.noise_multiplier * combine.clip * max(coef.values())


def _site_scales(
    inputs: list[SiteInput], specs: dict[str, TensorSpec], stats: dict, combine: Combine
) -> tuple[list[dict[str, float]], dict[str, float], dict[str, float]]:
    """Per-site, per-tensor scales (layer-wise normalisation, then clipping of the whole update),
    with each site's norm after normalisation and its clip factor."""
    n_sites = len(inputs)
    w = {i.site: i.weight for i in inputs}
    scale = [{n: 1.0 for n in specs} for _ in inputs]
    norms, factors = {}, {}
    if not stats:
        return scale, norms, factors
    names = sorted(stats)
    if combine.layerwise:
        for n in names:
            sc = st.layerwise_scales({inputs[i].site: math.sqrt(stats[n][0][i]) for i in range(n_sites)}, w)
            for i in range(n_sites):
                scale[i][n] = sc[inputs[i].site]
    for i in range(n_sites):
        norm = math.sqrt(sum(scale[i][n] ** 2 * stats[n][0][i] for n in names))
        norms[inputs[i].site] = norm
        f = factors[inputs[i].site] = st.clip_factor(norm, combine.clip)
        for n in names:
            scale[i][n] *= f
    return scale, norms, factors


def _choose(
    inputs: list[SiteInput], stats: dict, scale: list[dict[str, float]], combine: Combine
) -> tuple[list[int], dict[int, float]]:
    """The sites the rule combines and their coefficients.

    Krum's distances are those of the scaled updates, from the per-tensor Gram matrices.
    Mean-type rules weight the chosen sites by their coefficients, renormalised to the chosen share.
    """
    n_sites = len(inputs)
    chosen = list(range(n_sites))
    if combine.rule in ("krum", "multikrum") and inputs:
        gram = torch.zeros(n_sites, n_sites, dtype=torch.float64)
        for n in sorted(stats):
            k = torch.tensor([scale[i][n] for i in range(n_sites)], dtype=torch.float64)
            gram += torch.tensor(stats[n][1], dtype=torch.float64) * (k[:, None] * k[None, :])
        select = 1 if combine.rule == "krum" else (combine.select or n_sites - combine.faulty)
        chosen = st.krum_select(st.pairwise_sq_distances(gram), combine.faulty, select)
    if not chosen:
        return [], {}
    if combine.rule == "krum":
        return chosen, {chosen[0]: 1.0}
    if combine.rule in ("median", "trimmed_mean"):
        return chosen, {i: 1.0 / len(chosen) for i in chosen}
    share = sum(inputs[i].weight for i in chosen) or 1.0
    return chosen, {i: (inputs[i].coef if inputs[i].coef is not None else inputs[i].weight) / share for i in chosen}


def _secure_mean(sec, ups: list[UpdateFile], name: str, a: int, b: int) -> torch.Tensor:
    """Weighted mean of the plain updates over [a, b) from the masked ones: their sum modulo 2^64
    with the dropped pairs' masks removed (secure.masked_sum_range)."""
    from fedhpc.aggregation.secure import masked_sum_range

    parts = (u.reader.read(name, a, b).numpy().view("uint64") for u in ups)
    return masked_sum_range(sec, parts, name, a)


def _map(fn, items: list, workers: int) -> list:
    """fn over items, results in order; on `workers` threads (torch ops and pwrite release the GIL)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _combine(
    rule: str,
    faulty: int,
    ups: list[UpdateFile],
    chosen: list[int],
    coef: dict[int, float],
    scale: list[dict[str, float]],
    name: str,
    n: int,
    a: int,
    b: int,
) -> torch.Tensor:
    """The combined update Δ for elements [a, b) of tensor `name` (fp32, a fresh tensor)."""
    if not ups:
        return torch.zeros(b - a, dtype=torch.float32)
    if rule in ("median", "trimmed_mean"):
        xs = torch.stack([ups[i].read(name, n, a, b) * scale[i][name] for i in chosen])
        return st.coordinate_median(xs) if rule == "median" else st.trimmed_mean(xs, faulty)
    if not chosen:
        return torch.zeros(b - a, dtype=torch.float32)
    first, *rest = chosen
    acc = torch.mul(ups[first].read(name, n, a, b), coef[first] * scale[first][name])
    for i in rest:
        acc.add_(ups[i].read(name, n, a, b), alpha=coef[i] * scale[i][name])
    return acc
