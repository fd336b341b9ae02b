"""Allow `python -m fedhpc`."""

import sys

from fedhpc.cli.main import main

sys.exit(main())
