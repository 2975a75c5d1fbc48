"""Shared fixtures: small random-weight models saved as real model files, and small CT-like pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.networks.model import MisalignmentNet, RegNetT
from RegistrationMisalignmentLib.weights import save_model

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def randomise_batch_norm(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give batch-norm layers non-trivial running statistics so that eval-mode outputs vary in space."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=generator))
    return module.eval()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """Random-weight models of every kind, written with ``save_model`` (cards and hashes included)."""
    directory = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for decoder in ("lstm", "singlescale"):
        save_model(randomise_batch_norm(MisalignmentNet(decoder, DEFAULT_CONFIG)),
                   {"name": f"test_{decoder}", "decoder": decoder, "config": DEFAULT_CONFIG.to_dict()},
                   directory / f"test_{decoder}.pt")
    save_model(randomise_batch_norm(RegNetT(DEFAULT_CONFIG)),
               {"name": "test_regnet_t", "decoder": "regnet-t", "config": DEFAULT_CONFIG.to_dict()},
               directory / "test_regnet_t.pt")
    return directory


def ct_like(shape_zyx: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A smooth random HU volume with air, soft tissue and bright blobs (float32)."""
    rng = np.random.default_rng(seed)
    noise = sitk.GetImageFromArray(rng.normal(0, 1, shape_zyx).astype(np.float32))
    smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 2.0))
    return (smooth / (smooth.std() + 1e-6) * 400.0 - 300.0).astype(np.float32)


@pytest.fixture
def small_pair() -> tuple[sitk.Image, sitk.Image]:
    """Fixed and moving (shifted by 2 voxels in z) on an oblique, anisotropic grid."""
    array = ct_like((14, 20, 24))
    fixed = sitk.GetImageFromArray(array)
    fixed.SetSpacing((1.2, 1.0, 1.5))
    fixed.SetOrigin((10.0, -20.0, 5.0))
    c, s = np.cos(0.3), np.sin(0.3)
    fixed.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    moving = sitk.GetImageFromArray(np.roll(array, 2, axis=0))
    moving.CopyInformation(fixed)
    return fixed, moving
