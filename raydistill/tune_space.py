"""Search spaces for ``raydistill tune``: a YAML file per method, loaded and checked here (no Ray import).

A space file has these sections (see ``tune_spaces/*.yaml``)::

    name: igd                      # study name (MLflow parent run, output folder)
    config: {method: igd, ipc: 10, classes: [...], eval_preset: dc, eval_epochs: 100, num_evals: 1, ...}
    params:                        # searched; a DistillConfig field name, else a method parameter (config extra)
      igd_scale: {dist: uniform, low: 1, high: 20}
      igd_gamma: {dist: loguniform, low: 1, high: 200}
    metric: {name: accuracy, mode: max}
    budget: {num_samples: 8, time_budget_s: 1800, max_concurrent: 2, seed: 0}
    scheduler: {name: asha, grace_period: 25, reduction_factor: 2}   # or median / fifo
    evaluation: {eval_every: 25}   # test interval (epochs) = the early-stopping points
    resources: {cpu: 1, gpu: 0}    # per trial; fractional GPUs share one device
    confirm: {top: 2, defaults: true, config: {num_evals: 1}}   # optional: re-run the best on the full protocol

``confirm`` (:mod:`raydistill.orchestration.tune_confirm`): after the search, the ``top`` best completed trials and,
with ``defaults``, the fixed config alone are distilled and evaluated again with ``config`` over the study shortcuts
(default ``{classes: null, eval_epochs: null, num_evals: 1}``: every class, the preset's epochs, one net); the best
of them is ``best.yaml``. ``top: 0`` (or no section) keeps the proxy's winner.

Distributions: ``uniform``/``loguniform`` (low, high), ``int`` (low..high inclusive), ``choice`` (values) and ``grid``
(values: every value is tried, ``num_samples`` times). Every mistake raises one :class:`UserError` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from raydistill.config import DistillConfig
from raydistill.errors import UserError

DISTS = ("uniform", "loguniform", "int", "choice", "grid")
SCHEDULERS = ("asha", "median", "fifo")
SECTIONS = ("name", "description", "config", "params", "metric", "budget", "scheduler", "evaluation", "resources",
            "confirm")
CONFIG_FIELDS = {f.name for f in fields(DistillConfig)}
TRIAL_ONLY = ("out", "classes", "eval_epochs", "num_evals")  # study shortcuts, not part of a best preset
FULL_PROTOCOL = {"classes": None, "eval_epochs": None, "num_evals": 1}  # confirm.config's default


@dataclass(frozen=True)
class Param:
    """One searched parameter: ``dist`` with ``low``/``high`` or ``values``."""

    name: str
    dist: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()

    @property
    def is_field(self) -> bool:
        """True for a DistillConfig field (``cfg_scale``), False for a method parameter (``extra``)."""
        return self.name in CONFIG_FIELDS and self.name != "extra"


@dataclass(frozen=True)
class TuneSpace:
    """A loaded, checked search space."""

    name: str
    path: str
    config: dict[str, Any]
    params: tuple[Param, ...]
    metric: str = "accuracy"
    mode: str = "max"
    num_samples: int = 8
    time_budget_s: float | None = None
    max_concurrent: int = 1
    seed: int = 0
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    eval_every: int = 0
    cpu: float = 1.0
    gpu: float = 0.0
    description: str = ""
    confirm_top: int = 0
    confirm_defaults: bool = True
    confirm_config: dict[str, Any] = field(default_factory=lambda: dict(FULL_PROTOCOL))

    def base_config(self) -> DistillConfig:
        """The study's fixed settings as a DistillConfig (searched values are filled in per trial)."""
        return DistillConfig.from_dict(self.config)

    def trial_config(self, values: dict[str, Any]) -> DistillConfig:
        """The config of one trial: the fixed settings plus the sampled ``values`` (fields or ``extra``)."""
        return apply_values(self.base_config(), values)

    def confirm_trial_config(self, values: dict[str, Any], out: str | None = None) -> DistillConfig:
        """A trial's config on the full protocol: its ``values``, then ``confirm.config`` over the study shortcuts."""
        return DistillConfig.from_dict({**self.trial_config(values).to_dict(), **self.confirm_config, "out": out})

    def eval_epochs(self) -> int:
        """Evaluation epochs of a trial (the space's ``eval_epochs``, else the preset's)."""
        from raydistill.evaluate.presets import get_preset, resolve_epochs

        cfg = self.base_config()
        return resolve_epochs(get_preset(cfg.eval_preset), cfg.ipc, len(cfg.classes or ()) or 10, cfg.eval_epochs)


