"""Whole-image prediction: tiles through the network, stitched, mapped back to the fixed grid.

Exactness. Tiles start at 1 mm voxels that are multiples of 16 and every encoder is exactly
equivariant to shifts of 4 of its own level (see ``networks.regnet``), so each tile computes the
same numbers a single pass over the whole image would; tiles overlap only by the receptive-field
context they re-read, never by averaged outputs. Memory is bounded by the tile size and batch.

Back to the fixed grid: the 3 class probabilities are resampled linearly onto the fixed image's
exact grid (origin, spacing, direction) and the label is their argmax there — smoother than nearest
on labels and correct for any fixed spacing. Voxels outside the optional mask get label 0.

Where the stages run. On the CPU resampling is SimpleITK's; the pyramid and the stitched probabilities
are stored in float16 and the way back runs slab by slab, so the RAM that grows with the image stays
small. On CUDA every stage stays on the device (``grid_resample`` computes the same resampling with
``grid_sample``): the images go up once and only the labelmap (and the probabilities, when asked for)
come back.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.body_mask import body_mask
from RegistrationMisalignmentLib.config import PRECISIONS, MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.grid_resample import SLAB_VOXELS, resample_to_grid, source_box, target_slabs
from RegistrationMisalignmentLib.io import fill_region, moving_coverage, prepare_mask, prepare_pair
from RegistrationMisalignmentLib.networks.regnet import ENCODER_CONTEXT, HEAD_CONTEXT
from RegistrationMisalignmentLib.preprocess import (
    background_value, build_pyramid, extract_block, isotropic_reference, normalize_hu, pyramid_level, pyramid_of,
    resample_onto, scale_blocks,
)
from RegistrationMisalignmentLib.config import round_up_encoder_output
from RegistrationMisalignmentLib.progress import Cancel, Progress, Reporter
from RegistrationMisalignmentLib.spatial import compose, upsample_dvf, warp
from RegistrationMisalignmentLib.weights import LoadedModel, load_model



FILE_NOTES_KEY = "ITK_FileNotes"
"""ITK writes this metadata as NIfTI's descrip (80 bytes) and as a field of NRRD and MHA files."""
LABELMAP_NOTE = "RegistrationMisalignment labelmap: 0 no data, 1 correct, 2 poor, 3 wrong"
"""What a labelmap of ``predict`` says of itself in its file, so that ``evaluate`` can tell it from a segmentation."""


@dataclass
class Prediction:
    """The result of ``predict``, all on the fixed image's grid."""

    labelmap: sitk.Image
    """uint8: 0 outside the mask, 1 correct, 2 poor, 3 wrong."""
    probabilities: sitk.Image | None
    """float32 vector image (correct, poor, wrong), when asked for."""
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    """Wall time per stage (s): prepare, resample, pyramid, network, resample_back."""
    tiles: tuple[int, int] = (0, 0)
    """(computed, in all) network tiles: those outside the mask or body are skipped (0, 0 for RegNet-t)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; refuses 'cuda' on a machine without it and any other device ('tpu',
    'gpu', 'mps') with ``InputError``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r}: the network runs on auto, cpu, cuda or cuda:N (an NVIDIA GPU)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    return dev


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX flags in /proc/cpuinfo).

    Where it does, bf16 autocast runs the network 2-3x faster than float32 (one 64^3 LSTM tile on the
    project's 2-core EPYC: 3.01 s fp32, 1.37 s bf16); elsewhere bf16 is emulated and slower.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def network_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision the network runs in on ``device``: "bf16" (CUDA, or a CPU with native bf16: 2.2-2.9x
    faster per tile, ``cpu_has_native_bf16``), "fp16" (older GPUs) or "float32" (other CPUs, or asked for).
    Reports record it: the labels of bf16 and float32 differ at about 1 % of the voxels."""
    if precision == "float32":
        return "float32"
    if device.type != "cuda":
        return "bf16" if cpu_has_native_bf16() else "float32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _autocast(device: torch.device, precision: str = "auto"):
    """The network's autocast for ``network_precision``, plus cuDNN autotuning on CUDA.

    Autotuning is scoped to the network calls (``cudnn.flags``), so a host process such as Slicer
    keeps its own cuDNN settings. Every tile has the same shape, so the tuning is paid once.
    """
    name = network_precision(device, precision)
    if name == "float32":
        return nullcontext()
    if device.type != "cuda":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    stack = ExitStack()
    stack.enter_context(torch.backends.cudnn.flags(enabled=True, benchmark=True))
    stack.enter_context(torch.autocast("cuda", dtype=dtype))
    return stack


