"""MLflow tracking: one run per distillation with every parameter, the metrics and the artifacts.

The default store is sqlite at an absolute path under the output root (a relative URI would give every Ray worker
or Tune trial its own database; stack-notes). ``--tracking-uri`` points at a server instead; its scheme is checked
before anything runs (:func:`check_tracking_uri`).

A set's run (:class:`SetRun`) starts when the job starts working on the set, so its duration is the real one, and is
tagged with the set's folder (``raydistill.set``, ``raydistill.set_id``). A driver killed meanwhile leaves it
RUNNING; the next run of the same set marks it KILLED with a ``raydistill.note`` naming its successor. A driver that
stops on an error marks its runs FAILED with the error as the note.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from raydistill.errors import UserError

EXPERIMENT = "raydistill"
SET_TAG, SET_ID_TAG, NOTE_TAG = "raydistill.set", "raydistill.set_id", "raydistill.note"


def default_tracking_uri(root: str | Path, create: bool = True) -> str:
    """``sqlite:///<root>/mlflow.db``; ``create`` makes ``root`` (reading commands pass False and write nothing)."""
    root = Path(root).resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> None:
    """UserError unless MLflow has a store for ``uri``'s scheme (and a sqlite file's folder exists). Writes nothing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    fix = "pass --tracking-uri sqlite:///ABS/PATH/mlflow.db or http(s)://HOST:PORT, or leave it out"
    try:
        _tracking_store_registry.get_store_builder(uri)
    except MlflowException:
        raise UserError(f"MLflow cannot store runs at --tracking-uri {uri!r} (unknown scheme)", fix) from None
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise UserError(f"the folder of the MLflow database {uri!r} does not exist", fix)


def set_place(out: str | Path) -> str:
    """Where a set lives: its absolute folder, or its URI (an object store, ``raydistill.storage``) as given."""
    return str(out) if "://" in str(out) else str(Path(out).resolve())


def set_id(out: str | Path) -> str:
    """A set's identity in MLflow: a hash of :func:`set_place` (a tag value safe in filter strings)."""
    return hashlib.sha256(set_place(out).encode()).hexdigest()[:16]


class SetRun:
    """The MLflow run of one set in one job: created RUNNING at ``start_s``, ended FINISHED, FAILED or KILLED."""

    def __init__(self, tracking_uri: str, out: str | Path, run_name: str, params: dict[str, str],
                 tags: dict[str, str], start_s: float) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        _quiet()
        exp = set_experiment(tracking_uri)
        self.client = MlflowClient(tracking_uri)
        sid = set_id(out)
        stale = self.client.search_runs([exp.experiment_id], filter_string=f"tags.`{SET_ID_TAG}` = '{sid}' and "
                                        "attributes.status = 'RUNNING'")
        run = self.client.create_run(exp.experiment_id, start_time=int(start_s * 1000), run_name=run_name,
                                     tags={**tags, SET_TAG: set_place(out), SET_ID_TAG: sid})
        self.run_id = run.info.run_id
        for r in stale:  # a driver killed while it ran this set
            self.client.set_tag(r.info.run_id, NOTE_TAG, f"its driver ended without finishing it (killed?); "
                                f"superseded by run {self.run_id}")
            self.client.set_terminated(r.info.run_id, "KILLED")
        params = [Param(k, v if len(v) <= 6000 else v[:6000]) for k, v in params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def finish(self, metrics: dict[str, float], artifacts: list[Path], texts: dict[str, str],
               params: dict[str, str] | None = None) -> None:
        """Log ``metrics``, ``artifacts``, ``texts`` and params known only after the run (``params``), then end it."""
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        clean = {k.replace("+", "_").replace("/", "_"): float(v) for k, v in metrics.items() if v is not None}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in clean.items()],
                              params=[Param(k, v) for k, v in (params or {}).items()])
        for p in artifacts:
            if p.exists():
                self.client.log_artifact(self.run_id, str(p))
        for name, text in texts.items():
            self.client.log_text(self.run_id, text, name)
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self, error: BaseException) -> None:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        self.client.set_tag(self.run_id, NOTE_TAG, (str(error).strip().splitlines() or [type(error).__name__])[-1]
                            [:500])
        self.client.set_terminated(self.run_id, status)


