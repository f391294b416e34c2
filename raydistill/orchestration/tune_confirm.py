"""Confirming a Tune study on the full protocol: the proxy proposes, the full evaluation decides.

A study ranks its trials on a proxy: a class subset, a shortened preset, one net (``tune_spaces/*.yaml``). On the
Fashion-MNIST model shipped 2026-12-07 the proxy's winner scored below the method's defaults in the full evaluation for
four of six studies (docs/BENCHMARKS.md section 8), while one full net per configuration, trained with the same seeds,
put every one of those six winner-defaults pairs in the order that three nets give (docs/TUNE.md, "Confirmation").
So with a ``confirm`` section the study re-runs its ``top`` best completed trials and, with ``defaults: true``, the
space's fixed config without any searched value (the method's defaults), each distilled and evaluated again under
``confirm.config`` (default: every class, the preset's own epochs, one net) with the study's seed, so every contender
trains nets from the same initialisations on the same test split. The best of them becomes the study's ``best.yaml``;
the proxy's winner is kept as ``proposed.yaml``.

Each contender runs as one Ray task with the space's per-trial resources (``resources``), at most ``max_concurrent``
at a time like the trials, and writes its set under ``<study>/confirm/<label>/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydistill.config import DistillConfig
from raydistill.tune_space import TuneSpace

DEFAULTS = "defaults"


def contenders(space: TuneSpace, done: list[dict]) -> list[dict]:
    """The configurations to confirm: the ``top`` best completed trial rows, then the defaults (``values`` {})."""
    better = sorted(done, key=lambda r: r[space.metric], reverse=space.mode == "max")
    out = [{"label": f"trial-{r['trial_id']}", "trial_id": r["trial_id"], "values": r["values"],
            "proxy": r[space.metric]} for r in better[:space.confirm_top]]
    if space.confirm_defaults:
        out.append({"label": DEFAULTS, "trial_id": None, "values": {}, "proxy": None})
    return out


def confirm_config(space: TuneSpace, values: dict[str, Any], out: str | Path) -> DistillConfig:
    """A contender's full-protocol config: the space's config, its ``values``, then ``confirm.config``."""
    return space.confirm_trial_config(values, str(out))


def _confirm_one(space: TuneSpace, values: dict[str, Any], out: str, label: str) -> dict[str, Any]:
    """Distill and evaluate one contender in this (Ray worker) process; returns its accuracies."""
    import torch

    from raydistill.distill import ShardRunner, distill_local, evaluate_images, load_distilled, selected_labels

    torch.set_num_threads(max(1, int(space.cpu)))
    device = "cuda" if space.gpu > 0 and torch.cuda.is_available() else "cpu"
    cfg = confirm_config(space, values, out)
    t0 = time.time()
    runner = ShardRunner(cfg, device)
    res = distill_local(cfg, runner=runner)
    ds = runner.ds
    x, y = load_distilled(cfg.out, ds, selected_labels(cfg, ds), ipc=cfg.ipc)
    net = cfg.eval_nets[0]
    r = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, device=device,
                        epochs=cfg.eval_epochs, precision=cfg.eval_precision, compile=cfg.compile,
                        teacher=cfg.teacher, progress=lambda m: print(f"[confirm {label}] {m}", flush=True))
    accs = getattr(r, "best_accs" if getattr(r, "report", "last") == "best" else "last_accs", [])
    return {"accuracy": float(r.reported_mean), "std": float(r.reported_std), "nets": [float(a) for a in accs],
            "net": net, "preset": cfg.eval_preset, "images_per_s": res.images_per_s,
            "seconds": time.time() - t0}


def run_confirmation(space: TuneSpace, done: list[dict], study_dir: Path,
                     log: Callable[[str], None] = print) -> list[dict]:
    """Run every contender (inside the caller's Ray session); returns them with ``accuracy`` or ``error`` set."""
    import ray

    cands = contenders(space, done)
    full = confirm_config(space, {}, study_dir)
    epochs = f"{full.eval_epochs} epochs" if full.eval_epochs else "the preset's epochs"
    log(f"confirming {len(cands)} configuration(s) of study {space.name} on the full protocol: "
        f"{', '.join(c['label'] for c in cands)}; {len(full.classes or ()) or 'all'} classes, {epochs}, "
        f"{full.num_evals} net(s) each, seed {full.seed}")
    task = ray.remote(num_cpus=space.cpu, num_gpus=space.gpu, max_retries=0)(_confirm_one)
    pending: dict = {}
    queue = list(cands)
    while queue or pending:
        while queue and len(pending) < space.max_concurrent:
            c = queue.pop(0)
            c["out"] = str(study_dir / "confirm" / c["label"])
            pending[task.remote(space, c["values"], c["out"], c["label"])] = c
        ready, _ = ray.wait(list(pending), num_returns=1)
        c = pending.pop(ready[0])
        try:
            c.update(ray.get(ready[0]))
            proxy = "" if c["proxy"] is None else f" (proxy {c['proxy']:.2f})"
            log(f"confirm {c['label']}: {space.metric} {c['accuracy']:.2f}{proxy}")
        except Exception as e:  # noqa: BLE001 - one failed contender must not lose the others
            from raydistill.orchestration.runtime import user_error_in

            ue = user_error_in(e)
            c["error"] = ue.problem if ue is not None else (str(e).strip().splitlines() or [repr(e)])[-1]
            log(f"confirm {c['label']} failed: {c['error']}")
    return cands


def confirmed_best(space: TuneSpace, results: list[dict]) -> dict | None:
    """The contender with the best confirmed metric (None when none finished). A tie goes to the defaults (a search
    result has to beat them to be shipped), else to the better proxy rank (the earlier contender)."""
    ok = [c for c in results if "accuracy" in c]
    if not ok:
        return None
    best = (max if space.mode == "max" else min)(c["accuracy"] for c in ok)
    tied = [c for c in ok if c["accuracy"] == best]
    return next((c for c in tied if c["label"] == DEFAULTS), tied[0])


def log_confirmation(client, experiment_id: str, parent_id: str, space: TuneSpace, results: list[dict]) -> None:
    """One MLflow child run per contender (``tags.kind=confirm``): its config, full-protocol accuracy, grid."""
    from raydistill.orchestration.results import label_params

    for c in results:
        cfg = confirm_config(space, c["values"], c["out"])
        tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": f"{space.name}-confirm-{c['label']}",
                "method": cfg.method, "dataset": cfg.dataset, "kind": "confirm", "study": space.name,
                "contender": c["label"]}
        run = client.create_run(experiment_id, tags=tags)
        rid = run.info.run_id
        for k, v in {**cfg.flat_params(), **label_params(cfg)}.items():
            client.log_param(rid, k, v[:6000])
        if "accuracy" in c:
            key = f"acc_{c['preset']}_{c['net']}"
            metrics = {space.metric: c["accuracy"], f"{key}_mean": c["accuracy"], f"{key}_std": c["std"],
                       "images_per_s": c["images_per_s"], "seconds": c["seconds"]}
            if c["proxy"] is not None:
                metrics["proxy_" + space.metric] = c["proxy"]
            for k, v in metrics.items():
                client.log_metric(rid, k, float(v))
            grid = Path(c["out"]) / "grid.png"
            if grid.exists():
                client.log_artifact(rid, str(grid))
        else:
            client.set_tag(rid, "error", c["error"][:5000])
        client.set_terminated(rid, "FINISHED" if "accuracy" in c else "FAILED")
