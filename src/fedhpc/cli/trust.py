"""The trust verbs of `fedhpc`: keys, audit verification, provenance and secure-aggregation recovery."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedhpc.config.federation import Config
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_bytes
from fedhpc.core.layout import RunLayout
from fedhpc.stages.context import context, trust_store
from fedhpc.tasks.validation import load
from fedhpc.trust.signing import COORDINATOR, TrustStore, load_private_key, public_b64


def cmd_keys(a: argparse.Namespace) -> int:
    from fedhpc.trust.envelope import create_data_key, key_path
    from fedhpc.trust.identity import create_keypair

    if a.action == "init":
        name = COORDINATOR if a.coordinator else a.site
        keys_dir = Path(a.dir)
        path = keys_dir / f"{name}.key"
        if not path.exists():
            create_keypair(keys_dir, name)
            print(f"created {path} (private, mode 600; directory mode 700) and {path.with_suffix('.pub')}")
        else:
            print(f"{path} exists; keeping it")
        if a.data_key:
            dk = key_path(None, keys_dir, name)
            if not dk.exists():
                create_data_key(dk)
                print(f"created data key {dk} (mode 600; never share it, never lose it: sealed data needs it)")
        print("add this line to trust.public_keys in every party's config.yaml:")
        print(f"    {name}: {public_b64(load_private_key(path).public_key())}")
        return 0

    ctx = context(a.config)
    cfg, trust = ctx.cfg, ctx.trust
    names = [COORDINATOR, *sorted(cfg.sites)]
    for name in names:
        pub = trust.keys_dir / f"{name}.pub"
        if trust.listed:
            if name not in trust.listed:
                if name == COORDINATOR:
                    raise FedhpcError("trust.public_keys has no `coordinator` entry")
                print(f"{name!r} is not in trust.public_keys: it is not planned until it is")
                continue
            # The trust list is the authority; the file only mirrors it for tools that look for one.
            if not pub.exists() or pub.read_text().strip() != trust.listed[name].strip():
                write_bytes(pub, (trust.listed[name].strip() + "\n").encode())
            continue
        if not pub.exists():
            if not cfg.trust.generate_missing:
                raise FedhpcError(
                    f"no key for {name!r} in {trust.keys_dir} and trust.generate_missing is false; "
                    f"create it with `fedhpc keys init --site {name} --dir {trust.keys_dir}`"
                )
            create_keypair(trust.keys_dir, name)
            print(f"created identity {name!r} in {trust.keys_dir}")
    if cfg.trust.encryption.shards:
        _ensure_data_keys(cfg, trust, names, create_data_key)
    return 0


def _ensure_data_keys(cfg, trust, names: list[str], create) -> None:
    from fedhpc.trust.envelope import MissingDataKey, key_path

    enc = cfg.trust.encryption
    for name in names:
        try:
            trust.data_key(name)
        except MissingDataKey:
            if not cfg.trust.generate_missing:
                raise
            print(f"created data key {create(key_path(enc.key_file, trust.keys_dir, name))} for {name!r}")


def run_config(run_dir: Path, config: str | None) -> Config | None:
    """The config of a run directory: `--config`, else the run's config snapshot, else None."""
    snapshot = Path(config) if config else run_dir / "config.json"
    return load(snapshot) if snapshot.exists() else None


def run_trust(run_dir: Path, cfg: Config | None) -> TrustStore:
    """The trust store of a run directory: its config's trust settings, else `<run>/keys`."""
    layout = RunLayout.of(run_dir)
    return trust_store(cfg, layout) if cfg is not None else TrustStore(layout.keys_dir)


def cmd_audit(a: argparse.Namespace) -> int:
    from fedhpc.trust.ledger import verify_run

    run_dir = Path(a.run_dir)
    check = verify_run(run_dir, run_trust(run_dir, run_config(run_dir, a.config)))
    if check.ok:
        heads = f"{check.heads} signed heads" if check.heads else "no signed heads (the tail rests on the chain alone)"
        print(f"{run_dir}/audit.jsonl: intact, {check.lines} events, {heads}")
        return 0
    where = f"at line {check.bad_line}" if check.bad_line else f"({check.lines} lines)"
    print(f"{run_dir}/audit.jsonl: BROKEN {where}: {check.reason}", file=sys.stderr)
    return 1


def cmd_secagg(a: argparse.Namespace) -> int:
    from fedhpc.aggregation.secure import recover

    ctx = context(a.config)
    if not ctx.cfg.strategy.secure_aggregation.enabled:
        raise FedhpcError(f"{a.config}: strategy.secure_aggregation.enabled is false; nothing to recover")
    doc = recover(ctx.cfg, ctx.layout, ctx.trust, a.round)
    print(
        f"round {a.round}: summing {', '.join(doc['survivors']) or 'nobody'}; dropped {', '.join(doc['dropped']) or 'none'}"
        f" ({len(doc['corrections'])} pairwise seeds revealed)"
    )
    return 0


def cmd_provenance(a: argparse.Namespace) -> int:
    from fedhpc.ops.provenance import locate, write_provenance

    root, g = locate(a.model)
    cfg = run_config(root, a.config)
    trust = run_trust(root, cfg)
    record, card = write_provenance(root, g, trust, cfg, Path(a.out) if a.out else None)

    rec = read_json(record)
    d = rec["data"]
    print(
        f"global model r{g:04d} ({rec['model_sha256'][:16]}…): {len(rec['rounds'])} contributing rounds, "
        f"sites {', '.join(d['sites']) or 'none'}, {d['tokens_trained']:,} tokens from {len(d['sources'])} sources"
    )
    print(f"wrote {record} and {card}")
    return 0


def add_verbs(verb) -> None:
    """Register the trust verbs on the `fedhpc` parser (`verb` as in cli.parser)."""
    k = verb("keys", cmd_keys, "create identities: `init --site NAME`, or `ensure` every key the config needs")
    k.add_argument("action", choices=["init", "ensure"])
    k.add_argument("--site", default=COORDINATOR, help="identity to create (init)")
    k.add_argument("--coordinator", action="store_true", help="create the coordinator's identity (init)")
    k.add_argument("--dir", default="keys", help="keys directory (init; created with mode 700)")
    k.add_argument("--data-key", action="store_true", help="also create a data key for encryption at rest (init)")
    au = verb(
        "audit", cmd_audit, "verify the audit ledger of a run: hash chain and coordinator-signed heads", config=False
    )
    au.add_argument("action", choices=["verify"])
    au.add_argument("run_dir")
    au.add_argument("--config", help="config whose trust settings to use (default: the run's config.json)")
    sa = verb("secagg", cmd_secagg, "secure aggregation: request and check the survivors' seed reveals", round=True)
    sa.add_argument("action", choices=["recover"])
    pv = verb(
        "provenance",
        cmd_provenance,
        "trace a global model to its rounds, sites, shards and verdicts; write a model card",
        config=False,
    )
    pv.add_argument("model", help="a global model.safetensors, its global/ directory or its round directory")
    pv.add_argument("--config", help="config whose trust settings to use (default: the run's config.json)")
    pv.add_argument("--out", help="where provenance.json and MODEL_CARD.md go (default: beside the model)")
