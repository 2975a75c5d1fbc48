"""A physiological breathing field for a whole chest CT: the truth of the real-CT benchmark study.

``synthetic.dvf``'s respiratory kind (what training uses) is one smooth field. Real breathing is not:
the lungs slide along the chest wall and the mediastinum (the pleural space), so the motion is
discontinuous at the lung surface, and a smooth B-spline registration leaves its largest errors
along those surfaces and near the diaphragm. This module builds such a field for a CT in HU on a
1 mm grid (any spacing works), seeded, in the conventions of ``synthetic.dvf``: arrays (D, H, W) =
(z, y, x) with z superior, y posterior, x to the patient's left (LPS, identity direction); a DVF
(3, D, H, W) in mm with components (x, y, z); the moved image is I_D(x) = I(x + u(x)).

The anatomy (``chest_anatomy``): the body (``body_mask.body_mask``), the trachea and main bronchi
(``airway_mask``: traced down from the top slice while their cross-section stays small), and the
lungs: the largest components of the air inside the body without those airways, with the vessels
inside them (holes of each axial slice filled). From the lungs: the apex height and, per (x, y)
column, the height of the lung base (the diaphragm dome and the costophrenic recesses).

The field (``breathing_field``), for a moving image at exhale against an inhale fixed image
(DIR-Lab's pairing: fixed = inhale, moving = exhale; ``phase=-1`` gives the opposite):

* cranio-caudal (CC) lung motion, largest at the base:
  ``cc_mm * rise**cc_exponent * (1 - ventral_reduction * ventral) * (1 + asymmetry * side)``, where
  ``rise`` goes from 0 at the apex to 1 at the column's lung base, ``ventral`` from 0 at the back of the
  lungs to 1 at their front (the dependent, dorsal lung moves most) and ``side`` is -1 in the right
  lung, +1 in the left;
* antero-posterior expansion of the rib cage (anterior wall ``ap_mm``, the back still on the table)
  and lateral expansion (``lateral_mm`` at the sides), both fuller in the lower chest;
* smooth local variation: a random cubic B-spline field (``synthetic.dvf.single_frequency_dvf``,
  ``local_mm`` on ``local_knot_mm`` knots);
* sliding: the lungs take the CC motion, the tissue around them only ``wall_fraction`` of it (the
  chest wall and the mediastinum are nearly still), except the abdomen under the lungs, which
  follows the diaphragm (fading ``abdomen_decay_mm`` below it) wherever the moved image shows tissue
  from below the fixed image's diaphragm, so the diaphragm rises with the lungs and does not tear
  from them. The expansion and the local variation are shared by both sides, so the jump at the lung
  surface is the CC motion along it: tangential at the chest wall and the mediastinum, as in the
  pleural space.

The lung side applies where the moved image shows lung: ``chi(x) = L(x + u_lung(x))`` for the lung
mask L of the fixed image; the total field is ``u = chi * u_lung + (1 - chi) * u_outside``. That one
field makes the moved image (``breathe``: warp; sponge model in the lungs with the lung field's
Jacobian, since lung parenchyma changes density with its volume and the tissue around it does not;
Gaussian noise), so a landmark's truth, ``|T(x) + u(T(x)) - x|`` (``benchmark.cases.SyntheticTruth``),
is exactly what the moved image shows.

Amplitudes (defaults, drawn uniformly per field) follow 4DCT: DIR-Lab's inhale/exhale landmarks move
3.9-15 mm on average per case and up to about 25-30 mm, most in the lower lobes, dorsally and
cranio-caudally, while the apices hardly move; the chest wall moves a few mm (Castillo et al., Phys.
Med. Biol. 2009, DIR-Lab; Seppenwoolde et al., IJROBP 2002, lung tumour motion). The defaults sit at
the upper end of DIR-Lab's cases (dorsal base 28-36 mm, local variation 6-10 mm on 20-30 mm knots): on
POPI's lungs the study's first field moves its 300 landmarks 10.1 mm on average (median 8.9, p95 22.0,
largest 26.1 mm), like DIR-Lab's cases 6-10. Smaller amplitudes (20-28 mm, 4-7 mm on 30-40 mm knots:
7.6 mm on average) left elastix's B-spline settings almost nothing to miss (9 % of the landmarks poor
or wrong after 20 iterations, 3 % after 500). Sliding of the lung along the chest wall in 4DCT: e.g. Vandemeulebroucke et
al., Med. Phys. 2012 (POPI), Delmon et al., Phys. Med. Biol. 2013.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from RegistrationMisalignmentLib.body_mask import body_mask
from RegistrationMisalignmentLib.synthetic.deform import add_noise, jacobian_determinant, sponge
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings, single_frequency_dvf

Spacing = tuple[float, float, float]

AIR_HU = -400.0
"""Lung and airway air is below this (parenchyma about -850 HU)."""
AIRWAY_MAX_AREA_MM2 = 900.0
"""A traced airway's cross-section stays below this (the trachea: about 250-400 mm^2); a larger one
has joined a lung."""
AIRWAY_MIN_AREA_MM2 = 50.0
"""Smaller air regions at the top are noise or skin folds, not the trachea."""
AIRWAY_TOP_MM = 3.0
"""The trachea's trace starts only if there is air within this distance of the scan's top slice."""
AIRWAY_MIDLINE_MM = 50.0
"""The trachea enters the top slice within this distance of the body's left-right centre."""


