"""Site capability profiles: device memory → micro-batch, and how a site's batch is formed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedhpc.config.federation import ModelConfig, SiteConfig
from fedhpc.core.errors import FedhpcError

GB = 1e9


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    d, L = cfg.d_model, cfg.n_layer
    per_block = 12 * d * d + 13 * d  # qkv, proj, fc, out (+ biases) and two LayerNorms
    emb = vocab_size * d * (1 if cfg.tie_embeddings else 2) + cfg.seq_len * d
    return L * per_block + emb + 2 * d


class CapacityError(FedhpcError, ValueError):
    """A site's declared memory cannot hold the model and one training sequence."""


# Fraction of device memory we plan to use; the rest absorbs allocator fragmentation and
# framework workspaces that no closed-form estimate captures.
USABLE = 0.85


@dataclass(frozen=True)
class BatchShape:
    """How one site forms an optimizer step of `batch_tokens` tokens."""

    micro_batch: int  # sequences per device per forward/backward
    grad_accum: int  # micro-steps per optimizer step
    devices: int  # data-parallel ranks inside the site
    seq_len: int

    @property
    def sequences_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.devices

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.seq_len


def site_ranks(site: SiteConfig) -> int:
    """Data-parallel ranks a site's training job runs with."""
    return site.nodes * site.ranks_per_node


def device_memory_bytes(site: SiteConfig) -> float:
    return (site.gpu_memory_gb if site.gpus > 0 else site.memory_gb) * GB


def memory_per_sequence(model: ModelConfig, vocab_size: int) -> float:
    """Activation bytes one training sequence needs (fp32), after Korthikanti et al. 2022."""
    s, d, a, L = model.seq_len, model.d_model, model.n_head, model.n_layer
    per_layer_16bit = s * d * (34 + 5 * a * s / d)
    logits = 3 * s * vocab_size * 4  # logits, their gradient, and the float copy in the loss
    return 2 * L * per_layer_16bit + logits


def fixed_training_bytes(model: ModelConfig, vocab_size: int) -> float:
    """Weights, gradients and both AdamW moments in fp32: 16 bytes per parameter."""
    return 16 * param_count(model, vocab_size)


def micro_batch_for(site_name: str, site: SiteConfig, model: ModelConfig, vocab_size: int, cap: int) -> int:
    budget = USABLE * device_memory_bytes(site) - fixed_training_bytes(model, vocab_size)
    per_seq = memory_per_sequence(model, vocab_size)
    if budget < per_seq:
        need = (fixed_training_bytes(model, vocab_size) + per_seq) / USABLE / GB
        raise CapacityError(
            f"site {site_name!r} cannot train this model: one sequence needs about {need:.1f} GB per device, "
            f"the site declares {device_memory_bytes(site) / GB:.1f} GB"
        )
    return max(1, min(cap, int(budget // per_seq)))


def batch_shape(
    site_name: str,
    site: SiteConfig,
    model: ModelConfig,
    vocab_size: int,
    batch_tokens: int,
    max_micro_batch: int,
    devices: int,
) -> BatchShape:
    """Micro-batch from the site's memory; accumulation so every site steps on ~`batch_tokens`.

    `devices` is the number of data-parallel ranks the site actually runs.
    """
    target = max(1, batch_tokens // model.seq_len)  # sequences per optimizer step, federation-wide
    mb = micro_batch_for(site_name, site, model, vocab_size, max_micro_batch)
    mb = min(mb, math.ceil(target / devices))
    accum = math.ceil(target / (mb * devices))
    # Shrink the micro-batch so accumulation does not overshoot the target batch.
    mb = math.ceil(target / (accum * devices))
    return BatchShape(micro_batch=mb, grad_accum=accum, devices=devices, seq_len=model.seq_len)
