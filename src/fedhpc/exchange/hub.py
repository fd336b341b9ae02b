"""Staged transfer of signed file bundles between a site and the coordinator's hub: pull and publish.

A bundle is a directory's worth of named files plus `bundle.json`, an index signed by its
publisher that lists every file's sha256 and size. The index always travels last, so its
presence at the receiving end is the "complete" mark; the receiver checks the signature and
every hash before a file takes its final name, so a partial or corrupted transfer is never
taken for a finished one. Transfers resume: rsync keeps its partial file and sends only what
is missing; a shared-filesystem copy continues from the partial file's length.

Sites only ever open outbound connections: they pull the round's plan and global model from
the hub and publish their update into it. The hub is the coordinator's run directory.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedhpc.core.documents import DocumentError, check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import atomic_path, fsync_dir, read_json, sha256_file, write_json
from fedhpc.trust.audit import AuditLog
from fedhpc.trust.signing import COORDINATOR, SignatureError, TrustStore, sign_document, verify_document

INDEX = "bundle.json"
STAGING = ".exchange-staging"


class TransferError(FedhpcError, RuntimeError):
    """A transfer failed, or what arrived does not match its signed index; the message names the file."""


@dataclass(frozen=True)
class Shared:
    """The hub is a directory this machine mounts (a shared filesystem)."""

    root: Path

    def fetch(self, rel: str, dest: Path) -> bool:
        """Copy hub/rel to dest, continuing a partial dest; False when hub/rel does not exist."""
        src = self.root / rel
        if not src.is_file():
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        have = dest.stat().st_size if dest.exists() else 0
        if have > src.stat().st_size:
            dest.unlink()
            have = 0
        with open(src, "rb") as fi, open(dest, "ab") as fo:
            fi.seek(have)
            shutil.copyfileobj(fi, fo, 1 << 22)
            fo.flush()
            os.fsync(fo.fileno())
        return True

    def send(self, src: Path, rel: str) -> None:
        """Copy src to hub/rel under a temporary name and rename it into place."""
        with atomic_path(self.root / rel) as tmp:
            shutil.copyfile(src, tmp)

    def describe(self) -> str:
        return str(self.root)


@dataclass(frozen=True)
class Rsync:
    """The hub is `[user@]host:/path`, reached with rsync over SSH, host key pinned, no prompts."""

    remote: str
    port: int = 22
    key: str | None = None
    known_hosts: str | None = None
    timeout: int = 60

    def ssh_command(self) -> str:
        parts = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.timeout}"]
        if self.key:
            parts += ["-i", os.path.expanduser(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            kh = os.path.expanduser(self.known_hosts)
            parts += ["-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes"]
        return " ".join(shlex.quote(p) for p in parts)  # rsync splits -e like a shell

    def _rsync(self, src: str, dest: str) -> subprocess.CompletedProcess:
        # --partial keeps an interrupted file so the next attempt sends only what is missing;
        # rsync writes the receiving side under a temporary name and renames it when complete.
        # --copy-links: a promoted global is a symlink to its candidate (stages/promote.py), and
        # rsync would skip a symlink as "non-regular" rather than send the model.
        ssh = self.ssh_command()
        argv = [
            "rsync",
            "-s",
            "--copy-links",
            "--partial",
            "--timeout",
            str(self.timeout),
            "--mkpath",
            "-e",
            ssh,
            src,
            dest,
        ]
        return subprocess.run(argv, capture_output=True, text=True)

    def fetch(self, rel: str, dest: Path) -> bool:
        dest.parent.mkdir(parents=True, exist_ok=True)
        proc = self._rsync(f"{self.remote.rstrip('/')}/{rel}", str(dest))
        if proc.returncode == 23 and "No such file or directory" in proc.stderr:
            return False
        if proc.returncode != 0:
            raise TransferError(f"rsync from {self.remote}/{rel} failed ({proc.returncode}): {proc.stderr.strip()}")
        return True

    def send(self, src: Path, rel: str) -> None:
        proc = self._rsync(str(src), f"{self.remote.rstrip('/')}/{rel}")
        if proc.returncode != 0:
            raise TransferError(
                f"rsync of {src} to {self.remote}/{rel} failed ({proc.returncode}): {proc.stderr.strip()}"
            )

    def describe(self) -> str:
        return self.remote


@functools.lru_cache(maxsize=8)
def s3_client(endpoint: str | None):
    try:
        import boto3
    except ImportError:
        raise TransferError("exchange.kind 's3' needs boto3: pip install 'fedhpc[s3]'") from None
    # Credentials come the usual AWS ways (AWS_ACCESS_KEY_ID/..., ~/.aws/credentials, a profile).
    return boto3.client("s3", endpoint_url=endpoint)


@dataclass(frozen=True)
class S3:
    """The hub is `s3://bucket/prefix` on an S3-compatible object store (LUMI-O: https://lumidata.eu).

    Both sides are clients here: the coordinator publishes its offers and pulls the sites'
    bundles like a site does. An object appears only once its upload completed.
    """

    url: str
    endpoint: str | None = None

    def location(self, rel: str) -> tuple[str, str]:
        bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
        return bucket, f"{prefix.strip('/')}/{rel}".lstrip("/")

    def _fail(self, what: str, rel: str, exc: Exception) -> TransferError:
        return TransferError(f"{what} {self.url.rstrip('/')}/{rel} failed: {exc}")

    def fetch(self, rel: str, dest: Path) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self.location(rel)
        client = s3_client(self.endpoint)
        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("reading", rel, exc) from None
        except BotoCoreError as exc:
            raise self._fail("reading", rel, exc) from None
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, have = head["ContentLength"], dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        with open(dest, "ab") as fo:
            if have < size:
                try:
                    # The rest of the object, and only if it is still the object we started on.
                    body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={have}-", IfMatch=head["ETag"])
                    for block in body["Body"].iter_chunks(1 << 22):
                        fo.write(block)
                except (ClientError, BotoCoreError) as exc:
                    raise self._fail("reading", rel, exc) from None
            fo.flush()
            os.fsync(fo.fileno())
        return True

    def send(self, src: Path, rel: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self.location(rel)
        try:
            s3_client(self.endpoint).upload_file(str(src), bucket, key)
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._fail("writing", rel, exc) from None

    def remove(self, rel: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = self.location(rel)
        try:
            s3_client(self.endpoint).delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("deleting", rel, exc) from None

    def describe(self) -> str:
        return self.url.rstrip("/")


Transport = Shared | Rsync | S3


def transport_for(exchange) -> Transport:
    """The transport an `ExchangeConfig` names."""
    if exchange.kind == "shared":
        return Shared(Path(exchange.hub))
    if exchange.kind == "rsync":
        return Rsync(exchange.hub, exchange.ssh_port, exchange.ssh_key, exchange.known_hosts)
    if exchange.kind == "s3":
        return S3(exchange.hub, exchange.s3_endpoint)
    raise ValueError(f"exchange.kind {exchange.kind!r} moves nothing: every stage already works in one run directory")


def write_index(directory: Path, files: Iterable[str], signer: str, key) -> dict:
    """Sign and write `directory/bundle.json` listing `files` (relative to `directory`)."""
    entries = {}
    for name in sorted(files):
        path = directory / name
        if not path.is_file():
            raise TransferError(f"{path}: listed for publishing but missing")
        entries[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    doc = sign_document({"files": entries, "created": time.time()}, signer, key)
    write_json(directory / INDEX, doc)
    return doc


def check_index(doc: dict, trust: TrustStore, signer: str, what: str) -> dict[str, dict]:
    """The index's files after checking its signature and that no name escapes the bundle."""
    verify_document(doc, trust, signer, what)
    files = doc.get("files")
    for name in files if isinstance(files, dict) else ():
        p = Path(name)
        if (
            not name
            or "\0" in name
            or p.is_absolute()
            or ".." in p.parts
            or name == INDEX
            or p.parts[0] == STAGING
            or p.as_posix() != name  # "a//b", "./a": one file, one spelling
        ):
            raise TransferError(f"{what}: refuses file name {name!r}")
    try:
        return check_document("bundle_index", doc, what)["files"]
    except DocumentError as exc:
        raise TransferError(str(exc)) from None


def verified(path: Path, entry: dict) -> bool:
    return path.is_file() and path.stat().st_size == entry["bytes"] and sha256_file(path) == entry["sha256"]


def pull(
    transport: Transport,
    rel: str,
    dest: Path,
    trust: TrustStore,
    signer: str,
    attempts: int = 3,
    on_reject: Callable[[str, int], None] | None = None,
) -> dict | None:
    """Fetch bundle `rel` from the hub into `dest`, every file checked against the signed index.

    None when the hub has no complete bundle there yet. Files already present with the right
    hash are not fetched again; each new file takes its final name only once its hash
    matches, and the index is installed last, so `dest/bundle.json` marks a complete pull.
    `on_reject(name, attempt)` hears of every fetched file that did not match (for the audit log).
    """
    stage = dest / STAGING
    stage.mkdir(parents=True, exist_ok=True)
    index_tmp = stage / INDEX
    index_tmp.unlink(missing_ok=True)  # an index is small; always take the hub's current one
    if not transport.fetch(f"{rel}/{INDEX}", index_tmp):
        return None
    what = f"{transport.describe()}/{rel}/{INDEX}"
    try:
        doc = read_json(index_tmp)
        files = check_index(doc, trust, signer, what)
    except (ValueError, SignatureError) as exc:
        raise TransferError(f"{what}: {exc}") from None
    for name, entry in files.items():
        final = dest / name
        if verified(final, entry):
            continue
        part = stage / name.replace("/", "__")
        for attempt in range(1, attempts + 1):
            if not transport.fetch(f"{rel}/{name}", part):
                raise TransferError(f"{transport.describe()}/{rel}/{name}: listed in the index but missing on the hub")
            if verified(part, entry):
                break
            # A corrupted or mismatched file: start that file again from nothing.
            part.unlink(missing_ok=True)
            if on_reject is not None:
                on_reject(name, attempt)
            if attempt == attempts:
                raise TransferError(
                    f"{transport.describe()}/{rel}/{name}: sha256 differs from the signed index after "
                    f"{attempts} attempts (corrupted in transit or on the hub); nothing installed"
                )
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, final)
        fsync_dir(final.parent)
    os.replace(index_tmp, dest / INDEX)
    fsync_dir(dest)
    shutil.rmtree(stage, ignore_errors=True)
    return doc


