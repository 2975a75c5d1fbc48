"""The registration judge (``trainer.registration_judge``): held-out pairs as elastix leaves them, the truth
their dense residual."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.spatial import warp
from RegistrationMisalignmentLib.synthetic.images import TrainingImage
from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom
from trainer.config import TrainConfig
from trainer.registration_judge import registration_pairs

pytest.importorskip("itk")


@pytest.fixture(scope="module")
def pairs():
    hu = sitk.GetArrayFromImage(make_chest_phantom((112.0, 96.0, 96.0), 1.0, seed=7_600_001))
    return hu, registration_pairs(TrainingImage("phantom", hu), ("affine", "bspline100"), DEFAULT_CONFIG,
                                  threads=1, tiny=True)


def test_one_registered_pair_per_setting_supervised_in_the_lungs(pairs):
    _, found = pairs
    assert [p.name.split("/")[-1] for p in found] == ["affine", "bspline100"]
    for pair in found:
        assert pair.registered and pair.dvf.shape[1:] == pair.body.shape == pair.pyramid[1].shape[1:]
        assert 0 < pair.body.mean() < 0.6  # the lungs of the box, not the whole body
        assert np.allclose(pair.magnitude, pair.dvf.square().sum(0).sqrt().numpy())
    assert not np.array_equal(found[0].magnitude, found[1].magnitude)  # each setting leaves its own residual


def test_the_residual_is_what_the_registered_image_shows(pairs):
    """D(x) = I(x + r(x)): the fixed image warped by the residual explains the registered image, which the
    fixed image alone (r = 0) or the residual's reverse does not."""
    _, found = pairs
    for pair in found:
        fixed, deformed = (pair.pyramid[1][c] for c in (0, 1))
        lung = torch_mask(pair.body)
        background = float(fixed.min())  # the normalised image's air
        moved = warp(fixed, pair.dvf, (1.0, 1.0, 1.0), fill=background)
        reverse = warp(fixed, -pair.dvf, (1.0, 1.0, 1.0), fill=background)
        error, unmoved, reversed_ = ((deformed - image)[lung].abs().mean().item() for image in (moved, fixed, reverse))
        assert pair.magnitude[pair.body].mean() > 1.0  # the tiny registrations leave a residual worth showing
        assert error < 0.7 * unmoved and error < 0.7 * reversed_


def torch_mask(mask: np.ndarray):
    import torch

    inner = np.zeros_like(mask)
    inner[8:-8, 8:-8, 8:-8] = True  # away from the box's faces, where the warps read beyond it
    return torch.from_numpy(mask & inner)


def test_the_judge_takes_only_the_protocols_settings():
    with pytest.raises(ValueError, match="val_registrations"):
        TrainConfig(val_registrations=("bspline42",))
