#!/usr/bin/env python3
"""Process entry point: `python cmd/main.py run|migrate|dev|demo`.

Thin on purpose (the wiring is in mailer.service and mailer.cli); the same
as the installed `mailer` console script. Not an importable package: `cmd`
is a standard-library module name.
"""

import sys

from mailer.cli import main

if __name__ == "__main__":
    sys.exit(main())
