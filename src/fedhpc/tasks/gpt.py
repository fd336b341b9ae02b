"""The built-in task: pre-training the GPT of `model:` (training/model.py) on the run's token shards."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fedhpc.config.federation import ModelConfig
from fedhpc.tasks.lm import TokenLMTask

if TYPE_CHECKING:  # imported where the module is built: planning needs no torch
    from fedhpc.training.model import GPT


class GPTTask(TokenLMTask):
    """GPT pre-training from random initialisation (`model:` sets its shape); no options."""

    def build_module(self, vocab_size, meta=None) -> GPT:
        from fedhpc.training.model import GPT

        return GPT(self.cfg.model, vocab_size)

    def shape_model(self, vocab_size: int) -> ModelConfig:
        return self.cfg.model

    def describe(self, module, vocab_size):
        return {
            "vocab_size": vocab_size,
            "model": dataclasses.asdict(self.cfg.model),
            "parameters": sum(p.numel() for p in module.parameters()),
        }

    def export(self, state, meta, out, layout):
        from fedhpc.tasks.gpt_export import export_gpt

        return export_gpt(self.cfg, state, meta, out, layout)
