"""Entrypoint for `ray job submit`: `python jobs/finetune.py [raydistill finetune flags]` (see docs/RAY_JOBS.md).

Runs the Minimax DiffFit fine-tune as a Ray task (on a GPU when the cluster has one), resumable, with its loss
curves in MLflow. Without flags it fine-tunes the built-in Fashion-MNIST model (preset: 10,000 steps, 13-24 min
on 2 CPU cores).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raydistill.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
