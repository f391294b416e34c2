"""Mode coverage and spread (raydistill.evaluate.coverage) on hand-made latents."""

from __future__ import annotations

import pytest
import torch

from raydistill.errors import UserError
from raydistill.evaluate.coverage import class_coverage


def _blobs(k: int = 4, per: int = 50, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k well-separated Gaussian blobs: real latents [k*per, dim] and the blob centres [k, dim]."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.eye(k, dim)
    real = torch.cat([c + 0.5 * torch.randn(per, dim, generator=g) for c in centres])
    return real, centres


def test_one_sample_per_mode_covers_every_mode_evenly():
    real, centres = _blobs()
    r = class_coverage(real, centres + 0.05)
    assert r["coverage"] == 1.0
    assert r["distance"] < 1.2 and r["max_share"] == pytest.approx(0.25)


def test_samples_piled_on_one_mode_cover_one_and_sit_far_from_the_rest():
    real, centres = _blobs()
    piled = centres[0] + 0.01 * torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    r = class_coverage(real, piled)
    assert r["coverage"] == 0.25
    assert r["distance"] > 5  # three of four blobs are ~10 away from every sample; members sit ~1.4 from centres


def test_needs_enough_real_images():
    with pytest.raises(UserError, match="at least 4 real images"):
        class_coverage(torch.randn(3, 8), torch.randn(4, 8))
