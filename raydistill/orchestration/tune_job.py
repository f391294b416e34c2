"""``raydistill tune``: a Ray Tune study over a method's guidance parameters, tracked in MLflow.

Each trial distills the space's class subset at its IPC with the sampled parameters (in-process, ``distill_local``),
trains the evaluation net(s) under the named preset and reports the test accuracy every ``eval_every`` epochs, so the
scheduler (ASHA by default) can stop weak trials early. Trials run with the space's per-trial CPUs/GPU fraction.

Heavy state is shared by a per-worker-process cache, not by ``ray.put``: trials run with ``reuse_actors=True`` so a
worker process serves trial after trial, and :func:`_shared_state` keeps the loaded dataset and generator (DiT + VAE,
already on the worker's device) for as long as the process lives. Only the guidance terms, which hold the searched
parameters, are built per trial; the expensive inputs behind them are cached on disk once per study and machine
(MGD3's modes under ``<study>/trials/.modes``, IGD's real gradients next to the surrogate trajectory). ``ray.put``
would move weights through the object store to every trial and rebuild (and re-``.to(device)``) the modules each
time, and the lazily computed modes/gradients would still be recomputed per trial.

MLflow: the driver owns the sqlite store (no concurrent writers). One parent run per study and, from a Tune
callback, one child run per trial (params, per-epoch metrics, the set's grid and manifest). A trial the scheduler
stopped is tagged ``tune.status=early_stopped`` (metric ``early_stopped=1``, ``stopped_at_epoch``).

With a ``confirm`` section the search's best trials and the defaults are then evaluated on the full protocol and the
best of them is ``best.yaml`` (:mod:`raydistill.orchestration.tune_confirm`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydistill.orchestration.tune_confirm import confirmed_best, log_confirmation, run_confirmation
from raydistill.tune_space import TuneSpace, apply_values, best_preset

_CACHE: dict[tuple, Any] = {}  # per worker process: (kind, key) -> loaded object


def _shared_state(cfg, device: str) -> tuple[Any, Any, bool]:
    """(dataset, generator, reused?) for ``cfg`` from this process's cache, loading what is missing."""
    from raydistill.distill import open_dataset
    from raydistill.methods import get_method

    generative = get_method(cfg.method).generative
    ds_key = ("ds", cfg.dataset, cfg.data_root, cfg.image_size, cfg.nclass, cfg.phase)
    gen_key = ("gen", ds_key, cfg.model, cfg.vae, cfg.model_size, cfg.sampler, cfg.steps, cfg.cfg_scale,
               cfg.cfg_channels, cfg.cfg_interval, device)
    reused = ds_key in _CACHE and (not generative or gen_key in _CACHE)
    if ds_key not in _CACHE:
        _CACHE[ds_key] = open_dataset(cfg)
    ds = _CACHE[ds_key]
    gen = None
    if generative:
        if gen_key not in _CACHE:
            from raydistill.generator import load_generator

            _CACHE[gen_key] = load_generator(cfg, ds.dit_labels, ds.image_size, device)
        gen = _CACHE[gen_key]
    return ds, gen, reused


def _trial(config: dict, space: TuneSpace, study_dir: str) -> None:
    """One Tune trial: distill, evaluate with intermediate reports, final report with ``completed=1``."""
    import torch
    from ray import tune

    from raydistill.distill import ShardRunner, distill_local, evaluate_images, load_distilled, selected_labels

    torch.set_num_threads(max(1, int(space.cpu)))
    device = "cuda" if space.gpu > 0 and torch.cuda.is_available() else "cpu"
    trial_id = tune.get_context().get_trial_id()
    cfg = apply_values(space.base_config(), config).with_(out=str(Path(study_dir) / "trials" / trial_id))
    t0 = time.time()
    ds, gen, reused = _shared_state(cfg, device)
    runner = ShardRunner(cfg, device, ds=ds, generator=gen)
    setup_s = time.time() - t0
    res = distill_local(cfg, overwrite=True, runner=runner)
    labels = selected_labels(cfg, ds)
    x, y = load_distilled(cfg.out, ds, labels, ipc=cfg.ipc)
    epochs = space.eval_epochs()
    net = cfg.eval_nets[0]
    base = {"images_per_s": res.images_per_s, "seconds_sample": res.seconds, "seconds_setup": setup_s,
            "shared_state_reused": float(reused), "completed": 0.0}
    t1 = time.time()

    def on_epoch(net_index: int, epoch: int, acc: float) -> None:
        step = net_index * epochs + epoch
        if step < cfg.num_evals * epochs:  # the last one is the final report below
            tune.report({**base, space.metric: acc, "epoch": step, "seconds_eval": time.time() - t1})

    r = evaluate_images(x, y, ds, cfg.eval_preset, net, cfg.num_evals, seed=cfg.seed, epochs=epochs, device=device,
                        on_epoch=on_epoch, eval_every=space.eval_every or None, precision=cfg.eval_precision,
                        compile=cfg.compile, teacher=cfg.teacher)
    key = f"acc_{cfg.eval_preset}_{net}"
    soft = {"teacher_test_acc": r.teacher_test_acc} if getattr(r, "labels", "hard") == "soft" else {}
    tune.report({**base, space.metric: r.reported_mean, "epoch": cfg.num_evals * epochs, "completed": 1.0,
                 "seconds_eval": time.time() - t1, f"{key}_mean": r.reported_mean, f"{key}_std": r.reported_std,
                 **soft})


