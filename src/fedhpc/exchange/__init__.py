"""Staged transfer of signed file bundles between a site and the coordinator's hub.

The hub is a shared directory, rsync over SSH or S3; sites only pull and publish. Imports core,
config and trust.
"""
