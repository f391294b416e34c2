"""Accuracies of the tracked MLflow runs as :func:`raydistill.evaluate.scores.score_table` records.

A distillation run logs ``acc_<preset>_<net>_mean`` (the mean over its ``num_evals`` nets) per evaluated net; the
latest run wins for each (dataset, IPC, method, preset, net). A shortened schedule (``eval_epochs`` set) is kept apart
as preset ``dc:40ep``, and a class subset as dataset ``fashion-mnist[4cls]``: neither is the protocol's number. Tune
trials are left out (their parameters were chosen on the test accuracy).
"""

from __future__ import annotations

from raydistill.errors import UserError
from raydistill.evaluate.scores import Records


def records_from_mlflow(tracking_uri: str) -> Records:
    """Per-(dataset, IPC, method, preset, net) accuracies of the ``raydistill`` experiment's distillation runs."""
    import mlflow

    from raydistill.orchestration.tracking import EXPERIMENT, _quiet

    _quiet()
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        raise UserError(f"no raydistill runs in {tracking_uri}", "run `raydistill distill` first or pass result files")
    df = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="pandas", order_by=["start_time ASC"])
    out: Records = {}
    for _, r in df.iterrows():
        kind = r.get("tags.kind")
        if isinstance(kind, str) and kind != "distill":
            continue
        classes = r.get("params.classes")
        dataset = str(r.get("params.dataset"))
        if isinstance(classes, str) and classes:
            dataset += f"[{len(classes.split(','))}cls]"
        epochs = r.get("params.eval_epochs")
        n = int(r.get("params.num_evals") or 1)
        ipc, method = int(r.get("params.ipc") or 0), str(r.get("params.method"))
        for col in r.index:
            if not (col.startswith("metrics.acc_") and col.endswith("_mean")) or r[col] != r[col]:  # NaN: absent
                continue
            preset, _, net = col[len("metrics.acc_"):-len("_mean")].partition("_")
            if isinstance(epochs, str) and epochs:
                preset = f"{preset}:{epochs}ep"
            out[(dataset, ipc, method, preset, net)] = [float(r[col])] * n
    return out
