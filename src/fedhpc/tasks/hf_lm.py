"""A pretrained Hugging Face causal LM from a local directory, fully fine-tuned or with LoRA adapters.

With `lora`, the base model stays frozen at every site and only the adapter tensors are
exchanged, verified and aggregated; every site checks that its local base checkpoint is the
one the federation started from (`base_sha256` in the signed model.json).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fedhpc.config.federation import ModelConfig, opt
from fedhpc.tasks.base import TaskError
from fedhpc.tasks.lm import TokenLMTask, TrainingError

WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json")


@dataclass(kw_only=True)
class LoraOptions:
    """LoRA adapters (PEFT): low-rank updates of the named modules; the base stays frozen."""

    r: int = opt(8, "Rank of the adapters.", minimum=1)
    alpha: float = opt(16.0, "Scale numerator: the adapter output is multiplied by alpha / r.", exclusiveMinimum=0)
    dropout: float = opt(0.0, "Dropout on the adapters' input.", minimum=0, maximum=1)
    target_modules: list[str] = opt(
        [], "Module names to adapt (e.g. `c_attn` for GPT-2, `q_proj`/`v_proj` for Llama); empty: PEFT's default."
    )


@dataclass(kw_only=True)
class HFCausalLMOptions:
    """Options of the `hf_causal_lm` task."""

    path: str = opt(MISSING, "Local directory of the model (`save_pretrained` layout); never downloaded.")
    seq_len: int = opt(128, "Training and evaluation context in tokens (at most the model's positions).", minimum=8)
    lora: LoraOptions | None = opt(None, "Train LoRA adapters instead of every weight; only adapters travel.")


def base_sha256(path: str | Path) -> str:
    """Hash of a model directory's weights and config (tokenizer and README files do not count)."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted({p for pattern in WEIGHT_FILES for p in root.glob(pattern)}):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


class CausalLM(torch.nn.Module):
    """A transformers causal LM behind the interface of our GPT: `forward(idx, targets)` -> (logits, loss)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.lm(input_ids=idx).logits
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


class HFCausalLMTask(TokenLMTask):
    """Fine-tune a pretrained causal LM (any `AutoModelForCausalLM`) on the run's token shards."""

    Options = HFCausalLMOptions

    @property
    def seq_len(self) -> int:
        return self.options.seq_len

    def hf_config(self):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.options.path, local_files_only=True)

    def problems(self) -> list[str]:
        out = []
        if not (Path(self.options.path) / "config.json").is_file():
            return [f"task.options.path: {self.options.path!r} is not a model directory (no config.json)"]
        if self.cfg.data.tokenizer.kind != "pretrained":
            out.append(
                "data.tokenizer.kind: a pretrained model brings its tokenizer; set kind: pretrained and "
                f"path: {self.options.path}"
            )
        c = self.hf_config()
        positions = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if positions and self.options.seq_len > positions:
            out.append(f"task.options.seq_len: {self.options.seq_len} exceeds the model's {positions} positions")
        return out

    def build_module(self, vocab_size: int, meta: dict[str, Any] | None = None) -> CausalLM:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(self.options.path, local_files_only=True, dtype=torch.float32)
        if vocab_size > lm.config.vocab_size:
            raise TaskError(
                f"data.tokenizer: {vocab_size} token ids, but the model at {self.options.path} has "
                f"{lm.config.vocab_size} embeddings"
            )
        if self.options.lora is not None:
            from peft import LoraConfig, get_peft_model

            lo = self.options.lora
            lm = get_peft_model(
                lm,
                LoraConfig(
                    r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules or None
                ),
            )
        return CausalLM(lm)

    def shape_model(self, vocab_size: int) -> ModelConfig:
        c = self.hf_config()

        def first(*names: str) -> int:
            return next(int(getattr(c, n)) for n in names if getattr(c, n, None) is not None)

        return ModelConfig(
            n_layer=first("num_hidden_layers", "n_layer"),
            n_head=first("num_attention_heads", "n_head"),
            d_model=first("hidden_size", "n_embd"),
            seq_len=self.options.seq_len,
            tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        )

    def describe(self, module, vocab_size):
        return {
            "vocab_size": vocab_size,
            "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "total_parameters": sum(p.numel() for p in module.parameters()),
            "base_model": str(Path(self.options.path).name),
            "base_sha256": base_sha256(self.options.path),
            "lora": dataclasses.asdict(self.options.lora) if self.options.lora else None,
            "seq_len": self.options.seq_len,
        }

    def train_round(self, rc):
        local = base_sha256(self.options.path)
        if local != rc.global_meta.get("base_sha256"):
            raise TrainingError(
                f"site {rc.site!r}: the base model at task.options.path {self.options.path} (sha256 {local[:16]}…) "
                f"is not the one the federation started from ({str(rc.global_meta.get('base_sha256'))[:16]}…)"
            )
        return super().train_round(rc)

    def export(self, state, meta, out, layout):
        from transformers import AutoTokenizer

        module = self.load(state, meta)
        lm = module.lm
        if self.options.lora is not None:
            lm = lm.merge_and_unload()  # a plain checkpoint: the adapters folded into the base weights
        lm.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(self.options.path, local_files_only=True).save_pretrained(out)
        return {"architecture": type(lm).__name__, "merged_lora": self.options.lora is not None}
