"""Expected accuracy bands: a paper cell's published figure, or the built-in model's own measured band (issue 24).

Two sources, one :class:`Band` (docs/REPRODUCE.md):

- **published** (a ``published:`` block of ``jobs/configs/paper/*.yaml``, the figures of spec benchmarks.md section 2
  and methods.md): band = published mean +- max(published std, :data:`PUBLISHED_MIN_HALFWIDTH`). The floor is 2.0
  points because the papers' +- is the spread of a few trainings on one set (Minimax issue 6: 38.2 / 36.4 / 37.0 on
  the same images) and many cells print no +- at all.
- **built-in** (``raydistill/presets/bands.yaml``, docs/BENCHMARKS.md's measurements on the shipped Fashion-MNIST
  model): band = mean +- max(2 std, :data:`BUILTIN_MIN_HALFWIDTH`), std over the measured nets. The file is keyed by
  the sha256 of the shipped DiT weights, so a retrained model gets "no band measured for this model" rather than
  false warnings; the random real subset keeps its band (neither the DiT nor the VAE chooses it; herding's choice
  uses the VAE's latents, so its band goes with the model).

The distill table prints the band next to each accuracy and warns outside it; the MLflow run carries it as the tag
``expected.<net>`` (JSON) so ``raydistill compare`` shows published vs measured.
"""

from __future__ import annotations

import functools
import json
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raydistill.config import BUILTIN_MODEL, DistillConfig, check_cfg_interval, file_sha256
from raydistill.errors import UserError

PUBLISHED_MIN_HALFWIDTH = 2.0
BUILTIN_STD_FACTOR = 2.0
BUILTIN_MIN_HALFWIDTH = 1.0
BANDS_FILE = Path(__file__).parent / "presets" / "bands.yaml"
BUILTIN_WEIGHTS = BUILTIN_MODEL / "dit" / "diffusion_pytorch_model.safetensors"
NO_MODEL_BAND = "no band measured for this model"
NO_SETTINGS_BAND = "no band measured for these settings"
REAL_METHODS = ("random", "herding")  # real-image baselines: the generator settings do not change them
IGNORED_EXTRA = ("igd_cache", "modes_cache")  # where caches live, not what is made

# key -> (types, required); "accuracy" and "std" are percent.
_PUBLISHED_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    "accuracy": ((numbers.Real,), True), "std": ((numbers.Real, type(None)), False), "net": ((str,), True),
    "runs": ((int,), False), "reruns": ((list,), False), "source": ((str,), True), "status": ((str,), False),
    "note": ((str,), False), "finetune": ((dict,), False)}  # finetune: the `raydistill finetune` recipe


@dataclass(frozen=True)
class Band:
    """An expected accuracy interval [low, high] (percent) and where it comes from."""

    kind: str  # "published" or "builtin"
    mean: float
    std: float | None
    low: float
    high: float
    source: str
    reruns: tuple[float, ...] = ()
    nets: int | None = None  # nets behind a built-in band

    def verdict(self, acc: float) -> str:
        return "below" if acc < self.low else "above" if acc > self.high else "in"

    def text(self) -> str:
        """'43.3 +- 0.3 [41.3, 45.3] reruns 35.6/35.8' (published), '69.45 +- 0.42 [68.45, 70.45] 5 nets', or
        '80.53 [79.53, 81.53] 1 net' (one net has no spread to print)."""
        fmt = ".2f" if self.kind == "builtin" else "g"  # built-in figures have two decimals: 73.00, not 73
        pm = "" if self.std is None or self.nets == 1 else f" +- {self.std:{fmt}}"
        tail = (f" reruns {'/'.join(f'{r:g}' for r in self.reruns)}" if self.reruns else
                f" {self.nets} net{'s' * (self.nets != 1)}" if self.nets else "")
        return f"{self.mean:{fmt}}{pm} [{self.low:.2f}, {self.high:.2f}]{tail}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, s: str) -> Band:
        d = json.loads(s)
        return cls(**{**d, "reruns": tuple(d.get("reruns") or ())})


def check_published(p: Mapping[str, Any]) -> None:
    """A ``published:`` block: one UserError naming the first bad key (see :data:`_PUBLISHED_KEYS`)."""
    fix = "published: needs accuracy, net and source (optional std, runs, reruns, status, note, finetune)"
    for key in p:
        if key not in _PUBLISHED_KEYS:
            raise UserError(f"unknown published key {key!r}", fix)
    for key, (types, required) in _PUBLISHED_KEYS.items():
        if key not in p:
            if required:
                raise UserError(f"published block lacks {key!r}", fix)
            continue
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, types):
            raise UserError(f"published {key} has the wrong type: {v!r}", fix)
    if not all(isinstance(r, numbers.Real) and not isinstance(r, bool) for r in p.get("reruns", [])):
        raise UserError(f"published reruns must be numbers, got {p['reruns']!r}", fix)


def published_band(p: Mapping[str, Any]) -> Band:
    """Published mean +- max(std, 2.0)."""
    check_published(p)
    mean, std = float(p["accuracy"]), (None if p.get("std") is None else float(p["std"]))
    half = max(std or 0.0, PUBLISHED_MIN_HALFWIDTH)
    return Band("published", mean, std, round(mean - half, 2), round(mean + half, 2), p["source"],
                tuple(float(r) for r in p.get("reruns", [])))


