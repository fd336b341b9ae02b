"""Staged transfer: signed bundles pulled and published, hash-checked, resumable, over a directory or rsync+SSH."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fedhpc.core.files import read_json, write_json
from fedhpc.exchange import hub as ex
from fedhpc.trust.identity import create_keypair
from fedhpc.trust.signing import TrustStore


@pytest.fixture
def trust(tmp_path) -> TrustStore:
    keys = tmp_path / "keys"
    for name in ("coordinator", "lumi"):
        create_keypair(keys, name)
    return TrustStore(keys)


def offer(hub: Path, trust: TrustStore, sizes: dict[str, int]) -> dict:
    """The coordinator's side: files in its round directory and their signed index."""
    for name, n in sizes.items():
        (hub / name).parent.mkdir(parents=True, exist_ok=True)
        (hub / name).write_bytes(os.urandom(n))
    return ex.write_index(hub, list(sizes), "coordinator", trust.private_key("coordinator"))


@pytest.fixture(params=["shared", "rsync"])
def transport(request, tmp_path):
    hub = tmp_path / "hub"
    hub.mkdir()
    if request.param == "shared":
        return ex.Shared(hub), hub
    h = request.getfixturevalue("sshd_hub")
    return ex.Rsync(h.remote(hub), h.port, str(h.client_key), str(h.known_hosts)), hub


def test_pull_installs_every_file_checked_and_the_index_last(transport, trust, tmp_path):
    t, hub = transport
    doc = offer(hub / "rounds/r0001", trust, {"plan.json": 300, "global/model.safetensors": 3 << 20})
    dest = tmp_path / "site/rounds/r0001"
    assert ex.pull(t, "rounds/r0001", dest, trust, "coordinator") == doc
    for name in ("plan.json", "global/model.safetensors"):
        assert (dest / name).read_bytes() == (hub / "rounds/r0001" / name).read_bytes()
    assert read_json(dest / ex.INDEX) == doc
    assert not (dest / ex.STAGING).exists()


def test_nothing_offered_yet_is_none_not_an_error(transport, trust, tmp_path):
    t, _ = transport
    assert ex.pull(t, "rounds/r0003", tmp_path / "site", trust, "coordinator") is None


def test_a_file_corrupted_in_transit_is_never_installed(transport, trust, tmp_path):
    t, hub = transport
    offer(hub / "r", trust, {"plan.json": 100, "model.bin": 1 << 20})
    blob = bytearray((hub / "r/model.bin").read_bytes())
    blob[12345] ^= 0xFF  # what a bad link or disk does: same size, one byte off
    (hub / "r/model.bin").write_bytes(bytes(blob))
    dest = tmp_path / "site"
    rejected = []
    with pytest.raises(ex.TransferError, match=r"model.bin: sha256 differs from the signed index"):
        ex.pull(t, "r", dest, trust, "coordinator", attempts=2, on_reject=lambda *a: rejected.append(a))
    assert not (dest / "model.bin").exists() and not (dest / ex.INDEX).exists()
    assert rejected == [("model.bin", 1), ("model.bin", 2)]


def test_an_interrupted_pull_resumes_from_its_partial_file(transport, trust, tmp_path):
    t, hub = transport
    offer(hub / "r", trust, {"model.bin": 4 << 20})
    dest = tmp_path / "site"
    part = dest / ex.STAGING / "model.bin"
    part.parent.mkdir(parents=True)
    part.write_bytes((hub / "r/model.bin").read_bytes()[: 3 << 20])  # a transfer killed 3/4 through
    ex.pull(t, "r", dest, trust, "coordinator")
    assert (dest / "model.bin").read_bytes() == (hub / "r/model.bin").read_bytes()


def test_a_garbage_partial_file_is_replaced_not_installed(transport, trust, tmp_path):
    t, hub = transport
    offer(hub / "r", trust, {"model.bin": 1 << 20})
    dest = tmp_path / "site"
    (dest / ex.STAGING).mkdir(parents=True)
    (dest / ex.STAGING / "model.bin").write_bytes(os.urandom(1 << 19))
    ex.pull(t, "r", dest, trust, "coordinator")
    assert (dest / "model.bin").read_bytes() == (hub / "r/model.bin").read_bytes()


def test_an_index_signed_by_someone_else_is_refused(transport, trust, tmp_path):
    t, hub = transport
    (hub / "r").mkdir()
    (hub / "r/plan.json").write_text("{}")
    ex.write_index(hub / "r", ["plan.json"], "lumi", trust.private_key("lumi"))  # not the coordinator
    with pytest.raises(ex.TransferError, match="bundle.json"):
        ex.pull(t, "r", tmp_path / "site", trust, "coordinator")
    assert not (tmp_path / "site/plan.json").exists()


