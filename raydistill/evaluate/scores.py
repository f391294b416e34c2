"""DD-Ranking's robustness scores of a distilled set (benchmarks.md section 4), computed in the right units.

Inputs are test accuracies in **percent** (what every raydistill evaluation reports):

- HLR (hard label recovery) = real_hard - syn_hard, in percentage points: how far the set's hard-label accuracy is
  below training on the whole real training set (lower is better).
- IOR (improvement over random) = syn_soft - random_soft, in percentage points: the set's gain over a random real
  subset of the same size under the same (soft-label) protocol (higher is better).
- LRS (label-robust score) = (e^a - e^-1) / (e - e^-1), a = lam IOR - (1 - lam) HLR, lam = 0.5, with HLR and IOR as
  **fractions** (pp / 100), so a lies in [-1, 1] and LRS in [0, 1] (a = 0, i.e. no gain and full recovery -> 0.269).
  DD-Ranking's code feeds percent into the exponential (a unit bug: e^30 for a 30-point gap); we do not.
- ARS (augmentation-robust score) = the same map of b = lam (syn_aug - random_aug) + (1 - lam) (syn_noaug -
  random_noaug), the gaps over random with and without the evaluation's augmentation, again as fractions.

DD-Ranking averages per-run scores over 5 runs with the random subset redrawn per run; :func:`robustness_scores`
takes mean accuracies, which gives the same HLR and IOR (they are linear) and an LRS/ARS that differs only at second
order (the map is convex: under 1e-4 for a run-to-run spread of 1 point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raydistill.errors import UserError

__all__ = ["RobustnessScores", "exp_score", "robustness_scores"]


def exp_score(a: float) -> float:
    """DD-Ranking's map of a combined gap ``a`` (a fraction in [-1, 1]) to [0, 1]: (e^a - e^-1) / (e - e^-1)."""
    return (math.exp(a) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


@dataclass(frozen=True)
class RobustnessScores:
    """HLR and IOR in percentage points; LRS and ARS in [0, 1]; None where an input accuracy is missing."""

    hlr: float | None
    ior: float | None
    lrs: float | None
    ars: float | None


def _check(name: str, v: float | None) -> None:
    if v is not None and not 0.0 <= v <= 100.0:
        raise UserError(f"{name} accuracy {v} is not a percentage in [0, 100]", "pass accuracies in percent")


def robustness_scores(real_hard: float | None = None, syn_hard: float | None = None, syn_soft: float | None = None,
                      random_soft: float | None = None, syn_aug: float | None = None,
                      random_aug: float | None = None, syn_noaug: float | None = None,
                      random_noaug: float | None = None, lam: float = 0.5) -> RobustnessScores:
    """HLR, IOR, LRS and ARS from accuracies in percent (module docstring). ``lam`` is DD-Ranking's weight (0.5)."""
    given = {"real_hard": real_hard, "syn_hard": syn_hard, "syn_soft": syn_soft, "random_soft": random_soft,
             "syn_aug": syn_aug, "random_aug": random_aug, "syn_noaug": syn_noaug, "random_noaug": random_noaug}
    for name, v in given.items():
        _check(name, v)
    if not 0.0 <= lam <= 1.0:
        raise UserError(f"lambda {lam} is not in [0, 1]", "use DD-Ranking's 0.5 or another weight in [0, 1]")
    hlr = None if None in (real_hard, syn_hard) else real_hard - syn_hard
    ior = None if None in (syn_soft, random_soft) else syn_soft - random_soft
    lrs = None if None in (hlr, ior) else exp_score((lam * ior - (1 - lam) * hlr) / 100.0)
    gaps = (syn_aug, random_aug, syn_noaug, random_noaug)
    ars = None if None in gaps else exp_score((lam * (syn_aug - random_aug)
                                               + (1 - lam) * (syn_noaug - random_noaug)) / 100.0)
    return RobustnessScores(hlr, ior, lrs, ars)


# ----------------------------------------------------------------------------------------------------------------------
# the table of `raydistill score`: accuracies keyed (dataset, ipc, method, preset, net) -> per-net percents

Records = dict[tuple[str, int, str, str, str], list[float]]


def records_from_results(paths: list[str]) -> Records:
    """Per-net accuracies from ``benchmarks/quality.py`` result files (keys ``method|ipcN|preset|net|epochsE|setS|
    netI``, Fashion-MNIST). A shortened schedule is kept apart as preset ``dc:40ep``, as the quality table shows it."""
    import json
    from pathlib import Path

    out: Records = {}
    for path in paths:
        try:
            runs = json.loads(Path(path).read_text())["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} is not a quality result file ({type(e).__name__})",
                            "pass files written by benchmarks/quality.py (benchmarks/results/quality*.json)") from None
        for key, r in runs.items():
            method, ipc, preset, net, epochs = key.split("|")[:5]
            if epochs != "epochsNone":
                preset = f"{preset}:{epochs[6:]}ep"
            acc = r["last"] if r["report"] == "last" else r["best"]
            out.setdefault(("fashion-mnist", int(ipc[3:]), method, preset, net), []).append(float(acc))
    return out


def _mean(v: list[float] | None) -> float | None:
    return None if not v else sum(v) / len(v)


def score_table(records: Records, real_hard: float | None, hard: str = "dc", soft: str = "rded",
                aug: str = "dsa", noaug: str = "dc", net: str = "convnet", lam: float = 0.5) -> list[dict]:
    """One row per (dataset, IPC, method): mean accuracies under the hard and soft presets and the scores.

    The random baseline of a row is the ``random`` method at the same dataset, IPC and preset. ``missing`` lists the
    (method, preset) accuracies a score needed and the records lack.
    """
    keys = sorted({(d, i, m) for d, i, m, _, n in records if n == net})
    rows = []
    for d, i, m in keys:
        def acc(method: str, preset: str, d: str = d, i: int = i) -> float | None:
            return _mean(records.get((d, i, method, preset, net)))

        need = {(m, hard), (m, soft), ("random", soft), (m, aug), ("random", aug), (m, noaug), ("random", noaug)}
        s = robustness_scores(real_hard, acc(m, hard), acc(m, soft), acc("random", soft), acc(m, aug),
                              acc("random", aug), acc(m, noaug), acc("random", noaug), lam)
        rows.append({"dataset": d, "ipc": i, "method": m, "hard": acc(m, hard), "soft": acc(m, soft),
                     "n_hard": len(records.get((d, i, m, hard, net), [])),
                     "n_soft": len(records.get((d, i, m, soft, net), [])), "scores": s,
                     "missing": sorted(f"{mm}/{pp}@ipc{i}" for mm, pp in need if acc(mm, pp) is None)})
    return rows


def format_scores(rows: list[dict], real_hard: float | None, hard: str, soft: str, aug: str, noaug: str) -> str:
    """The rows as a fixed-width table with the unit of every column and the inputs behind them."""
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    lines = [f"{'dataset':<14} {'IPC':>4} {'method':<14} {hard + ' %':>9} {soft + ' %':>9} {'HLR pp':>7} "
             f"{'IOR pp':>7} {'LRS':>6} {'ARS':>6}"]
    for r in rows:
        s = r["scores"]
        lines.append(f"{r['dataset']:<14} {r['ipc']:>4} {r['method']:<14} {f(r['hard'], '.2f'):>9} "
                     f"{f(r['soft'], '.2f'):>9} {f(s.hlr, '+.2f'):>7} {f(s.ior, '+.2f'):>7} {f(s.lrs, '.3f'):>6} "
                     f"{f(s.ars, '.3f'):>6}")
    lines.append(f"accuracies: mean test top-1 in percent over the nets; HLR = real-data hard ({f(real_hard, '.2f')}) "
                 f"- {hard}, IOR = {soft} - random's {soft}, both in percentage points; LRS and ARS in [0, 1] from "
                 f"fractions (ARS from the gaps over random under {aug} and {noaug}).")
    gaps = sorted({m for r in rows for m in r["missing"]})
    if gaps:
        lines.append("missing (scores shown as -): " + ", ".join(gaps))
    if real_hard is None:
        lines.append("HLR and LRS need --real-hard PCT: the hard-label accuracy of the whole real training set")
    return "\n".join(lines)
