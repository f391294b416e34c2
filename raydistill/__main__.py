"""``python -m raydistill``: the same command line as the ``raydistill`` console script."""

import sys

from raydistill.cli import main

sys.exit(main())
