"""Typed configuration of aggregation: the strategy, late updates, differential privacy, secure aggregation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedhpc.config.fields import opt


@dataclass(kw_only=True)
class StalenessConfig:
    """How much a late update (built on an older global model) still counts."""

    decay: Literal["constant", "polynomial", "hinge", "exponential"] = opt(
        "polynomial",
        "Weight multiplier by staleness s (rounds): `constant` 1, `polynomial` (1+s)^-a, "
        "`hinge` 1 up to `hinge` rounds then 1/(a(s-hinge)+1), `exponential` e^(-a s).",
    )
    exponent: float = opt(0.5, "The `a` of the decay functions.", minimum=0)
    hinge: int = opt(4, "Rounds of grace of the `hinge` decay.", minimum=0)


@dataclass(kw_only=True)
class PrivacyConfig:
    """Central differential privacy: clip each site's update, add Gaussian noise to the aggregate."""

    noise_multiplier: float = opt(
        0.0, "Noise std as a multiple of the sensitivity (clip_norm × largest weight); 0 turns DP off.", minimum=0
    )
    clip_norm: float = opt(1.0, "L2 norm every site's update is clipped to when DP is on.", exclusiveMinimum=0)
    delta: float = opt(1e-5, "The δ at which ε is reported after every round.", exclusiveMinimum=0, exclusiveMaximum=1)


@dataclass(kw_only=True)
class SecureAggregationConfig:
    """Pairwise additive masking (X25519): the coordinator learns only the sum of the updates."""

    enabled: bool = opt(
        False,
        "Sites mask their (fp32) update with pairwise masks that cancel in the sum; survivors reveal the seeds "
        "they shared with a site that dropped. Needs `rule: mean` and no per-site clipping, compression or DP.",
    )
    fraction_bits: int = opt(
        32, "Fixed-point fraction bits of the masked integers (precision 2^-bits).", minimum=8, maximum=48
    )
    min_sites: int = opt(
        2,
        "Fewest accepted updates a round may sum: one alone would be that site's update in the clear.",
        minimum=2,
    )


@dataclass(kw_only=True)
class StrategyConfig:
    """How accepted updates become the next global model."""

    name: Literal["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "diloco", "scaffold"] = opt(
        "fedavg",
        "Server rule on the combined update: `fedavg`; `fedavgm` (server momentum); `fedprox` (FedAvg with a "
        "proximal term at the sites); `fedadam`/`fedyogi`/`fedadagrad` (adaptive server optimisers); `diloco` "
        "(outer Nesterov SGD); `scaffold` (control variates correct the sites' gradients).",
    )
    weighting: Literal["tokens", "samples", "uniform"] = opt(
        "tokens", "Weight of each site: tokens trained, sequences trained, or equal."
    )
    server_lr: float | None = opt(
        None,
        "Server learning rate; null takes the strategy's default (1.0; diloco 0.7; adaptive ones 0.01).",
        exclusiveMinimum=0,
    )
    momentum: float | None = opt(
        None, "Server momentum of fedavgm and diloco; null: 0.9.", minimum=0, exclusiveMaximum=1
    )
    beta1: float = opt(0.9, "First-moment decay of the adaptive server optimisers.", minimum=0, exclusiveMaximum=1)
    beta2: float = opt(0.99, "Second-moment decay of fedadam and fedyogi.", minimum=0, exclusiveMaximum=1)
    tau: float = opt(1e-3, "Adaptivity floor τ of the adaptive server optimisers.", exclusiveMinimum=0)
    proximal_mu: float = opt(
        0.01, "FedProx: weight μ of the proximal term μ/2 ‖w − w_global‖² in the sites' loss.", minimum=0
    )
    rule: Literal["mean", "median", "trimmed_mean", "krum", "multikrum"] = opt(
        "mean",
        "How site updates are combined: weighted `mean`; coordinate-wise `median`; `trimmed_mean` (drops f from "
        "each end); `krum` (the one update closest to its n-f-2 neighbours); `multikrum` (weighted mean of the "
        "`multikrum_select` best by Krum score).",
    )
    faulty_sites: int = opt(
        0,
        "Faulty or malicious sites (f) the rule must tolerate; configurations that cannot are refused.",
        minimum=0,
    )
    multikrum_select: int | None = opt(None, "Updates Multi-Krum averages; null: n - f.", minimum=1)
    clip_norm: float | None = opt(
        None, "Scale each site's update down to this L2 norm before combining (null: no clipping).", exclusiveMinimum=0
    )
    layerwise_norm: bool = opt(
        False, "Scale every site's tensor to the weighted mean norm of that tensor across sites before combining."
    )
    heterogeneity_aware: bool = opt(
        False,
        "Normalise each update by its local effort (Σ step learning rates), FedNova style, so sites with "
        "different batch sizes, step counts and learning rates count by data, not by how far they moved.",
    )
    domain_cap: float | None = opt(
        None, "Largest share of the aggregate any data domain may hold (null: no cap).", exclusiveMinimum=0, maximum=1
    )
    staleness: StalenessConfig = opt(StalenessConfig, "Decay of late updates' weight.")
    privacy: PrivacyConfig = opt(PrivacyConfig, "Central differential privacy.")
    chunk_mb: float = opt(
        2.0,
        "Working-set size per site read by the aggregator (MB); tensors larger than this are streamed in chunks.",
        exclusiveMinimum=0,
    )
    ranks: int = opt(
        1,
        "MPI ranks of the aggregation job (they split the tensors by bytes; the result is bitwise the serial one).",
        minimum=1,
    )
    secure_aggregation: SecureAggregationConfig = opt(SecureAggregationConfig, "Secure aggregation.")
