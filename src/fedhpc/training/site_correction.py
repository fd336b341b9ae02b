"""Site-side terms of FedProx and SCAFFOLD, added to the local gradients before each optimizer step."""

from __future__ import annotations

import torch


class GradCorrection:
    """FedProx adds μ(w − w_global); SCAFFOLD adds c − c_i (server minus site control variate).

    Called by the engine after gradients are complete (all-reduced under DDP) and before
    clipping. For SCAFFOLD it also averages the raw local gradients over the round: that
    mean is the site's new control variate c_i⁺ (a gradient estimate that does not depend
    on the local optimiser, which need not be SGD).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        anchor: dict[str, torch.Tensor] | None = None,
        mu: float = 0.0,
        c_global: dict[str, torch.Tensor] | None = None,
        c_local: dict[str, torch.Tensor] | None = None,
    ):
        # Trainable parameters only: frozen ones (a LoRA adapter's base model) are never exchanged.
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.mu, self.anchor = mu, anchor
        self.scaffold = c_global is not None
        if self.scaffold:
            dev = {n: p.device for n, p in self.params.items()}
            local = c_local or {}
            # c − c_i once per round, not per step: both stay fixed during the round.
            self.shift = {
                n: (c_global[n].to(dev[n]) - local[n].to(dev[n]) if n in local else c_global[n].to(dev[n]))
                for n in self.params
            }
            self.c_local = {n: (local[n] if n in local else torch.zeros_like(c_global[n])) for n in self.params}
            self.grad_sum = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()}
        self.steps = 0

    def __call__(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                g = p.grad
                if g is None:
                    continue
                if self.scaffold:
                    self.grad_sum[name].add_(g.float())
                    g.add_(self.shift[name].to(g.dtype))
                if self.mu:
                    g.add_(p.detach() - self.anchor[name].to(p.device, p.dtype), alpha=self.mu)
        self.steps += 1

    def control_update(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(new c_i, Δc_i = c_i⁺ − c_i) on the CPU, after the round."""
        new = {n: (s / max(self.steps, 1)).cpu() for n, s in self.grad_sum.items()}
        return new, {n: new[n] - self.c_local[n].cpu().float() for n in new}
