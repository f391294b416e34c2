"""Entrypoint for `ray job submit`: `python jobs/tune.py SPACE [raydistill tune flags]` (see docs/RAY_JOBS.md).

Runs inside the job's cluster (RAY_ADDRESS is set by the job server), with the uploaded working directory first on
sys.path so the submitted code is what runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