@dataclass(frozen=True)
class BreathingSettings:
    """Ranges of the breathing field; each value is drawn uniformly from its range per field."""

    cc_mm: tuple[float, float] = (28.0, 36.0)
    """Cranio-caudal lung motion at the dorsal base of the lungs, where it is largest."""
    cc_exponent: tuple[float, float] = (2.0, 3.0)
    """Shape of the apex-to-base rise: > 1 keeps the upper lobes nearly still."""
    ventral_reduction: tuple[float, float] = (0.4, 0.7)
    """The ventral (anterior) lung moves (1 - this) times as far cranio-caudally as the dorsal lung."""
    asymmetry: tuple[float, float] = (-0.15, 0.15)
    """The left lung moves (1 + this), the right (1 - this) times as far cranio-caudally."""
    ap_mm: tuple[float, float] = (6.0, 12.0)
    """Antero-posterior motion of the anterior chest wall (the back lies still on the table)."""
    lateral_mm: tuple[float, float] = (2.0, 4.0)
    """Lateral motion at the sides of the body."""
    wall_fraction: tuple[float, float] = (0.0, 0.1)
    """CC motion of the chest wall and mediastinum, as a fraction of the lung's next to them: the sliding."""
    local_mm: tuple[float, float] = (6.0, 10.0)
    """Largest per-axis displacement of the smooth local variation."""
    local_knot_mm: tuple[float, ...] = (20.0, 30.0)
    """Knot spacings of the local variation's cubic B-spline."""
    abdomen_decay_mm: float = 100.0
    """The abdomen's CC motion falls by 1/e this far below the lung base."""
    noise_sigma_hu: float = 5.0
    """Gaussian noise on the moved image (the paper's training value)."""
    sponge_clamp: tuple[float, float] = (0.5, 2.0)
    """Volume-ratio clamp of the sponge model (as ``DVFSettings``)."""


