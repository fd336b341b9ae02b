"""Allow `python -m fedhpc`."""

import sys

from .cli import main

sys.exit(main())