def builtin_model_id(weights: Path = BUILTIN_WEIGHTS) -> str | None:
    """sha256 of the shipped DiT weights (None when they are missing)."""
    return file_sha256(weights) if weights.is_file() else None


@functools.lru_cache(maxsize=2)
def load_bands(path: Path = BANDS_FILE) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text())


def is_builtin(cfg: DistillConfig) -> bool:
    """The built-in default: Fashion-MNIST with the shipped model, all classes, full evaluation, seed 0."""
    return (cfg.dataset in ("fashion-mnist", "fmnist") and cfg.model is None and cfg.vae is None
            and cfg.classes is None and cfg.image_size is None and cfg.eval_epochs is None and cfg.seed == 0)


def _norm_extra(extra: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in IGNORED_EXTRA and defaults.get(k, object()) != v}


def builtin_band(cfg: DistillConfig, net: str, table: Mapping[str, Any] | None = None,
                 model_id: str | None = None) -> Band | str:
    """The band of bands.yaml that matches ``cfg`` (method, IPC, preset, CFG scale, method parameters) and ``net``,
    or the reason there is none."""
    table = load_bands() if table is None else table
    model_id = builtin_model_id() if model_id is None else model_id
    real = cfg.method in REAL_METHODS
    if model_id != table["model_sha256"] and cfg.uses_model():  # a set no model chooses keeps its band
        return NO_MODEL_BAND
    defaults = table.get("extra_defaults", {})
    mine = _norm_extra({k: v for k, v in cfg.extra.items() if not real or k == "herding_pool"}, defaults)
    for b in table["bands"]:
        if (b["method"], b["ipc"], b["preset"], b.get("net", "convnet")) != (cfg.method, cfg.ipc, cfg.eval_preset, net):
            continue
        interval = check_cfg_interval(b["cfg_interval"]) if "cfg_interval" in b else None  # YAML list -> pair
        if not real and (float(b.get("cfg_scale", 4.0)) != float(cfg.cfg_scale) or cfg.steps != 50
                         or cfg.sampler != "ddpm" or cfg.cfg_channels is not None or interval != cfg.cfg_interval):
            continue
        if _norm_extra(b.get("extra", {}), defaults) != mine:
            continue
        mean, std = float(b["mean"]), float(b["std"])
        half = max(BUILTIN_STD_FACTOR * std, BUILTIN_MIN_HALFWIDTH)
        return Band("builtin", mean, std, round(mean - half, 2), round(mean + half, 2),
                    f"docs/BENCHMARKS.md section {b['section']}", nets=int(b["nets"]))
    return NO_SETTINGS_BAND


def expected(cfg: DistillConfig, net: str) -> Band | str:
    """What ``cfg``'s accuracy with ``net`` should be: its published cell, the built-in band, or why neither
    ("" when no expectation applies, e.g. an ImageNet run without a paper config)."""
    if cfg.published:
        if str(cfg.published["net"]).lower() != net.lower():
            return f"published for {cfg.published['net']}"
        return published_band(cfg.published)
    return builtin_band(cfg, net) if is_builtin(cfg) else ""


def expected_tags(cfg: DistillConfig) -> dict[str, str]:
    """MLflow tags ``expected.<net>``: the band as JSON, or the reason there is none."""
    out = {}
    for net in cfg.eval_nets:
        e = expected(cfg, net)
        if e:
            out[f"expected.{net}"] = e.to_json() if isinstance(e, Band) else e
    return out


def judge(acc: float, e: Band | str) -> tuple[str, str | None]:
    """(table cell, warning or None) for a measured accuracy against its expectation."""
    if not isinstance(e, Band):
        return (e or "-"), None
    v = e.verdict(acc)
    cell = f"{e.text()}{'' if v == 'in' else ' OUTSIDE'}"
    if v == "in":
        return cell, None
    what = "the published" if e.kind == "published" else "the band measured for the built-in model,"
    hint = (": a broken install or a changed dependency?" if e.kind == "builtin" else
            (" (independent reruns: " + ", ".join(f"{r:g}" for r in e.reruns) + ")" if e.reruns else ""))
    return cell, f"{acc:.2f} is {v} {what} {e.text()} ({e.source}){hint}"


def judge_reports(sets: Mapping[str, DistillConfig], reports) -> tuple[dict[tuple[str, str], str], list[str]]:
    """The distill table's ``expected`` cells by (method, net), and one warning per result outside its band.

    Args:
        sets: method -> the config of its set (``orchestration.distill_job.set_configs``).
        reports: the job's ``SetReport`` list (``evals``: net -> result dict with ``reported_mean``).
    """
    cells, warnings = {}, []
    for r in reports:
        for net, e in r.evals.items():
            cells[r.method, net], warning = judge(e["reported_mean"], expected(sets[r.method], net))
            if warning:
                warnings.append(f"{r.method} IPC {r.ipc} {net}: {warning}")
    return cells, warnings


def expected_of_run(row: Mapping[str, Any], net: str | None) -> Band | str:
    """The ``expected.<net>`` tag of an MLflow run (a pandas row of ``mlflow.search_runs``), parsed."""
    v = row.get(f"tags.expected.{net}") if net else None
    if not isinstance(v, str) or not v:
        return ""
    return Band.from_json(v) if v.startswith("{") else v