def test_an_index_naming_files_outside_its_bundle_is_refused(trust, tmp_path):
    from fedhpc.trust.signing import sign_document

    doc = sign_document(
        {"files": {"../../etc/x": {"sha256": "0", "bytes": 1}}}, "coordinator", trust.private_key("coordinator")
    )
    with pytest.raises(ex.TransferError, match="refuses file name"):
        ex.check_index(doc, trust, "coordinator", "x")


def test_publish_sends_only_the_named_files_and_the_hub_sees_it_complete_only_at_the_end(transport, trust, tmp_path):
    t, hub = transport
    src = tmp_path / "site/rounds/r0000/sites/lumi"
    src.mkdir(parents=True)
    (src / "update.safetensors").write_bytes(os.urandom(1 << 20))
    write_json(src / "receipt.json", {"site": "lumi"})
    (src / "status.json").write_text("{}")  # the site's own bookkeeping: not published
    (src / "secret.zarr").write_bytes(b"raw data")
    rel = "rounds/r0000/sites/lumi"
    ex.publish(t, src, ex.present(src, ex.SITE_FILES), rel, "lumi", trust.private_key("lumi"))
    got = sorted(p.name for p in (hub / rel).iterdir())
    assert got == ["bundle.json", "receipt.json", "update.safetensors"]
    assert ex.complete(hub / rel, trust, "lumi")
    # A truncated update on the hub (a publish cut short, or tampering) is not complete.
    with open(hub / rel / "update.safetensors", "r+b") as fh:
        fh.truncate(1000)
    assert not ex.complete(hub / rel, trust, "lumi")
    # The site publishing again (what a retried job does) completes it.
    ex.publish(t, src, ex.present(src, ex.SITE_FILES), rel, "lumi", trust.private_key("lumi"))
    assert ex.complete(hub / rel, trust, "lumi")


def test_rsync_errors_name_the_hub(tmp_path, sshd_hub):
    t = ex.Rsync(
        f"{sshd_hub.user}@127.0.0.1:/nonexistent-root-dir",
        sshd_hub.port + 1 if sshd_hub.port < 65535 else 1,
        str(sshd_hub.client_key),
        str(sshd_hub.known_hosts),
        timeout=5,
    )
    with pytest.raises(ex.TransferError, match="127.0.0.1:/nonexistent-root-dir"):
        t.send(Path(__file__), "x")


def test_the_completeness_cache_hashes_again_only_when_a_file_changed(trust, tmp_path, monkeypatch):
    d = tmp_path / "hub/rounds/r0000/sites/lumi"
    d.mkdir(parents=True)
    (d / "update.safetensors").write_bytes(os.urandom(1 << 16))
    ex.write_index(d, ["update.safetensors"], "lumi", trust.private_key("lumi"))
    hashed = []
    real = ex.sha256_file
    monkeypatch.setattr(ex, "sha256_file", lambda p: hashed.append(p) or real(p))
    cache = ex.CompletenessCache(trust)
    assert cache.complete(d, "lumi") and cache.complete(d, "lumi") and len(hashed) == 1
    with open(d / "update.safetensors", "r+b") as fh:  # damaged: same size, new mtime
        fh.write(b"\0\0\0\0")
    assert not cache.complete(d, "lumi") and not cache.complete(d, "lumi") and len(hashed) == 2


# ---------------------------------------------------------------- S3 (moto's S3 server on loopback)


