"""Typed configuration of trust and movement: identities, encryption at rest, scrubbing, the exchange."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fedhpc.config.fields import opt


@dataclass(kw_only=True)
class EncryptionConfig:
    """Encryption at rest: AES-256-GCM under per-shard data keys, wrapped by each reader's data key."""

    shards: bool = opt(
        False,
        "Seal every shard (for its owning site, or for every site when unpinned) and held-out split (for the "
        "coordinator); no plaintext token is written to disk.",
    )
    key_file: str | None = opt(
        None,
        "Data key file of each party, `{name}` standing for the site or `coordinator` (base64 of 32 bytes, mode "
        "600, owned by the user); null: `<keys_dir>/{name}.datakey`.",
    )
    key_env: str = opt(
        "FEDHPC_DATA_KEY_{NAME}",
        "Environment variable that, when set, holds a party's data key instead of the file; `{NAME}` is the name "
        "upper-cased with other characters than letters and digits as `_`.",
    )


@dataclass(kw_only=True)
class ScrubConfig:
    """What is removed from metrics, receipts and logs before they leave a site."""

    user_names: bool = opt(True, "Replace this machine's user names (and home directories) with `[user]`.")
    host_names: bool = opt(True, "Replace this machine's host names with `[host]`.")
    paths: bool = opt(True, "Replace absolute file-system paths with `[path]`.")
    patterns: list[str] = opt([], "Further regular expressions whose matches are replaced with `[scrubbed]`.")


@dataclass(kw_only=True)
class TrustConfig:
    """Identities (Ed25519 keys), the trust list, encryption at rest and what leaves a site."""

    keys_dir: str | None = opt(
        None,
        "Directory of `<name>.pub` (and, where this machine signs, `<name>.key`) files; null uses `<run dir>/keys`.",
    )
    generate_missing: bool = opt(True, "Create missing key pairs (single-machine demo); set false in real federations.")
    public_keys: dict[str, str] = opt(
        {},
        "The trust list: name → base64 Ed25519 public key (`fedhpc keys init` prints it) for `coordinator` and "
        "every site. When set, only these identities are trusted and `.pub` files are ignored; empty: the `.pub` "
        "files in `keys_dir` are trusted.",
    )
    encryption: EncryptionConfig = opt(EncryptionConfig, "Encryption at rest.")
    scrub: ScrubConfig = opt(ScrubConfig, "Scrubbing of metrics, receipts and logs that leave a site.")


@dataclass(kw_only=True)
class ExchangeConfig:
    """How round directories move between the coordinator's hub and the sites (multi-site mode)."""

    kind: Literal["local", "shared", "rsync", "s3"] = opt(
        "local",
        "`local`: every stage works in one run directory (one machine, or one cluster's shared filesystem); "
        "`shared`: the hub is a directory both sides mount; `rsync`: the hub is reached with rsync over SSH, "
        "sites connecting out to it; `s3`: the hub is a prefix in an S3-compatible object store (e.g. LUMI-O) "
        "that the coordinator and the sites all reach as clients.",
    )
    role: Literal["all", "coordinator", "site"] = opt(
        "all",
        "What this invocation runs: `all` (every stage, local exchange), `coordinator` (plan, gather, verify, "
        "aggregate, evaluate, promote on the hub) or `site` (pull, train, publish for `exchange.site`). Usually "
        "given on the command line: `fedhpc run --role site --site NAME`.",
    )
    site: str | None = opt(None, "The site this invocation acts for when `role` is `site`.")
    hub: str | None = opt(
        None,
        "The coordinator's run directory as the sites reach it: a path (`shared`) or `[user@]host:/path` (`rsync`); "
        "for `s3`, `s3://bucket/prefix`.",
    )
    s3_endpoint: str | None = opt(
        None,
        "S3 endpoint URL (LUMI-O: `https://lumidata.eu`); null: AWS. Credentials come from the usual AWS "
        "variables or files.",
    )
    ssh_port: int = opt(22, "SSH port of the hub.", minimum=1, maximum=65535)
    ssh_key: str | None = opt(None, "Private key the site logs in to the hub with (null: ssh's default).")
    known_hosts: str | None = opt(
        None, "known_hosts file pinning the hub's host key (null: ssh's default; unknown hosts are refused)."
    )
    poll_seconds: float = opt(10.0, "How often a site looks for the next round on the hub.", exclusiveMinimum=0)
    wait_minutes: float = opt(
        1440.0, "How long a site waits for the next round to appear on the hub before it stops.", exclusiveMinimum=0
    )
