"""A synthetic moving image from a CT and a random DVF: warp, sponge model, noise (``deform_pair``), or
as a registration leaves it: a large breathing motion undone but for that DVF (``registered_pair``).

The sponge/noise augmentation follows Sokooti et al. (2019, 2021) and their TensorFlow code
(github.com/hsokooti/RegNet: functions/artificial_generation/intensity_augmentation.py).
Conventions are ``synthetic.dvf``'s: volumes (D, H, W) = (z, y, x), a DVF (3, D, H, W) in mm with
components (x, y, z), I_D(x) = I(x + u(x)).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from RegistrationMisalignmentLib.spatial import compose, warp
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings, Spacing, random_dvf


def jacobian_determinant(dvf: torch.Tensor, spacing: Spacing) -> torch.Tensor:
    """det(I + grad u) on the (D, H, W) grid; central differences inside, one-sided at the edges."""
    sx, sy, sz = spacing
    # grads[a] = (du_a/dz, du_a/dy, du_a/dx), so du_a/dx_b (b in x, y, z) is grads[a][2 - b].
    grads = [torch.gradient(dvf[a], spacing=(sz, sy, sx)) for a in range(3)]
    j = [[grads[a][2 - b] + (1.0 if a == b else 0.0) for b in range(3)] for a in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def sponge(image_hu: torch.Tensor, det_j: torch.Tensor, clamp: tuple[float, float] = (0.5, 2.0)) -> torch.Tensor:
    """Mass-preserving intensity change: density ~ HU + 1000 falls as tissue expands.

    ``det_j`` is the local volume ratio of the tissue after / before the deformation (>1:
    expanded, darker), so I' = (I + 1000) / detJ - 1000 with detJ clamped to ``clamp``.
    """
    return (image_hu + 1000.0) / det_j.clamp(*clamp) - 1000.0


def add_noise(image: torch.Tensor, sigma_hu: float, generator: torch.Generator) -> torch.Tensor:
    """Add white Gaussian noise of ``sigma_hu``, drawn on the generator's device."""
    noise = torch.randn(image.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return image + sigma_hu * noise.to(image.device)


REGISTERED_MOTION = replace(DVFSettings(), max_displacement_mm=25.0, respiratory_expansion_mm=(3.0, 10.0),
                            diaphragm_shift_mm=(10.0, 25.0))
"""The motion a registration undoes (``registered_pair``): breathing up to 25 mm per axis, the
cranio-caudal shift at the lung base 10-25 mm (DIR-Lab's largest cases move landmarks about 15-25 mm)."""


def invert_dvf(dvf: torch.Tensor, spacing: Spacing, iterations: int = 8) -> torch.Tensor:
    """v with v(y) = -u(y + v(y)), so that warping by u and then by v is the identity (where u is invertible).

    The fixed-point iteration of Chen et al., "A simple fixed-point approach to invert a deformation field",
    Med. Phys. 35 (2008), as in ITK's InvertDisplacementFieldImageFilter; it converges where |grad u| < 1, which
    smooth breathing fields meet: on a 16 mm breathing field 4 / 8 / 12 iterations leave 0.05 / 0.0006 / 0.00001
    mm inside the volume. (3, D, H, W) mm in, (3, D, H, W) mm out.
    """
    inverse = -dvf
    for _ in range(iterations):
        inverse = inverse - compose(inverse, dvf, spacing)
    return inverse


def _chest_masks(image_hu: torch.Tensor, threshold_hu: float = -400.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rough (body, lung) masks: tissue, plus the air that tissue encloses along both x and y."""
    tissue = image_hu > threshold_hu
    enclosed = torch.ones_like(tissue)
    for dim in (1, 2):
        t = tissue.to(torch.uint8)
        before = torch.cummax(t, dim=dim).values.bool()
        after = torch.cummax(t.flip(dim), dim=dim).values.flip(dim).bool()
        enclosed &= before & after
    body = tissue | enclosed
    return body, body & ~tissue


def _fill_masks(image: torch.Tensor, body_mask: torch.Tensor | None,
                lung_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The given masks, each missing one estimated from the image (``_chest_masks``)."""
    if body_mask is not None and lung_mask is not None:
        return body_mask, lung_mask
    body_guess, lung_guess = _chest_masks(image)
    return (body_guess if body_mask is None else body_mask), (lung_guess if lung_mask is None else lung_mask)


def _acquire(image: torch.Tensor, dvf: torch.Tensor, spacing: Spacing, settings: DVFSettings,
             generator: torch.Generator) -> torch.Tensor:
    """The image deformed by ``dvf`` as a scanner would see it: warped, sponge model, noise."""
    tissue_ratio = 1.0 / jacobian_determinant(dvf, spacing).clamp(min=1e-3)
    deformed = sponge(warp(image, dvf, spacing), tissue_ratio, settings.sponge_clamp)
    return add_noise(deformed, settings.noise_sigma_hu, generator)


def deform_pair(image_hu: torch.Tensor, kind: str, spacing: Spacing, generator: torch.Generator,
                settings: DVFSettings = DVFSettings(), initial_dvf: torch.Tensor | None = None,
                body_mask: torch.Tensor | None = None,
                lung_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic moving image and its DVF (the label field) for a (D, H, W) HU image.

    The image is warped with a random DVF of ``kind``, then the sponge model and noise are
    applied. With ``initial_dvf`` (a real registration residual u0) the synthetic u1 is stacked
    on top, u = u0(x) + u1(x + u0(x)), and the returned DVF is that total. For the respiratory
    kind, missing masks are estimated from the image by thresholding.

    The warp's Jacobian det(I + grad u) is the volume ratio original / deformed (it maps fixed
    grid to original tissue), so the sponge model gets its reciprocal: tissue stretched in the
    deformed image turns darker. (The authors divide by det(I + grad u) itself.)
    """
    image = image_hu.float()
    if kind == "respiratory":
        body_mask, lung_mask = _fill_masks(image, body_mask, lung_mask)
    dvf = random_dvf(kind, tuple(image.shape), spacing, generator, settings, image.device, body_mask, lung_mask)
    if initial_dvf is not None:
        dvf = compose(initial_dvf.to(image.device, torch.float32), dvf, spacing)
    return _acquire(image, dvf, spacing, settings, generator), dvf


def registered_pair(image_hu: torch.Tensor, kind: str, spacing: Spacing, generator: torch.Generator,
                    settings: DVFSettings = DVFSettings(), body_mask: torch.Tensor | None = None,
                    lung_mask: torch.Tensor | None = None,
                    motion_left: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A moving image as a registration leaves it, its DVF u (the truth) and where the image is seen:
    (D, H, W) HU, (3, D, H, W) mm, (D, H, W) bool.

    A breathing motion m (``REGISTERED_MOTION``) makes the acquired image M(y) = sponge(I(y + m(y))) + noise,
    and the registration T(x) = x + u(x) + m^-1(x + u(x)) maps it back but for u: D(x) = M(T(x)) =
    I(x + u(x)) with m's density change, noise and two interpolations, as after a real registration of a
    large motion, which the paper's pairs never show (its "identity" pairs are never moved at all). Where
    either sampling leaves the image (up to 25 mm at its faces) D shows made-up air, not I(x + u(x)): ``seen``
    is False there, and such voxels must not be supervised.

    u is a DVF of ``kind`` drawn as ``deform_pair`` draws it, plus ``motion_left`` (0 to 1) times m: the part
    of the breathing a registration failed to undo (an affine one leaves most of it at the lung base), where
    the misalignment and the density change come together. With 0 the registration is perfect but for u.
    """
    if not 0.0 <= motion_left <= 1.0:
        raise ValueError(f"motion_left {motion_left!r}: give the share of the breathing motion left, 0 to 1")
    image = image_hu.float()
    body_mask, lung_mask = _fill_masks(image, body_mask, lung_mask)
    shape = tuple(image.shape)
    dvf = random_dvf(kind, shape, spacing, generator, settings, image.device, body_mask, lung_mask)
    motion = random_dvf("respiratory", shape, spacing, generator, REGISTERED_MOTION, image.device, body_mask, lung_mask)
    if motion_left:
        dvf = dvf + motion_left * motion
    acquired = _acquire(image, motion, spacing, settings, generator)
    registration = compose(dvf, invert_dvf(motion, spacing), spacing)
    inside = warp(warp(torch.ones_like(image), motion, spacing, fill=0.0), registration, spacing, fill=0.0)
    return warp(acquired, registration, spacing), dvf, inside > 0.999
