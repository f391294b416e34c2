"""Run configuration as data: a frozen dataclass, loadable from YAML, flattenable to MLflow params.

Every field is a plain value, so a config round-trips through YAML/JSON unchanged and its fingerprint decides
whether an output directory may be resumed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from raydistill.errors import UserError
from raydistill.precision import check_precision

BUILTIN_MODEL = Path(__file__).parent / "assets" / "fmnist"
BUILTIN_DEFAULT_PRESET = Path(__file__).parent / "presets" / "fmnist-default.yaml"  # what `raydistill distill` runs
BUILTIN_WEIGHTS = ("dit/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: a rewritten file is read again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime)."""
    st = Path(path).stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


def builtin_weights_id(root: Path | None = None) -> str | None:
    """A short digest of the shipped DiT and VAE weights (None when they are missing): part of the fingerprint of a
    set made with the built-in model, so retrained weights never resume a set the old ones made."""
    root = BUILTIN_MODEL if root is None else root
    files = [root / f for f in BUILTIN_WEIGHTS]
    if not all(f.is_file() for f in files):
        return None
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DistillConfig:
    # data
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    image_size: int | None = None
    classes: tuple[str, ...] | None = None  # class names or indices; None = all
    nclass: int | None = None
    phase: int = 0
    allow_other_split: bool = False  # ImageNet subsets: accept a tree that is not ImageNet's own (data/split_guard.py)
    # what to make
    method: str = "dit"
    ipc: int = 10
    seed: int = 0
    # generator (None: the built-in Fashion-MNIST model)
    model: str | None = None
    model_size: str | None = None
    vae: str | None = None
    sampler: str = "ddpm"
    steps: int = 50
    cfg_scale: float = 4.0
    cfg_channels: int | None = None  # None: auto (3 for DiT-XL/2, all otherwise)
    cfg_interval: tuple[int, int] | None = None  # (lo, hi) model timesteps (0-999) where CFG acts; None: all steps
    batch_size: int = 16
    precision: str = "auto"  # sampling + guidance: auto (tf32 on CUDA, fp32 on CPU), fp32, tf32, bf16 (precision.py)
    compile: bool = False  # torch.compile the DiT forward (and the evaluation nets); same images to a tolerance
    # evaluation
    eval_preset: str = "dc"
    eval_nets: tuple[str, ...] = ("convnet",)
    num_evals: int = 1  # nets per network type; the default job stays under 15 min on 2 cores
    eval_epochs: int | None = None
    teacher: str | None = None  # soft-label presets (rded): teacher checkpoint; None: the built-in one (Fashion-MNIST)
    baselines: tuple[str, ...] = ("random",)
    eval_precision: str = "fp32"  # evaluation nets: fp32 (the published protocols), tf32, bf16, auto
    coverage: bool = True  # also measure mode coverage / spread of each set (raydistill.evaluate.coverage)
    # output
    out: str | None = None  # None: <root>/<dataset>/<method>-ipc<IPC>-seed<seed>; a URI with write_from_workers
    write_from_workers: bool = False  # sampler actors write their PNGs where the set lives (raydistill.storage)
    plugins: tuple[str, ...] = ()  # modules / .py files that register method parts (raydistill.methods.register)
    extra: dict[str, Any] = field(default_factory=dict)  # method parameters (weights, windows, ...)
    # a paper cell's published figure (jobs/configs/paper/*.yaml); metadata, logged as MLflow tags (reproduce.py)
    published: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked once, before anything runs: one line naming the bad value (issue 25)."""
        from raydistill.methods import MAX_IPC, check_extra, get_method, load_plugins

        load_plugins(self.plugins)  # before the method names are looked up
        if isinstance(self.ipc, bool) or not isinstance(self.ipc, int) or self.ipc <= 0:
            raise UserError(f"IPC must be a positive integer, got {self.ipc!r}", "pass --ipc 1 or more")
        if self.ipc > MAX_IPC:
            raise UserError(f"IPC {self.ipc} is above the limit of {MAX_IPC} images per class",
                            "pass a smaller --ipc (published tables use 1 to 100)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"seed must be an integer >= 0, got {self.seed!r}", "pass --seed 0 or another")
        get_method(self.method)
        for b in self.baselines:
            try:
                get_method(b)
            except UserError as e:
                raise UserError(f"baseline: {e.problem}", e.fix) from None
        if self.steps <= 0 or self.batch_size <= 0 or self.num_evals < 0:
            raise UserError("steps and batch size must be positive and num_evals >= 0", "fix the config values")
        if self.sampler not in ("ddpm", "ddim"):
            raise UserError(f"unknown sampler {self.sampler!r}", "use ddpm or ddim")
        if (isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float))
                or not math.isfinite(self.cfg_scale) or self.cfg_scale < 0):
            raise UserError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}",
                            "pass --cfg-scale 4 (the paper), or 1 to turn CFG off")
        if self.cfg_interval is not None:
            object.__setattr__(self, "cfg_interval", check_cfg_interval(self.cfg_interval))
        check_precision(self.precision, "precision")
        check_precision(self.eval_precision, "eval_precision")
        if self.eval_precision != "fp32":
            from raydistill.evaluate.presets import get_preset

            if get_preset(self.eval_preset).labels == "soft":
                raise UserError(f"eval_precision {self.eval_precision} is for the hard-label presets; "
                                f"{self.eval_preset} trains in fp32", "leave --eval-precision out with this preset")
        if not isinstance(self.compile, bool):
            raise UserError(f"compile must be true or false, got {self.compile!r}", "pass --compile, or leave it out")
        if self.classes is not None:
            if not self.classes:
                raise UserError("classes is empty", "name at least one class, or leave --classes out for all classes")
            dup = sorted({c for c in self.classes if list(self.classes).count(c) > 1})
            if dup:
                raise UserError(f"class {dup[0]!r} is listed twice in classes", "name every class once")
        if not isinstance(self.write_from_workers, bool):
            raise UserError(f"write_from_workers must be true or false, got {self.write_from_workers!r}",
                            "pass --write-from-workers, or leave it out")
        if self.out is not None:
            from raydistill.storage import is_uri, local_out

            object.__setattr__(self, "out", local_out(str(self.out)))  # file:///abs/path -> /abs/path
            if is_uri(self.out) and not self.write_from_workers:
                raise UserError(f"the output {self.out!r} is a URI, which only the sampler actors can write to",
                                "pass --write-from-workers (config key write_from_workers: true), or a local path")
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            raise UserError(f"teacher must be a checkpoint path, got {self.teacher!r}", "pass --teacher PATH")
        if self.published:
            from raydistill.reproduce import check_published

            check_published(self.published)
        check_extra(self.extra, self)

    # -- (de)serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown config key(s): {', '.join(unknown)}", f"valid keys: {', '.join(sorted(known))}")
        d = dict(d)
        for k in ("classes", "eval_nets", "baselines", "plugins"):
            if isinstance(d.get(k), list):
                d[k] = tuple(str(v) for v in d[k])
        if isinstance(d.get("cfg_interval"), list):
            d["cfg_interval"] = tuple(d["cfg_interval"])
        try:
            return cls(**d)
        except TypeError as e:
            raise UserError(f"bad config: {e}", "check the value types") from e

    def with_(self, **kw: Any) -> DistillConfig:
        return replace(self, **kw)

    def generation_key(self) -> dict[str, Any]:
        """The fields that determine the generated images (evaluation settings excluded).

        ``precision`` is in it when chosen (fp32, tf32, bf16 give other images); ``auto``, the device's own numerics,
        is left out like the device itself, so the sets made before the setting existed keep their fingerprint.
        ``compile`` and ``batch_size`` are left out: they change how the images are computed, not which (the same
        images to float tolerance, tests/test_precision.py)."""
        skip = {"eval_preset", "eval_nets", "num_evals", "eval_epochs", "eval_precision", "baselines", "out",
                "batch_size", "compile", "coverage", "plugins", "allow_other_split", "published", "write_from_workers",
                "teacher"}
        if self.precision == "auto":
            skip.add("precision")
        if self.cfg_interval is None:  # the sets made before the setting existed keep their fingerprint
            skip.add("cfg_interval")
        key = {k: v for k, v in self.to_dict().items() if k not in skip}
        if self.model is None and self.uses_model() and (ident := builtin_weights_id()) is not None:
            key["builtin_weights"] = ident  # the built-in model: which weights made (or chose) the images
        extra = key.get("extra") or {}
        if extra.get("igd_impl") == "reference" and "igd_twin" not in extra:
            # IGD's reference carries the unconditional twin since it became the default (igd_twin auto): such a set
            # must not resume one made before with one copy, so the resolved value is part of its key
            key["extra"] = {**extra, "igd_twin": "on"}
        if "igd_gamma" not in extra and self._rescales_igd_gamma():
            # Fashion-MNIST's default gamma follows the latent size since 2026-12-06 (it was a constant 3.125 before):
            # a set made with the old default must not be resumed as one of the new
            key["extra"] = {**key.get("extra", {}), "igd_gamma": "latent-scaled"}
        return key

    def _rescales_igd_gamma(self) -> bool:
        """Whether this run's IGD deviation weight comes from the latent-size rule (raydistill.methods.igd.guidance)."""
        from raydistill.methods.igd.guidance import LATENT_SCALED
        from raydistill.methods.registry import get_method

        if self.dataset not in LATENT_SCALED:
            return False
        try:
            spec = get_method(self.method)
        except Exception:  # noqa: BLE001 - an unknown method fails where it is used
            return False
        return any(part.name == "igd" for part in spec.parts)

    def uses_model(self) -> bool:
        """Whether the set depends on the DiT or the VAE (every method but a plain real subset such as ``random``)."""
        from raydistill.methods.registry import get_method

        try:
            spec = get_method(self.method)
        except Exception:  # noqa: BLE001 - an unknown method fails where it is used; here, assume it does
            return True
        return spec.generative or any(p.needs_codec for p in spec.parts)

    def fingerprint(self) -> str:
        blob = json.dumps(self.generation_key(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat_params(self) -> dict[str, str]:
        """Flat string params for MLflow (``extra`` keys prefixed ``extra.``; ``published`` goes to tags)."""
        out = {k: ("" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v))
               for k, v in self.to_dict().items() if k not in ("extra", "published")}
        out.update({f"extra.{k}": str(v) for k, v in self.extra.items()})
        return out


def check_cfg_interval(value: Any) -> tuple[int, int]:
    """``cfg_interval`` as ``(lo, hi)``: two integer model timesteps with 0 <= lo <= hi <= 999 (the 1,000-step DDPM
    schedule the built-in and DiT-XL/2 models are trained on); one clear line if it is anything else."""
    ok = (isinstance(value, (list, tuple)) and len(value) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
          and 0 <= value[0] <= value[1] <= 999)
    if not ok:
        raise UserError(f"cfg_interval must be two model timesteps LO,HI with 0 <= LO <= HI <= 999, got {value!r}",
                        "pass e.g. --cfg-interval 80,580 (CFG on for 80 <= t <= 580), or leave it out for every step")
    return int(value[0]), int(value[1])


def read_config_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """A YAML mapping of config keys (``--config``, ``--preset``, a study's ``best.yaml``); one clear error if not."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} file not found: {p}", "pass an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} file {p} is not valid YAML ({str(e).splitlines()[0]})", "fix its syntax") from e
    if not isinstance(data, dict) or not all(isinstance(data.get(k) or {}, dict) for k in ("extra", "published")):
        raise UserError(f"{what} file {p} must hold a mapping of config keys (extra, published: mappings)",
                        "see jobs/configs/*.yaml or a study's best.yaml")
    return data