def _scheduler(space: TuneSpace, epochs: int):
    """The space's scheduler over ``epoch``; it records the trials it stopped (``.stopped``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler

    s = space.scheduler
    max_t = space.base_config().num_evals * epochs
    if s["name"] == "asha":
        base, kw = ASHAScheduler, {"time_attr": "epoch", "max_t": max_t, "grace_period": int(s.get("grace_period", 1)),
                                   "reduction_factor": float(s.get("reduction_factor", 2))}
    elif s["name"] == "median":
        base, kw = MedianStoppingRule, {"time_attr": "epoch", "grace_period": float(s.get("grace_period", 1)),
                                        "min_samples_required": int(s.get("min_samples_required", 3))}
    else:
        base, kw = FIFOScheduler, {}

    class Recording(base):  # type: ignore[misc, valid-type]
        stopped: set[str] = set()

        def on_trial_result(self, tune_controller, trial, result):  # noqa: ANN001
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.STOP and not result.get("completed"):
                self.stopped.add(trial.trial_id)
            return decision

    sched = Recording(**kw)
    sched.stopped = set()
    return sched


def _callback(space: TuneSpace, study_dir: str, tracking_uri: str, experiment_id: str, parent_id: str, sched):
    """A Tune callback that writes one MLflow child run per trial (driver side)."""
    from mlflow import MlflowClient
    from ray.tune import Callback

    from raydistill.orchestration.results import label_params

    client = MlflowClient(tracking_uri)

    class MlflowTrials(Callback):
        runs: dict[str, str] = {}

        def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
            cfg = apply_values(space.base_config(), trial.config)
            tags = {"mlflow.parentRunId": parent_id, "mlflow.runName": f"{space.name}-{trial.trial_id}",
                    "method": cfg.method, "dataset": cfg.dataset, "kind": "trial", "study": space.name,
                    "trial_id": trial.trial_id}
            run = client.create_run(experiment_id, tags=tags)
            self.runs[trial.trial_id] = run.info.run_id
            params = {**cfg.with_(out=str(Path(study_dir) / "trials" / trial.trial_id)).flat_params(),
                      **label_params(cfg)}
            for k, v in params.items():
                client.log_param(run.info.run_id, k, v[:6000])

        def on_trial_result(self, iteration, trials, trial, result, **info):  # noqa: ANN001
            run_id = self.runs.get(trial.trial_id)
            step = int(result.get("epoch", 0))
            for k, v in result.items():
                if k in (space.metric, "images_per_s", "seconds_sample", "seconds_eval", "seconds_setup",
                         "shared_state_reused", "teacher_test_acc") or k.startswith("acc_"):
                    client.log_metric(run_id, k, float(v), step=step)

        def _end(self, trial, status: str) -> None:
            run_id = self.runs.pop(trial.trial_id, None)
            if run_id is None:
                return
            last = trial.last_result or {}
            done = bool(last.get("completed"))
            tag = "completed" if done else "error" if status == "FAILED" else "early_stopped"
            client.set_tag(run_id, "tune.status", tag)
            if tag == "early_stopped":
                client.set_tag(run_id, "tune.stopped_by", "scheduler" if trial.trial_id in sched.stopped else "budget")
            client.log_metric(run_id, "early_stopped", float(tag == "early_stopped"))
            client.log_metric(run_id, "stopped_at_epoch", float(last.get("epoch", 0)))
            out = Path(study_dir) / "trials" / trial.trial_id
            for name in ("grid.png", "manifest.parquet"):
                if (out / name).exists():
                    client.log_artifact(run_id, str(out / name))
            client.set_terminated(run_id, status)

        def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
            self._end(trial, "FINISHED")

        def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
            self._end(trial, "FAILED")

    cb = MlflowTrials()
    cb.runs = {}
    return cb


def _param_space(space: TuneSpace) -> dict:
    from ray import tune

    out = {}
    for p in space.params:
        if p.dist == "uniform":
            out[p.name] = tune.uniform(p.low, p.high)
        elif p.dist == "loguniform":
            out[p.name] = tune.loguniform(p.low, p.high)
        elif p.dist == "int":
            out[p.name] = tune.randint(int(p.low), int(p.high) + 1)
        elif p.dist == "choice":
            out[p.name] = tune.choice(list(p.values))
        else:
            out[p.name] = tune.grid_search(list(p.values))
    return out


def run_study(space: TuneSpace, root: str | Path, address: str | None = None, tracking_uri: str | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Run the study; returns a summary (best trial, its values, the preset file, trial statuses)."""
    import mlflow
    import yaml
    from mlflow import MlflowClient
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydistill.orchestration.runtime import ray_session
    from raydistill.orchestration.tracking import EXPERIMENT, _quiet, default_tracking_uri, set_experiment
    from raydistill.outputs import atomic_write_text

    tracking_uri = tracking_uri or default_tracking_uri(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    study_dir = (Path(root) / "tune" / f"{space.name}-{stamp}").resolve()
    study_dir.mkdir(parents=True, exist_ok=True)
    epochs = space.eval_epochs()
    _quiet()
    exp = set_experiment(tracking_uri, EXPERIMENT)
    base = space.base_config()
    with mlflow.start_run(run_name=f"study-{space.name}-{stamp}",
                          tags={"kind": "study", "study": space.name, "method": base.method,
                                "dataset": base.dataset}) as parent:
        mlflow.log_params({f"space.{k}": str(v)[:6000] for k, v in {
            "file": space.path, "params": [p.__dict__ for p in space.params], "metric": space.metric,
            "num_samples": space.num_samples, "time_budget_s": space.time_budget_s, "scheduler": space.scheduler,
            "eval_every": space.eval_every, "eval_epochs": epochs, "cpu": space.cpu, "gpu": space.gpu}.items()})
        mlflow.log_artifact(space.path)
        sched = _scheduler(space, epochs)
        cb = _callback(space, str(study_dir), tracking_uri, exp.experiment_id, parent.info.run_id, sched)
        trainable = tune.with_resources(tune.with_parameters(_trial, space=space, study_dir=str(study_dir)),
                                        {"cpu": space.cpu, "gpu": space.gpu})
        log(f"study {space.name}: {space.num_samples} trials of {base.method} (IPC {base.ipc}, "
            f"{len(base.classes or ()) or 'all'} classes, {epochs} eval epochs), scheduler {space.scheduler['name']}, "
            f"budget {space.time_budget_s or 'none'} s -> {study_dir}")
        t0 = time.time()
        with ray_session(address):
            tuner = tune.Tuner(trainable, param_space=_param_space(space), tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=sched,
                search_alg=BasicVariantGenerator(random_state=space.seed, max_concurrent=space.max_concurrent),
                reuse_actors=True, time_budget_s=space.time_budget_s),
                run_config=tune.RunConfig(name=f"{space.name}-{stamp}", storage_path=str(study_dir / "ray"),
                                          callbacks=[cb], verbose=0))
            grid = tuner.fit()
            rows = []
            for r in grid:
                m, conf = r.metrics or {}, r.config or {}
                rows.append({"trial_id": m.get("trial_id"), "values": {p.name: conf.get(p.name) for p in space.params},
                             space.metric: m.get(space.metric), "epoch": m.get("epoch"),
                             "completed": bool(m.get("completed")), "error": r.error is not None})
            done = [r for r in rows if r["completed"] and r[space.metric] is not None]
            confirmation = run_confirmation(space, done, study_dir, log) if done and space.confirm_top else []
        summary = {"study": space.name, "space_file": space.path, "dir": str(study_dir), "seconds": time.time() - t0,
                   "trials": rows, "parent_run_id": parent.info.run_id, "early_stopped": sorted(sched.stopped)}
        if done:
            best = (max if space.mode == "max" else min)(done, key=lambda r: r[space.metric])
            proxy = (f"{space.metric} {best[space.metric]:.2f} at IPC {base.ipc} on classes "
                     f"{list(base.classes or []) or 'all'}, {epochs} eval epochs")
            chosen = confirmed_best(space, confirmation)
            preset = study_dir / "best.yaml"
            if confirmation:
                log_confirmation(MlflowClient(tracking_uri), exp.experiment_id, parent.info.run_id, space,
                                 confirmation)
                summary.update(confirm=confirmation)
            if chosen is None:
                failed = " (its confirmation failed: see the log)" if confirmation else ""
                header = f"# best of study {space.name} ({space.path}): trial {best['trial_id']}, {proxy}{failed}\n"
            else:
                proposed = study_dir / "proposed.yaml"
                atomic_write_text(proposed, f"# the search's best of study {space.name}: trial {best['trial_id']}, "
                                  f"{proxy}\n" + yaml.safe_dump(best_preset(space, best["values"]), sort_keys=False))
                mlflow.log_artifact(str(proposed))
                scores = "; ".join(f"{c['label']} {c['accuracy']:.2f}" if "accuracy" in c else f"{c['label']} failed"
                                   for c in confirmation)
                header = (f"# confirmed best of study {space.name} ({space.path}): {chosen['label']}, "
                          f"{space.metric} {chosen['accuracy']:.2f} on the full protocol ({scores}); the search "
                          f"proposed trial {best['trial_id']} ({proxy}, proposed.yaml)\n")
                mlflow.log_metric(f"confirmed_{space.metric}", chosen["accuracy"])
                mlflow.log_params({"confirmed.label": chosen["label"],
                                   **{f"confirmed.{k}": str(v) for k, v in chosen["values"].items()}})
                summary.update(confirmed=chosen, proposed=str(proposed))
            header += f"# use: raydistill distill --preset {preset}\n"
            values = best["values"] if chosen is None else chosen["values"]
            atomic_write_text(preset, header + yaml.safe_dump(best_preset(space, values), sort_keys=False))
            mlflow.log_artifact(str(preset))
            mlflow.log_metric(f"best_{space.metric}", best[space.metric])
            mlflow.log_params({f"best.{k}": str(v) for k, v in best["values"].items()})
            summary.update(best=best, preset=str(preset))
        mlflow.log_metrics({"trials": len(rows), "trials_completed": len(done),
                            "trials_early_stopped": len(sched.stopped), "seconds": summary["seconds"]})
        atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    errors = [r.error for r in grid if r.error is not None]
    if rows and len(errors) == len(rows):  # nothing ran: say why once instead of printing an empty table
        from raydistill.errors import UserError
        from raydistill.orchestration.runtime import user_error_in

        ue = user_error_in(errors[0])
        first = ue.problem if ue is not None else str(errors[0]).strip().splitlines()[-1]
        fix = ue.fix if ue is not None and ue.fix else "fix the space"
        raise UserError(f"all {len(rows)} trials of study {space.name} failed; the first: {first}",
                        f"{fix} (trial logs: {study_dir / 'ray'})")
    return summary


