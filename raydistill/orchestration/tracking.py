"""MLflow tracking: one run per distillation with every parameter, the metrics and the artifacts.

The default store is sqlite at an absolute path under the output root (a relative URI would give every Ray worker
or Tune trial its own database; stack-notes). ``--tracking-uri`` points at a server instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

EXPERIMENT = "raydistill"


def default_tracking_uri(root: str | Path) -> str:
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def set_experiment(tracking_uri: str, experiment: str = EXPERIMENT):
    """Point MLflow at ``tracking_uri`` and make ``experiment`` active, creating it when missing.

    A new experiment in a sqlite store keeps its artifacts in ``mlartifacts/`` next to the database; MLflow's default
    (``./mlruns``) is relative to whatever directory the process happens to run in.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        try:
            mlflow.create_experiment(experiment, artifact_location=(db.parent / "mlartifacts").resolve().as_uri())
        except MlflowException:  # created meanwhile by another process
            pass
    return mlflow.set_experiment(experiment)


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextlib.contextmanager
def mlflow_run(tracking_uri: str, run_name: str, params: dict[str, str], experiment: str = EXPERIMENT,
               tags: dict[str, str] | None = None, nested: bool = False) -> Iterator[object]:
    """Start (and end) an MLflow run with ``params`` logged; yields the active run."""
    import mlflow

    _quiet()  # after the import: mlflow configures its loggers when imported
    set_experiment(tracking_uri, experiment)
    with mlflow.start_run(run_name=run_name, nested=nested, tags=tags or {}) as run:
        mlflow.log_params({k: (v if len(v) <= 6000 else v[:6000]) for k, v in params.items()})
        yield run


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    import mlflow

    clean = {k.replace("+", "_").replace("/", "_"): float(v) for k, v in metrics.items() if v is not None}
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifacts(paths: list[str | Path], artifact_path: str | None = None) -> None:
    import mlflow

    for p in paths:
        p = Path(p)
        if p.exists():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)
