"""What leaves a site is scrubbed: no user name, host name or path in its metrics, receipt or log."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.config.trust import ScrubConfig
from fedhpc.core.files import read_json, write_json
from fedhpc.exchange.hub import INDEX
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.scrub import Scrubber, outgoing_receipt
from tests.workflow_util import tiny_config

USER, HOST = "mkowalski", "nid005123.lumi.csc"


def scrubber(**kw) -> Scrubber:
    return Scrubber(ScrubConfig(**kw), users={USER}, hosts={HOST, "nid005123"})


def test_users_hosts_and_paths_are_replaced_and_words_that_merely_contain_them_are_not():
    s = scrubber(patterns=[r"project_\d+"])
    text = (
        f"rank 0 on {HOST} (nid005123) as {USER}: reading /scratch/project_465000/{USER}/data.zarr; "
        f"home /home/{USER}/x; url https://lumidata.eu/bucket/x; cuda:0; xmkowalskix; project_465000"
    )
    got = s.text(text)
    assert got == (
        "rank 0 on [host] ([host]) as [user]: reading [path]; home [path]; url https://lumidata.eu/bucket/x; "
        "cuda:0; xmkowalskix; [scrubbed]"
    )
    off = Scrubber(ScrubConfig(user_names=False, host_names=False, paths=False), users={USER}, hosts={HOST})
    assert off.text(text) == text


def test_structural_receipt_fields_pass_untouched_and_free_text_is_scrubbed():
    rec = {"site": USER, "shards": [f"/{USER}"], "host": HOST, "device": "cpu", "note": f"/home/{USER}", "tokens": 5}
    got = scrubber().receipt(rec)
    assert got == {
        "site": USER,
        "shards": [f"/{USER}"],
        "host": "[host]",
        "device": "cpu",
        "note": "[path]",
        "tokens": 5,
    }


def this_machine() -> list[str]:
    """What this machine's scrubber must remove: its user and host names."""
    names = [getpass.getuser(), socket.gethostname()]
    return [n for n in names if n and n != "localhost"]


def leaks(secret: str, text: str) -> bool:
    """Whether `secret` appears in `text`: a user or host name as a word (bounded as the scrubber
    bounds names; this VM is called "vm", which base64 signatures contain by chance), a path anywhere."""
    if "/" in secret:
        return secret in text
    return re.search(rf"(?<![A-Za-z0-9_-]){re.escape(secret)}(?![A-Za-z0-9_-])", text) is not None


def test_a_secret_name_is_found_as_a_word_not_inside_a_signature():
    assert leaks("vm", "ran on vm today") and leaks("vm", '"host": "vm"') and leaks("/tmp/x", "at/tmp/xy")
    assert not leaks("vm", '"signature": "q9Zvm3+Kd"')


def test_a_site_publishing_through_the_hub_leaves_no_user_host_or_path_behind(tmp_path, monkeypatch):
    """A real site-side `fedhpc exchange publish` with a training log, metrics and a receipt full of
    this machine's identifiers: what reaches the hub holds none of them."""
    monkeypatch.chdir(tmp_path)
    hub = tmp_path / "hub"
    cfg = tiny_config(tmp_path)
    cfg["output_dir"] = "site-results"
    cfg["exchange"] = {"kind": "shared", "role": "site", "site": "lumi", "hub": str(hub)}
    write_json(tmp_path / "config.json", cfg)
    run = tmp_path / "site-results" / "tiny"
    create_keypair(run / "keys", "lumi")
    site_dir = run / "rounds" / "r0000" / "sites" / "lumi"
    site_dir.mkdir(parents=True)
    secret = [*this_machine(), str(tmp_path), os.path.expanduser("~")]
    lines = [
        f"step {i}: loss 2.{i} on {socket.gethostname()} user {getpass.getuser()} cwd {tmp_path}" for i in range(5)
    ]
    (run / "logs" / "train").mkdir(parents=True)
    (run / "logs" / "train" / "r0000-lumi.log").write_text("\n".join(lines) + "\n")
    metrics = site_dir / "metrics.jsonl"
    metrics.write_text(
        "".join(json.dumps({"site": "lumi", "step": i, "loss": 2.0, "note": f"{tmp_path}/x"}) + "\n" for i in range(3))
    )
    receipt = outgoing_receipt(
        ScrubConfig(), metrics, {"site": "lumi", "host": socket.gethostname(), "msg": f"ran in {tmp_path}"}
    )
    write_json(site_dir / "receipt.json", receipt)
    (site_dir / "update.safetensors").write_bytes(b"\0" * 8)
    assert main(["exchange", "publish", "--config", "config.json", "--round", "0"]) == 0
    published = hub / "rounds" / "r0000" / "sites" / "lumi"
    assert {p.name for p in published.iterdir()} == {
        "metrics.jsonl",
        "train.log",
        "receipt.json",
        "update.safetensors",
        INDEX,
    }
    assert read_json(published / "receipt.json")["host"] == "[host]"
    assert (published / "train.log").read_text().splitlines()[0] == "step 0: loss 2.0 on [host] user [user] cwd [path]"
    for p in published.iterdir():
        data = p.read_text(errors="replace")
        for s in secret:
            assert not leaks(s, data), (p.name, s)


@pytest.mark.parametrize("field", ["host", "msg"])
def test_receipts_built_by_training_are_scrubbed(field):
    rec = outgoing_receipt(ScrubConfig(), Path("/nonexistent/metrics.jsonl"), {field: f"{socket.gethostname()} /etc/x"})
    assert socket.gethostname() not in rec[field] and "/etc/x" not in rec[field]
