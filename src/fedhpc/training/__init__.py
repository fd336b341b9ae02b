"""One site's local training.

The model, the short training loop, the engines (single process, DDP, FSDP, DeepSpeed), ranks
and devices, optimizer state kept between rounds, gradient corrections and site capability
profiles. Imports core, config and trust.
"""