def publish(transport: Transport, src: Path, files: Iterable[str], rel: str, signer: str, key) -> dict:
    """Send `files` of `src` to hub/rel, then their signed index: the index's arrival marks the
    bundle complete. Only the named files go, whatever else `src` holds."""
    names = sorted(files)
    doc = write_index(src, names, signer, key)
    for name in names:
        transport.send(src / name, f"{rel}/{name}")
    transport.send(src / INDEX, f"{rel}/{INDEX}")
    return doc


def complete(directory: Path, trust: TrustStore, signer: str) -> bool:
    """Whether `directory` holds a bundle whose signed index matches every file (the receiving
    side of a publish: the hub checks before it counts an update as arrived)."""
    index = directory / INDEX
    try:
        files = check_index(read_json(index, max_bytes=16 << 20), trust, signer, str(index))
    except (FileNotFoundError, ValueError, SignatureError, TransferError):
        return False  # not there yet, or not a bundle its site signed: either way not an arrival
    return all(verified(directory / name, entry) for name, entry in files.items())


def _stamp(directory: Path) -> tuple:
    """Size and mtime of every file in `directory`: what must change before a check can change."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()))
    except FileNotFoundError:
        return ()


class CompletenessCache:
    """`complete()` for a poll loop: a bundle is hashed again only when its files changed, so
    waiting on a 64 GB update costs a directory listing per poll, not a read of 64 GB."""

    def __init__(self, trust: TrustStore):
        self.trust = trust
        self._seen: dict[Path, tuple[tuple, bool]] = {}

    def complete(self, directory: Path, signer: str) -> bool:
        stamp = _stamp(directory)
        hit = self._seen.get(directory)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        ok = complete(directory, self.trust, signer)
        self._seen[directory] = (stamp, ok)
        return ok


# What each side hands over. Sites publish only these names from their round directory.
SITE_FILES = ("update.safetensors", "control.safetensors", "metrics.jsonl", "train.log", "receipt.json")
ROUND_FILES = ("plan.json", "global/model.safetensors", "global/model.json", "global/server_state.safetensors")
DATA_FILES = ("manifest.json", "manifest.sig", "tokenizer.json")


def present(directory: Path, names: Iterable[str]) -> list[str]:
    return [n for n in names if (directory / n).is_file()]


STOPPED = "stopped.json"  # at the hub's root: the coordinator stopped the federation


def announce_stop(exchange, layout, trust: TrustStore, r: int, reason: str) -> None:
    """Tell the sites, through the hub, that the federation stopped in round r, so they stop
    waiting for a round that will not come (instead of waiting `exchange.wait_minutes`)."""

    doc = sign_document(
        {"round": r, "reason": reason, "time": time.time()}, COORDINATOR, trust.private_key(COORDINATOR)
    )
    write_json(layout.root / STOPPED, doc)
    if exchange.kind == "s3":
        transport_for(exchange).send(layout.root / STOPPED, STOPPED)


def withdraw_stop(exchange, layout) -> None:
    """A coordinator that resumes takes its stop notice back."""
    if not (layout.root / STOPPED).exists():
        return
    if exchange.kind == "s3":
        transport_for(exchange).remove(STOPPED)
    (layout.root / STOPPED).unlink()


def stop_notice(transport: Transport, stage: Path, trust: TrustStore, before: int) -> str | None:
    """The coordinator's reason, if it announced a stop in a round before `before`."""

    path = stage / STOPPED
    path.unlink(missing_ok=True)
    if not transport.fetch(STOPPED, path):
        return None
    try:
        return read_stop(path, trust, before, f"{transport.describe()}/{STOPPED}")
    finally:
        path.unlink(missing_ok=True)


