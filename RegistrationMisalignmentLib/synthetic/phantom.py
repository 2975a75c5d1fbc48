"""Procedural chest CT phantom, so training, tests and the demo run with no downloaded data.

The phantom has what the misalignment network looks at: a body outline with a fat layer, two
lungs with a branching vessel tree and fine texture, ribs, a spine, a heart, a liver and a
dome-shaped diaphragm, in realistic Hounsfield units, plus scanner noise. Geometry is LPS with
identity direction and origin (0, 0, 0): x to the patient's left, y posterior, z superior, so
array index 0 along z is the feet end (the lung base).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

AIR_HU = -1000.0
LUNG_HU = -850.0
FAT_HU = -100.0
SOFT_TISSUE_HU = 40.0
HEART_HU = 45.0
LIVER_HU = 60.0
VESSEL_HU = 50.0
SPINE_HU = 400.0
DISC_HU = 80.0
RIB_HU = 700.0
NOISE_HU = 20.0
LUNG_THRESHOLD_HU = -400.0
ROOM_AIR_MEAN_HU = -950.0


def _vessel_segments(rng: np.random.Generator, root: np.ndarray, directions: list[np.ndarray],
                     length_mm: float, radius_mm: float, generations: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Line segments (start, end, radius) of a binary tree: each child is shorter, thinner and
    turned 20-40 degrees away from its parent in a random plane."""
    segments = []
    front = [(root, d / np.linalg.norm(d)) for d in directions]
    for generation in range(generations):
        length = length_mm * 0.78**generation * rng.uniform(0.8, 1.2, size=len(front))
        radius = radius_mm * 0.78**generation
        next_front = []
        for (start, direction), seg_length in zip(front, length):
            end = start + seg_length * direction
            segments.append((start, end, radius))
            normal = np.cross(direction, rng.normal(size=3))
            normal /= np.linalg.norm(normal)
            for side in (1.0, -1.0):
                angle = np.deg2rad(rng.uniform(20.0, 40.0))
                child = np.cos(angle) * direction + side * np.sin(angle) * normal
                next_front.append((end, child / np.linalg.norm(child)))
        front = next_front
    return segments