def test_s3_publish_then_pull_round_trips_every_file_checked(trust, tmp_path, s3_hub):
    t = ex.S3("s3://federation/run-a", s3_hub)
    src = tmp_path / "coordinator/rounds/r0000"
    offer(src, trust, {"plan.json": 300, "global/model.safetensors": 9 << 20, "empty.bin": 0})
    ex.publish(
        t,
        src,
        ["plan.json", "global/model.safetensors", "empty.bin"],
        "rounds/r0000",
        "coordinator",
        trust.private_key("coordinator"),
    )
    dest = tmp_path / "site/rounds/r0000"
    assert ex.pull(t, "rounds/r0000", dest, trust, "coordinator") is not None
    for name in ("plan.json", "global/model.safetensors", "empty.bin"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert ex.pull(t, "rounds/r0001", tmp_path / "site/rounds/r0001", trust, "coordinator") is None


def test_s3_a_corrupted_object_is_never_installed_and_a_resumed_pull_of_a_replaced_object_starts_over(
    trust, tmp_path, s3_hub
):
    import boto3

    t = ex.S3("s3://federation/run-b", s3_hub)
    src = tmp_path / "src"
    offer(src, trust, {"model.bin": 2 << 20})
    ex.publish(t, src, ["model.bin"], "r", "coordinator", trust.private_key("coordinator"))
    s3 = boto3.client("s3", endpoint_url=s3_hub)
    good = (src / "model.bin").read_bytes()
    bad = bytearray(good)
    bad[777] ^= 0xFF
    s3.put_object(Bucket="federation", Key="run-b/r/model.bin", Body=bytes(bad))
    dest = tmp_path / "site"
    with pytest.raises(ex.TransferError, match="model.bin: sha256 differs from the signed index"):
        ex.pull(t, "r", dest, trust, "coordinator", attempts=2)
    assert not (dest / "model.bin").exists()
    # The object is put right while a stale 3/4 partial of the bad one sits in staging: the
    # resumed download does not match, so the file is fetched again from its first byte.
    s3.put_object(Bucket="federation", Key="run-b/r/model.bin", Body=good)
    (dest / ex.STAGING).mkdir(parents=True, exist_ok=True)
    (dest / ex.STAGING / "model.bin").write_bytes(bytes(bad[: 3 << 19]))
    ex.pull(t, "r", dest, trust, "coordinator")
    assert (dest / "model.bin").read_bytes() == good


def test_s3_resume_fetches_only_the_missing_bytes(trust, tmp_path, s3_hub, monkeypatch):
    t = ex.S3("s3://federation/run-c", s3_hub)
    src = tmp_path / "src"
    offer(src, trust, {"model.bin": 4 << 20})
    ex.publish(t, src, ["model.bin"], "r", "coordinator", trust.private_key("coordinator"))
    dest = tmp_path / "site"
    (dest / ex.STAGING).mkdir(parents=True)
    (dest / ex.STAGING / "model.bin").write_bytes((src / "model.bin").read_bytes()[: 3 << 20])
    client = ex.s3_client(s3_hub)
    ranges = []
    real = client.get_object
    monkeypatch.setattr(client, "get_object", lambda **kw: ranges.append(kw.get("Range")) or real(**kw))
    ex.pull(t, "r", dest, trust, "coordinator")
    assert (dest / "model.bin").read_bytes() == (src / "model.bin").read_bytes()
    assert f"bytes={3 << 20}-" in ranges


def test_s3_errors_name_the_object(tmp_path, s3_hub):
    t = ex.S3("s3://no-such-bucket/x", s3_hub)
    with pytest.raises(ex.TransferError, match="s3://no-such-bucket/x/f"):
        t.send(Path(__file__), "f")


def test_rejected_transfers_are_recorded_in_the_audit_log_with_their_round(tmp_path):
    from fedhpc.core.layout import RunLayout
    from fedhpc.trust.audit import AuditLog

    layout = RunLayout(tmp_path / "run")
    ex.audit_rejects(layout, "rounds/r0003")("global/model.safetensors", 1)
    ex.audit_rejects(layout, "data")("manifest.json", 2)
    got = [(e["event"], e["round"], e["bundle"], e["file"], e["attempt"]) for e in AuditLog(layout.audit).events()]
    assert got == [
        ("transfer.rejected", 3, "rounds/r0003", "global/model.safetensors", 1),
        ("transfer.rejected", None, "data", "manifest.json", 2),
    ]


@pytest.mark.parametrize("kind", ["shared", "s3"])
def test_a_stopped_federation_stops_the_sites_waiting_for_its_next_round(kind, trust, tmp_path, request):
    from types import SimpleNamespace

    from fedhpc.core.layout import RunLayout

    coordinator = RunLayout(tmp_path / "coordinator")
    coordinator.root.mkdir()
    if kind == "s3":
        endpoint = request.getfixturevalue("s3_hub")
        exchange = SimpleNamespace(kind="s3", hub=f"s3://federation/{tmp_path.name}", s3_endpoint=endpoint)
    else:
        exchange = SimpleNamespace(kind="shared", hub=str(coordinator.root))
    t = ex.transport_for(exchange)
    ex.announce_stop(exchange, coordinator, trust, 1, "round 1: deadline passed with 0 of 2 planned updates")
    t0 = time.monotonic()
    with pytest.raises(ex.TransferError, match=r"stopped the federation \(round 1: round 1: deadline passed"):
        ex.wait_pull(t, "rounds/r0002", tmp_path / "site/rounds/r0002", trust, "coordinator", 0.01, 600, round_=2)
    assert time.monotonic() - t0 < 30  # not exchange.wait_minutes
    # A notice about a later round does not stop a site still waiting for an earlier one.
    with pytest.raises(ex.TransferError, match="not published after"):
        ex.wait_pull(t, "rounds/r0001", tmp_path / "site/rounds/r0001", trust, "coordinator", 0.01, 0.2, round_=1)
    # The coordinator resuming takes the notice back: sites wait again.
    ex.withdraw_stop(exchange, coordinator)
    assert ex.stop_notice(t, tmp_path / "probe", trust, 5) is None


def test_a_stop_notice_not_signed_by_the_coordinator_is_ignored(trust, tmp_path):
    from fedhpc.trust.signing import sign_document

    hub = tmp_path / "hub"
    hub.mkdir()
    write_json(hub / ex.STOPPED, sign_document({"round": 0, "reason": "forged"}, "lumi", trust.private_key("lumi")))
    assert ex.stop_notice(ex.Shared(hub), tmp_path / "probe", trust, 3) is None
