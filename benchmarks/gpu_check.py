"""The prepared GPU check (issue 22, item 6): run by ``benchmarks/gpu_check.sh`` on one GPU, writes one JSON.

Sections, each printing its progress, each timing taken after a warm-up and between ``cuda.synchronize`` calls:

- ``tests``: ``pytest -m gpu`` (tests/test_gpu.py: device placement, CUDA = CPU sampling, the bf16 / TF32 paths).
- ``dit``: DiT-XL/2 (random weights, 256 px, 32x32x4 latents, CFG 4 on 3 channels) plain sampling at each batch in
  fp32, tf32, bf16 and bf16 + ``torch.compile``. A few chain steps are timed (``--steps``) and extrapolated to the
  real workload, 50 CFG steps per image (``steps_timed`` / ``steps_per_image`` say so in the JSON); the SD-sized
  VAE decode is timed once per batch. ``share_of_bf16_ceiling`` = DiT images/s x 50 steps x 2 (CFG) x GFLOPs per
  forward / the dense bf16 peak (990 TFLOP/s for an H100/H200: 42 DiT-XL/2 images/s).
- ``igd``: IGD ``fast`` (influence with 4 ConvNet-6 checkpoints + deviation) against plain sampling at the same
  batch, bf16 (fp32 in the CPU smoke mode), SD-sized VAE: every timed step inside the guidance window; per image
  = 34 plain + 16 guided steps (the window [30, 45] of 50) + the decode.
- ``eval``: ResNet-AP10 training images/s at 128 px (the ``idc`` preset's SGD, batch 256 of random images, no
  augmentation) in fp32, tf32, bf16.

``--smoke`` runs the same code on the CPU with tiny sizes (a test runs it). A section that would pass
``--budget-s`` is skipped and says so.

    python benchmarks/gpu_check.py [--smoke] [--results benchmarks/results/gpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydistill.outputs import atomic_write_text  # noqa: E402
from raydistill.precision import maybe_compile, precision_scope  # noqa: E402

BF16_DENSE_TFLOPS = {"H100": 989.5, "H200": 989.5, "A100": 312.0}
STEPS_PER_IMAGE, WINDOW_STEPS = 50, 16  # IGD's window [30, 45] of the 50-step chain
CFG_SCALE, CFG_CHANNELS = 4.0, 3


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], dev: torch.device, repeats: int = 1) -> float:
    """Seconds of one call of ``fn`` (median of ``repeats``), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def dit_forward_gflops(size: str, px: int) -> float:
    """FLOPs (2 per multiply-add, ``torch.utils.flop_counter``) of one DiT forward on one image, counted on the meta
    device. DiT-XL/2 at 256 px: 237.3 GFLOPs, twice the paper's 118.6 "Gflops", which count multiply-adds."""
    from torch.utils.flop_counter import FlopCounterMode

    from raydistill.models.dit import DiTConfig, build_dit

    with torch.device("meta"):
        dit = build_dit(DiTConfig(size=size, input_size=px // 8, in_channels=4, num_classes=1000))
        latent, step_or_label = torch.zeros(1, 4, px // 8, px // 8), torch.zeros(1, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            dit(latent, step_or_label, step_or_label)
    return counter.get_total_flops() / 1e9


class Models:
    """DiT (XL/2 at 256 px, or "test" at 32 px for smoke), an SD-sized VAE and the ConvNet-6 surrogate, random."""

    def __init__(self, dev: torch.device, smoke: bool) -> None:
        from diffusers import AutoencoderKL

        from raydistill.models.dit import DiTConfig, build_dit
        from raydistill.models.evalnets import build_eval_net
        from raydistill.models.vae import LatentCodec

        self.size, self.px = ("test", 32) if smoke else ("XL/2", 256)
        torch.manual_seed(0)
        self.dit = build_dit(DiTConfig(size=self.size, input_size=self.px // 8, in_channels=4,
                                       num_classes=1000)).to(dev).eval()
        blocks = (8, 8, 8, 8) if smoke else (128, 256, 512, 512)  # sd-vae-ft-mse's AutoencoderKL layout
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=blocks, layers_per_block=2, latent_channels=4, sample_size=self.px,
                            norm_num_groups=8 if smoke else 32, scaling_factor=0.18215)
        self.codec = LatentCodec(vae.to(dev)).eval()
        self.surrogate = build_eval_net("convnet3" if smoke else "convnet6", 3, 10, self.px).to(dev).eval()
        self.dev = dev

    def chain(self, b: int, steps: int, terms: list, forward=None) -> torch.Tensor:
        from raydistill.diffusion.sampler import SamplerConfig, dit_denoiser, sample
        from raydistill.diffusion.schedule import Schedule

        y = torch.arange(b) % 10
        sc = SamplerConfig(cfg_scale=CFG_SCALE, cfg_channels=CFG_CHANNELS)
        return sample(dit_denoiser(self.dit if forward is None else forward), Schedule.linear(1000, steps), y,
                      list(range(b)), (4, self.px // 8, self.px // 8), 1000, sc, terms=terms, class_labels=y,
                      image_indices=torch.arange(b), device=self.dev)

    def igd_terms(self, steps: int) -> list:
        from raydistill.methods.igd.guidance import DeviationGuidance, InfluenceGuidance

        ckpts = [{k: v.detach().clone() for k, v in self.surrogate.named_parameters()} for _ in range(4)]
        n = sum(p.numel() for p in self.surrogate.parameters())
        real = {c: torch.randn(4, n, device=self.dev) for c in range(10)}
        window = (0, steps - 1)  # every timed step guided
        return [DeviationGuidance(gamma=50.0, window=window),
                InfluenceGuidance(self.codec.decode, self.surrogate, ckpts, real, scale=5.0, window=window)]


def run_tests(smoke: bool) -> dict:
    log("tests: pytest -m gpu tests/test_gpu.py")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs",
                           "tests/test_gpu.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1] if lines else proc.stderr.strip()[-200:]
    log(f"tests: {summary} ({time.perf_counter() - t0:.0f} s)")
    return {"returncode": proc.returncode, "summary": summary, "passed": proc.returncode == 0,
            "tail": "\n".join(lines[-15:])}


def dit_section(m: Models, batches: list[int], steps: int, gflops: float, peak: float | None) -> dict:
    res: dict = {"steps_timed": steps, "steps_per_image": STEPS_PER_IMAGE, "extrapolated": True,
                 "dit_gflops_per_forward": gflops, "tflop_per_image": STEPS_PER_IMAGE * 2 * gflops / 1000}
    for b in batches:
        with torch.no_grad(), precision_scope("bf16", m.dev):
            decode_s = timed(lambda b=b: m.codec.decode(torch.randn(b, 4, m.px // 8, m.px // 8, device=m.dev)), m.dev)
        res[f"b{b}_decode_s"] = decode_s
        for name in ("fp32", "tf32", "bf16", "bf16_compiled"):
            if name.endswith("compiled") and m.dev.type == "cpu":
                res[f"b{b}_{name}"] = {"skipped": "on a CPU (smoke) the compile warm-up alone takes minutes"}
                continue
            prec = name.split("_")[0]
            t_start = time.perf_counter()
            forward = maybe_compile(m.dit, True) if name.endswith("compiled") else m.dit
            with precision_scope(prec, m.dev):
                first = time.perf_counter()
                m.chain(b, steps, [], forward)  # warm-up (compiles)
                sync(m.dev)
                warm = time.perf_counter() - first
                step_s = timed(lambda b=b, f=forward: m.chain(b, steps, [], f), m.dev) / steps
            dit_rate = b / (STEPS_PER_IMAGE * step_s)
            row = {"step_s": step_s, "dit_images_per_s": dit_rate,
                   "images_per_s": b / (STEPS_PER_IMAGE * step_s + decode_s), "warmup_s": warm,
                   "dit_tflops": dit_rate * res["tflop_per_image"]}
            if peak:
                row["share_of_bf16_ceiling"] = row["dit_tflops"] / peak
            res[f"b{b}_{name}"] = row
            log(f"dit {m.size} batch {b} {name}: {dit_rate:.2f} DiT images/s ({row['images_per_s']:.2f} with decode), "
                f"{row['dit_tflops']:.0f} TFLOP/s" + (f" = {100 * row['share_of_bf16_ceiling']:.1f}% of the bf16 "
                                                     f"ceiling" if peak else "") +
                f", warm-up {warm:.1f} s ({time.perf_counter() - t_start:.0f} s)")
    return res


def igd_section(m: Models, batches: list[int], steps: int) -> dict:
    prec = "bf16" if m.dev.type == "cuda" else "fp32"  # a CPU without avx512_bf16 crawls in bf16 (smoke)
    res: dict = {"precision": prec, "steps_timed": steps, "extrapolated": True,
                 "per_image": f"{STEPS_PER_IMAGE - WINDOW_STEPS} plain + {WINDOW_STEPS} guided steps + decode"}
    for b in batches:
        try:
            with precision_scope(prec, m.dev):
                with torch.no_grad():
                    plain = timed(lambda b=b: m.chain(b, steps, []), m.dev) / steps
                    decode_s = timed(lambda b=b: m.codec.decode(torch.randn(b, 4, m.px // 8, m.px // 8,
                                                                            device=m.dev)), m.dev)
                guided = timed(lambda b=b: m.chain(b, steps, m.igd_terms(steps)), m.dev) / steps
        except torch.OutOfMemoryError as e:
            res[f"b{b}"] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            log(f"igd batch {b}: out of memory")
            torch.cuda.empty_cache()
            continue
        t_plain = STEPS_PER_IMAGE * plain + decode_s
        t_igd = (STEPS_PER_IMAGE - WINDOW_STEPS) * plain + WINDOW_STEPS * guided + decode_s
        row = {"plain_step_s": plain, "guided_step_s": guided, "plain_images_per_s": b / t_plain,
               "igd_fast_images_per_s": b / t_igd, "igd_vs_plain": t_igd / t_plain}
        if m.dev.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        res[f"b{b}"] = row
        log(f"igd batch {b}: plain {row['plain_images_per_s']:.2f} vs IGD fast {row['igd_fast_images_per_s']:.2f} "
            f"images/s = {row['igd_vs_plain']:.2f}x the cost")
    return res


def eval_section(dev: torch.device, smoke: bool, passes: int) -> dict:
    from raydistill.evaluate.fit import make_optimizer, train_pass
    from raydistill.evaluate.presets import get_preset
    from raydistill.models.evalnets import build_eval_net

    px, n, bs = (32, 4, 4) if smoke else (128, 1024, 256)  # smoke: tiny, CPUs without avx512_bf16 crawl in bf16
    preset = get_preset("idc")
    x, y = torch.randn(n, 3, px, px, device=dev), torch.arange(n, device=dev) % 10
    res: dict = {"net": "resnet_ap10", "px": px, "images_per_pass": n, "batch": bs}
    for prec in ("fp32", "tf32", "bf16"):
        torch.manual_seed(0)
        net = build_eval_net("resnet_ap10", 3, 10, px).to(dev)
        opt = make_optimizer(preset, list(net.parameters()), preset.lr)
        gen = torch.Generator(device=dev).manual_seed(0)

        def one(net=net, opt=opt, gen=gen, prec=prec):
            for _ in range(passes):
                train_pass(net, opt, ((x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)), preset, gen, prec)

        with precision_scope(prec, dev, forwards=False):
            secs = timed(one, dev)
        res[f"{prec}_images_per_s"] = passes * n / secs
        log(f"eval resnet_ap10 {px} px {prec}: {res[f'{prec}_images_per_s']:.0f} training images/s")
    return res


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the code path)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--batch-sizes", default="16,64")
    ap.add_argument("--steps", type=int, default=5, help="chain steps timed per configuration (default 5)")
    ap.add_argument("--sections", default="tests,dit,igd,eval")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip sections that start after this (default 450)")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    dev = torch.device("cpu" if a.smoke or not torch.cuda.is_available() else "cuda")
    batches = [1, 2] if a.smoke else [int(b) for b in a.batch_sizes.split(",")]
    steps = 2 if a.smoke else a.steps
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    peak = next((v for k, v in BF16_DENSE_TFLOPS.items() if k in name), None)
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": name, "smoke": a.smoke,
                 "torch": torch.__version__, "bf16_dense_peak_tflops": peak, "batch_sizes": batches}
    log(f"gpu check on {name} (smoke: {a.smoke}), sections {a.sections}")
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    sections = a.sections.split(",")
    models = None
    for section in sections:
        if time.perf_counter() - t0 > a.budget_s:
            res[section] = {"skipped": f"time budget of {a.budget_s:.0f} s spent"}
            log(f"{section}: skipped (budget)")
            continue
        if section == "tests":
            res["tests"] = run_tests(a.smoke)
            continue
        if section in ("dit", "igd") and models is None:
            models = Models(dev, a.smoke)
            res["dit_size"], res["px"] = models.size, models.px
        if section == "dit":
            res["dit"] = dit_section(models, batches, steps, dit_forward_gflops(models.size, models.px), peak)
        elif section == "igd":
            res["igd"] = igd_section(models, batches, steps)
        elif section == "eval":
            res["eval"] = eval_section(dev, a.smoke, 1 if a.smoke else 3)
        atomic_write_text(Path(a.results), json.dumps(res, indent=1))  # each finished section is kept
    res["seconds"] = time.perf_counter() - t0
    if peak and "dit" in res and isinstance(res["dit"], dict):
        best = max((v.get("dit_images_per_s", 0.0), k) for k, v in res["dit"].items() if isinstance(v, dict))
        ceiling = peak * 1000 / (STEPS_PER_IMAGE * 2 * res["dit"]["dit_gflops_per_forward"])
        res["best_dit"] = {"config": best[1], "dit_images_per_s": best[0], "ceiling_images_per_s": ceiling}
    atomic_write_text(Path(a.results), json.dumps(res, indent=1))
    log(f"wrote {a.results} ({res['seconds']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
