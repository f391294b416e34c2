"""IGD's guidance terms (spec 2.2): influence and deviation guidance, each in a ``reference`` and a ``fast`` form.

Influence (Eq. 7, TracIn's cosine form). For image b of class c at respaced index i in the window [30, 45]:

    img_b = D(x0_hat(x_t))                                     decoded predicted image (graph through VAE and DiT)
    g_e   = grad_theta CE(f_theta_e(img_b), c)                 per checkpoint e, with create_graph (second order)
    L_b   = sum_e (1 - cos(g_e, G_e^c)) / E                    G_e^c: class c's mean real gradient at checkpoint e
    g_inf = grad_{x_t} L_b
    rho   = 0.0015 * RMS(eps_b) * sqrt(1 - abar_i) / RMS(g_inf)
    mean += -k * rho * g_inf                                   (RMS over all elements of image b; eps is CFG-combined)

``twin`` (``igd_twin``; on by default with ``reference``): the released code decodes both rows of its CFG batch, the
image and its unconditional twin (row 1: it starts at the same x_T, draws its own noise at every step and is never
guided; its x0_hat uses its own latent and the twin row of DiT's ``forward_with_cfg``, i.e. the guided eps channels,
the unconditional eps on the others and the unconditional variance, all from the model run on the image's latent).
g_e is then the gradient of the CE averaged over the two rows, and the gradient is taken w.r.t. the doubled x with
row 0 kept, i.e. w.r.t. x_t with the twin's latent held fixed (its x0_hat still depends on x_t through the DiT). The
sampler carries the twin (``uses_twin``); without it (``igd_twin: off``, the ``fast`` default) one copy is decoded.

``reference`` follows the released code step by step: batch 1 and one ``autograd.grad`` to x_t per checkpoint (so the
decoder and DiT backward runs E times). ``fast`` sums the losses of all checkpoints and all images of the batch and
takes one ``autograd.grad`` (the per-image losses only depend on their own x_t, so the summed gradient holds every
image's own gradient): one backward through decoder and DiT per step instead of E, and batches of any size.

``refresh`` (``igd_refresh``, default 1 = exact): an approximate, cheaper option that is not in the paper. The
influence gradient is computed at the window's first step and then every ``refresh`` steps; on the steps between,
the last computed direction ``g_inf / RMS(g_inf)`` of each image is reused with the current step's factor
``0.0015 * RMS(eps_b) * sqrt(1 - abar_i)`` (so the step size follows the schedule as in Eq. 7) and no graph through
the DiT is built. The cost of the window drops ~``refresh``-fold; its effect on accuracy is measured in
docs/BENCHMARKS.md section 6, not assumed.

Deviation (Eq. 8): ``mean += -gamma * grad_{x_t} cos(x_t, m*)`` with ``m*`` the memory entry most cosine-similar to
the noisy x_t; the memory holds the final clean latents of the class's earlier images (FIFO of 64); no normalisation;
``cos(a, b) = <a, b> / (|a| |b| + 1e-6)`` as in the code.

- ``reference``: the released definition at batch 1: a FIFO list per class, appended after each image.
- ``fast``: defined for batches. The memory of image k of class c is images max(0, k - 64) .. k - 1 of class c: the
  final latents of those already finished, and for those in the same batch (not finished yet) their current predicted
  clean latent ``x0_hat`` as the stand-in. Images are generated in index order, so at batch 1 this is exactly the
  reference FIFO; in a batch every image still sees all its predecessors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.errors import UserError
from raydistill.guidance.base import StepContext

IMPLS = ("fast", "reference")
TWIN_MODES = ("auto", "on", "off")  # igd_twin: auto = on with reference, off with fast
DEFAULT_WINDOW = (30, 45)  # spec 2.1 step 4: --low 30 --high 45 on the respaced 0-49 index
STEP_CONSTANT = 0.0015  # spec 2.2: hard-coded ``out["l2"]`` factor


def code_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The released code's cosine over the last dim: ``<a, b> / (|a| |b| + 1e-6)``."""
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-6)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square per batch element, shaped [B, 1, 1, 1]."""
    return x.pow(2).flatten(1).mean(1).sqrt().view(-1, *([1] * (x.dim() - 1)))


def check_window(window) -> tuple[int, int]:
    ok = (isinstance(window, (list, tuple)) and len(window) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in window) and window[0] <= window[1])
    if not ok:
        raise UserError(f"a guidance window must be two integers [low, high] with low <= high, got {window!r}",
                        "IGD uses [30, 45] on the respaced 0-49 index")
    return int(window[0]), int(window[1])


def check_scale(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}", f"fix {name} in the config")
    return float(value)


def check_refresh(refresh) -> int:
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise UserError(f"igd_refresh must be a positive integer, got {refresh!r}",
                        "1 computes the influence gradient at every window step (exact IGD); 2-4 reuse it")
    return refresh


def check_impl(impl) -> str:
    if impl not in IMPLS:
        raise UserError(f"unknown IGD implementation {impl!r}", f"use one of {', '.join(IMPLS)}")
    return impl


class InfluenceGuidance:
    """IGD influence term: ``InfluenceGuidance(decode, surrogate, checkpoints, real_grads, scale=5.0)``.

    Args:
        decode: latents [B, c, h, w] -> images [B, C, H, W] in [-1, 1] (the VAE decoder, differentiable).
        surrogate: the surrogate net, called through ``torch.func.functional_call`` with each checkpoint's params.
        checkpoints: parameter dicts of the selected epochs (names as in ``surrogate.named_parameters()``).
        real_grads: subset class label -> [E, P] class-mean real gradients at those checkpoints (flat, same order).
        scale: k. window: respaced indices [low, high], inclusive. impl: "fast" or "reference".
        refresh: recompute the gradient every ``refresh`` window steps and reuse its direction in between
            (approximate; 1, the default, is the exact term). See the module docstring.
        twin: decode each image's unconditional CFG twin too and average the CE over both rows, as released (the
            sampler carries the twin: ``uses_twin``). See the module docstring.
    """

    name = "igd-influence"

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], surrogate: nn.Module,
                 checkpoints: Sequence[Mapping[str, torch.Tensor]], real_grads: Mapping[int, torch.Tensor],
                 scale: float = 5.0, window: tuple[int, int] = DEFAULT_WINDOW, impl: str = "fast",
                 step_constant: float = STEP_CONSTANT, refresh: int = 1, twin: bool = False) -> None:
        if not checkpoints:
            raise UserError("IGD needs at least one surrogate checkpoint", "select epochs, e.g. igd_epochs: [0, 2, 5]")
        self.decode = decode
        self.surrogate = surrogate.eval()
        self.checkpoints = [dict(c) for c in checkpoints]
        self.real_grads = real_grads
        self.scale = check_scale("igd_scale", scale)
        self.window = check_window(window)
        self.impl = check_impl(impl)
        self.step_constant = float(step_constant)
        self.refresh = check_refresh(refresh)
        self.uses_twin = bool(twin)
        self._grads_on: dict[tuple, torch.Tensor] = {}
        self._last: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (i, labels, indices, unit)

    def active(self, i: int) -> bool:
        return self.window[0] <= i <= self.window[1] and self.scale != 0

    def fresh(self, i: int) -> bool:
        """Whether step ``i`` computes the gradient (always at ``refresh`` 1). A chain visits i in decreasing order,
        so ``i >= `` the last computed step means a new chain has started."""
        if self.refresh == 1 or self._last is None:
            return True
        last_i = self._last[0]
        return i >= last_i or last_i - i >= self.refresh

    def needs_grad(self, i: int) -> bool:
        return self.active(i) and self.fresh(i)

    def on_images_done(self, latents, class_labels, image_indices) -> None:
        return None

    def _real(self, label: int, like: torch.Tensor) -> torch.Tensor:
        key = (int(label), str(like.device), like.dtype)
        if key not in self._grads_on:
            g = torch.as_tensor(self.real_grads[int(label)])
            if g.dim() != 2 or g.shape[0] != len(self.checkpoints):
                raise UserError(f"real gradients of class {label} have shape {tuple(g.shape)}, expected "
                                f"[{len(self.checkpoints)}, P]", "recompute them for the selected checkpoints")
            self._grads_on[key] = g.to(device=like.device, dtype=like.dtype)
        return self._grads_on[key]

    def checkpoint_losses(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(1 - cos(g_e(img_b), G_e)) / E`` for every image b and checkpoint e: [B, E], differentiable in images.

        ``images`` is [B, C, H, W], or [B, R, C, H, W] for R decoded rows per image (the image and its twin): g_e is
        then the gradient of the CE averaged over the R rows. ``reference`` takes one image at a time (one
        ``autograd.grad`` per image and checkpoint, as released); ``fast`` gets all per-image parameter gradients of
        a checkpoint at once with ``vmap(grad(...))``, batched convolutions instead of B small ones (same values:
        tests/test_igd.py compares the two).
        """
        if images.dim() == 4:
            images = images[:, None]
        if self.impl == "fast":
            return self._batched_losses(images, labels)
        from torch.func import functional_call

        n_ck = len(self.checkpoints)
        rows = []
        for b in range(images.shape[0]):
            real = self._real(int(labels[b]), images)
            y = labels[b:b + 1].to(images.device).expand(images.shape[1])
            row = []
            for e, ckpt in enumerate(self.checkpoints):
                params = {k: v.detach().requires_grad_() for k, v in ckpt.items()}
                loss = F.cross_entropy(functional_call(self.surrogate, params, (images[b],)), y)
                pg = torch.autograd.grad(loss, list(params.values()), create_graph=True)
                row.append((1 - code_cosine(torch.cat([g.reshape(-1) for g in pg]), real[e])) / n_ck)
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def _batched_losses(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call, grad, vmap

        def loss(params, image, label):  # one image's R rows: [R, C, H, W], label: []
            return F.cross_entropy(functional_call(self.surrogate, params, (image,)), label.expand(image.shape[0]))

        labels = labels.to(images.device)
        real = torch.stack([self._real(int(c), images) for c in labels.tolist()])  # [B, E, P]
        n_ck, cols = len(self.checkpoints), []
        for e, ckpt in enumerate(self.checkpoints):
            params = {k: v.detach() for k, v in ckpt.items()}
            per_image = vmap(grad(loss), in_dims=(None, 0, 0))(params, images, labels)  # name -> [B, *shape]
            flat = torch.cat([per_image[k].reshape(images.shape[0], -1) for k in params], 1)  # [B, P]
            cols.append((1 - code_cosine(flat, real[:, e])) / n_ck)  # [B]
        return torch.stack(cols, 1)  # [B, E]

    def gradient(self, ctx: StepContext) -> torch.Tensor:
        """g_inf = grad_{x_t} of the influence loss, [B, c, h, w] (needs ``ctx.x0_hat`` built from ``ctx.x_t``)."""
        if not ctx.x_t.requires_grad:
            raise ValueError("the influence term needs x_t with requires_grad (the sampler sets it via needs_grad)")
        if self.uses_twin:  # [B, 2, C, H, W]: each image and its twin, decoded as one batch (released: batch 2)
            if ctx.x0_hat_twin is None:
                raise ValueError("the twin influence term needs ctx.x0_hat_twin (the sampler sets it via uses_twin)")
            b = ctx.x0_hat.shape[0]
            both = self.decode(torch.cat([ctx.x0_hat, ctx.x0_hat_twin]))
            images = torch.stack([both[:b], both[b:]], 1)
        else:
            images = self.decode(ctx.x0_hat)
        if self.impl == "fast":
            return torch.autograd.grad(self.checkpoint_losses(images, ctx.class_labels).sum(), ctx.x_t)[0]
        if ctx.x_t.shape[0] != 1:
            raise ValueError("the reference influence term runs at batch size 1")
        losses = self.checkpoint_losses(images, ctx.class_labels)[0]
        g = torch.zeros_like(ctx.x_t)
        for e in range(len(self.checkpoints)):  # one backward through decoder + DiT per checkpoint, as released
            g = g + torch.autograd.grad(losses[e], ctx.x_t, retain_graph=e < len(self.checkpoints) - 1)[0]
        return g

    def delta(self, ctx: StepContext) -> torch.Tensor:
        step = self.step_constant * _rms(ctx.eps.detach()) * (1 - ctx.alpha_bar).sqrt()  # [B, 1, 1, 1]
        if not self.fresh(ctx.i):
            return -self.scale * step * self._reused(ctx)
        g = self.gradient(ctx).detach()
        g_rms = _rms(g)
        rho = step / g_rms
        rho = torch.where(g_rms > 0, rho, torch.zeros_like(rho))  # a zero gradient (e.g. dead surrogate) adds nothing
        if self.refresh > 1:  # remember the direction g / RMS(g) for the next refresh - 1 steps
            unit = torch.where(g_rms > 0, g / g_rms, torch.zeros_like(g))
            self._last = (ctx.i, ctx.class_labels.detach().clone(), ctx.image_indices.detach().clone(), unit)
        return -self.scale * rho * g

    def _reused(self, ctx: StepContext) -> torch.Tensor:
        _, labels, indices, unit = self._last
        if (unit.shape != ctx.x_t.shape or not torch.equal(labels, ctx.class_labels)
                or not torch.equal(indices, ctx.image_indices)):
            raise RuntimeError("igd_refresh reuses a gradient of another batch (chains must run one at a time)")
        return unit


class DeviationGuidance:
    """IGD deviation term: ``DeviationGuidance(gamma=50.0, window=(30, 45), memory_size=64, impl="fast")``."""

    name = "igd-deviation"

    def __init__(self, gamma: float = 50.0, window: tuple[int, int] = DEFAULT_WINDOW, memory_size: int = 64,
                 impl: str = "fast") -> None:
        self.gamma = check_scale("igd_gamma", gamma)
        self.window = check_window(window)
        if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
            raise UserError(f"igd_memory must be a positive integer, got {memory_size!r}", "the paper uses 64")
        self.memory_size = memory_size
        self.impl = check_impl(impl)
        self.fifo: dict[int, list[torch.Tensor]] = {}  # reference: class -> final latents in generation order
        self.finals: dict[int, dict[int, torch.Tensor]] = {}  # fast: class -> image index -> final latent

    def active(self, i: int) -> bool:
        return self.window[0] <= i <= self.window[1] and self.gamma != 0

    def needs_grad(self, i: int) -> bool:
        return False

    def on_images_done(self, latents: torch.Tensor, class_labels: torch.Tensor, image_indices: torch.Tensor) -> None:
        for z, c, k in zip(latents.detach(), class_labels.tolist(), image_indices.tolist()):
            if int(k) == 0:  # a class's generation starts at image 0: its FIFO starts afresh (released: per class)
                self.fifo[int(c)] = []
            fifo = self.fifo.setdefault(int(c), [])
            fifo.append(z.clone())
            while len(fifo) > self.memory_size:
                fifo.pop(0)
            self.finals.setdefault(int(c), {})[int(k)] = z.clone()

    def memory(self, ctx: StepContext, b: int) -> list[torch.Tensor]:
        """The memory image ``b`` of the batch is repelled from (see the module docstring)."""
        c, k = int(ctx.class_labels[b]), int(ctx.image_indices[b])
        if self.impl == "reference":
            if ctx.x_t.shape[0] != 1:
                raise ValueError("the reference deviation term runs at batch size 1")
            return self.fifo.get(c, [])
        in_batch = {int(ctx.image_indices[j]): j for j in range(ctx.x_t.shape[0])
                    if int(ctx.class_labels[j]) == c and int(ctx.image_indices[j]) < k}
        finals = self.finals.get(c, {})
        bank = []
        for j in range(max(0, k - self.memory_size), k):
            if j in in_batch:
                bank.append(ctx.x0_hat[in_batch[j]].detach())
            elif j in finals:
                bank.append(finals[j])
        return bank

    def delta(self, ctx: StepContext) -> torch.Tensor:
        out = torch.zeros_like(ctx.x_t, requires_grad=False)
        for b in range(ctx.x_t.shape[0]):
            bank = self.memory(ctx, b)
            if not bank:
                continue
            x = ctx.x_t[b].detach().flatten()
            mem = torch.stack([m.to(x.device, x.dtype).flatten() for m in bank])  # [M, D]
            nearest = int(code_cosine(x[None], mem).argmax())
            with torch.enable_grad():
                leaf = x.clone().requires_grad_()
                g = torch.autograd.grad(code_cosine(leaf, mem[nearest]), leaf)[0]
            out[b] = -self.gamma * g.view_as(out[b])
        return out


# ---------------------------------------------------------------------------------------------------------------------
# presets and construction from a distillation config

# Spec 2.3 (paper Table 7): (dataset, base model) -> {IPC: (k, gamma)}. Window [30, 45], 4 ConvNet-6 checkpoints,
# 200 real images per class, memory 64 in every row. Fashion-MNIST has no row in the paper: k as the ImageNette rows,
# gamma the ImageNette gamma rescaled to the latent's size at run time (LATENT_SCALED, see igd_preset).
IGD_PRESETS: dict[tuple[str, str], dict[int, tuple[float, float]]] = {
    ("imagenette", "dit"): {10: (5, 50), 50: (5, 120), 100: (5, 120)},
    ("imagewoof", "dit"): {10: (5, 50), 50: (5, 120), 100: (5, 120)},
    ("imagenet-1k", "dit"): {10: (5, 120), 50: (5, 120)},
    ("imagenette", "minimax"): {10: (15, 10), 50: (15, 10), 100: (15, 10)},
    ("imagewoof", "minimax"): {10: (10, 50), 50: (10, 100), 100: (10, 100)},
    ("imagenet-1k", "minimax"): {10: (10, 100), 50: (10, 100)},
    ("fashion-mnist", "dit"): {1: (5, 50), 10: (5, 50), 50: (5, 120)},
    ("fashion-mnist", "minimax"): {1: (5, 50), 10: (5, 50), 50: (5, 120)},
}
# Datasets whose gamma is given for the paper's 4x32x32 = 4,096-value latents and rescaled to the run's latent: the
# deviation gradient d cos(x_t, m)/d x_t has norm ~ 1/|x_t| ~ 1/sqrt(D), so ~ 1/D per element, and gamma x D/4096
# moves each element as far as the paper's gamma does at 256 px. The built-in 4x16x16 latents (1,024 values) get
# gamma 12.5 at IPC 10 and 30 at IPC 50; the first model's 4x8x8 latents got 3.125 / 7.5.
LATENT_SCALED = {"fashion-mnist"}
REFERENCE_LATENT_NUMEL = 4 * 32 * 32


def igd_preset(dataset: str, ipc: int, base: str = "dit",
               latent_numel: int = REFERENCE_LATENT_NUMEL) -> tuple[float, float]:
    """(k, gamma) of spec 2.3 for ``dataset`` at ``ipc`` (the row of the largest listed IPC <= ipc, else the first);
    for :data:`LATENT_SCALED` datasets gamma is rescaled from 4,096 latent values to ``latent_numel``."""
    table = IGD_PRESETS.get((dataset, base))
    if table is None:
        raise UserError(f"no IGD preset for {dataset} ({base})", "set extra.igd_scale and extra.igd_gamma")
    rows = sorted(table)
    below = [r for r in rows if r <= ipc]
    k, gamma = table[below[-1] if below else rows[0]]
    if dataset in LATENT_SCALED:
        gamma = gamma * latent_numel / REFERENCE_LATENT_NUMEL
    return k, gamma


def twin_on(p) -> bool:
    """Whether a run carries the unconditional twin: ``igd_twin`` on, or auto with ``igd_impl: reference``."""
    return p.igd_twin == "on" or (p.igd_twin == "auto" and p.igd_impl == "reference")


def trajectory_path(cfg, ds, p) -> str:
    """The surrogate trajectory of a run: ``surrogate``, else the built-in one for Fashion-MNIST with its model."""
    if p.surrogate is not None:
        return p.surrogate
    from raydistill.config import BUILTIN_MODEL

    if ds.name != "fashion-mnist" or cfg.model is not None:
        raise UserError("IGD needs a surrogate trajectory", "train one with `raydistill surrogate` and pass "
                        "extra.surrogate (--set surrogate=PATH)")
    return str(BUILTIN_MODEL / "surrogate")


def igd_terms(ctx, p) -> list:
    """[DeviationGuidance, InfluenceGuidance] of a run (method part ``igd`` and its combinations); ``p``:
    :class:`raydistill.methods.igd.IgdParams`. Unset ``igd_scale`` / ``igd_gamma`` come from :data:`IGD_PRESETS`
    for the dataset, the IPC, the generator the method samples from (``ctx.base``: dit or minimax) and the size of
    its latent."""
    from pathlib import Path

    from raydistill.guidance.base import LazyClassMap
    from raydistill.methods.igd.surrogate import Trajectory, resolve_epochs

    cfg, ds, codec = ctx.cfg, ctx.ds, ctx.codec
    device = next(codec.parameters()).device
    traj = Trajectory(trajectory_path(cfg, ds, p), device=device)
    traj.check_dataset(ds)
    epochs = resolve_epochs(traj, ds.name, p.igd_epochs)
    k_default, g_default = (None, None)
    if p.igd_scale is None or p.igd_gamma is None:
        k_default, g_default = igd_preset(ds.name, cfg.ipc, ctx.base, math.prod(ctx.generator.latent_shape))
    k = check_scale("igd_scale", p.igd_scale if p.igd_scale is not None else k_default)
    gamma = check_scale("igd_gamma", p.igd_gamma if p.igd_gamma is not None else g_default)
    cache = p.igd_cache if p.igd_cache is not None else (str(Path(cfg.out).parent / ".igd") if cfg.out is not None
                                                           else None)
    real = LazyClassMap(ctx.labels, lambda c: traj.real_gradients(ds, c, epochs, p.igd_grad_ipc, cache))
    influence = InfluenceGuidance(codec.decode, traj.net, [traj.params(e) for e in epochs], real, scale=k,
                                  window=p.igd_window, impl=p.igd_impl, refresh=p.igd_refresh, twin=twin_on(p))
    return [DeviationGuidance(gamma=gamma, window=p.igd_window, memory_size=p.igd_memory, impl=p.igd_impl),
            influence]
