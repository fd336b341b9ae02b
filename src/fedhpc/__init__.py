"""fedhpc: federated training of foundation models across heterogeneous HPC sites."""

__version__ = "0.1.0"
