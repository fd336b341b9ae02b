"""`fedhpc serve`: a small HTTP endpoint for a first look at an exported checkpoint.

A causal LM answers POST /v1/completions {"prompt": str, "max_tokens": int, "temperature": float,
"seed": int} with {"choices": [{"text", "finish_reason"}], "usage": {...}}; a sentence-transformers
export answers POST /v1/embeddings {"input": str | [str]} with {"data": [{"index", "embedding"}]}.
GET /health says what is loaded. One request runs at a time; it is for stakeholders' first use,
not for production.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from fedhpc.core.errors import FedhpcError

MAX_BODY = 1 << 20
MAX_NEW_TOKENS = 512


class ServeError(FedhpcError, ValueError):
    """The directory to serve is not an exported model fedhpc can serve."""


class Completer:
    """An exported Hugging Face causal LM and its tokenizer, loaded offline."""

    route = "/v1/completions"

    def __init__(self, model_dir: str | Path, threads: int = 1):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.path = Path(model_dir)
        if not (self.path / "config.json").is_file():
            raise ServeError(f"{self.path}: no config.json; give a directory written by `fedhpc export`")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(self.path, local_files_only=True).eval()
        except (OSError, ValueError) as exc:
            raise ServeError(f"{self.path}: not a causal language model transformers can load ({exc})") from None
        self.positions = int(
            getattr(self.model.config, "n_positions", None) or self.model.config.max_position_embeddings
        )
        self.lock = threading.Lock()

    def complete(self, prompt: str, max_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
        max_tokens = max(1, min(int(max_tokens), MAX_NEW_TOKENS, self.positions - 1))
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        # Keep the end of a long prompt: the model sees at most its positions, including what it writes.
        ids = ids[:, -(self.positions - max_tokens) :] if ids.shape[1] else ids
        if ids.shape[1] == 0:
            ids = torch.tensor([[self.tokenizer.eos_token_id]])
        with self.lock, torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None,
                top_p=None,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        stopped = len(new) < max_tokens or (len(new) and int(new[-1]) == self.tokenizer.eos_token_id)
        return {
            "object": "text_completion",
            "model": self.path.name,
            "choices": [
                {
                    "index": 0,
                    "text": self.tokenizer.decode(new, skip_special_tokens=True),
                    "finish_reason": "stop" if stopped else "length",
                }
            ],
            "usage": {"prompt_tokens": int(ids.shape[1]), "completion_tokens": int(len(new))},
        }

    def handle(self, req: dict) -> dict[str, Any]:
        prompt = req["prompt"]
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a string")
        return self.complete(
            prompt,
            max_tokens=int(req.get("max_tokens", 32)),
            temperature=float(req.get("temperature", 0.0)),
            seed=int(req.get("seed", 0)),
        )

    def describe(self) -> dict[str, Any]:
        return {"model": self.path.name, "kind": "causal-lm", "positions": self.positions}


class Embedder:
    """An exported sentence-transformers model (the embedding task's export), loaded offline."""

    route = "/v1/embeddings"
    MAX_INPUTS = 256

    def __init__(self, model_dir: str | Path, threads: int = 1):
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.path = Path(model_dir)
        self.model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        self.lock = threading.Lock()

    def handle(self, req: dict) -> dict[str, Any]:
        texts = req["input"]
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("input must be a string or a non-empty list of strings")
        if len(texts) > self.MAX_INPUTS:
            raise ValueError(f"at most {self.MAX_INPUTS} inputs per request")
        with self.lock, torch.no_grad():
            vectors = self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True)
        return {
            "object": "list",
            "model": self.path.name,
            "data": [{"index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)],
        }

    def describe(self) -> dict[str, Any]:
        return {"model": self.path.name, "kind": "sentence-embedding"}


def load_served(model_dir: str | Path, threads: int = 1) -> Completer | Embedder:
    """What `model_dir` holds: a sentence-transformers export (modules.json) or a causal LM."""
    if (Path(model_dir) / "modules.json").is_file():
        return Embedder(model_dir, threads)
    return Completer(model_dir, threads)


def make_server(served: Completer | Embedder, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send(200, {"status": "ok", **served.describe()})
            else:
                self._send(404, {"error": f"no such path {self.path}; try POST {served.route}"})

        def do_POST(self) -> None:
            if self.path != served.route:
                self._send(404, {"error": f"no such path {self.path}; try POST {served.route}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._send(413, {"error": f"request body over {MAX_BODY} bytes"})
                return
            try:
                req = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(req, dict):
                    raise TypeError("the request body must be a JSON object")
                res = served.handle(req)
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                self._send(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
                return
            self._send(200, res)

    return ThreadingHTTPServer((host, port), Handler)
