"""A synthetic moving image from a CT and a random DVF: warp, sponge model, noise (``deform_pair``).

The sponge/noise augmentation follows Sokooti et al. (2019, 2021) and their TensorFlow code
(github.com/hsokooti/RegNet: functions/artificial_generation/intensity_augmentation.py).
Conventions are ``synthetic.dvf``'s: volumes (D, H, W) = (z, y, x), a DVF (3, D, H, W) in mm with
components (x, y, z), I_D(x) = I(x + u(x)).
"""

from __future__ import annotations

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
    if kind == "respiratory" and (body_mask is None or lung_mask is None):
        body_guess, lung_guess = _chest_masks(image)
        body_mask = body_guess if body_mask is None else body_mask
        lung_mask = lung_guess if lung_mask is None else lung_mask
    dvf = random_dvf(kind, tuple(image.shape), spacing, generator, settings, image.device, body_mask, lung_mask)
    if initial_dvf is not None:
        dvf = compose(initial_dvf.to(image.device, torch.float32), dvf, spacing)
    deformed = warp(image, dvf, spacing)
    tissue_ratio = 1.0 / jacobian_determinant(dvf, spacing).clamp(min=1e-3)
    deformed = sponge(deformed, tissue_ratio, settings.sponge_clamp)
    return add_noise(deformed, settings.noise_sigma_hu, generator), dvf