# ---- anatomy --------------------------------------------------------------------------------
def airway_mask(air: np.ndarray, body: np.ndarray, spacing: Spacing) -> np.ndarray:
    """The trachea and main bronchi: air traced down from the top slice while it stays a small tube.

    The trace starts from the air regions (``AIRWAY_MIN_AREA_MM2`` .. ``AIRWAY_MAX_AREA_MM2``) of the
    highest slice with air inside the body, within ``AIRWAY_TOP_MM`` of the scan's top, near the body's
    left-right centre (the trachea on its way to the neck; lung apices are lateral and do not reach the
    top of a chest CT) and follows the regions that overlap the previous slice's airway, as long as each
    stays under ``AIRWAY_MAX_AREA_MM2``: where a bronchus joins a lung in the slice, that branch stops.
    No air near the top (the scan ends below the neck, or a phantom): no airways.
    """
    sx, sy, sz = spacing
    airways = np.zeros_like(air)
    columns = np.nonzero(body.any(axis=(0, 1)))[0]
    filled = np.nonzero(air.any(axis=(1, 2)))[0]
    if not len(columns) or not len(filled) or (air.shape[0] - 1 - filled[-1]) * sz > AIRWAY_TOP_MM:
        return airways
    centre_x = 0.5 * (columns[0] + columns[-1]) * sx
    previous = None
    for k in range(filled[-1], -1, -1):
        labels, count = ndimage.label(air[k])
        index = np.arange(1, count + 1)
        areas = ndimage.sum_labels(np.ones_like(labels), labels, index) * sx * sy
        small = areas < AIRWAY_MAX_AREA_MM2
        if previous is None:  # the top: where the trachea leaves the scan towards the neck
            centres = np.array(ndimage.center_of_mass(np.ones_like(labels), labels, index)).reshape(-1, 2)
            keep = (small & (areas >= AIRWAY_MIN_AREA_MM2)
                    & (np.abs(centres[:, 1] * sx - centre_x) < AIRWAY_MIDLINE_MM))
        else:
            touching = np.unique(labels[previous & (labels > 0)])
            keep = np.isin(index, touching) & small
        if not keep.any():
            break
        previous = np.isin(labels, index[keep])
        airways[k] = previous
    return airways


