"""Site data catalogues: what a site holds, signed by the site, and the federation's merged view of all data.

A site shards its own (pinned) sources where they live and publishes only a catalogue: the
id, size, domain, language, source, licence and sha256 of each shard and held-out split,
signed with the site's key. The coordinator never sees the data; it merges the catalogues
with its own signed manifest (the shared shards and the tokenizer) to plan rounds, weigh
domains and trace provenance. A catalogue may describe only data resident at its signer.
"""

from __future__ import annotations

import time
from pathlib import PurePosixPath
from typing import Any

from fedhpc.core.documents import check_document
from fedhpc.core.errors import FedhpcError
from fedhpc.core.files import read_json, write_json
from fedhpc.core.layout import RunLayout
from fedhpc.data.shards import load_manifest
from fedhpc.trust.signing import TrustStore, sign_document, verify_document

CATALOGUE_VERSION = 1


class CatalogueError(FedhpcError, ValueError):
    """A site's catalogue is malformed, describes data it may not hold, or clashes with another."""


def write_catalogue(
    layout: RunLayout, site: str, tokenizer_sha: str | None, shards: list[dict], heldout: list[dict], key
) -> dict:
    doc = {
        "version": CATALOGUE_VERSION,
        "site": site,
        "tokenizer_sha256": tokenizer_sha,
        "shards": shards,
        "heldout": heldout,
        "created": time.time(),
    }
    doc = sign_document(doc, site, key)
    write_json(layout.catalogue(site), doc)
    return doc


def check_catalogue(doc: Any, trust: TrustStore, site: str, tokenizer_sha: str | None, what: str) -> dict:
    """The catalogue after checking signer, version, tokenizer and that every entry is the site's own."""
    if not isinstance(doc, dict):
        raise CatalogueError(f"{what}: not a JSON object")
    verify_document(doc, trust, site, what)
    check_document("catalogue", doc, what)
    if doc.get("version") != CATALOGUE_VERSION or doc.get("site") != site:
        raise CatalogueError(
            f"{what}: version {doc.get('version')!r} for site {doc.get('site')!r}, "
            f"expected {CATALOGUE_VERSION} for {site!r}"
        )
    if doc.get("tokenizer_sha256") != tokenizer_sha:
        raise CatalogueError(f"{what}: built with another tokenizer than the manifest's (sha256 differs)")
    prefix = PurePosixPath("data", "sites", site)
    for kind in ("shards", "heldout"):
        entries = doc.get(kind)
        if not isinstance(entries, list):
            raise CatalogueError(f"{what}: {kind!r} is not a list")
        for e in entries:
            label = e.get("id") or e.get("domain") if isinstance(e, dict) else None
            if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("tokens"), int):
                raise CatalogueError(f"{what}: malformed {kind} entry {label!r}")
            if e.get("residency") != site:
                raise CatalogueError(
                    f"{what}: {kind} entry {label!r} has residency {e.get('residency')!r}; "
                    f"a site may list only data resident at itself"
                )
            rel = PurePosixPath(e["path"])
            if rel.is_absolute() or ".." in rel.parts or rel.parts[: len(prefix.parts)] != prefix.parts:
                raise CatalogueError(f"{what}: {kind} entry {label!r} has path {e['path']!r} outside {prefix}/")
    return doc


def tokenizer_sha256(manifest: dict) -> str | None:
    """The hash of the run's tokenizer (None for a task whose data is not token shards)."""
    return (manifest.get("tokenizer") or {}).get("sha256")


def load_catalogue(layout: RunLayout, trust: TrustStore, site: str, tokenizer_sha: str | None) -> dict | None:
    """Site `site`'s checked catalogue in this run directory, or None when it has none (yet)."""
    path = layout.catalogue(site)
    try:
        doc = read_json(path)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CatalogueError(f"{path}: {exc}") from None
    return check_catalogue(doc, trust, site, tokenizer_sha, str(path))


def catalogued_sites(layout: RunLayout, trust: TrustStore, sites, tokenizer_sha: str | None) -> dict[str, dict]:
    """The catalogues present for `sites`, each checked; a bad one is an error naming its file."""
    out = {}
    for site in sorted(sites):
        doc = load_catalogue(layout, trust, site, tokenizer_sha)
        if doc is not None:
            out[site] = doc
    return out


def catalogue_sites(layout: RunLayout) -> list[str]:
    """The sites whose catalogue is in this run directory (for readers that have no config, e.g. provenance)."""
    root = layout.data / "sites"
    return sorted(p.name for p in root.iterdir() if (p / "catalogue.json").is_file()) if root.is_dir() else []


def load_data(layout: RunLayout, trust: TrustStore, sites=()) -> dict[str, Any]:
    """The coordinator's manifest with the shards and held-out splits of the catalogues of
    `sites` that are present merged in (the same shape as the manifest; held-out entries
    say who holds them in `holder`: `coordinator` or the site). Shard ids must be unique."""
    manifest = load_manifest(layout, trust)
    merged = {**manifest, "shards": list(manifest["shards"]), "catalogues": {}}
    merged["heldout"] = [{**h, "holder": "coordinator"} for h in manifest["heldout"]]
    owner = {s["id"]: "the manifest" for s in manifest["shards"]}
    for site, doc in catalogued_sites(layout, trust, sites, tokenizer_sha256(manifest)).items():
        for e in doc["shards"]:
            if e["id"] in owner:
                raise CatalogueError(
                    f"{layout.catalogue(site)}: shard id {e['id']!r} is also listed by {owner[e['id']]}"
                )
            owner[e["id"]] = f"site {site!r}'s catalogue"
        merged["shards"] += doc["shards"]
        merged["heldout"] += [{**h, "holder": site} for h in doc["heldout"]]
        merged["catalogues"][site] = {k: doc[k] for k in ("created", "signature")}
    return merged
