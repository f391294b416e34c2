"""A set's ``metrics.json``: the sampling figures of the run that made its images and every evaluation it had.

Evaluations accumulate, keyed by (preset, net, seed, epochs) and, for a soft-label preset (``rded``), the teacher's
content hash (:func:`eval_key`): a rerun with another preset, epoch count or teacher adds its results next to the
earlier ones, and a rerun that asks for a key already there with the same number of nets reuses it instead of training
again. ``images_per_s`` and ``seconds_sample`` are those of the run that sampled images; a rerun that only resumed
finished shards keeps them. A rerun with nothing to add (finished set, every
asked evaluation present) writes nothing and logs no MLflow run (:func:`has_work`), so it also works on a read-only
output root. ``metrics`` holds the flat view of the current settings that the MLflow run logs
(``acc_<preset>_<net>_mean``/``_std``, as tune trials do; the epochs are in the run's params) and, for a soft-label
preset, ``teacher_test_acc``; :func:`label_params` and :func:`teacher_net_param` are the run's label-mode params.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from raydistill.config import DistillConfig
from raydistill.errors import UserError
from raydistill.outputs import MANIFEST, atomic_write_text

METRICS = "metrics.json"


def eval_key(preset: str, net: str, seed: int, epochs: int | None, precision: str = "fp32") -> str:
    """``dc/convnet/seed0/full``; an evaluation in another precision than the protocols' fp32 is kept apart
    (``.../full/bf16``)."""
    key = f"{preset}/{net}/seed{seed}/{'full' if epochs is None else f'{epochs}ep'}"
    return key if precision == "fp32" else f"{key}/{precision}"


def _key(c: DistillConfig, net: str) -> str:
    """:func:`eval_key` of ``c``, plus ``/teacher-<sha256[:12]>`` for a soft-label preset: evaluations with two
    teachers (or a retrained one at the same path) never share an entry."""
    key = eval_key(c.eval_preset, net, c.seed, c.eval_epochs, c.eval_precision)
    teacher = soft_teacher(c)
    return key if teacher is None else f"{key}/teacher-{_sha256(teacher)[:12]}"


def soft_teacher(c: DistillConfig) -> Path | None:
    """The teacher checkpoint of ``c``'s evaluation (``--teacher``, else the built-in one for Fashion-MNIST), or None
    for a hard-label preset. A soft preset without a usable path is one UserError line."""
    from raydistill.evaluate.presets import get_preset
    from raydistill.evaluate.soft_label import teacher_path
    from raydistill.evaluate.teacher import require_checkpoint

    preset = get_preset(c.eval_preset)
    if preset.labels != "soft":
        return None
    return require_checkpoint(teacher_path(get_preset(preset, teacher=c.teacher) if c.teacher else preset, c.dataset))


def _sha256(path: Path) -> str:
    st = path.stat()
    return _sha256_cached(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    from raydistill.evaluate.teacher import file_sha256

    return file_sha256(path)


def label_params(c: DistillConfig) -> dict[str, str]:
    """MLflow params of ``c``'s label mode: ``label_mode`` (hard/soft) and, when soft, ``teacher`` (the path used)
    and ``teacher_sha256``."""
    teacher = soft_teacher(c)
    if teacher is None:
        return {"label_mode": "hard"}
    return {"label_mode": "soft", "teacher": str(teacher), "teacher_sha256": _sha256(teacher)}


def teacher_net_param(c: DistillConfig, content: dict) -> dict[str, str]:
    """``teacher_net`` of ``c``'s stored soft-label evaluations (the architecture read from the checkpoint); {} when
    hard."""
    nets = sorted({e["teacher_net"] for e in current_evals(c, content).values() if e.get("teacher_net")})
    return {"teacher_net": ",".join(nets)} if nets else {}


def read_results(out: str | Path) -> dict:
    """``{"sampling": {...}, "evals": {key: result}, "coverage": dict | None}`` of ``out/metrics.json`` (empty when
    there is none yet)."""
    p = Path(out) / METRICS
    if not p.exists():
        return {"sampling": {}, "evals": {}, "coverage": None}
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("evals", {}), dict):
        raise UserError(f"{p} is corrupt", "delete it (its evaluations are then run again)")
    return {"sampling": dict(data.get("sampling") or {}), "evals": dict(data.get("evals") or {}),
            "coverage": data.get("coverage")}


def missing_evals(c: DistillConfig, results: dict) -> list[str]:
    """The nets of ``c`` whose evaluation (key and number of nets) is not in ``results`` yet."""
    if c.num_evals == 0:
        return []
    have = results["evals"]
    return [net for net in c.eval_nets
            if have.get(_key(c, net), {}).get("num_nets") != c.num_evals]


def needs_coverage(c: DistillConfig, results: dict) -> bool:
    return bool(c.coverage) and c.num_evals > 0 and results["coverage"] is None


def set_finished(c: DistillConfig) -> bool:
    """The set of ``c`` is complete (its manifest written) with ``c``'s generation settings. Reads only."""
    out = Path(c.out)
    try:
        run = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(run, dict) and run.get("fingerprint") == c.fingerprint() and (out / MANIFEST).is_file()


