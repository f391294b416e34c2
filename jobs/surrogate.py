"""Entrypoint for `ray job submit`: `python jobs/surrogate.py [raydistill surrogate flags]` (see docs/RAY_JOBS.md).

Trains IGD's surrogate trajectory as a Ray task (on a GPU when the cluster has one) and selects checkpoints.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["surrogate", *sys.argv[1:]]))
