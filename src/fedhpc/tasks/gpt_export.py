"""The GPT task's hand-over: the built-in GPT as a Hugging Face GPT-2 directory.

The built-in GPT maps exactly onto GPT-2 (same blocks, exact-erf GELU, LayerNorm eps 1e-5;
GPT-2's Conv1D weights are our Linear weights transposed), so `transformers` computes the
same logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import load_run_tokenizer
from fedhpc.data.tokenizer import ByteTokenizer


class ExportError(FedhpcError, ValueError):
    """A model cannot be exported (no signed model.json beside it, or a task without an export)."""


def gpt2_state(state: dict[str, torch.Tensor], n_layer: int, tied: bool) -> dict[str, torch.Tensor]:
    """Our GPT's parameters under GPT-2's names (Linear weights transposed into Conv1D's [in, out])."""
    out = {
        "transformer.wte.weight": state["tok.weight"],
        "transformer.wpe.weight": state["pos.weight"],
        "transformer.ln_f.weight": state["ln_f.weight"],
        "transformer.ln_f.bias": state["ln_f.bias"],
    }
    ours = {
        "ln_1": "ln1",
        "ln_2": "ln2",
        "attn.c_attn": "qkv",
        "attn.c_proj": "proj",
        "mlp.c_fc": "fc",
        "mlp.c_proj": "out",
    }
    for i in range(n_layer):
        for theirs, mine in ours.items():
            w, b = state[f"blocks.{i}.{mine}.weight"], state[f"blocks.{i}.{mine}.bias"]
            out[f"transformer.h.{i}.{theirs}.weight"] = w if theirs.startswith("ln") else w.t().contiguous()
            out[f"transformer.h.{i}.{theirs}.bias"] = b
    out["lm_head.weight"] = state["tok.weight"] if tied else state["head.weight"]
    return out


def hf_tokenizer_json(tok) -> dict[str, Any]:
    """A `tokenizers` JSON with the run tokenizer's exact ids. The byte tokenizer becomes a
    byte-level BPE without merges: byte b is token b, end-of-document 256."""
    if not isinstance(tok, ByteTokenizer):
        return tok.hf_json()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>"])
    return json.loads(hf.to_str())


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenisation emits)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def save_tokenizer_dir(tok, out: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>" if isinstance(tok, ByteTokenizer) else tok.eos
    path = out / "tokenizer.json"
    write_bytes(path, json.dumps(hf_tokenizer_json(tok)).encode())
    PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=eos).save_pretrained(out)


def export_gpt(cfg: Config, state: dict, meta: dict, out: Path, layout: RunLayout) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    m = meta["model"]
    # export_model has checked the manifest's signature; the tokenizer is checked against it.
    tok = load_run_tokenizer(layout, json.loads(layout.manifest.read_text()))
    config = GPT2Config(
        vocab_size=meta["vocab_size"],
        n_positions=m["seq_len"],
        n_embd=m["d_model"],
        n_layer=m["n_layer"],
        n_head=m["n_head"],
        n_inner=4 * m["d_model"],
        activation_function="gelu",  # torch's exact (erf) GELU, as in training/model.py; GPT-2's default is tanh
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=m["tie_embeddings"],
        eos_token_id=tok.eos_id,
        bos_token_id=tok.eos_id,
    )
    model = GPT2LMHeadModel(config)
    missing, unexpected = model.load_state_dict(gpt2_state(state, m["n_layer"], m["tie_embeddings"]), strict=False)
    if unexpected or [k for k in missing if not k.endswith(".attn.bias")]:
        raise ExportError(f"GPT-2 mapping incomplete: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer_dir(tok, out)
    return {"architecture": "GPT2LMHeadModel"}
