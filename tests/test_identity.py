"""Site identities: `fedhpc keys init`, the trust list in config, agreement-key certificates."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fedhpc.cli.main import main
from fedhpc.config.schema import ConfigError
from fedhpc.core.files import read_json, write_json
from fedhpc.tasks.validation import validate
from fedhpc.trust.agreement import agreement_key, certificate_path, pair_seed, peer_public
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import (
    SignatureError,
    TrustStore,
    load_private_key,
    public_b64,
    sign_document,
    verify_document,
)
from tests.workflow_util import tiny_config


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_keys_init_creates_a_private_directory_and_file_and_prints_the_trust_list_line(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert main(["keys", "init", "--site", "lumi", "--dir", str(keys), "--data-key"]) == 0
    out = capsys.readouterr().out
    assert mode(keys) == 0o700 and mode(keys / "lumi.key") == 0o600 and mode(keys / "lumi.datakey") == 0o600
    pub = (keys / "lumi.pub").read_text().strip()
    assert f"    lumi: {pub}" in out.splitlines()
    assert public_b64(load_private_key(keys / "lumi.key").public_key()) == pub
    # --coordinator is the coordinator's identity; running init again keeps what exists.
    assert main(["keys", "init", "--coordinator", "--dir", str(keys)]) == 0
    before = (keys / "lumi.key").read_bytes()
    assert main(["keys", "init", "--site", "lumi", "--dir", str(keys)]) == 0
    assert (keys / "lumi.key").read_bytes() == before and (keys / "coordinator.pub").is_file()
    assert "lumi.key exists; keeping it" in capsys.readouterr().out


def test_a_private_key_that_is_a_symlink_or_too_open_is_refused(tmp_path):
    key = create_keypair(tmp_path / "k", "lumi")
    link = tmp_path / "k" / "evil.key"
    link.symlink_to(key)
    with pytest.raises(PermissionError, match="not a regular file"):
        load_private_key(link)
    os.chmod(key, 0o640)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_private_key(key)


@pytest.fixture()
def three(tmp_path) -> Path:
    keys = tmp_path / "keys"
    for n in ("coordinator", "lumi", "a100"):
        create_keypair(keys, n)
    return keys


def listed(keys: Path, *names: str) -> dict[str, str]:
    return {n: (keys / f"{n}.pub").read_text().strip() for n in names}


def test_with_a_trust_list_only_listed_identities_exist_and_pub_files_are_ignored(three):
    trust = TrustStore(three, listed(three, "coordinator", "lumi"))
    assert trust.knows("lumi") and not trust.knows("a100")  # a100.pub is on disk, but not in the list
    doc = sign_document({"x": 1}, "a100", load_private_key(three / "a100.key"))

    with pytest.raises(SignatureError, match=r"unknown signer 'a100': not in the trust list \(trust.public_keys"):
        verify_document(doc, trust, "a100", "doc")


def test_a_pub_file_swapped_on_disk_does_not_fool_a_trust_list(three, tmp_path):
    trust = TrustStore(three, listed(three, "coordinator", "lumi"))
    create_keypair(tmp_path / "mallory", "lumi")
    (three / "lumi.pub").write_text((tmp_path / "mallory" / "lumi.pub").read_text())
    forged = sign_document({"x": 1}, "lumi", load_private_key(tmp_path / "mallory" / "lumi.key"))

    with pytest.raises(SignatureError, match="signature does not verify"):
        verify_document(forged, trust, "lumi", "doc")


def test_a_private_key_that_is_not_the_listed_identity_is_refused_before_it_signs(three, tmp_path):
    other = tmp_path / "other"
    create_keypair(other, "lumi")
    trust = TrustStore(three, {**listed(three, "coordinator"), "lumi": (other / "lumi.pub").read_text().strip()})
    with pytest.raises(SignatureError, match=r"keys/lumi.key is not the identity trust.public_keys.lumi lists"):
        trust.private_key("lumi")


def test_config_trust_list_is_checked(tmp_path, three):
    cfg = tiny_config(tmp_path)
    cfg["trust"] = {"public_keys": {"lumi": "not base64!"}}
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    assert "trust.public_keys.lumi: not a base64 Ed25519 public key" in str(info.value)
    assert "the trust list must include the coordinator's key" in str(info.value)
    cfg["trust"] = {"public_keys": listed(three, "coordinator", "lumi")}
    assert validate(cfg).trust.public_keys["lumi"] == listed(three, "lumi")["lumi"]


def test_keys_ensure_with_a_trust_list_mirrors_it_and_plans_only_listed_sites(tmp_path, three, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path)
    run_keys = tmp_path / "results" / "tiny" / "keys"
    cfg["trust"] = {"keys_dir": str(run_keys), "public_keys": listed(three, "coordinator", "lumi", "a100")}
    write_json(tmp_path / "config.json", cfg)
    assert main(["keys", "ensure", "--config", "config.json"]) == 0
    assert "'laptop' is not in trust.public_keys" in capsys.readouterr().out
    assert (run_keys / "lumi.pub").read_text().strip() == cfg["trust"]["public_keys"]["lumi"]
    assert not (run_keys / "laptop.pub").exists() and not (run_keys / "laptop.key").exists()
    from fedhpc.stages.plan import identified_sites

    trust = TrustStore(run_keys, cfg["trust"]["public_keys"])
    sites, notes = identified_sites(validate(cfg), trust, 0)
    assert sorted(sites) == ["a100", "lumi"]
    assert notes == ["site 'laptop' is not in the trust list (trust.public_keys); not planned until it is"]


def test_agreement_keys_are_certified_by_the_identity_and_agree_pairwise(three):
    trust = TrustStore(three)
    lumi, a100 = (load_private_key(three / f"{n}.key") for n in ("lumi", "a100"))
    s1 = pair_seed(agreement_key(lumi), peer_public(trust, "a100"), "run", 3, "lumi", "a100")
    s2 = pair_seed(agreement_key(a100), peer_public(trust, "lumi"), "run", 3, "a100", "lumi")
    assert s1 == s2 and len(s1) == 32
    assert s1 != pair_seed(agreement_key(lumi), peer_public(trust, "a100"), "run", 4, "lumi", "a100")
    assert s1 != pair_seed(agreement_key(lumi), peer_public(trust, "a100"), "other", 3, "lumi", "a100")
    # A certificate whose key was swapped (or that another identity signed) is refused.
    cert = read_json(certificate_path(three, "a100"))
    cert["x25519"] = read_json(certificate_path(three, "lumi"))["x25519"]
    write_json(certificate_path(three, "a100"), cert)
    with pytest.raises(SignatureError, match="a100.x25519.json: signature does not verify"):
        peer_public(trust, "a100")
    write_json(certificate_path(three, "a100"), sign_document(cert, "lumi", lumi))
    with pytest.raises(SignatureError, match="signed by 'lumi', expected 'a100'"):
        peer_public(trust, "a100")
