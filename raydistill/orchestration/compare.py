"""``raydistill compare``: the MLflow runs of distillations and tune trials as one table, and a plot.

Rows come from every run of the ``raydistill`` experiment that has an accuracy metric (``acc_<preset>_<net>_mean``,
what the main job, every completed or early-stopped trial and every confirmation run of a study log); study parent
runs are summaries and are left out.
A distilled set (runs tagged ``raydistill.set_id``) is one row per evaluation protocol: its latest FINISHED run,
which holds every result of the set so far (reruns, killed and failed runs are left out). Reading writes nothing: a
missing sqlite database is an error, not a new empty one.
"""

from __future__ import annotations

from pathlib import Path

from raydistill.errors import UserError

KEY_PARAMS = ("extra.igd_scale", "extra.igd_gamma", "extra.mode_scale", "extra.t_stop", "cfg_scale", "cfg_interval")


def _fmt(v: str) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


def _classes(r) -> str:
    """'4cls' for a class subset, 'all' otherwise: accuracies on different subsets are not comparable."""
    v = r.get("params.classes")
    return f"{len(v.split(','))}cls" if isinstance(v, str) and v else "all"


def collect_runs(tracking_uri: str, method: str | None = None, dataset: str | None = None,
                 ipc: int | None = None, study: str | None = None) -> list[dict]:
    """One dict per run: method, dataset, ipc, kind, status, eval, key params, accuracy, std, images/s."""
    import mlflow

    from raydistill.orchestration.tracking import EXPERIMENT, SET_ID_TAG, _quiet
    from raydistill.reproduce import expected_of_run

    _quiet()
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        raise UserError(f"no raydistill runs in {tracking_uri} (no such database)",
                        "run `raydistill distill` or `raydistill tune` first, or pass --root/--tracking-uri")
    mlflow.set_tracking_uri(tracking_uri)  # a sqlite database is opened only once it exists: compare writes nothing
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        raise UserError(f"no raydistill runs in {tracking_uri}",
                        "run `raydistill distill` or `raydistill tune` first, or pass --root/--tracking-uri")
    df = mlflow.search_runs(experiment_names=[EXPERIMENT], output_format="pandas")
    rows, latest = [], {}
    for _, r in df.iterrows():
        acc_cols = sorted(c for c in r.index if c.startswith("metrics.acc_") and c.endswith("_mean")
                          and r[c] == r[c])  # NaN-safe
        kind = r.get("tags.kind") or "distill"
        kind = "distill" if kind != kind else kind
        if kind == "study":
            continue
        acc_col = None
        if acc_cols:
            acc_col = acc_cols[0]
            acc, std = float(r[acc_col]), float(r.get(acc_col[:-5] + "_std", float("nan")))
        elif "metrics.accuracy" in r.index and r["metrics.accuracy"] == r["metrics.accuracy"]:
            acc, std = float(r["metrics.accuracy"]), float("nan")
        else:
            continue
        status = r.get("tags.tune.status")
        row = {"run_id": r["run_id"], "method": r.get("params.method"), "dataset": r.get("params.dataset"),
               "ipc": int(r.get("params.ipc") or 0), "kind": kind, "study": r.get("tags.study") or "",
               "status": status if isinstance(status, str) else "completed",
               "eval": f"{r.get('params.eval_preset')}/{r.get('params.eval_epochs') or 'full'} {_classes(r)}",
               "params": {k.split(".")[-1]: _fmt(r[f"params.{k}"]) for k in KEY_PARAMS
                          if f"params.{k}" in r.index and isinstance(r[f"params.{k}"], str) and r[f"params.{k}"]},
               "acc": acc, "std": std, "images_per_s": float(r.get("metrics.images_per_s", float("nan"))),
               "expected": expected_of_run(r, acc_col.split("_", 2)[2][:-5] if acc_col else None)}
        if method and row["method"] != method or dataset and row["dataset"] != dataset or \
                ipc and row["ipc"] != ipc or study and row["study"] != study:
            continue
        sid = r.get(f"tags.{SET_ID_TAG}")
        if isinstance(sid, str):  # a set's run: only its latest finished one per evaluation protocol is a row
            if r["status"] != "FINISHED":
                continue
            key = (sid, row["eval"])
            if key not in latest or r["start_time"] > latest[key][0]:
                latest[key] = (r["start_time"], row)
            continue
        rows.append(row)
    rows.extend(row for _, row in latest.values())
    return sorted(rows, key=lambda x: (x["dataset"] or "", x["method"] or "", x["ipc"], -x["acc"]))


def format_runs(rows: list[dict]) -> str:
    """The runs as a fixed-width table; the last column is the published figure or built-in band with its
    verdict (``reproduce.judge``: OUTSIDE when the accuracy falls outside the band)."""
    from raydistill.reproduce import judge

    head = (f"{'method':<11} {'dataset':<14} {'IPC':>4} {'kind':<8} {'status':<14} {'eval':<14} "
            f"{'accuracy':>16} {'images/s':>9}  parameters  | expected")
    lines = [head]
    for r in rows:
        std = "" if r["std"] != r["std"] else f" +- {r['std']:.2f}"
        rate = "-" if r["images_per_s"] != r["images_per_s"] else f"{r['images_per_s']:.2f}"
        params = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lines.append(f"{r['method']:<11} {r['dataset']:<14} {r['ipc']:>4} {r['kind']:<8} {r['status']:<14} "
                     f"{r['eval']:<14} {r['acc']:>8.2f}{std:<8} {rate:>9}  {params}  | "
                     f"{judge(r['acc'], r.get('expected', ''))[0]}")
    return "\n".join(lines)


def plot_runs(rows: list[dict], path: str | Path) -> str:
    """Accuracy by method and IPC (best run per method, IPC and evaluation; early-stopped trials left out).

    Returns a message (where the plot went, or why there is none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed in this environment (pip install matplotlib)"
    best: dict[tuple, dict] = {}
    for r in rows:
        if r["status"] != "completed":
            continue
        key = (f"{r['method']} ({r['eval']})", r["ipc"])
        if key not in best or r["acc"] > best[key]["acc"]:
            best[key] = r
    if not best:
        return "no plot: no completed runs match"
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in sorted({k[0] for k in best}):
        pts = sorted((ipc, r) for (m, ipc), r in best.items() if m == label)
        ax.errorbar([p[0] for p in pts], [p[1]["acc"] for p in pts],
                    yerr=[0 if p[1]["std"] != p[1]["std"] else p[1]["std"] for p in pts], marker="o", capsize=3,
                    label=label)
    ax.set_xlabel("images per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"