def apply_values(cfg: DistillConfig, values: dict[str, Any]) -> DistillConfig:
    """``cfg`` with searched ``values``: DistillConfig fields replaced, other names put in ``extra``."""
    top = {k: v for k, v in values.items() if k in CONFIG_FIELDS and k != "extra"}
    extra = {k: v for k, v in values.items() if k not in top}
    return cfg.with_(**top, extra={**cfg.extra, **extra})


def best_preset(space: TuneSpace, values: dict[str, Any]) -> dict[str, Any]:
    """The best trial as a ``distill --preset`` mapping: fixed settings minus study shortcuts, plus ``values``."""
    cfg = space.trial_config(values).to_dict()
    out = {k: v for k, v in cfg.items() if k not in TRIAL_ONLY and v is not None}
    for k, v in list(out.items()):
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# loading and checking


def _fail(path: Path, problem: str, fix: str) -> UserError:
    return UserError(f"search space {path}: {problem}", fix)


def _number(path: Path, where: str, v: Any, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise _fail(path, f"{where} must be a {'positive ' if positive else ''}number, got {v!r}", f"fix {where}")
    return float(v)


def _param(path: Path, name: str, spec: Any) -> Param:
    where = f"params.{name}"
    if name == "extra" or not isinstance(name, str):
        raise _fail(path, f"bad parameter name {name!r}", "name a config field or a method parameter")
    if not isinstance(spec, dict) or spec.get("dist") not in DISTS:
        raise _fail(path, f"{where} needs dist: one of {', '.join(DISTS)}", "e.g. {dist: uniform, low: 1, high: 20}")
    dist = spec["dist"]
    allowed = {"dist", "values"} if dist in ("choice", "grid") else {"dist", "low", "high"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise _fail(path, f"{where} has unknown key(s) {', '.join(unknown)} for dist {dist}",
                    f"use {', '.join(sorted(allowed))}")
    if dist in ("choice", "grid"):
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise _fail(path, f"{where} ({dist}) needs a non-empty list of values", "e.g. values: [10, 25, 40]")
        return Param(name, dist, values=tuple(values))
    low = _number(path, f"{where}.low", spec.get("low"))
    high = _number(path, f"{where}.high", spec.get("high"))
    if low > high or (dist == "loguniform" and low <= 0):
        raise _fail(path, f"{where} has low {low:g} and high {high:g}",
                    "use low <= high (and low > 0 for loguniform)")
    if dist == "int" and (low != int(low) or high != int(high)):
        raise _fail(path, f"{where} (int) needs integer bounds", "use whole numbers for low and high")
    if dist == "int":
        return Param(name, dist, int(low), int(high))
    return Param(name, dist, low, high)


def _section(path: Path, data: dict, key: str, allowed: set[str]) -> dict:
    sec = data.get(key) or {}
    if not isinstance(sec, dict):
        raise _fail(path, f"{key} must be a mapping", f"see tune_spaces/igd.yaml for the {key} section")
    bad = sorted(set(sec) - allowed)
    if bad:
        raise _fail(path, f"unknown key(s) in {key}: {', '.join(bad)}", f"use {', '.join(sorted(allowed))}")
    return sec


def load_space(path: str | Path, overrides: dict[str, Any] | None = None) -> TuneSpace:
    """Load and check a space file; ``overrides`` (``--set``) replace entries of its ``config`` section."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"search space not found: {p}", "pass a YAML file such as tune_spaces/igd.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise _fail(p, f"not valid YAML ({str(e).splitlines()[0]})", "fix its syntax") from e
    if not isinstance(data, dict):
        raise _fail(p, "must hold a mapping of sections", f"use the sections {', '.join(SECTIONS)}")
    bad = sorted(set(data) - set(SECTIONS))
    if bad:
        raise _fail(p, f"unknown section(s) {', '.join(bad)}", f"use {', '.join(SECTIONS)}")
    config = dict(data.get("config") or {})
    if not isinstance(data.get("config"), dict) or "method" not in config:
        raise _fail(p, "config must be a mapping that names the method", "add config: {method: igd, ...}")
    for k, v in (overrides or {}).items():
        if k in CONFIG_FIELDS:
            config[k] = v
        else:
            config["extra"] = {**(config.get("extra") or {}), k: v}
    raw_params = data.get("params")
    if not isinstance(raw_params, dict) or not raw_params:
        raise _fail(p, "params must map at least one parameter to its distribution",
                    "e.g. params: {igd_scale: {dist: uniform, low: 1, high: 20}}")
    params = tuple(_param(p, str(k), v) for k, v in raw_params.items())
    metric = _section(p, data, "metric", {"name", "mode"})
    budget = _section(p, data, "budget", {"num_samples", "time_budget_s", "max_concurrent", "seed"})
    sched = _section(p, data, "scheduler", {"name", "grace_period", "reduction_factor", "min_samples_required"})
    evaluation = _section(p, data, "evaluation", {"eval_every"})
    res = _section(p, data, "resources", {"cpu", "gpu"})
    confirm = _section(p, data, "confirm", {"top", "defaults", "config"})
    mode = metric.get("mode", "max")
    if mode not in ("max", "min"):
        raise _fail(p, f"metric.mode must be max or min, got {mode!r}", "use max for accuracy")
    if sched.get("name", "asha") not in SCHEDULERS:
        raise _fail(p, f"unknown scheduler {sched.get('name')!r}", f"use one of {', '.join(SCHEDULERS)}")
    for k in ("grace_period", "reduction_factor", "min_samples_required"):
        if k in sched:
            _number(p, f"scheduler.{k}", sched[k], positive=True)
    n = budget.get("num_samples", 8)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise _fail(p, f"budget.num_samples must be a positive integer, got {n!r}", "e.g. num_samples: 12")
    conc = budget.get("max_concurrent", 1)
    if isinstance(conc, bool) or not isinstance(conc, int) or conc < 1:
        raise _fail(p, f"budget.max_concurrent must be a positive integer, got {conc!r}", "e.g. max_concurrent: 2")
    every = evaluation.get("eval_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise _fail(p, f"evaluation.eval_every must be an integer >= 0, got {every!r}", "e.g. eval_every: 25")
    budget_s = budget.get("time_budget_s")
    top = confirm.get("top", 0)
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise _fail(p, f"confirm.top must be an integer >= 0, got {top!r}", "e.g. top: 2 (0: no confirmation)")
    if not isinstance(confirm.get("defaults", True), bool):
        raise _fail(p, f"confirm.defaults must be true or false, got {confirm['defaults']!r}", "e.g. defaults: true")
    full = confirm.get("config") or {}
    if not isinstance(full, dict):
        raise _fail(p, "confirm.config must be a mapping of config keys", "e.g. config: {num_evals: 2}")
    bad = sorted(k for k in full if k not in CONFIG_FIELDS or k in ("out", "extra", "method")
                 or k in {q.name for q in params})
    n_full = full.get("num_evals", 1)
    if isinstance(n_full, bool) or not isinstance(n_full, int) or n_full < 1:
        raise _fail(p, f"confirm.config.num_evals must be an integer >= 1, got {n_full!r}",
                    "e.g. num_evals: 1 (each contender's nets train from the same seeds)")
    if bad:
        raise _fail(p, f"confirm.config cannot set {', '.join(map(str, bad))}",
                    "give it evaluation settings (classes, eval_epochs, num_evals, eval_preset, ...), not searched "
                    "parameters, method or out")
    space = TuneSpace(
        name=str(data.get("name") or p.stem), path=str(p), config=config, params=params,
        metric=str(metric.get("name", "accuracy")), mode=mode, num_samples=n,
        time_budget_s=None if budget_s is None else _number(p, "budget.time_budget_s", budget_s, positive=True),
        max_concurrent=conc, seed=int(budget.get("seed", 0)), scheduler={"name": "asha", **sched},
        eval_every=every, cpu=_number(p, "resources.cpu", res.get("cpu", 1), positive=True),
        gpu=_number(p, "resources.gpu", res.get("gpu", 0)), description=str(data.get("description") or ""),
        confirm_top=top, confirm_defaults=confirm.get("defaults", True), confirm_config={**FULL_PROTOCOL, **full})
    first = {q.name: (q.values[0] if q.values else q.low) for q in params}
    try:
        space.trial_config(first)
    except UserError as e:
        raise _fail(p, f"config: {e.problem}", e.fix or "fix the config section") from None
    try:
        space.confirm_trial_config(first)
    except UserError as e:
        raise _fail(p, f"confirm.config: {e.problem}", e.fix or "fix the confirm section") from None
    return space
