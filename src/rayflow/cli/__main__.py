"""``python -m rayflow.cli``: the same command line as the ``rayflow`` console script."""

import sys

from rayflow.cli import main

sys.exit(main())