def _rasterise_tubes(shape: tuple[int, int, int], spacing: float,
                     segments: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Partial-volume fraction (0..1) of tubes around segments given in (x, y, z) mm.

    Each segment touches only the voxels of its bounding box, so the cost is the tree's volume,
    not the image's.
    """
    fraction = np.zeros(shape, dtype=np.float32)
    upper = np.array(shape[::-1]) - 1  # (x, y, z) index limits
    for start, end, radius in segments:
        reach = radius + spacing
        lo = np.clip(np.floor((np.minimum(start, end) - reach) / spacing).astype(int), 0, upper)
        hi = np.clip(np.ceil((np.maximum(start, end) + reach) / spacing).astype(int), 0, upper)
        if np.any(hi < lo):
            continue
        x = np.arange(lo[0], hi[0] + 1)[None, None, :] * spacing
        y = np.arange(lo[1], hi[1] + 1)[None, :, None] * spacing
        z = np.arange(lo[2], hi[2] + 1)[:, None, None] * spacing
        axis = end - start
        t = ((x - start[0]) * axis[0] + (y - start[1]) * axis[1] + (z - start[2]) * axis[2]) / max(axis @ axis, 1e-9)
        t = np.clip(t, 0.0, 1.0)
        dist = np.sqrt((x - start[0] - t * axis[0]) ** 2 + (y - start[1] - t * axis[1]) ** 2
                       + (z - start[2] - t * axis[2]) ** 2)
        cover = np.clip((radius - dist) / spacing + 0.5, 0.0, 1.0)
        box = fraction[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        np.maximum(box, cover, out=box)
    return fraction


def make_chest_phantom(size_mm: tuple[float, float, float] = (160.0, 128.0, 128.0), spacing_mm: float = 1.0,
                       seed: int = 0) -> sitk.Image:
    """A procedural chest CT in HU (float32); ``size_mm`` is the (x, y, z) extent.

    The seed varies the body and organ sizes, the diaphragm height, the vessel trees, the texture
    and the noise; the same seed gives the same image.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = (max(8, int(round(s / spacing_mm))) for s in size_mm)
    lx, ly, lz = (n * spacing_mm for n in (nx, ny, nz))
    x = (np.arange(nx, dtype=np.float32) * spacing_mm)[None, None, :]
    y = (np.arange(ny, dtype=np.float32) * spacing_mm)[None, :, None]
    z = (np.arange(nz, dtype=np.float32) * spacing_mm)[:, None, None]
    cx, cy = lx / 2, ly / 2

    def jitter() -> float:
        """One draw per anatomical size, so seeds give different patients."""
        return rng.uniform(0.95, 1.05)

    # Body: ellipse in the transversal plane, a fat layer under the skin.
    ax, ay = 0.46 * lx * jitter(), 0.40 * ly * jitter()
    r_body = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)  # (1, ny, nx)
    image = np.empty((nz, ny, nx), dtype=np.float32)
    image[:] = np.where(r_body < 0.9, SOFT_TISSUE_HU, np.where(r_body < 1.0, FAT_HU, AIR_HU))

    # Diaphragm: one dome per side, the right (smaller x) higher, as in most patients.
    base = 0.18 * lz * jitter()
    dome = 0.15 * lz * jitter()
    lung_cx = 0.45 * ax
    lung_ax, lung_ay, lung_az = 0.36 * ax * jitter(), 0.70 * ay * jitter(), 0.42 * lz
    lung_cy, lung_cz = cy + 0.05 * ay, 0.52 * lz
    lungs = np.zeros((nz, ny, nx), dtype=bool)
    below_diaphragm = np.ones((nz, ny, nx), dtype=bool)
    for side, extra in ((-1.0, 0.03 * lz), (1.0, 0.0)):
        centre_x = cx + side * lung_cx
        radial = ((x - centre_x) / lung_ax) ** 2 + ((y - lung_cy) / lung_ay) ** 2
        dome_z = base + extra + dome * np.clip(1.0 - radial, 0.0, 1.0)
        inside = radial + ((z - lung_cz) / lung_az) ** 2 < 1.0
        under = z < dome_z
        lungs |= inside & ~under
        below_diaphragm &= under | (np.abs(x - centre_x) > lung_ax)
    lungs &= r_body < 0.78

    # Heart (anterior, to the left) and spine (posterior midline) push the lungs aside.
    heart = (((x - cx - 0.10 * ax) / (0.30 * ax)) ** 2 + ((y - cy + 0.25 * ay) / (0.35 * ay)) ** 2
             + ((z - 0.38 * lz) / (0.20 * lz)) ** 2) < 1.0
    spine_r = np.sqrt((x - cx) ** 2 + (y - cy - 0.60 * ay) ** 2)
    canal_r = np.sqrt((x - cx) ** 2 + (y - cy - 0.80 * ay) ** 2)
    vertebra = spine_r < 0.20 * ay
    arch = (canal_r < 0.16 * ay) & ~(canal_r < 0.08 * ay)
    lungs &= ~heart & ~(spine_r < 0.30 * ay)

    # Liver under the right dome.
    liver = below_diaphragm & (r_body < 0.85) & (x < cx + 0.2 * ax) & (z > 0.02 * lz)
    image[liver] = LIVER_HU

    # Lungs: parenchyma with fine texture, then the vessel trees.
    texture = ndimage.gaussian_filter(rng.normal(size=(nz, ny, nx)).astype(np.float32), 1.0 / spacing_mm)
    texture *= 25.0 / max(float(texture.std()), 1e-6)
    image[lungs] = LUNG_HU + texture[lungs]
    segments = []
    for side in (-1.0, 1.0):
        hilum = np.array([cx + side * 0.18 * ax, lung_cy, 0.55 * lz])
        directions = [np.array([side, 0.0, 1.0]), np.array([side, 0.0, 0.0]), np.array([side, 0.3, -0.8]),
                      np.array([side, -0.6, 0.2]), np.array([0.5 * side, 0.7, 0.4]), np.array([0.5 * side, -0.5, -0.6])]
        directions = [d + rng.normal(scale=0.2, size=3) for d in directions]
        segments += _vessel_segments(rng, hilum, directions, 0.11 * lz, 0.02 * min(lx, ly), generations=7)
    vessels = _rasterise_tubes((nz, ny, nx), spacing_mm, segments)
    image = np.where(lungs, image + vessels * (VESSEL_HU - image), image)

    image[heart] = HEART_HU

    # Spine: vertebral bodies separated by discs, a posterior arch around the canal.
    disc = (z % 26.0) < 5.0
    image = np.where(vertebra, np.where(disc, DISC_HU, SPINE_HU), image)
    image = np.where(arch & ~disc, SPINE_HU, image)

    # Ribs: bands of the chest wall that descend anteriorly, no bone at the sternal cartilage.
    rib_phase = (z - 0.25 * (y - cy) + rng.uniform(0.0, 22.0)) % 22.0  # y is posterior
    rib_wall = (r_body > 0.80) & (r_body < 0.87) & ~((np.abs(x - cx) < 0.15 * ax) & (y < cy))
    ribs = rib_wall & (rib_phase < 8.0) & (z > base - 0.05 * lz)
    image[ribs] = RIB_HU

    image += rng.normal(scale=NOISE_HU, size=image.shape).astype(np.float32)
    out = sitk.GetImageFromArray(image.astype(np.float32))
    out.SetSpacing((spacing_mm,) * 3)
    out.SetOrigin((0.0, 0.0, 0.0))
    return out


def lung_mask(image_hu: sitk.Image) -> sitk.Image:
    """Lungs as the air inside the body: the largest components of voxels < -400 HU.

    Components that touch the image's border and are as dark as room air (mean < -950 HU) are
    the outside, not lung: lung parenchyma averages about -850 HU, and a cropped field of view
    often cuts through the lungs, so touching the border alone does not disqualify them. The
    second-largest component is kept only with at least a tenth of the first's volume, so gas in
    the stomach or bowel does not pass for a lung; lungs joined by the airways count as one.
    """
    values = sitk.GetArrayViewFromImage(image_hu)
    labels, count = ndimage.label(values < LUNG_THRESHOLD_HU)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    means = np.bincount(labels.ravel(), weights=values.ravel(), minlength=count + 1) / np.maximum(sizes, 1)
    border = np.unique(np.concatenate([labels[(0, -1), :, :].ravel(), labels[:, (0, -1), :].ravel(),
                                       labels[:, :, (0, -1)].ravel()]))
    outside = np.zeros(count + 1, dtype=bool)
    outside[border] = True
    sizes[0] = 0
    sizes[outside & (means < ROOM_AIR_MEAN_HU)] = 0
    order = np.argsort(sizes)[::-1][:2]
    keep = [label for label in order if sizes[label] > 0 and sizes[label] >= 0.1 * sizes[order[0]]]
    mask = sitk.GetImageFromArray(np.isin(labels, keep).astype(np.uint8))
    mask.CopyInformation(image_hu)
    return mask