@dataclass
class ChestAnatomy:
    """What the breathing field needs of a chest CT, on a box of its grid.

    ``offset`` is the box's first voxel (z, y, x) in the whole scan's grid; every position in mm below
    is measured in the whole scan's grid from its voxel 0, so a cropped anatomy gives the same field
    values as the whole one on the same voxels (except for the local variation, drawn on the box).
    """

    lung: np.ndarray
    """bool (D, H, W): the lungs with their vessels, without trachea and main bronchi."""
    body: np.ndarray
    """bool (D, H, W)."""
    spacing: Spacing
    apex_mm: float
    """Height (z) of the lung apices."""
    base_mm: np.ndarray
    """(H, W) height of the lung base in each column, smoothed (10 mm), extended outside the lungs."""
    floor_mm: np.ndarray
    """(H, W) height of the lowest lung voxel in each column (the diaphragm), extended outside the lungs."""
    under_lung: np.ndarray
    """(H, W) float: the columns that hold lung, smoothed (5 mm)."""
    lung_y_mm: tuple[float, float]
    """Anterior and posterior extent (y) of the lungs."""
    body_y_mm: tuple[float, float]
    """Anterior and posterior extent (y) of the body at the lungs' heights."""
    body_x_mm: tuple[float, float]
    """Right and left extent (x) of the body at the lungs' heights."""
    offset: tuple[int, int, int] = (0, 0, 0)

    def crop(self, start: tuple[int, int, int], stop: tuple[int, int, int]) -> "ChestAnatomy":
        """The same anatomy on the box [start, stop) (z, y, x) of this one's arrays."""
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        return replace(self, lung=self.lung[box], body=self.body[box], base_mm=self.base_mm[box[1:]],
                       floor_mm=self.floor_mm[box[1:]], under_lung=self.under_lung[box[1:]],
                       offset=tuple(o + a for o, a in zip(self.offset, start)))

    def lung_box(self, margin_mm: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(start, stop) (z, y, x) of the lungs' bounding box grown by ``margin_mm``, inside the arrays."""
        index = np.argwhere(self.lung)
        grow = [int(math.ceil(margin_mm / s)) for s in self.spacing[::-1]]
        start = tuple(int(max(v - g, 0)) for v, g in zip(index.min(axis=0), grow))
        stop = tuple(int(min(v + 1 + g, n)) for v, g, n in zip(index.max(axis=0), grow, self.lung.shape))
        return start, stop


def chest_anatomy(hu: np.ndarray, spacing: Spacing = (1.0, 1.0, 1.0)) -> ChestAnatomy:
    """Body, lungs and their landmarks of height for a (D, H, W) chest CT in HU (see the module)."""
    sx, sy, sz = spacing
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu, dtype=np.float32))
    image.SetSpacing(spacing)
    body = sitk.GetArrayFromImage(body_mask(image)).astype(bool)
    air = (hu < AIR_HU) & body
    air &= ~airway_mask(air, body, spacing)
    labels, count = ndimage.label(air)
    if count == 0:
        raise ValueError("no air inside the body: not a chest CT in HU")
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][:2]
    keep = [int(k) for k in order if sizes[k] > 0 and sizes[k] >= 0.1 * sizes[order[0]]]
    lung = np.isin(labels, keep)
    del labels
    index = np.argwhere(lung)
    lo, hi = index.min(axis=0), index.max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    inner = lung[box]
    for k in range(inner.shape[0]):  # the vessels inside the lungs belong to them
        inner[k] = ndimage.binary_fill_holes(inner[k])
    lung[box] = inner
    area = lung.sum(axis=(1, 2))
    slices = np.nonzero(area >= 0.01 * area.max())[0]
    apex = float(slices[-1] * sz)
    footprint = lung.any(axis=0)
    lowest = np.argmax(lung, axis=0).astype(np.float64) * sz  # first (lowest) lung voxel of each column
    # Extend the base height to columns without lung (nearest lung column); smooth it for the CC profile.
    _, (iy, ix) = ndimage.distance_transform_edt(~footprint, sampling=(sy, sx), return_indices=True)
    floor = lowest[iy, ix]
    base = ndimage.gaussian_filter(floor, sigma=(10.0 / sy, 10.0 / sx), mode="nearest")
    under = ndimage.gaussian_filter(footprint.astype(np.float32), sigma=(5.0 / sy, 5.0 / sx), mode="nearest")
    rows = np.nonzero(lung.any(axis=(0, 2)))[0]
    chest = body[slices[0]:slices[-1] + 1]
    body_rows = np.nonzero(chest.any(axis=(0, 2)))[0]
    body_cols = np.nonzero(chest.any(axis=(0, 1)))[0]
    return ChestAnatomy(lung, body, tuple(spacing), apex, base, floor, under,
                        (rows[0] * sy, rows[-1] * sy), (body_rows[0] * sy, body_rows[-1] * sy),
                        (body_cols[0] * sx, body_cols[-1] * sx))


# ---- the field --------------------------------------------------------------------------------
@dataclass
class BreathingField:
    """One breathing field on an anatomy's box, with its parts and the values drawn for it."""

    dvf: torch.Tensor
    """(3, D, H, W) mm, the total field u = chi * lung + (1 - chi) * outside."""
    lung_side: torch.Tensor
    """bool (D, H, W): chi, where the moved image shows lung (the lung field applies)."""
    inside: torch.Tensor = field(repr=False)
    """(3, D, H, W) the lung field, everywhere."""
    outside: torch.Tensor = field(repr=False)
    """(3, D, H, W) the field of the tissue around the lungs, everywhere."""
    parameters: dict = field(default_factory=dict)
    """The values drawn: cc_mm, cc_exponent, ventral_reduction, asymmetry, ap_mm, lateral_mm, wall_fraction,
    local_mm, local_knot_mm, phase."""


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def draw_parameters(generator: torch.Generator, settings: BreathingSettings) -> dict:
    """One value from each range of ``settings`` (in a fixed order, so a seed gives one field)."""
    values = {name: _uniform(generator, *getattr(settings, name))
              for name in ("cc_mm", "cc_exponent", "ventral_reduction", "asymmetry", "ap_mm", "lateral_mm",
                           "wall_fraction", "local_mm")}
    knots = settings.local_knot_mm
    values["local_knot_mm"] = knots[int(torch.randint(len(knots), (1,), generator=generator).item())]
    return values


