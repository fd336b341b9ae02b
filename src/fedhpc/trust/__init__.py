"""What makes a file trustworthy across sites: Ed25519 identities and signed documents, X25519
key agreement, encryption at rest, the hash-chained audit log and its signed heads,
scrubbing of what leaves a site, signed global checkpoints and plans, provenance and the
model card. Imports core and config.
"""
