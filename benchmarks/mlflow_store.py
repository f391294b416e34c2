"""Time a new sqlite MLflow store: MLflow building it (every schema migration) against raydistill's seeded copy.

    python benchmarks/mlflow_store.py [--repeats 3]

Each repeat makes a fresh store both ways in a temporary folder and times ``set_experiment`` on it (the call every
set's run makes first); the template in ``~/.cache/raydistill`` is made before timing. Prints median seconds of each
and their ratio. MLflow's modules are imported before timing, so only the store's creation is timed.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401  (imported before timing)

    from raydistill.orchestration.tracking import _empty_store_template, _quiet, set_experiment

    _quiet()
    _empty_store_template()
    plain, seeded = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            db = Path(tmp) / f"plain{i}" / "mlflow.db"
            db.parent.mkdir()
            t = time.perf_counter()
            mlflow.set_tracking_uri(f"sqlite:///{db}")  # MLflow's own path: migrations, then the experiment
            mlflow.set_experiment("raydistill")
            plain.append(time.perf_counter() - t)
            db = Path(tmp) / f"seeded{i}" / "mlflow.db"
            db.parent.mkdir()
            t = time.perf_counter()
            set_experiment(f"sqlite:///{db}")
            seeded.append(time.perf_counter() - t)
    p, s = statistics.median(plain), statistics.median(seeded)
    print(f"new sqlite store + experiment, median of {a.repeats}: MLflow builds it {p:.2f} s, seeded copy {s:.2f} s "
          f"({p / s:.1f}x)")


if __name__ == "__main__":
    main()
