"""Hand-over: a global GPT exported as a Hugging Face directory, loaded offline, and served over HTTP."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch

from fedhpc.cli.main import main
from fedhpc.core.tensorfile import load_state
from fedhpc.data.tokenizer import ByteTokenizer
from fedhpc.tasks.validation import validate
from fedhpc.training.model import GPT, load_exported_state

pytestmark = pytest.mark.e2e  # uses the session's finished federation
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(finished, tmp_path_factory):
    tmp, cfg, run = finished
    out = tmp_path_factory.mktemp("export") / "hf"
    os.environ["HF_HUB_OFFLINE"] = "1"
    assert (
        main(
            [
                "export",
                "--config",
                str(run / "config.json"),
                str(run / "rounds/r0002/global/model.safetensors"),
                str(out),
            ]
        )
        == 0
    )
    return out, cfg, run


def test_exported_gpt_loads_offline_with_the_same_logits(exported):
    out, cfg, run = exported
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ours = GPT(validate(json.loads((run / "config.json").read_text())).model, 257)
    load_exported_state(ours, load_state(run / "rounds/r0002/global/model.safetensors"))
    ours.eval()
    idx = torch.randint(0, 257, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine, theirs = ours(idx)[0], hf(input_ids=idx).logits
    assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5), (mine - theirs).abs().max()


def test_exported_tokenizer_has_the_run_tokenizers_ids_and_the_card_its_provenance(exported):
    out, _, run = exported
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Über 3 clinical trials, ü€ and plain ascii."
    assert tok(text, add_special_tokens=False).input_ids == ByteTokenizer().encode(text).tolist()
    assert tok.eos_token_id == 256 and tok.decode(ByteTokenizer().encode(text).tolist()) == text
    card = (out / "README.md").read_text()
    meta = json.loads((run / "rounds/r0002/global/model.json").read_text())
    ev = json.loads((run / "rounds/r0002/global/eval.json").read_text())
    assert meta["sha256"] in card and f"| held-out loss | {ev['loss']} |" in card


def test_exported_gpt_generates_what_our_model_would(exported):
    out, _, run = exported
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    ids = tok("the ", return_tensors="pt", add_special_tokens=False).input_ids
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, pad_token_id=256)
    # Greedy decoding by hand with our own model gives the same continuation.
    ours = GPT(validate(json.loads((run / "config.json").read_text())).model, 257)
    load_exported_state(ours, load_state(run / "rounds/r0002/global/model.safetensors"))
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(gen.shape[1] - ids.shape[1]):
            seq = torch.cat([seq, ours.eval()(seq)[0][:, -1:].argmax(-1)], dim=1)
    assert gen.tolist() == seq.tolist() and gen.shape[1] > ids.shape[1]


def test_export_refuses_a_model_without_a_signed_model_json(finished, tmp_path):
    _, _, run = finished
    code = main(
        [
            "export",
            "--config",
            str(run / "config.json"),
            str(run / "rounds/r0001/candidate/model.safetensors"),
            str(tmp_path),
        ]
    )
    assert code == 1


def test_export_checks_a_copied_models_content_against_its_signed_hash(finished, tmp_path, capsys):
    _, _, run = finished
    copy = tmp_path / "global"
    copy.mkdir()
    for name in ("model.safetensors", "model.json"):  # the model is a link to its candidate: copy the bytes
        shutil.copyfile(run / "rounds/r0002/global" / name, copy / name)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    code = main(["export", "--config", str(run / "config.json"), str(copy / "model.safetensors"), str(tmp_path / "hf")])
    assert code == 1
    assert f"{copy / 'model.safetensors'}: content does not match the sha256 in {copy / 'model.json'}" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "hf").exists()


def test_fedhpc_serve_answers_a_completion_request(exported):
    out, _, _ = exported
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhpc", "serve", str(out), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" on ")[1].strip()
        base = url.rsplit("/v1/", 1)[0]
        with urllib.request.urlopen(base + "/health", timeout=30) as r:
            assert json.loads(r.read())["status"] == "ok"
        req = urllib.request.Request(
            url,
            data=json.dumps({"prompt": "the ", "max_tokens": 8}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            body = json.loads(r.read())
        choice = body["choices"][0]
        assert body["usage"]["prompt_tokens"] == 4 and 1 <= body["usage"]["completion_tokens"] <= 8
        # The same greedy continuation as transformers' own generate on the exported files.
        tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
        ids = tok("the ", return_tensors="pt", add_special_tokens=False).input_ids
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=256)
        assert choice["text"] == tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
        bad = urllib.request.Request(url, data=b'{"max_tokens": 3}', headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=30)
        assert info.value.code == 400 and "prompt" in json.loads(info.value.read())["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
