"""Synthetic DVFs, warping, Jacobian, sponge model and noise: the statistics the training labels rely on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from RegistrationMisalignmentLib.spatial import compose, warp
from RegistrationMisalignmentLib.synthetic.deform import (REGISTERED_MOTION, add_noise, deform_pair, invert_dvf,
                                                          jacobian_determinant, registered_pair, sponge)
from RegistrationMisalignmentLib.synthetic.dvf import KINDS, DVFSettings, random_dvf

SHAPE = (40, 40, 40)
SPACING = (2.0, 2.0, 2.0)
SETTINGS = DVFSettings()


def _field(kind: str, seed: int, settings: DVFSettings = SETTINGS, shape=SHAPE, spacing=SPACING, **masks) -> torch.Tensor:
    return random_dvf(kind, shape, spacing, torch.Generator().manual_seed(seed), settings, **masks)


def _positions(shape, spacing) -> list[torch.Tensor]:
    """Physical x, y, z (mm) of every voxel of a (D, H, W) grid, each broadcast to the full shape."""
    z, y, x = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    return [x * spacing[0], y * spacing[1], z * spacing[2]]


def _roughness(u: torch.Tensor, spacing) -> float:
    """Mean |finite difference| per mm relative to mean |u|: the inverse of the field's length scale."""
    diffs = [u.diff(dim=d).abs().mean() / spacing[2 - (d - 1)] for d in (1, 2, 3)]
    return (sum(diffs) / 3 / u.abs().mean()).item()


@pytest.mark.parametrize("kind", ["single", "mixed", "respiratory"])
def test_peak_displacement_is_positive_and_within_the_maximum(kind):
    for seed in range(3):
        u = _field(kind, seed)
        assert u.shape == (3, *SHAPE) and u.dtype == torch.float32
        peak = u.abs().amax().item()
        assert 0.0 < peak <= SETTINGS.max_displacement_mm + 1e-4


def test_single_frequency_peak_is_drawn_from_the_amplitude_range():
    settings = DVFSettings(max_displacement_mm=6.0, amplitude_ratio=(0.5, 1.0))
    peaks = [_field("single", seed, settings).abs().amax().item() for seed in range(6)]
    assert all(3.0 - 1e-4 <= p <= 6.0 + 1e-4 for p in peaks)
    assert max(peaks) - min(peaks) > 0.1  # random, not a constant


def test_identity_is_exactly_zero():
    u = _field("identity", 0)
    assert u.shape == (3, *SHAPE) and u.dtype == torch.float32
    assert torch.count_nonzero(u) == 0


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        _field("twist", 0)


def test_single_frequency_is_smoother_than_mixed():
    single = np.mean([_roughness(_field("single", s), SPACING) for s in range(4)])
    mixed = np.mean([_roughness(_field("mixed", s), SPACING) for s in range(4)])
    assert mixed > 1.5 * single


def test_single_frequency_does_not_fold():
    for seed in range(4):
        det = jacobian_determinant(_field("single", seed), SPACING)
        assert (det > 0).float().mean().item() > 0.999