def phase_prefix(phase: int, n_phases: int) -> str:
    """The metric-name prefix of a fine-tune phase: none for a single phase, else ``phaseNN_``."""
    return "" if n_phases == 1 else f"phase{phase:02d}_"


def log_step_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` into the run ``run_id`` (from any process: a Ray task logs into the driver's
    run). Several tasks may write one sqlite store at once; sqlite serialises them (each waits for the lock)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    _quiet()
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_experiment(tracking_uri: str, experiment: str = EXPERIMENT):
    """Point MLflow at ``tracking_uri`` and make ``experiment`` active, creating it when missing.

    A new experiment in a sqlite store keeps its artifacts in ``mlartifacts/`` next to the database; MLflow's default
    (``./mlruns``) is relative to whatever directory the process happens to run in.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    db = Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None
    if db is not None:
        seed_sqlite_store(db)
    mlflow.set_tracking_uri(tracking_uri)
    if db is not None and mlflow.get_experiment_by_name(experiment) is None:
        try:
            mlflow.create_experiment(experiment, artifact_location=(db.parent / "mlartifacts").resolve().as_uri())
        except MlflowException:  # created meanwhile by another process
            pass
    return mlflow.set_experiment(experiment)


def _empty_store_template() -> Path:
    """An empty sqlite store at MLflow's current schema, made once per MLflow version in ``~/.cache/raydistill``.

    MLflow builds a new sqlite store by running every schema migration since its first release: 1.17 s on an idle
    2-core machine against 0.04 s for a seeded copy, and several seconds under load (benchmarks/mlflow_store.py,
    docs/RELIABILITY.md), paid again by every new output root (and by the test suite's 17). The template is made by
    MLflow itself (``SqlAlchemyStore``), in a temporary file renamed into place, so a reader never sees a half-made
    one.
    """
    from importlib.metadata import version

    home = os.environ.get("RAYDISTILL_CACHE")
    cache = Path(home) if home else Path.home() / ".cache" / "raydistill"
    template = cache / f"mlflow-{version('mlflow')}-empty.db"
    if not template.is_file():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        cache.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f"{template.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        store = SqlAlchemyStore(f"sqlite:///{tmp}", (cache / "mlruns").as_uri())
        store.engine.dispose()
        os.replace(tmp, template)
    return template


def seed_sqlite_store(db: Path) -> None:
    """Create the sqlite store ``db``, when it does not exist yet, as a copy of :func:`_empty_store_template`.

    The copy is what MLflow would have made (same schema version, the ``Default`` experiment) except that ``Default``
    keeps its artifacts in ``mlartifacts/0`` next to the database, like raydistill's own experiment, rather than in
    ``./mlruns/0`` under whatever directory the process runs in. It is linked into place only if no other process
    created ``db`` meanwhile. Any failure here leaves the creation to MLflow.
    """
    import shutil
    import sqlite3
    from contextlib import closing

    if db.exists() or not db.parent.is_dir():
        return
    tmp = db.with_name(f"{db.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(_empty_store_template(), tmp)
        with closing(sqlite3.connect(tmp)) as con, con:  # closed even when the update fails
            now = int(time.time() * 1000)
            con.execute("UPDATE experiments SET artifact_location = ?, creation_time = ?, last_update_time = ? "
                        "WHERE experiment_id = 0", ((db.parent / "mlartifacts" / "0").resolve().as_uri(), now, now))
        os.link(tmp, db)  # fails if another process made db meanwhile: theirs stands
    except (OSError, sqlite3.Error):
        pass
    finally:
        tmp.unlink(missing_ok=True)


def _quiet() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import logging

    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
