"""Generator quality of a DiT + VAE on Fashion-MNIST: FID, precision / recall / density / coverage, class consistency
and a sample sheet, at several CFG scales, next to the real-vs-real floor (a random real subset of the same size).

Plain sampling (no guidance), ``--per-class`` images per class, scored against the 10k test images in the feature
space of the built-in feature network (raydistill.evaluate.generator_metrics). Resumable: results accumulate in
``--results`` keyed by (tag, CFG, images per class, seed); a rerun skips what is there.

    python benchmarks/generator_quality.py                                   # the built-in model, CFG 1,1.5,2,3,4
    python benchmarks/generator_quality.py --model DIR --vae DIR --tag fmnist-m-20000 --cfg 1.5
    python benchmarks/generator_quality.py --vae DIR --tag vae-w64 --vae-floor --cfg ""   # a VAE's own floor only
    python benchmarks/generator_quality.py --table-only

``--vae-floor`` also scores the real floor's images passed through the VAE (posterior mean, decoded; row
``<tag>-vae``): no generator on that VAE's latents can score better than its reconstructions, so it is the floor
a VAE sets for every DiT trained on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from raydistill.cli import cfg_interval_arg
from raydistill.config import BUILTIN_MODEL, DistillConfig
from raydistill.outputs import save_grid, save_merged_json

FLOOR = "real"  # the tag of the real-vs-real floor rows


def score_generator(model: Path, vae: Path, cfgs: list[float], per_class: int, seed: int, extractor, reference,
                    judge, steps: int = 50, sheet_dir: Path | None = None, tag: str = "", log=print,
                    cfg_interval: tuple[int, int] | None = None) -> dict:
    """{cfg: metrics} for plain sampling of ``model`` at each CFG scale (only inside ``cfg_interval`` if given)."""
    from raydistill.data import load_dataset
    from raydistill.evaluate.generator_metrics import features
    from raydistill.generator import load_generator
    from raydistill.pretrain import classifier_accuracy

    ds = load_dataset("fashion-mnist")
    labels = [c for c in range(ds.num_classes) for _ in range(per_class)]
    indices = [k for _ in range(ds.num_classes) for k in range(per_class)]
    out = {}
    for cfg_scale in cfgs:
        gen = load_generator(DistillConfig(model=str(model), vae=str(vae), cfg_scale=cfg_scale, steps=steps,
                                           cfg_interval=cfg_interval),
                             ds.dit_labels, ds.image_size, device="cpu")
        t0, imgs = time.time(), []
        for s in range(0, len(labels), 100):
            imgs.append(gen.generate(labels[s:s + 100], indices[s:s + 100], seed))
        x, y = torch.cat(imgs), torch.as_tensor(labels)
        seconds = time.time() - t0
        m = reference.score(features(extractor, x)).as_dict()
        m["class_consistency"] = classifier_accuracy(judge, x, y)
        m["sample_seconds"] = round(seconds, 1)
        if sheet_dir is not None:
            save_grid(x, y, sheet_dir / f"{tag}-cfg{cfg_scale:g}.png", per_class=10)
        log(f"[{tag} cfg {cfg_scale:g}] FID {m['fid']:.2f}  P {m['precision']:.3f}  R {m['recall']:.3f}  "
            f"D {m['density']:.3f}  C {m['coverage']:.3f}  consistency {m['class_consistency']:.1f}%  "
            f"({seconds:.0f} s sampling)")
        out[f"{cfg_scale:g}"] = m
    return out


def vae_floor(ds, vae: Path, extractor, reference, per_class: int, seed: int) -> dict:
    """The metrics of the real floor's images after the VAE's round trip, with their PSNR (dB) to the originals."""
    from raydistill.evaluate.generator_metrics import class_balanced_subset, features
    from raydistill.models.vae import load_vae, psnr_db, reconstruct_images

    real = class_balanced_subset(ds, torch.arange(ds.num_classes).repeat_interleave(per_class), seed)
    rec = reconstruct_images(load_vae(vae, image_size=ds.image_size), real)
    return {**reference.score(features(extractor, rec)).as_dict(), "psnr_db": psnr_db(real, rec),
            "vae": str(vae), "date": time.strftime("%Y-%m-%d")}


def table(results: dict) -> str:
    rows = ["| model | CFG | images per class | FID | precision | recall | density | coverage | class consistency |",
            "|---|---|---|---|---|---|---|---|---|"]
    def order(key: str) -> tuple:
        tag, cfg = key.split("|")[:2]
        return (tag == FLOOR, tag, float(cfg) if cfg != "-" else 0.0)

    for key, m in sorted(results["runs"].items(), key=lambda kv: order(kv[0])):
        tag, cfg, n = key.split("|")[:3]
        cons = f"{m['class_consistency']:.1f}%" if "class_consistency" in m else ""
        rows.append(f"| {tag} | {cfg} | {n} | {m['fid']:.2f} | {m['precision']:.3f} | {m['recall']:.3f} | "
                    f"{m['density']:.3f} | {m['coverage']:.3f} | {cons} |")
    return "\n".join(rows)


def main() -> None:
    from raydistill.data import load_dataset
    from raydistill.evaluate.consistency import load_builtin_classifier
    from raydistill.evaluate.generator_metrics import feature_extractor, real_floor, split_reference

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(BUILTIN_MODEL / "dit"))
    ap.add_argument("--vae", default=str(BUILTIN_MODEL / "vae"))
    ap.add_argument("--tag", default="builtin", help="name of the model in the results")
    ap.add_argument("--cfg", default="1,1.5,2,3,4", help="comma-separated CFG scales")
    ap.add_argument("--cfg-interval", type=cfg_interval_arg, default=None, metavar="LO,HI",
                    help="CFG only for model timesteps LO <= t <= HI; give the run its own --tag")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--feature-net", default=None, help="default: the built-in Fashion-MNIST feature network")
    ap.add_argument("--sheets", default="benchmarks/results/generator", help="folder of the sample sheets")
    ap.add_argument("--results", default="benchmarks/results/generator_quality.json")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--vae-floor", action="store_true", help="also score the VAE's reconstructions of the floor")
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res_path = Path(a.results)
    results = json.loads(res_path.read_text()) if res_path.exists() else {"runs": {}}
    if not a.table_only:
        ds = load_dataset("fashion-mnist")
        extractor = feature_extractor("fashion-mnist", a.feature_net)
        reference = split_reference(ds, extractor)
        n = a.per_class * ds.num_classes
        floor_key = f"{FLOOR}|-|{a.per_class}|{a.seed}"
        if floor_key not in results["runs"]:
            labels = torch.arange(ds.num_classes).repeat_interleave(a.per_class)
            results["runs"][floor_key] = real_floor(ds, extractor, reference, labels, seed=a.seed).as_dict()
            print(f"[real floor, {n} images] FID {results['runs'][floor_key]['fid']:.2f}", flush=True)
        vae_key = f"{a.tag}-vae|-|{a.per_class}|{a.seed}"
        if a.vae_floor and vae_key not in results["runs"]:
            results["runs"][vae_key] = vae_floor(ds, Path(a.vae), extractor, reference, a.per_class, a.seed)
            print(f"[{a.tag} VAE floor, {n} images] FID {results['runs'][vae_key]['fid']:.2f}, PSNR "
                  f"{results['runs'][vae_key]['psnr_db']:.2f} dB", flush=True)
            save_merged_json(res_path, results, indent=1, sort_keys=True)
        todo = [float(c) for c in a.cfg.split(",") if c.strip() and f"{a.tag}|{float(c):g}|{a.per_class}|{a.seed}"
                not in results["runs"]]
        sheets = Path(a.sheets)
        sheets.mkdir(parents=True, exist_ok=True)
        for cfg_scale in todo:  # one at a time, saved after each, so an interrupted run resumes
            m = score_generator(Path(a.model), Path(a.vae), [cfg_scale], a.per_class, a.seed, extractor, reference,
                                load_builtin_classifier(), steps=a.steps, sheet_dir=sheets, tag=a.tag,
                                log=lambda s: print(s, flush=True), cfg_interval=a.cfg_interval)
            for cfg, metrics in m.items():
                metrics.update(model=a.model, date=time.strftime("%Y-%m-%d"), host=platform.node(),
                               threads=torch.get_num_threads())
                results["runs"][f"{a.tag}|{cfg}|{a.per_class}|{a.seed}"] = metrics
            save_merged_json(res_path, results, indent=1, sort_keys=True)
    print(table(results))


if __name__ == "__main__":
    main()