def _positions(anatomy: ChestAnatomy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z (D, 1, 1), y (1, H, 1), x (1, 1, W) in mm in the whole scan's grid."""
    sx, sy, sz = anatomy.spacing
    (oz, oy, ox), (depth, height, width) = anatomy.offset, anatomy.lung.shape
    z = ((torch.arange(depth, dtype=torch.float32) + oz) * sz).reshape(-1, 1, 1)
    y = ((torch.arange(height, dtype=torch.float32) + oy) * sy).reshape(1, -1, 1)
    x = ((torch.arange(width, dtype=torch.float32) + ox) * sx).reshape(1, 1, -1)
    return z, y, x


def sample_at(volume: torch.Tensor, offset: tuple[int, int, int], dvf: torch.Tensor, spacing: Spacing,
              mode: str = "bilinear") -> torch.Tensor:
    """``volume`` (D', H', W') read at x + u(x) for the box of ``dvf`` (3, D, H, W) starting at voxel
    ``offset`` of it; outside ``volume`` its border values are repeated (the scan goes on there)."""
    big = volume.shape
    _, depth, height, width = dvf.shape
    coords = []
    for component, (n, step, size, start, view) in enumerate(zip(
            (width, height, depth), spacing, big[::-1], offset[::-1], ((1, 1, -1), (1, -1, 1), (-1, 1, 1)))):
        index = torch.arange(n, dtype=torch.float32).reshape(view) + start
        coords.append((index + dvf[component] / step) * (2.0 / max(size - 1, 1)) - 1.0)
    grid = torch.stack(torch.broadcast_tensors(*coords), dim=-1)[None]
    return F.grid_sample(volume.float()[None, None], grid, mode=mode, padding_mode="border", align_corners=True)[0, 0]


def breathing_field(anatomy: ChestAnatomy, generator: torch.Generator,
                    settings: BreathingSettings = BreathingSettings(), phase: int = 1,
                    whole_lung: np.ndarray | None = None) -> BreathingField:
    """A breathing field on ``anatomy``'s box (see the module); ``phase`` +1: the moved image is the exhale
    of an inhale fixed image, -1: the inhale of an exhale one.

    ``whole_lung`` is the lung mask of the whole scan when ``anatomy`` is a crop of it (then chi reads
    the lungs beyond the box too); by default the box's own.
    """
    if phase not in (1, -1):
        raise ValueError(f"phase {phase} must be 1 (moved image at exhale) or -1 (at inhale)")
    p = draw_parameters(generator, settings)
    p["phase"] = phase
    sx, sy, sz = anatomy.spacing
    z, y, x = _positions(anatomy)
    base = torch.from_numpy(anatomy.base_mm.astype(np.float32))[None]  # (1, H, W)
    apex = anatomy.apex_mm
    # Cranio-caudal: 0 at the apex, 1 at (and below) the column's lung base.
    rise = ((apex - z) / (apex - base).clamp(min=10.0)).clamp(0.0, 1.0)
    y_front, y_back = anatomy.lung_y_mm
    ventral = ((y_back - y) / max(y_back - y_front, sy)).clamp(0.0, 1.0)  # 0 at the back of the lungs, 1 in front
    front, back = anatomy.body_y_mm
    right, left = anatomy.body_x_mm
    side = torch.tanh((2 * x - right - left) / 20.0)  # -1 right lung, +1 left lung, 10 mm wide across the midline
    cc = (p["cc_mm"] * rise ** p["cc_exponent"] * (1.0 - p["ventral_reduction"] * ventral)
          * (1.0 + p["asymmetry"] * side))
    below = (base - z).clamp(min=0.0)
    cc_outside = cc * torch.exp(-below / settings.abdomen_decay_mm)
    # The abdomen under the lungs follows the diaphragm: in the lung columns, where the diaphragm's motion
    # brings tissue from below the fixed image's lowest lung voxel (2 mm soft edge). So the moved image
    # shows abdomen, not lung, where the diaphragm has risen (exhale). The chest wall and the mediastinum
    # move wall_fraction of the CC motion.
    floor = torch.from_numpy(anatomy.floor_mm.astype(np.float32))[None]
    under = torch.from_numpy(anatomy.under_lung.astype(np.float32))[None]
    abdomen = under * torch.sigmoid((floor - (z - phase * cc_outside)) / 2.0)
    follow = p["wall_fraction"] + (1.0 - p["wall_fraction"]) * abdomen
    # Expansion of the rib cage, fuller in the lower chest (the bucket handle of the lower ribs).
    lower = 0.5 + 0.5 * rise
    ap = -p["ap_mm"] * ((back - y) / max(back - front, sy)).clamp(0.0, 1.0) * lower
    lateral = p["lateral_mm"] * ((2 * x - right - left) / max(left - right, sx)).clamp(-1.0, 1.0) * lower
    local = single_frequency_dvf(tuple(anatomy.lung.shape), anatomy.spacing, generator,
                                 DVFSettings(max_displacement_mm=p["local_mm"], amplitude_ratio=(1.0, 1.0),
                                             single_freq_grid_mm=(p["local_knot_mm"],)))
    shape = anatomy.lung.shape
    ex, ey = (phase * t.expand(shape) for t in (lateral, ap))
    inside = torch.stack([ex + local[0], ey + local[1], -phase * cc.expand(shape) + local[2]])
    outside = torch.stack([ex + local[0], ey + local[1], follow * (-phase * cc_outside.expand(shape) + local[2])])
    del ex, ey, local, cc, cc_outside, follow, abdomen, floor, under
    if whole_lung is None:
        whole_lung, offset = anatomy.lung, (0, 0, 0)
    else:
        offset = anatomy.offset
    lung_side = sample_at(torch.from_numpy(whole_lung), offset, inside, anatomy.spacing) > 0.5
    dvf = torch.where(lung_side[None], inside, outside)
    return BreathingField(dvf, lung_side, inside, outside, p)


def breathe(hu: np.ndarray, anatomy: ChestAnatomy, seed: int, settings: BreathingSettings = BreathingSettings(),
            phase: int = 1, whole: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, BreathingField]:
    """The moved image (HU, float32, ``anatomy``'s box) and its field: warp, sponge model, noise.

    ``hu`` is the box's image; with ``whole = (whole HU, whole lung mask)`` of the scan the box is
    cut from, the warp reads the anatomy beyond the box (the moved image has no empty rim).
    The sponge model (density / volume ratio) applies to the lungs only, with the lung field's own
    Jacobian, so the sliding surface adds no intensity artefact; the tissue around them is
    incompressible (the model's ratio of a sheared chest wall would only be an artefact).
    """
    generator = torch.Generator().manual_seed(int(seed))
    source, lung, offset = (hu, None, (0, 0, 0)) if whole is None else (whole[0], whole[1], anatomy.offset)
    result = breathing_field(anatomy, generator, settings, phase, lung)
    moved = sample_at(torch.from_numpy(np.ascontiguousarray(source, dtype=np.float32)), offset, result.dvf,
                      anatomy.spacing)
    det = jacobian_determinant(result.inside, anatomy.spacing)
    moved = torch.where(result.lung_side, sponge(moved, 1.0 / det.clamp(min=1e-3), settings.sponge_clamp), moved)
    moved = add_noise(moved, settings.noise_sigma_hu, generator)
    return moved.numpy().astype(np.float32), result


__all__ = ["BreathingSettings", "BreathingField", "ChestAnatomy", "chest_anatomy", "airway_mask", "breathing_field",
           "breathe", "draw_parameters", "sample_at"]
