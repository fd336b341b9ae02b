"""What makes a file trustworthy across sites: identities, signatures, encryption, the audit log.

Ed25519 identities and signed documents, X25519 key agreement, secret key files, encryption at
rest, the hash-chained audit log and its signed heads, scrubbing of what leaves a site, signed
global checkpoints and plans, and the model card written from a provenance record (which
`fedhpc.ops.provenance` traces). Imports core and config.
"""