def format_summary(summary: dict, metric: str) -> str:
    """The study's trials as a table, best first."""
    rows = sorted(summary["trials"], key=lambda r: (not r["completed"], -(r[metric] or -1e9)))
    lines = [f"{'trial':<12} {'status':<14} {metric:>9} {'epoch':>6}  values"]
    for r in rows:
        status = "error" if r["error"] else "completed" if r["completed"] else "early_stopped"
        acc = "-" if r[metric] is None else f"{r[metric]:.2f}"
        vals = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["values"].items())
        lines.append(f"{str(r['trial_id']):<12} {status:<14} {acc:>9} {str(r['epoch']):>6}  {vals}")
    if summary.get("confirm"):
        lines.append(f"confirmed on the full protocol ({metric}; the best of them is best.yaml):")
        for c in summary["confirm"]:
            proxy = "-" if c["proxy"] is None else f"{c['proxy']:.2f}"
            full = c.get("error") or f"{c['accuracy']:.2f}  nets " + ", ".join(f"{a:.2f}" for a in c["nets"])
            lines.append(f"  {c['label']:<20} proxy {proxy:>7}  full {full}")
    if summary.get("proposed"):
        lines.append(f"the search's best: {summary['proposed']}")
    if summary.get("preset"):
        lines.append(f"best configuration: {summary['preset']}")
    return "\n".join(lines)