def stages_on_device(device: torch.device) -> bool:
    """Whether resampling and stitching run on ``device`` too (CUDA), not through the host."""
    return device.type == "cuda"


NETWORK_MEMORY_FORMAT = torch.channels_last_3d
"""The layout of the misalignment network's weights and input blocks on every device (RegNet-t's blocks stay
contiguous, as measured; benchmarks/network_variants.py):
cuDNN's bf16 3-D convolutions run 1.6x faster in it on an H100; on the CPU oneDNN's float32 ones 1.35x at a
tile of 128 (40.9 -> 30.2 s) on a 2-core AMD EPYC without AVX-512 (benchmarks/results/network_variants_cpu/),
and 1.5x (float32) and 1.3x (bf16 autocast) at 64^3 on one with AVX-512 BF16 (issue 22). Probabilities move by
< 1e-6 in float32. Training keeps the contiguous layout: in a one-off check its step was no faster in this one."""


def host_storage_dtype(decoder: str) -> torch.dtype:
    """What the host path stores the pyramid and the stitched probabilities in; both are computed in float32.

    float16 halves the two buffers that grow with the image, which is what keeps the CPU's peak RAM under
    6 GB at twice the chest CT (benchmarks/results/speed-cpu-double.md); its rounding (< 5e-4) is well
    inside the tolerance the GPU's bf16 autocast is held to. RegNet-t warps its pyramid: float32.
    """
    return torch.float32 if decoder == "regnet-t" else torch.float16


def default_tile_size(config: MisalignmentConfig, device: torch.device) -> int:
    """The configuration's tile side for ``device``: GPUs take larger tiles (less re-read context)."""
    return config.cuda_tile_size if device.type == "cuda" else config.tile_size


def tile_starts(shape: tuple[int, ...], tile: tuple[int, ...]) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(range(0, n, t) for n, t in zip(shape, tile))))