def has_work(c: DistillConfig, results: dict) -> bool:
    """Whether a run of ``c`` changes anything: images to make, evaluations or coverage to add, or the results of a
    job killed before it wrote them (``metrics.json`` is written last, after the MLflow run finished)."""
    return (not set_finished(c) or bool(missing_evals(c, results)) or needs_coverage(c, results)
            or not (Path(c.out) / METRICS).is_file())


def merged(c: DistillConfig, results: dict, sampled: tuple[float, float, int], new_evals: dict[str, dict],
           coverage: dict | None, eval_secs: float) -> dict:
    """The new content of ``metrics.json``: ``results`` plus this run's sampling (when it made images), evaluations
    and coverage, and the flat ``metrics`` of ``c``'s settings."""
    rate, secs, shards_run = sampled
    sampling = results["sampling"]
    if shards_run or not sampling:
        sampling = {"images_per_s": rate, "seconds_sample": secs}
    evals = dict(results["evals"])
    for net, e in new_evals.items():
        evals[_key(c, net)] = {
            **e, "preset": c.eval_preset, "net": net, "seed": c.seed, "epochs": c.eval_epochs,
            "precision": c.eval_precision}
    coverage = coverage if coverage is not None else results["coverage"]
    metrics = dict(sampling)
    if new_evals:
        metrics["seconds_eval"] = eval_secs
    if coverage is not None:
        metrics.update({"mode_coverage": coverage["mode_coverage"], "mode_distance": coverage["mode_distance"]})
        metrics.update({k: v for k, v in (coverage.get("generator") or {}).items() if not k.endswith("_k")})
    for net, e in current_evals(c, {"evals": evals}).items():
        key = f"acc_{c.eval_preset}_{net}"
        metrics.update({f"{key}_mean": e["reported_mean"], f"{key}_std": e["reported_std"]})
        if e.get("teacher_test_acc") is not None:  # soft labels: the teacher's accuracy on the same test images
            metrics["teacher_test_acc"] = e["teacher_test_acc"]
    return {"metrics": metrics, "sampling": sampling, "evals": dict(sorted(evals.items())), "coverage": coverage}


def current_evals(c: DistillConfig, results: dict) -> dict[str, dict]:
    """net -> the stored evaluation of ``c``'s preset, seed and epochs (the nets that have one)."""
    found = {net: results["evals"].get(_key(c, net)) for net in c.eval_nets}
    return {net: e for net, e in found.items() if e is not None}


def write_results(out: str | Path, content: dict) -> str:
    """Write ``metrics.json`` (only when its bytes change); returns its text."""
    text = json.dumps(content, indent=1)
    atomic_write_text(Path(out) / METRICS, text)
    return text
