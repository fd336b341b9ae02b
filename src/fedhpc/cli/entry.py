"""The `fedhpc` executable (handed to the run's warm process when it can take the command) and that process."""

import os
import sys


def main() -> int:
    from fedhpc.cli.handoff import handoff

    if (code := handoff(sys.argv)) is not None:
        return code
    from fedhpc.cli.main import main as run_here

    return run_here()


def serve_warm() -> None:
    """`python -m fedhpc.cli.entry NAME LOG`: the warm process `fedhpc run` starts (cli/warm.py)."""
    from fedhpc.cli.main import main as run_here
    from fedhpc.cli.main import parser
    from fedhpc.cli.warm import serve
    from fedhpc.config.schema import config_validator

    # Built once for every command served: together most of what a coordinator's small step took.
    serve(sys.argv[1], os.environ.pop("FEDHPC_WARM_TOKEN"), sys.argv[2], run_here, (parser, config_validator))


if __name__ == "__main__":
    serve_warm()
