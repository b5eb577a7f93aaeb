"""``python -m rayflow``: the same command line as the ``rayflow`` console script."""

import sys

from rayflow.cli import main

sys.exit(main())