def tile_shape(shape: tuple[int, ...], tile_size: int, multiple: int = 16) -> tuple[int, int, int]:
    """Per-axis tile side: the fewest tiles of at most ``tile_size`` that cover the axis, made equal.

    Each side is the axis length over that tile count, rounded up to ``multiple`` (what keeps tiles
    exact), so the last tile overshoots the image by less than ``multiple`` voxels per tile instead of
    by up to a whole tile (313 voxels in tiles of 128 would compute 384; in 3 tiles of 112, 336).
    """
    sides = []
    for n in shape:
        count = -(-n // tile_size)  # ceiling divisions throughout
        equal = -(-n // count)
        sides.append(multiple * -(-equal // multiple))
    return tuple(sides)  # type: ignore[return-value]


def tile_plan(shape: tuple[int, ...], tile_size: int, needed: torch.Tensor | None = None
              ) -> tuple[tuple[int, int, int], list[tuple[int, int, int]], int]:
    """(tile, starts of the tiles to compute, number of tiles in all) for a 1 mm grid of ``shape``.

    With ``needed`` (bool (D, H, W)) a tile that holds no needed voxel is left out: air and the table
    outside the body cost nothing.
    """
    tile = tile_shape(shape, tile_size)
    starts = tile_starts(shape, tile)
    total = len(starts)
    if needed is not None:
        starts = [p0 for p0 in starts if bool(needed[p0[0] : p0[0] + tile[0], p0[1] : p0[1] + tile[1],
                                                       p0[2] : p0[2] + tile[2]].any())]
    return tile, starts, total


def network_probabilities(module: torch.jit.ScriptModule, decoder: str, pyramid: dict[int, torch.Tensor],
                          config: MisalignmentConfig, tile: tuple[int, int, int], starts: list[tuple[int, int, int]],
                          batch: int, report: Reporter, span: tuple[float, float] = (0.1, 0.9),
                          out_device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          precision: str = "auto") -> torch.Tensor:
    """(D, H, W, 3) class probabilities on the 1 mm grid, computed for the tiles at ``starts`` (``tile_plan``),
    stitched on ``out_device``; voxels of no computed tile stay 0.

    Classes last: the layout a SimpleITK vector image takes without a copy (``to_fixed_grid``). Blocks
    go in as float32 whatever the pyramid's ``dtype`` (the network then runs at ``precision``, see
    ``_autocast``); the stitched result is ``dtype``.
    """
    device = pyramid[1].device
    shape = tuple(pyramid[1].shape[1:])
    scales = (1,) if decoder == "singlescale" else tuple(config.scales)
    empty = torch.empty(0, device=device)
    out = torch.zeros((*shape, 3), dtype=dtype, device=out_device)
    for first in range(0, len(starts), batch):
        group = starts[first : first + batch]
        blocks = [scale_blocks(pyramid, p0, tile, config, scales) for p0 in group]
        x = {s: torch.stack([b[s] for b in blocks]).float().contiguous(memory_format=NETWORK_MEMORY_FORMAT)
             if s in scales else empty for s in config.scales}
        with torch.inference_mode(), _autocast(device, precision):
            probs = module.probabilities(x[1], x[2], x[4]).float().to(out.device)
        for p0, p in zip(group, probs):
            size = [min(t, n - a) for t, n, a in zip(tile, shape, p0)]
            out[p0[0] : p0[0] + size[0], p0[1] : p0[1] + size[1], p0[2] : p0[2] + size[2]] = \
                p[:, : size[0], : size[1], : size[2]].permute(1, 2, 3, 0)
        done = first + len(group)
        report(span[0] + (span[1] - span[0]) * done / len(starts), f"tile {done}/{len(starts)}")
    return out


def needed_voxels(mask: sitk.Image, grid_1mm: sitk.Image, device: torch.device) -> torch.Tensor:
    """bool (D, H, W) on the 1 mm grid: the mask (nearest), grown by 2 voxels so that the linear way back
    to the fixed grid reads only computed voxels for every voxel of the mask."""
    near = sitk.Resample(mask, grid_1mm, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    grown = torch.from_numpy(sitk.GetArrayFromImage(near) > 0).to(device)[None, None].float()
    return torch.nn.functional.max_pool3d(grown, 5, stride=1, padding=2)[0, 0] > 0


def dense_dvf(module: torch.jit.ScriptModule, pair: torch.Tensor, scale: int, config: MisalignmentConfig,
              tile_size: int, batch: int, precision: str = "auto") -> torch.Tensor:
    """RegNet DVF (3, d, h, w) in mm over a whole pyramid level, tiled exactly (starts multiple of 4)."""
    shape = tuple(pair.shape[1:])
    tile = tile_shape(shape, tile_size, multiple=4)
    ctx = ENCODER_CONTEXT + HEAD_CONTEXT
    size = tuple(round_up_encoder_output(t) + 2 * ctx for t in tile)
    fill = background_value(config)
    out = torch.zeros((3, *shape), dtype=torch.float32, device=pair.device)
    starts = tile_starts(shape, tile)
    for first in range(0, len(starts), batch):
        group = starts[first : first + batch]
        x = torch.stack([extract_block(pair, tuple(p - ctx for p in p0), size, fill) for p0 in group])
        with torch.inference_mode(), _autocast(pair.device, precision):
            dvf = module(x, scale).float()
        for p0, d in zip(group, dvf):
            n = [min(t, m - a) for t, m, a in zip(tile, shape, p0)]
            out[:, p0[0] : p0[0] + n[0], p0[1] : p0[1] + n[1], p0[2] : p0[2] + n[2]] = d[:, : n[0], : n[1], : n[2]]
    return out


def regnet_t_displacement(module: torch.jit.ScriptModule, pyramid: dict[int, torch.Tensor], config: MisalignmentConfig,
                          tile_size: int, batch: int, report: Reporter, precision: str = "auto") -> torch.Tensor:
    """RegNet used as a 3-level registration (x4, then x2 and x1 on the warped result): total DVF (3, D, H, W)."""
    fixed, moving = pyramid[1][:1], pyramid[1][1:]
    shape = tuple(fixed.shape[1:])
    fill = background_value(config)
    total = torch.zeros((3, *shape), dtype=torch.float32, device=fixed.device)
    warped = moving
    for i, s in enumerate(sorted(config.scales, reverse=True)):
        pair = torch.cat([pyramid[s][:1], pyramid_level(warped, s, config)])
        residual = upsample_dvf(dense_dvf(module, pair, s, config, tile_size, batch, precision), s, shape)
        total = compose(residual, total)
        warped = warp(moving, total, fill=fill)
        report(0.1 + 0.8 * (i + 1) / len(config.scales), f"RegNet level x{s} registered")
    return total


def regnet_t_probabilities(displacement: torch.Tensor, config: MisalignmentConfig) -> torch.Tensor:
    """One-hot (D, H, W, 3) of |DVF| thresholded at the class edges (3 and 6 mm)."""
    magnitude = torch.linalg.vector_norm(displacement, dim=0).cpu().numpy()
    classes = torch.from_numpy(config.classify_mm(magnitude))
    return torch.nn.functional.one_hot(classes, 3).float()


def to_fixed_grid(probabilities: torch.Tensor, grid_1mm: sitk.Image, fixed: sitk.Image, mask: sitk.Image | None,
                  config: MisalignmentConfig, with_probabilities: bool = True,
                  slab_voxels: int = SLAB_VOXELS) -> tuple[sitk.Image, sitk.Image | None]:
    """Resample (D, H, W, 3) probabilities onto the fixed grid; labelmap = argmax (+1), 0 outside the mask.

    A CPU tensor goes through SimpleITK slab by slab (``slab_voxels`` fixed voxels each), a device tensor
    through ``grid_resample`` on its device; the probabilities image is made only ``with_probabilities``.
    """
    if probabilities.device.type == "cpu":
        classes, probs = _resample_back_on_host(probabilities, grid_1mm, fixed, with_probabilities, slab_voxels)
    else:
        on_device = resample_to_grid(probabilities.permute(3, 0, 1, 2), grid_1mm, fixed, default=None)
        classes = on_device.argmax(dim=0).to(torch.uint8).cpu().numpy()
        probs = on_device.permute(1, 2, 3, 0).cpu().numpy() if with_probabilities else None
        del on_device
    resampled = None
    if probs is not None:
        resampled = sitk.GetImageFromArray(probs, isVector=True)
        resampled.CopyInformation(fixed)
        del probs
    labels = np.asarray(config.label_values, dtype=np.uint8)[classes]
    if mask is not None:
        labels[sitk.GetArrayViewFromImage(mask) == 0] = config.label_outside
    labelmap = sitk.GetImageFromArray(labels)
    labelmap.CopyInformation(fixed)
    return labelmap, resampled


def _resample_back_on_host(probabilities: torch.Tensor, grid_1mm: sitk.Image, fixed: sitk.Image,
                           with_probabilities: bool, slab_voxels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Class index (uint8) and, when asked, float32 (D, H, W, 3) probabilities on the fixed grid, slab by slab.

    Each slab of the fixed grid is resampled by SimpleITK from the crop of the 1 mm grid it reads
    (``source_box``), so memory beyond the outputs stays bounded by the slab, whatever the image size.
    """
    width, height, depth = fixed.GetSize()
    classes = np.empty((depth, height, width), dtype=np.uint8)
    probs = np.empty((depth, height, width, 3), dtype=np.float32) if with_probabilities else None
    for z0, z1 in target_slabs(fixed, slab_voxels):
        lo, hi = source_box(grid_1mm, fixed, z0, z1)
        crop = probabilities[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]].float().numpy()
        vector = sitk.GetImageFromArray(crop, isVector=True)
        vector.SetSpacing(grid_1mm.GetSpacing())
        vector.SetDirection(grid_1mm.GetDirection())
        vector.SetOrigin(grid_1mm.TransformIndexToPhysicalPoint(lo))
        resampled = sitk.Resample(vector, size=[width, height, z1 - z0], transform=sitk.Transform(),
                                  interpolator=sitk.sitkLinear, outputOrigin=fixed.TransformIndexToPhysicalPoint((0, 0, z0)),
                                  outputSpacing=fixed.GetSpacing(), outputDirection=fixed.GetDirection(),
                                  defaultPixelValue=0.0, outputPixelType=sitk.sitkVectorFloat32,
                                  useNearestNeighborExtrapolator=True)
        values = sitk.GetArrayViewFromImage(resampled)
        classes[z0:z1] = np.argmax(values, axis=-1)
        if probs is not None:
            probs[z0:z1] = values
    return classes, probs


def _geometry_of(image: sitk.Image) -> sitk.Image:
    """A uint8 image on ``image``'s grid: what the way back needs of the fixed image, at a quarter of its float32."""
    grid = sitk.Image(image.GetSize(), sitk.sitkUInt8)
    grid.CopyInformation(image)
    return grid


def resample_pair_on_device(fixed: sitk.Image, moving: sitk.Image, grid: sitk.Image, config: MisalignmentConfig,
                            device: torch.device) -> torch.Tensor:
    """HU (2, D, H, W) of the pair (fixed, moving) on the 1 mm ``grid``, uploaded once and resampled on ``device``."""
    # prepare_pair put both images on the fixed grid, so one resampling serves the pair.
    pair = torch.stack([torch.from_numpy(sitk.GetArrayFromImage(image)).to(device) for image in (fixed, moving)])
    return resample_to_grid(pair, fixed, grid, config.background_hu)


def _without_fill(coverage: sitk.Image | None, fill: sitk.Image, value: float,
                  log: Callable[[str], None] | None) -> sitk.Image:
    """``coverage`` (None: everywhere) less a registration's fill (``io.fill_region``), with a note."""
    if log is not None:
        share = 100 * float(sitk.GetArrayViewFromImage(fill).mean())
        log(f"{share:.1f} % of the moving image is one block of exactly {value:g} HU at its edge where the fixed "
            "image shows anatomy: a registration's fill outside the original moving image (elastix: "
            "DefaultPixelValue, 0 by default), treated as no data.")
    outside = sitk.Cast(fill == 0, sitk.sitkUInt8)
    return outside if coverage is None else sitk.Cast(sitk.And(coverage, outside), sitk.sitkUInt8)


def _limit_to_coverage(fixed: sitk.Image, moving: sitk.Image, mask: sitk.Image | None, coverage: sitk.Image,
                       log: Callable[[str], None] | None, advice: str) -> tuple[sitk.Image, sitk.Image]:
    """Where the moving image has no data (``coverage`` 0) the map says nothing (label 0, as outside a mask),
    and the network reads the fixed image there in its place: an aligned context instead of the fill's air,
    which it would take for misalignment in every block that reaches past the moving image's edge."""
    covered = sitk.GetArrayViewFromImage(coverage) != 0
    values = sitk.GetArrayFromImage(moving)  # float32, as prepare_pair gives both images
    np.copyto(values, sitk.GetArrayViewFromImage(fixed), where=~covered)
    blended = sitk.GetImageFromArray(values)
    blended.CopyInformation(moving)
    limited = coverage if mask is None else sitk.Cast(sitk.And(mask != 0, coverage), sitk.sitkUInt8)
    if log is not None:
        inside = covered.size if mask is None else int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
        kept = int(np.count_nonzero(sitk.GetArrayViewFromImage(limited)))
        log(f"the moving image has data for only {100 * kept / max(inside, 1):.1f} % of the fixed image's "
            f"{'mask' if mask is not None else 'grid'}: the rest gets label 0 (no data there); near the gap's "
            f"edge the map sees less of the moving image.{advice}")
    return blended, limited


def predict(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel | None = None, *,
            mask: sitk.Image | None = None, device: str | torch.device = "auto", with_probabilities: bool = False,
            progress: Progress | None = None, cancel: Cancel | None = None,
            log: Callable[[str], None] | None = None, tile_size: int | None = None,
            tile_batch: int | None = None, hu_offset: float | tuple[float, float] = 0.0, body_only: bool = True,
            precision: str = "auto") -> Prediction:
    """Misalignment labelmap of the deformed ``moving`` image against ``fixed``, on the fixed grid.

    Without a ``mask`` the map covers the fixed image's body (``body_mask``; ``body_only=False`` for the
    whole image): tiles outside it are not computed and their voxels get label 0, as outside a mask. So do
    the fixed voxels the moving image does not reach (``io.moving_coverage``), with a warning through ``log``.
    ``precision``: "auto" (bf16 where the device computes it natively) or "float32" (see ``_autocast``).

    ``hu_offset`` is added to the images' values before the HU check (``io.prepare_pair``): one number
    for both, or (fixed, moving); e.g. -1024 for a CT stored as HU + 1024 without its rescale intercept.
    Raises ``InputError`` for bad inputs (before any work) and ``PredictionCancelled`` when ``cancel``
    is raised; nothing is written in either case.
    """
    if tile_size is not None and (tile_size < 16 or tile_size % 16):
        raise InputError(f"tile size {tile_size} must be a positive multiple of 16 (1 mm voxels); tiles start on "
                         "multiples of 16 so that tiled prediction equals one-shot prediction")
    if tile_batch is not None and tile_batch < 1:
        raise InputError(f"tile batch {tile_batch} must be at least 1")
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    start = time.perf_counter()
    timings: dict[str, float] = {}
    report = Reporter(progress, cancel)
    dev = resolve_device(device)

    def lap(stage: str, t0: float) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        now = time.perf_counter()
        timings[stage] = now - t0
        return now

    report(0.0, "checking inputs")
    fixed, moving_on_grid = prepare_pair(fixed, moving, log=log, hu_offset=hu_offset)
    coverage, moving = moving_coverage(moving, fixed), moving_on_grid
    advice = (" Give a moving image resampled onto the fixed grid (as a registration writes it) for a map of the "
              "whole image." if coverage is not None else "")
    fill = fill_region(moving, fixed)
    if fill is not None:
        coverage = _without_fill(coverage, *fill, log)
    if mask is not None:
        mask = prepare_mask(mask, fixed, log=log)
    elif body_only:
        mask = body_mask(fixed)
    if coverage is not None:
        moving, mask = _limit_to_coverage(fixed, moving, mask, coverage, log, advice)
    model = model or load_model(device=dev)
    module = model.module.to(dev)
    if model.decoder != "regnet-t":  # RegNet-t's blocks are cut elsewhere (dense_dvf) and stay as measured
        module = module.to(memory_format=NETWORK_MEMORY_FORMAT)
    config = model.config
    t = lap("prepare", start)

    report(0.02, f"resampling to {config.spacing_mm:g} mm")
    grid = isotropic_reference(fixed, config.spacing_mm)
    on_device = stages_on_device(dev)
    storage = torch.float32 if on_device else host_storage_dtype(model.decoder)
    if on_device:
        pair_1mm = resample_pair_on_device(fixed, moving, grid, config, dev)
        t = lap("resample", t)
        pyramid = pyramid_of(normalize_hu(pair_1mm, config), config)
        del pair_1mm
    else:
        fixed_1mm, moving_1mm = (sitk.GetArrayFromImage(resample_onto(image, grid, config.background_hu))
                                 for image in (fixed, moving))
        fixed, moving = _geometry_of(fixed), None  # only the grid is needed from here: drop the float32 pair
        t = lap("resample", t)
        pyramid = build_pyramid(fixed_1mm, moving_1mm, config, dev, dtype=storage)
        del fixed_1mm, moving_1mm
    t = lap("pyramid", t)

    tile_side = tile_size or default_tile_size(config, dev)
    batch = tile_batch or config.tile_batch
    report(0.1, f"predicting with {model.name} ({model.decoder}) on {dev.type}")
    tiles = (0, 0)
    if model.decoder == "regnet-t":
        probabilities = regnet_t_probabilities(regnet_t_displacement(module, pyramid, config, tile_side, batch, report,
                                                                     precision), config)
    else:
        needed = needed_voxels(mask, grid, pyramid[1].device) if mask is not None else None
        tile, starts, total = tile_plan(tuple(pyramid[1].shape[1:]), tile_side, needed)
        tiles = (len(starts), total)
        probabilities = network_probabilities(module, model.decoder, pyramid, config, tile, starts, batch, report,
                                              out_device=dev if on_device else "cpu", dtype=storage,
                                              precision=precision)
    del pyramid
    t = lap("network", t)

    report(0.92, "mapping back to the fixed image grid")
    labelmap, probs_image = to_fixed_grid(probabilities, grid, fixed, mask, config, with_probabilities)
    labelmap.SetMetaData(FILE_NOTES_KEY, LABELMAP_NOTE)  # NIfTI descrip, a NRRD / MHA field: evaluate reads it
    lap("resample_back", t)
    report(1.0, "done")
    return Prediction(labelmap=labelmap, probabilities=probs_image,
                      seconds=time.perf_counter() - start, timings=timings, tiles=tiles)
