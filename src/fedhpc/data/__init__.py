"""Data preparation at the site that holds it, and the allocation of shards to sites.

Reading sources, tokenizers, the synthetic demo corpus, zarr shards and the signed manifest,
site catalogues, task-owned data files and the allocation of shards to sites. Imports core,
config and trust.
"""
