"""Class consistency of the built-in Fashion-MNIST model: 100 images per class with CFG, judged by the shipped
ConvNet-3 (trained on the real training set by the pretraining job). Quality bar: >= 85%.

    python benchmarks/class_consistency.py [--per-class 100] [--cfg-scale 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from raydistill.config import DistillConfig
from raydistill.data import load_dataset
from raydistill.evaluate.consistency import class_consistency, load_builtin_classifier
from raydistill.generator import load_generator
from raydistill.outputs import atomic_write_text, save_grid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--cfg-scale", type=float, default=4.0)
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    ds = load_dataset("fashion-mnist")
    cfg = DistillConfig(cfg_scale=a.cfg_scale, sampler=a.sampler)
    gen = load_generator(cfg, ds.dit_labels, ds.image_size)
    t0 = time.time()
    res = class_consistency(gen, load_builtin_classifier(), ds.num_classes, a.per_class, a.seed,
                            progress=lambda m: print(m, flush=True))
    secs = time.time() - t0
    real_acc = None
    from raydistill.pretrain import classifier_accuracy

    real_acc = classifier_accuracy(load_builtin_classifier(), *ds.load("test"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"cfg{a.cfg_scale:g}-{a.sampler}"
    save_grid(res.images, res.labels, out / f"class_consistency_{tag}.png", per_class=10)
    report = {"overall": res.overall, "per_class": res.per_class, "per_class_images": a.per_class,
              "cfg_scale": a.cfg_scale, "sampler": a.sampler, "seed": a.seed, "seconds": secs,
              "classifier_real_test_accuracy": real_acc, "classes": ds.class_names}
    atomic_write_text(out / f"class_consistency_{tag}.json", json.dumps(report, indent=1))
    print(f"class consistency ({a.per_class}/class, CFG {a.cfg_scale}, {a.sampler}): {res.overall:.1f}% "
          f"(judge's real test accuracy {real_acc:.1f}%); per class " +
          ", ".join(f"{n} {p:.0f}" for n, p in zip(ds.class_names, res.per_class)) + f"; {secs:.0f} s")


if __name__ == "__main__":
    main()