def _base_slab_and_centre(u):
    """Mean u_z over the lowest and highest slices, and the correlation of u_x, u_y with x, y."""
    x, y, _ = _positions(SHAPE, SPACING)
    base = u[2, :4].mean().item()
    apex = u[2, -4:].abs().mean().item()
    low = slice(0, SHAPE[0] // 4)  # the lung base, where the motion is full
    corr_x = np.corrcoef(u[0, low].flatten(), x[low].flatten())[0, 1]
    corr_y = np.corrcoef(u[1, low].flatten(), y[low].flatten())[0, 1]
    return base, apex, corr_x, corr_y


def test_respiratory_pattern_without_random_part():
    settings = DVFSettings(respiratory_single_freq_ratio=0.0)
    for seed in range(4):
        base, apex, corr_x, corr_y = _base_slab_and_centre(_field("respiratory", seed, settings))
        assert abs(base) > 4.0 and apex < 1e-6  # diaphragm shift fades to zero by mid-lung
        assert abs(corr_x) > 0.9 and abs(corr_y) > 0.9
        # Radial: x and y move the same way (in or out); inhale (u_z > 0 at the base) samples inward.
        assert np.sign(corr_x) == np.sign(corr_y) == -np.sign(base)


def test_respiratory_with_random_part_keeps_the_pattern():
    for seed in range(4):
        u = _field("respiratory", seed)
        assert u[2, :4].abs().mean() > u[2, -4:].abs().mean()
        _, _, corr_x, corr_y = _base_slab_and_centre(u)
        assert np.sign(corr_x) == np.sign(corr_y) and abs(corr_x) > 0.3


def test_respiratory_follows_the_lung_mask():
    """The shift is full below the lung base given by the mask and gone above mid-lung."""
    lungs = torch.zeros(SHAPE, dtype=torch.bool)
    lungs[20:40, 10:30, 5:35] = True  # base at slice 20 (40 mm), mid-lung at slice 30
    u = _field("respiratory", 0, DVFSettings(respiratory_single_freq_ratio=0.0), lung_mask=lungs)
    assert torch.allclose(u[2, :20], u[2, 0, 0, 0].expand(20, 40, 40))
    assert u[2, 0, 0, 0].abs() > 4.0
    assert u[2, 31:].abs().max() < 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_reproducibility(kind):
    assert torch.equal(_field(kind, 7), _field(kind, 7))
    if kind != "identity":
        assert not torch.equal(_field(kind, 7), _field(kind, 8))


def test_warp_moves_a_bright_voxel_by_the_displacement():
    spacing = (1.0, 2.0, 0.5)
    image = torch.full((20, 24, 28), -1000.0)
    image[10, 12, 14] = 1000.0
    dvf = torch.zeros(3, 20, 24, 28)
    dvf[0], dvf[1], dvf[2] = 3.0, -4.0, 2.0  # mm: +3 voxels in x, -2 in y, +4 in z
    moved = warp(image, dvf, spacing)
    # I_D(p) = I(p + u): the voxel seen at p comes from p + u, so the bright spot appears at p - u.
    assert tuple(np.unravel_index(int(moved.argmax()), moved.shape)) == (6, 14, 11)
    assert moved.max().item() == pytest.approx(1000.0, abs=1e-2)
    assert moved[-4:].eq(-1000.0).all()  # sampled beyond the last slice: filled with air


def test_jacobian_of_a_linear_field():
    spacing = (1.5, 1.0, 2.5)
    shape = (10, 12, 14)
    a = torch.tensor([[0.10, -0.05, 0.02], [0.03, -0.20, 0.04], [-0.06, 0.01, 0.15]])
    pos = torch.stack(_positions(shape, spacing))  # (3, D, H, W), x y z
    u = torch.einsum("ab,bdhw->adhw", a, pos)
    det = jacobian_determinant(u, spacing)
    expected = torch.linalg.det(torch.eye(3) + a).item()
    assert torch.allclose(det, torch.full(shape, expected), atol=1e-4)


def test_sponge_on_a_known_jacobian():
    image = torch.full((4, 4, 4), -500.0)
    assert torch.allclose(sponge(image, torch.full_like(image, 2.0)), torch.full_like(image, -750.0))
    assert torch.allclose(sponge(image, torch.ones_like(image)), image)
    clamped = sponge(image, torch.full_like(image, 10.0), clamp=(0.5, 2.0))
    assert torch.allclose(clamped, torch.full_like(image, -750.0))


def test_noise_has_the_requested_sigma_and_is_seeded():
    image = torch.zeros(32, 32, 32)
    noisy = add_noise(image, 5.0, torch.Generator().manual_seed(3))
    assert noisy.std().item() == pytest.approx(5.0, rel=0.03)
    assert torch.equal(noisy, add_noise(image, 5.0, torch.Generator().manual_seed(3)))


def test_identity_pair_is_the_image_plus_noise():
    image = torch.linspace(-1000.0, 500.0, 32**3).reshape(32, 32, 32)
    deformed, dvf = deform_pair(image, "identity", (1.0, 1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.count_nonzero(dvf) == 0
    residual = deformed - image
    assert residual.std().item() == pytest.approx(5.0, rel=0.05)
    assert abs(residual.mean().item()) < 0.2


@pytest.mark.parametrize("kind", ["single", "mixed", "respiratory"])
def test_pair_is_the_warped_image_and_its_dvf(kind):
    gen = torch.Generator().manual_seed(5)
    x, y, z = _positions(SHAPE, SPACING)
    image = 200.0 * torch.sin(x / 9.0) * torch.cos(y / 7.0) + 100.0 * torch.sin(z / 11.0) - 300.0
    lungs = torch.zeros(SHAPE, dtype=torch.bool)
    lungs[10:, 8:32, 8:32] = True
    masks = {"body_mask": torch.ones(SHAPE, dtype=torch.bool), "lung_mask": lungs}
    deformed, dvf = deform_pair(image, kind, SPACING, gen, **masks)
    assert torch.equal(dvf, _field(kind, 5, **(masks if kind == "respiratory" else {})))
    # The deformed image differs from the plain warp only by the sponge factor and noise.
    tissue = 1.0 / jacobian_determinant(dvf, SPACING)
    expected = sponge(warp(image, dvf, SPACING), tissue)
    assert (deformed - expected).std().item() == pytest.approx(5.0, rel=0.1)


def test_sponge_in_a_pair_darkens_stretched_tissue():
    """u0 = -0.1 x stretches the image (I_D(x) = I(0.9 x)); mass preserved: (HU + 1000) * 0.9^3."""
    spacing = (1.0, 1.0, 1.0)
    shape = (24, 24, 24)
    initial = -0.1 * torch.stack(_positions(shape, spacing))
    image = torch.zeros(shape)
    deformed, dvf = deform_pair(image, "identity", spacing, torch.Generator().manual_seed(0), initial_dvf=initial)
    assert torch.allclose(dvf, initial)
    assert deformed.mean().item() == pytest.approx(1000.0 * 0.9**3 - 1000.0, abs=0.5)


def test_compose_adds_translations_and_samples_the_second_field_at_the_moved_point():
    spacing = (1.0, 1.0, 1.0)
    first = torch.zeros(3, 16, 16, 16)
    first[0] = 2.0  # +2 voxels in x
    second = torch.zeros(3, 16, 16, 16)
    second[1] = torch.arange(16, dtype=torch.float32)[None, None, :] * 0.5  # u1_y = 0.5 * x
    total = compose(first, second, spacing)
    assert torch.allclose(total[0], first[0])
    # u1 is read at x + 2: 0.5 * (x + 2), inside the image (the last two columns replicate the edge).
    expected = 0.5 * (torch.arange(16, dtype=torch.float32) + 2).clamp(max=15)
    assert torch.allclose(total[1, 3, 4], expected, atol=1e-5)


def _chest_like(shape=(48, 48, 48)) -> tuple[torch.Tensor, dict]:
    """A smooth HU pattern with body and lung masks: what the registered pairs' breathing motion needs."""
    x, y, z = _positions(shape, SPACING)
    image = 300.0 * torch.sin(x / 13.0) * torch.cos(y / 11.0) + 150.0 * torch.sin(z / 17.0) - 400.0
    lungs = torch.zeros(shape, dtype=torch.bool)
    lungs[8:, 10:38, 10:38] = True
    return image, {"body_mask": torch.ones(shape, dtype=torch.bool), "lung_mask": lungs}


INTERIOR = (slice(14, 34),) * 3  # 28 mm from every edge: beyond REGISTERED_MOTION's 25 mm


def test_inverted_breathing_motion_undoes_it():
    image, masks = _chest_like()
    motion = random_dvf("respiratory", image.shape, SPACING, torch.Generator().manual_seed(2), REGISTERED_MOTION,
                        **masks)
    assert motion.abs().amax().item() > 10.0  # a large motion, as registrations undo
    inverse = invert_dvf(motion, SPACING)
    assert compose(inverse, motion, SPACING)[(slice(None),) + INTERIOR].abs().amax().item() < 0.05
    assert compose(-motion, motion, SPACING)[(slice(None),) + INTERIOR].abs().amax().item() > 0.5  # not the naive -u


@pytest.mark.parametrize("kind", ["identity", "single"])
def test_registered_pair_shows_only_its_residual(kind):
    """A large motion undone by the registration leaves the image warped by the residual DVF alone."""
    image, masks = _chest_like()
    clean = DVFSettings(noise_sigma_hu=0.0, sponge_clamp=(1.0, 1.0))
    plain, residual = deform_pair(image, kind, SPACING, torch.Generator().manual_seed(4), clean, **masks)
    moved, truth, seen = registered_pair(image, kind, SPACING, torch.Generator().manual_seed(4), clean, **masks)
    assert torch.equal(truth, residual)  # the truth is the residual, drawn as without the motion
    error = (moved - plain)[INTERIOR].abs()
    assert error.mean().item() < 1.5 and error.amax().item() < 6.0  # two interpolations of a 450 HU pattern
    assert seen[INTERIOR].all() and not seen.all()  # at the faces the motion read outside the image
    assert torch.quantile((moved - plain)[seen].abs(), 0.99).item() < 6.0  # where it is seen, it is I(x + u)
    assert (moved[~seen] < -900).float().mean().item() > 0.5  # elsewhere mostly made-up air
    motion = random_dvf("respiratory", image.shape, SPACING, torch.Generator().manual_seed(4), REGISTERED_MOTION,
                        **masks)
    assert (warp(image, motion, SPACING) - plain)[INTERIOR].abs().mean().item() > 20.0  # what was undone


def test_a_registration_that_leaves_part_of_the_motion_shows_it_in_the_truth_and_the_image():
    """With ``motion_left`` the truth gains that share of the breathing motion, and the image still is I(x + u)."""
    image, masks = _chest_like()
    clean = DVFSettings(noise_sigma_hu=0.0, sponge_clamp=(1.0, 1.0))
    _, perfect, _ = registered_pair(image, "single", SPACING, torch.Generator().manual_seed(4), clean, **masks)
    moved, truth, seen = registered_pair(image, "single", SPACING, torch.Generator().manual_seed(4), clean, **masks,
                                         motion_left=0.5)
    generator = torch.Generator().manual_seed(4)  # the same draws: the pair's DVF, then the breathing motion
    random_dvf("single", image.shape, SPACING, generator, clean, **masks)
    motion = random_dvf("respiratory", image.shape, SPACING, generator, REGISTERED_MOTION, **masks)
    assert torch.allclose(truth - perfect, 0.5 * motion, atol=1e-5)
    assert motion[(slice(None),) + INTERIOR].abs().amax().item() > 5.0  # a large motion, even 28 mm from the faces
    expected = warp(image, truth, SPACING)
    assert (moved - expected)[INTERIOR].abs().mean().item() < 1.5  # the image shows exactly that truth
    assert torch.quantile((moved - expected)[seen].abs(), 0.99).item() < 6.0
    with pytest.raises(ValueError, match="motion_left"):
        registered_pair(image, "single", SPACING, torch.Generator().manual_seed(4), clean, **masks, motion_left=1.5)


def test_registered_pair_keeps_the_motions_density_change_and_noise():
    image, masks = _chest_like()
    moved, _, _ = registered_pair(image, "identity", SPACING, torch.Generator().manual_seed(4), **masks)
    assert (moved - image)[INTERIOR].std().item() > 2.0  # sponge and interpolated noise, not the bare image


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_field_matches_cpu_for_a_cpu_generator(kind):
    cpu = _field(kind, 11)
    cuda = random_dvf(kind, SHAPE, SPACING, torch.Generator().manual_seed(11), SETTINGS, device="cuda")
    assert cuda.device.type == "cuda"
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-4)