def read_stop(path: Path, trust: TrustStore, before: int, where: str) -> str | None:
    """The reason in the stop notice at `path` (found at `where`), if the coordinator signed it
    and stopped in a round before `before`."""
    try:
        doc = read_json(path)
        verify_document(doc, trust, COORDINATOR, where)
    except (OSError, ValueError, SignatureError):
        return None  # none, or not a notice the coordinator signed: keep waiting
    return f"round {doc['round']}: {doc['reason']}" if doc["round"] < before else None


def audit_rejects(layout, rel: str) -> Callable[[str, int], None]:
    """An `on_reject` that records each rejected file in the run's audit log."""

    parts = rel.split("/")
    r = int(parts[1][1:]) if len(parts) > 1 and parts[0] == "rounds" else None

    def record(name: str, attempt: int) -> None:
        AuditLog(layout.audit).append(
            "transfer.rejected",
            round=r,
            bundle=rel,
            file=name,
            attempt=attempt,
            reason="sha256 differs from the signed index; fetched again",
        )

    return record


def wait_pull(
    transport: Transport,
    rel: str,
    dest: Path,
    trust: TrustStore,
    signer: str,
    poll_seconds: float,
    wait_seconds: float,
    say=print,
    on_reject: Callable[[str, int], None] | None = None,
    round_: int | None = None,
) -> dict:
    """`pull`, polling the hub until the bundle appears; a TransferError after `wait_seconds`,
    or as soon as the coordinator announces it stopped before round `round_`."""
    t0 = last = time.monotonic()
    while (doc := pull(transport, rel, dest, trust, signer, on_reject=on_reject)) is None:
        if round_ is not None and (why := stop_notice(transport, dest / STAGING, trust, round_)):
            raise TransferError(
                f"{transport.describe()}/{rel}: the coordinator stopped the federation ({why}); "
                "rerun this command when it resumes"
            )
        waited = time.monotonic() - t0
        if waited >= wait_seconds:
            raise TransferError(
                f"{transport.describe()}/{rel}: not published after {waited / 60:.1f} min (exchange.wait_minutes)"
            )
        if time.monotonic() - last >= 60:
            say(f"waiting for {transport.describe()}/{rel} ({waited / 60:.0f} min so far)")
            last = time.monotonic()
        time.sleep(poll_seconds)
    return doc


def eval_fetcher(exchange, layout, trust: TrustStore, r: int, which: str) -> Callable[[str], None] | None:
    """For the coordinator of an object-store hub: a function pulling a site's published scores
    of round r's `which` model into this run directory (None where sites publish in place)."""
    if exchange.kind != "s3" or exchange.role != "coordinator":
        return None
    transport = transport_for(exchange)

    def fetch(site: str) -> None:
        d = layout.eval_part(r, which, site).parent
        rel = d.relative_to(layout.root).as_posix()
        try:
            pull(transport, rel, d, trust, site, on_reject=audit_rejects(layout, rel))
        except TransferError as exc:
            print(f"round {r}: {site}'s held-out scores are not usable yet: {exc}", flush=True)

    return fetch
