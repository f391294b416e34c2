"""Multi-formation (IDC: Kim et al. 2022, "Dataset Condensation via Efficient Synthetic-Data Parameterization"):
one stored image holds ``factor x factor`` smaller images in a grid; a net is trained on the parts, each resized back
to the full size. At the same storage (images per class) a set carries ``factor**2`` times as many training images,
each at ``1/factor`` of the resolution.

- :func:`decode_zoom` is IDC's ``decode_zoom`` (its ``common.py``), written out here because the evaluation must
  read a packed set exactly as IDC does: crops in row-major grid order, concatenated crop by crop (all images' crop
  (0, 0), then all images' crop (0, 1), ...), each upsampled with ``nn.Upsample(mode="bilinear")``
  (``align_corners=False``), labels repeated in the same order. IDC pads a side that ``factor`` does not divide with
  0.5 in its normalised space; here such a size is refused instead (28, 32 and 224 px divide by 2 and 4).
- :func:`pack` is the generator's side: ``factor**2`` full-size images of one class (a group of consecutive indices
  of a generated set) are each shrunk by area averaging (``F.interpolate(mode="area")``) and tiled at the grid
  position ``decode_zoom`` reads them from.
- :func:`pack_set` packs a finished distilled set of ``IPC * factor**2`` images per class into a set of ``IPC``
  stored images per class; its ``run.json`` records the factor, and :func:`formation_of` reads it back, so
  ``raydistill evaluate`` decodes a packed set without being told.

Bilinear resizing commutes with the per-channel normalisation (its weights sum to one), so decoding the [0, 1]
images before the presets normalise them trains on the very tensors IDC's order (normalise, then decode) gives.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from raydistill.errors import UserError


def _check_factor(factor: int, size: int) -> None:
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise UserError(f"the formation factor must be a positive integer, got {factor!r}", "pass --factor 2 (or 3, 4)")
    if size % factor:
        raise UserError(f"the formation factor {factor} does not divide the image size {size}",
                        "pick a factor that divides the image side (2 or 4 for 28, 32 or 224 px images)")


def decode_zoom(x: torch.Tensor, y: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """IDC's decode: float images [N, C, H, W] -> [N * factor**2, C, H, W] and labels, crop-major (module docstring).
    ``factor == 1`` returns the inputs unchanged."""
    _check_factor(factor, x.shape[-1])
    if factor == 1:
        return x, y
    h, s = x.shape[-1], x.shape[-1] // factor
    crops = [x[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s] for i in range(factor) for j in range(factor)]
    decoded = F.interpolate(torch.cat(crops), size=(h, h), mode="bilinear", align_corners=False)
    return decoded, torch.cat([y] * factor ** 2)


def pack(x: torch.Tensor, factor: int) -> torch.Tensor:
    """uint8 images [G * factor**2, C, H, W] (groups of consecutive images) -> [G, C, H, W]: image
    ``g * factor**2 + i * factor + j``, shrunk by ``factor`` (area averaging, rounded), at grid row ``i``, column
    ``j`` of stored image ``g``."""
    _check_factor(factor, x.shape[-1])
    n, c, h, w = x.shape
    if n % factor ** 2:
        raise UserError(f"{n} images do not fill whole groups of {factor ** 2}",
                        f"pack a set whose images per class are a multiple of {factor ** 2}")
    s = h // factor
    small = F.interpolate(x.float(), size=(s, s), mode="area").round().clamp(0, 255).to(torch.uint8)
    grid = small.view(n // factor ** 2, factor, factor, c, s, s)  # [G, i, j, C, s, s]
    return grid.permute(0, 3, 1, 4, 2, 5).reshape(n // factor ** 2, c, h, w)


def formation_of(out: str | Path) -> int:
    """The formation factor a set's ``run.json`` records (1 for an ordinary set or a plain PNG tree)."""
    run = Path(out) / "run.json"
    if not run.exists():
        return 1
    try:
        factor = json.loads(run.read_text()).get("settings", {}).get("formation", 1)
    except (ValueError, AttributeError):
        return 1
    return int(factor) if isinstance(factor, int) and factor >= 1 else 1


def pack_set(src: str | Path, out: str | Path, factor: int, overwrite: bool = False) -> list[dict]:
    """Pack the finished set ``src`` (``IPC * factor**2`` images per class, index order) into ``out`` (``IPC`` per
    class): one shard per class, written and resumed like any set (:class:`raydistill.outputs.DistilledSetWriter`).
    Returns the manifest rows; a row's ``seed`` is the source index of its first part."""
    from raydistill.outputs import DistilledSetWriter, png_bytes, read_image, read_manifest, verify_set

    src, out = Path(src), Path(out)
    if not isinstance(factor, int) or factor < 2:
        raise UserError(f"packing needs a formation factor of at least 2, got {factor!r}", "pass --factor 2")
    if (have := formation_of(src)) != 1:
        raise UserError(f"{src} is already a packed set (factor {have})", "pack the unpacked set")
    rows = sorted(read_manifest(src), key=lambda r: (r["label"], r["index"]))
    damage = verify_set(src)
    if damage:
        raise UserError(f"{src} is damaged ({damage[0]})", "regenerate it before packing")
    by_class: dict[int, list[dict]] = {}
    for r in rows:
        by_class.setdefault(int(r["label"]), []).append(r)
    for rs in by_class.values():
        if len(rs) % factor ** 2:
            raise UserError(f"class {rs[0]['class_name']!r} of {src} has {len(rs)} images, not a multiple of "
                            f"{factor ** 2}", f"distill IPC * {factor ** 2} images per class, then pack")
    src_run = json.loads((src / "run.json").read_text()) if (src / "run.json").exists() else {}
    settings = {"formation": factor, "packed_from": src_run.get("settings", {}),
                "packed_from_fingerprint": src_run.get("fingerprint")}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    from PIL import Image

    with Image.open(src / rows[0]["path"]) as im:
        channels = 1 if im.mode in ("1", "L", "I", "I;16") else 3  # a grey set stays grey
    names = sorted({(r["label"], r["class_name"]) for r in rows})
    writer = DistilledSetWriter(out, [n for _, n in names], fingerprint, settings, overwrite)
    for label, rs in sorted(by_class.items()):
        shard = f"c{label:04d}"
        if writer.shard_done(shard):
            continue
        x = torch.stack([read_image(src / r["path"], channels) for r in rs])
        packed = pack(x, factor)
        new_rows = [{"class_name": rs[0]["class_name"], "label": label, "dit_label": rs[0].get("dit_label", label),
                     "index": g, "seed": int(rs[g * factor ** 2]["index"]), "method": rs[0]["method"],
                     "params": json.dumps({"formation": factor}), "seconds": 0.0}
                    for g in range(len(packed))]
        writer.commit(shard, new_rows, [png_bytes(img) for img in packed])
    return writer.finalize()
