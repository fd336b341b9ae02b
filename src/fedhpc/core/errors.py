"""The base class of errors caused by input, configuration or environment, not by a bug."""


class FedhpcError(Exception):
    """Reported to the user as one clear message, without a traceback (FEDHPC_DEBUG=1 shows it)."""
