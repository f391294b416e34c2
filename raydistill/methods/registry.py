"""The method registry: one :class:`Method` record per method *part*; every combination is derived from its parts.

A part is one of four kinds:

- ``real``: a coreset of real training images (``random``, ``herding``); it has a ``select`` function and no
  generator. Real parts stand alone.
- ``base``: plain sampling from the DiT (``dit``). It stands alone; every generative method samples like it.
- ``model``: a change to the model the sampler uses (``minimax``: a fine-tuned DiffFit DiT); it may lead a combination.
- ``guidance``: guidance terms added to the sampler's step (``mgd3``, ``igd``, a user's own term); any number of them
  combine, after at most one model part.

A combined name joins its parts with ``+`` in a canonical order: the model part first, then the guidance parts in
registration order (``mgd3+igd``, ``minimax+mgd3``). A guidance part may name the separator it takes after a model
part (``joins``: IGD's ``-``, so Minimax + IGD is the paper's ``minimax-igd``). :func:`get_method` parses any such
name back into its parts and refuses a name that is not canonical.

Each part's parameters are a frozen dataclass whose fields carry their help text and checks (:func:`number`,
:func:`integer`, :func:`choice`, :func:`flag`, :func:`value`); :func:`parse_params` reads them from
``DistillConfig.extra`` (``--set KEY=VALUE``) once, with one-line errors, and ``--help`` / docs/METHODS.md list them.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from raydistill.errors import UserError

KINDS = ("real", "base", "model", "guidance")
MAX_IPC = 10_000  # the most images per class a generated set may ask for (published tables stop at 100)


# ---------------------------------------------------------------------------------------------------------------------
# typed parameters

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _param(default: Any, help: str, check: Callable[[str, Any], Any]) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def number(default: float | None, help: str, low: float | None = 0.0, high: float | None = None) -> Any:
    """A finite float in ``[low, high]`` (``None`` allowed only when it is the default)."""
    what = "a finite number" + (f" >= {low:g}" if low is not None else "") + (f" <= {high:g}" if high is not None
                                                                              else "")

    def check(key: str, v: Any) -> Any:
        if v is None and default is None:
            return None
        if (not _is_number(v) or not math.isfinite(v) or (low is not None and v < low)
                or (high is not None and v > high)):
            raise UserError(f"{key} must be {what}, got {v!r}", f"fix {key} (--set {key}=VALUE or extra.{key})")
        return v

    return _param(default, help, check)


def integer(default: int | None, help: str, low: int | None = None) -> Any:
    what = "a positive integer" if low == 1 else "an integer" + (f" >= {low}" if low is not None else "")

    def check(key: str, v: Any) -> Any:
        if v is None and default is None:
            return None
        if not _is_int(v) or (low is not None and v < low):
            raise UserError(f"{key} must be {what}, got {v!r}", f"fix {key} (--set {key}=VALUE or extra.{key})")
        return v

    return _param(default, help, check)


def choice(default: str, help: str, choices: Sequence[str]) -> Any:
    def check(key: str, v: Any) -> Any:
        if v not in choices:
            raise UserError(f"{key} must be one of {', '.join(choices)}, got {v!r}",
                            f"fix {key} (--set {key}=VALUE or extra.{key})")
        return v

    return _param(default, help, check)


def flag(default: bool, help: str) -> Any:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, bool):
            raise UserError(f"{key} must be true or false, got {v!r}", f"fix {key} (--set {key}=true)")
        return v

    return _param(default, help, check)


def value(default: Any, help: str, check: Callable[[str, Any], Any] | None = None) -> Any:
    """A parameter with its own ``check(key, v) -> v`` (raising :class:`UserError`), or any value when None."""
    return _param(default, help, check or (lambda key, v: v))


def parse_params(cls: type, extra: dict[str, Any], cfg: Any = None) -> Any:
    """An instance of the parameter dataclass ``cls`` from ``extra`` (missing keys: the defaults), each value
    checked by its field; then ``instance.validate(cfg)`` when the class has one (checks against the run config)."""
    values = {}
    for f in fields(cls):
        v = extra.get(f.name, f.default if f.default is not MISSING else None)
        values[f.name] = f.metadata["check"](f.name, v) if "check" in f.metadata else v
    params = cls(**values)
    if cfg is not None and hasattr(params, "validate"):
        params.validate(cfg)
    return params


def param_rows(cls: type | None) -> list[tuple[str, str, str]]:
    """(name, default, help) of every parameter of ``cls``, for ``--help`` and docs/METHODS.md."""
    if cls is None:
        return []
    return [(f.name, repr(f.default) if f.default is not MISSING else "", f.metadata.get("help", ""))
            for f in fields(cls)]


# ---------------------------------------------------------------------------------------------------------------------
# method parts and their combinations

@dataclass(frozen=True)
class Method:
    """One method part. The callables receive a :class:`raydistill.methods.context.MethodContext` and this part's
    parsed parameters.

    - ``terms(ctx, params) -> list[GuidanceTerm]``: what the part adds to every sampler step (guidance and model parts).
    - ``select(ctx, params, label) -> np.ndarray``: a real part's ``IPC`` training positions of class ``label``.
    - ``transform(ctx, params, images) -> images``: a real part's change to the chosen uint8 images before they are
      written (``recon``: through the VAE).
    - ``load_model(cfg, dit_path, device) -> (dit, router | None)``: a model part's DiT (default: the plain DiT).
    - ``check(cfg, params, ds)``: cheap preflight checks (files present, enough images), run before Ray starts.
    - ``precompute``: stages the driver runs before sampling (``"modes"``: MGD3's mode discovery as Ray tasks).
    """

    name: str
    kind: str
    summary: str
    params: type | None = None
    terms: Callable[..., list] | None = None
    select: Callable[..., Any] | None = None
    transform: Callable[..., Any] | None = None
    load_model: Callable[..., tuple] | None = None
    check: Callable[..., None] | None = None
    batch_limit: Callable[[Any], int | None] | None = None  # params -> the most images per sampler batch (or None)
    needs_codec: bool = False  # a real part that uses the VAE (herding, recon)
    whole_class: bool = False  # per-class sequential state: a class's images must stay in one shard
    precompute: tuple[str, ...] = ()
    joins: str = "+"  # the separator this guidance part takes right after a model part

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"method kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name or any(c in self.name for c in "+-/ "):
            raise ValueError(f"a method part's name may not contain '+', '-', '/' or spaces: {self.name!r}")
        if self.kind == "real" and self.select is None:
            raise ValueError(f"real method {self.name!r} needs a select function")


@dataclass(frozen=True)
class MethodSpec:
    """A method as the pipeline sees it: its canonical name and its parts (one for a single method)."""

    name: str
    parts: tuple[Method, ...]

    @property
    def real(self) -> Method | None:
        return self.parts[0] if self.parts[0].kind == "real" else None

    @property
    def generative(self) -> bool:
        return self.real is None

    @property
    def model(self) -> Method | None:
        """The part that supplies the DiT (None: the plain DiT)."""
        return next((p for p in self.parts if p.load_model is not None), None)

    @property
    def base(self) -> str:
        """The generator the method samples from: ``dit`` or the model part's name (presets differ per base)."""
        return self.model.name if self.model is not None else "dit"

    @property
    def whole_class(self) -> bool:
        return any(p.whole_class for p in self.parts)

    @property
    def precompute(self) -> tuple[str, ...]:
        return tuple(s for p in self.parts for s in p.precompute)

    @property
    def needs_codec(self) -> bool:
        return any(p.needs_codec for p in self.parts)

    def batch_size(self, params: dict[str, Any], default: int) -> int:
        """The sampler batch: ``default`` unless a part limits it (IGD's reference implementation runs batch 1)."""
        limits = [p.batch_limit(params.get(p.name)) for p in self.parts if p.batch_limit is not None]
        return min([default] + [b for b in limits if b is not None])

    def param_keys(self) -> set[str]:
        return {f.name for p in self.parts if p.params is not None for f in fields(p.params)}

    def parse(self, extra: dict[str, Any], cfg: Any = None) -> dict[str, Any]:
        """Part name -> its parsed parameters."""
        return {p.name: parse_params(p.params, extra, cfg) for p in self.parts if p.params is not None}


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method part (``raydistill.methods`` registers the built-in ones; a plugin module calls this on import).
    Re-registering the same name replaces the part (a plugin module imported again)."""
    for other in _REGISTRY.values():
        if other.name != method.name and other.params is not None and method.params is not None:
            clash = {f.name for f in fields(other.params)} & {f.name for f in fields(method.params)}
            if clash:
                raise ValueError(f"method {method.name!r} reuses parameter name(s) {sorted(clash)} of {other.name!r}")
    _REGISTRY[method.name] = method
    return method


def parts() -> list[Method]:
    """Every registered part, in registration order."""
    return list(_REGISTRY.values())


def canonical_name(chosen: Sequence[Method]) -> str:
    model = [p for p in chosen if p.kind == "model"]
    guidance = [p for p in parts() if p.kind == "guidance" and p in chosen]
    if not model:
        return "+".join(p.name for p in guidance)
    if not guidance:
        return model[0].name
    return model[0].name + guidance[0].joins + "+".join(p.name for p in guidance)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of a single or combined method name; a one-line error for anything else."""
    if name in _REGISTRY:
        return MethodSpec(name, (_REGISTRY[name],))
    chosen: list[Method] = []
    for piece in str(name).split("+"):
        head, sep, tail = piece.partition("-")
        names = [head, tail] if sep and head in _REGISTRY and tail in _REGISTRY else [piece]
        for n in names:
            if n not in _REGISTRY:
                raise UserError(f"unknown method {name!r}", f"use one of {', '.join(method_names())}, or parts joined "
                                "by '+' (a guidance method after a model method: minimax+mgd3)")
            chosen.append(_REGISTRY[n])
    kinds = [p.kind for p in chosen]
    if (len({p.name for p in chosen}) != len(chosen) or "real" in kinds or "base" in kinds
            or kinds.count("model") > 1):
        raise UserError(f"method {name!r} cannot be combined", "combine guidance methods (mgd3+igd), optionally after "
                        "one model method (minimax+mgd3); random, herding and dit stand alone")
    canon = canonical_name(chosen)
    if canon != name:
        raise UserError(f"method {name!r} is spelled {canon!r}", f"pass --method {canon}")
    return MethodSpec(name, tuple(p for p in parts() if p in chosen and p.kind == "model") +
                      tuple(p for p in parts() if p in chosen and p.kind == "guidance"))


def method_names() -> list[str]:
    """The single methods and the two-part combinations (longer ones are valid too), for help texts."""
    names = [p.name for p in parts()]
    guidance = [p for p in parts() if p.kind == "guidance"]
    models = [p for p in parts() if p.kind == "model"]
    names += [canonical_name([a, b]) for i, a in enumerate(guidance) for b in guidance[i + 1:]]
    names += [canonical_name([m, g]) for m in models for g in guidance]
    return names


def methods_help() -> str:
    """The methods and each part's parameters (``--set KEY=VALUE``), for ``raydistill distill --help``."""
    lines = ["methods (combine guidance parts with '+', after at most one model part):"]
    for p in parts():
        lines.append(f"  {p.name:<9} {p.kind:<8} {p.summary}")
        for name, default, help in param_rows(p.params):
            lines.append(f"      --set {name}=... (default {default}): {help}")
    return "\n".join(lines)


def methods_markdown() -> str:
    """The parameter tables of docs/METHODS.md (tests/test_methods.py checks that the file holds this text)."""
    out = []
    for p in parts():
        out.append(f"**`{p.name}`** ({p.kind}): {p.summary}.")
        rows = param_rows(p.params)
        if rows:
            out += ["", "| parameter | default | meaning |", "|---|---|---|"]
            out += [f"| `{n}` | `{d}` | {h} |" for n, d, h in rows]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def all_param_keys() -> set[str]:
    return {f.name for p in parts() if p.params is not None for f in fields(p.params)}


def check_extra(extra: dict[str, Any], cfg: Any = None) -> None:
    """Every key of ``extra`` is a parameter of some registered part (baselines share the main method's ``extra``),
    and the parameters of every part that ``extra`` mentions parse."""
    known = all_param_keys()
    unknown = sorted(set(extra) - known)
    if unknown:
        raise UserError(f"unknown method parameter(s): {', '.join(unknown)}",
                        f"valid --set keys: {', '.join(sorted(known))}")
    for p in parts():
        if p.params is not None and any(f.name in extra for f in fields(p.params)):
            parse_params(p.params, extra, cfg)


@dataclass
class MethodContext:
    """What a part's ``terms`` / ``select`` see: the run config, the dataset, the selected subset labels, the
    generator (None for real parts), the VAE codec and the generator the method samples from (``base``)."""

    cfg: Any
    ds: Any
    labels: list[int]
    generator: Any = None
    codec: Any = None
    base: str = "dit"


# ---------------------------------------------------------------------------------------------------------------------
# plugins: a user's own method parts, registered from outside the package

def load_plugins(plugins: Sequence[str]) -> None:
    """Import each plugin: a module name (importable where the code runs) or a path to a ``.py`` file. A plugin
    registers its parts with :func:`register` when imported. Idempotent: a module is imported once per process."""
    for spec in plugins:
        spec = str(spec)
        if spec.endswith(".py"):
            path = Path(spec).expanduser().resolve()
            mod_name = f"raydistill_plugin_{path.stem}"
            if mod_name in sys.modules:
                continue
            if not path.is_file():
                raise UserError(f"plugin file not found: {path}", "pass --plugin an existing .py file or a module name")
            loader = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[mod_name] = module
            try:
                loader.loader.exec_module(module)
            except UserError:
                del sys.modules[mod_name]
                raise
            except Exception as e:
                del sys.modules[mod_name]
                raise UserError(f"plugin {path} failed to import: {type(e).__name__}: {e}",
                                "fix the plugin (run `python " + str(path) + "` to see the traceback)") from e
        else:
            try:
                importlib.import_module(spec)
            except ImportError as e:
                raise UserError(f"cannot import plugin module {spec!r} ({e})",
                                "put it on PYTHONPATH (and in the Ray job's working_dir) or pass a .py path") from e
