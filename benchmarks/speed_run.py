"""Measures one prediction configuration (time per stage, peak RSS / CUDA memory) in its own process, on the benchmark's pair.

    python -m benchmarks.speed_run JOB_JSON

A fresh process per configuration makes the kernel's peak-RSS counter (VmHWM, per process) that
configuration's peak. The job (JSON on the command line) names the pair files, the model, the
device and the tiling; the result is one JSON object on the last line of stdout.

Timing: one warm-up ``predict`` (on a crop that holds a full batch of full-size tiles, or on the
whole pair, or none), then ``repeats`` timed runs; each stage's median is reported. ``predict``
synchronises CUDA at every stage boundary, so its stage times are device times too.

The "naive" kind is the seed's simple loop: cubic patches (205^3 at x1 by default) through the model
one at a time, fp32, no batching and no tile planning, stitched, then the same resampling back.

The pair. The benchmark's input is a chest-CT-sized fixed/moving pair made from the procedural phantom.

Geometry is fixed so numbers from different runs and machines compare: by default 512 x 512 x 130
voxels at 0.97 x 0.97 x 2.5 mm (origin 0, identity direction), the chest CT of issue 7. A scale f
multiplies the voxel count by f and keeps the spacing (each axis grows by f^(1/3)).

Fixed = the phantom (drawn at ``phantom_spacing_mm``, isotropic) resampled onto that grid; moving =
the phantom sampled at x + u(x), u a seeded respiratory DVF from ``synthetic.deform.deform_pair``.
The DVF is drawn on a 4 mm copy of the phantom (it is smooth on that scale: knots 35-50 mm) and
applied at full resolution with SimpleITK, so making a 2x volume never needs the several GB a
full-resolution ``deform_pair`` would. Run times do not depend on the voxel values, only on the
grid; the content only has to look like a chest so that outputs are plausible.

Pairs are cached as uncompressed .mha files keyed by the geometry and seed (loading is not timed).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.config import round_up_encoder_output
from RegistrationMisalignmentLib.inference import (
    NETWORK_MEMORY_FORMAT, default_tile_size, predict, resolve_device, tile_shape, tile_starts, to_fixed_grid,
)
from RegistrationMisalignmentLib.io import prepare_pair
from RegistrationMisalignmentLib.preprocess import build_pyramid, isotropic_reference, resample_onto, scale_blocks
from RegistrationMisalignmentLib.synthetic.deform import deform_pair
from RegistrationMisalignmentLib.synthetic.phantom import AIR_HU, make_chest_phantom
from RegistrationMisalignmentLib.weights import LoadedModel, load_model

# ---- the pair ----------------------------------------------------------------------------------------
CHEST_SHAPE = (512, 512, 130)
"""(x, y, z) voxels of the reference chest CT."""
CHEST_SPACING = (0.97, 0.97, 2.5)
"""(x, y, z) mm of the reference chest CT."""
DVF_SPACING_MM = 4.0
"""Grid on which the respiratory DVF is drawn before it is interpolated onto the fixed grid."""


@dataclass(frozen=True)
class PairGeometry:
    """The fixed grid: size (x, y, z) voxels and spacing (x, y, z) mm; origin 0, identity direction."""

    shape: tuple[int, int, int] = CHEST_SHAPE
    spacing: tuple[float, float, float] = CHEST_SPACING

    def scaled(self, factor: float) -> "PairGeometry":
        """The same spacing with ``factor`` times the voxels (each axis times factor^(1/3), rounded)."""
        side = factor ** (1.0 / 3.0)
        return PairGeometry(tuple(max(1, round(n * side)) for n in self.shape), self.spacing)  # type: ignore[arg-type]

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    @property
    def extent_mm(self) -> tuple[float, ...]:
        return tuple(n * s for n, s in zip(self.shape, self.spacing))

    def reference(self) -> sitk.Image:
        image = sitk.Image(list(self.shape), sitk.sitkUInt8)
        image.SetSpacing(self.spacing)
        return image

    def grid_1mm_shape(self, spacing_mm: float = 1.0) -> tuple[int, int, int]:
        """(x, y, z) size of the isotropic grid the network runs on (as ``inference.predict`` builds it)."""
        return tuple(isotropic_reference(self.reference(), spacing_mm).GetSize())  # type: ignore[return-value]


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "regmis-benchmark"


def respiratory_field(phantom: sitk.Image, seed: int) -> sitk.Image:
    """A seeded respiratory DVF of ``phantom`` (x, y, z mm, vector float64) on a ``DVF_SPACING_MM`` grid."""
    coarse = resample_onto(phantom, isotropic_reference(phantom, DVF_SPACING_MM), AIR_HU)
    image = torch.from_numpy(sitk.GetArrayFromImage(coarse))
    _, dvf = deform_pair(image, "respiratory", (DVF_SPACING_MM,) * 3, torch.Generator().manual_seed(seed))
    field = sitk.GetImageFromArray(dvf.permute(1, 2, 3, 0).double().numpy(), isVector=True)
    field.CopyInformation(coarse)
    return field


def make_pair(geometry: PairGeometry, seed: int = 0, phantom_spacing_mm: float = 1.0) -> tuple[sitk.Image, sitk.Image]:
    """(fixed, moving) HU images on ``geometry``'s grid; moving(x) = phantom(x + u(x))."""
    # One DVF voxel of margin, so the field covers the fixed grid's last voxels too.
    size_mm = tuple(e + DVF_SPACING_MM for e in geometry.extent_mm)
    phantom = make_chest_phantom(size_mm, phantom_spacing_mm, seed=seed)  # type: ignore[arg-type]
    reference = geometry.reference()
    fixed = resample_onto(phantom, reference, AIR_HU)
    transform = sitk.DisplacementFieldTransform(respiratory_field(phantom, seed))
    moving = sitk.Resample(phantom, reference, transform, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return fixed, moving


def cached_pair(geometry: PairGeometry, seed: int = 0, phantom_spacing_mm: float = 1.0,
                cache_dir: Path | None = None) -> tuple[Path, Path]:
    """Paths of the (fixed, moving) .mha files for this geometry, generating them on first use."""
    key = json.dumps({**asdict(geometry), "seed": seed, "phantom": phantom_spacing_mm, "v": 1}, sort_keys=True)
    tag = "x".join(map(str, geometry.shape)) + "_" + hashlib.sha1(key.encode()).hexdigest()[:10]
    directory = cache_dir or default_cache_dir()
    fixed_path, moving_path = directory / f"fixed_{tag}.mha", directory / f"moving_{tag}.mha"
    if not (fixed_path.exists() and moving_path.exists()):
        directory.mkdir(parents=True, exist_ok=True)
        fixed, moving = make_pair(geometry, seed, phantom_spacing_mm)
        # Write under a temporary name first so an interrupted run never leaves half a pair in the cache.
        for image, path in ((fixed, fixed_path), (moving, moving_path)):
            partial = path.with_suffix(".partial.mha")
            sitk.WriteImage(image, str(partial), useCompression=False)
            partial.replace(path)
    return fixed_path, moving_path


# ---- one configuration -------------------------------------------------------------------------------
STAGES = ("prepare", "resample", "pyramid", "network", "resample_back")


def _proc_status_bytes(field: str) -> int | None:
    """A kB field of /proc/self/status (Linux) in bytes; None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM), the number a memory goal is about."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource  # not on Windows; /proc is the usual source, this is the portable fallback

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    return _proc_status_bytes("VmRSS") or 0


def naive_patch_output(patch_input: int) -> int:
    """1 mm output side of one seed-style patch whose x1 input is ``patch_input`` (205 -> 120).

    The encoder drops 76 voxels, the decoder margin 6 more; patch starts must be multiples of 4 for
    the scales to stay aligned, so the output side is rounded down to a multiple of 4.
    """
    out = (patch_input - 82) // 4 * 4
    if out < 4 or round_up_encoder_output(out + 6) + 76 != patch_input:
        raise ValueError(f"naive patch input {patch_input} is not 101 + 4k (k >= 0)")
    return out


def naive_predict(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel, device: torch.device,
                  patch_input: int) -> dict[str, float]:
    """The seed's per-patch loop; returns its stage timings (s), same stage names as ``predict``."""
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal t
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        timings[stage], t = now - t, now

    fixed, moving = prepare_pair(fixed, moving)
    module, config = model.module.to(device), model.config
    lap("prepare")
    grid = isotropic_reference(fixed, config.spacing_mm)
    fixed_1mm = sitk.GetArrayFromImage(resample_onto(fixed, grid, config.background_hu))
    moving_1mm = sitk.GetArrayFromImage(resample_onto(moving, grid, config.background_hu))
    lap("resample")
    pyramid = build_pyramid(fixed_1mm, moving_1mm, config, device)
    lap("pyramid")
    out_side = naive_patch_output(patch_input)
    shape = tuple(pyramid[1].shape[1:])
    scales = (1,) if model.decoder == "singlescale" else tuple(config.scales)
    empty = torch.empty(0, device=device)
    probabilities = torch.zeros((*shape, 3), dtype=torch.float32)
    for p0 in tile_starts(shape, (out_side,) * 3):
        blocks = scale_blocks(pyramid, p0, (out_side,) * 3, config, scales)
        x = {s: blocks[s][None] if s in blocks else empty for s in config.scales}
        with torch.inference_mode():
            p = module.probabilities(x[1], x[2], x[4])[0].cpu()
        n = [min(out_side, size - a) for size, a in zip(shape, p0)]
        target = probabilities[p0[0] : p0[0] + n[0], p0[1] : p0[1] + n[1], p0[2] : p0[2] + n[2]]
        target.copy_(p[:, : n[0], : n[1], : n[2]].permute(1, 2, 3, 0))
    lap("network")
    to_fixed_grid(probabilities, grid, fixed, None, config)
    lap("resample_back")
    return timings


def tile_profile(fixed: sitk.Image, moving: sitk.Image, model: LoadedModel, device: torch.device,
                 tile_size: int, batch: int, repeats: int) -> dict:
    """Median time of one batch of tiles through the encoders alone and through the whole model.

    ``predict`` reports the network stage as one number; this splits it into encoders and the rest
    (scale alignment + decoder), for the first batch of full-size tiles of this pair.
    """
    config = model.config
    fixed, moving = prepare_pair(fixed, moving)
    grid = isotropic_reference(fixed, config.spacing_mm)
    pyramid = build_pyramid(sitk.GetArrayFromImage(resample_onto(fixed, grid, config.background_hu)),
                            sitk.GetArrayFromImage(resample_onto(moving, grid, config.background_hu)), config, device)
    shape = tuple(pyramid[1].shape[1:])
    tile = tile_shape(shape, tile_size)
    starts = tile_starts(shape, tile)
    blocks = [scale_blocks(pyramid, p0, tile, config) for p0 in starts[:batch]]
    x = {s: torch.stack([b[s] for b in blocks]).contiguous(memory_format=NETWORK_MEMORY_FORMAT) for s in config.scales}
    module = model.module.to(device).to(memory_format=NETWORK_MEMORY_FORMAT)  # as predict runs it
    encoders = [(getattr(module, f"encoder{s}"), x[s]) for s in config.scales
                if model.decoder != "singlescale" or s == 1]
    cuda_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16

    def timed(fn, warmup: bool) -> float:
        times = []
        for _ in range(repeats + warmup):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(device.type, dtype=cuda_dtype, enabled=device.type == "cuda"):
                fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[int(warmup):])

    # The whole model is warm from the predict runs; the encoders called alone are new graphs to TorchScript.
    full = timed(lambda: module.probabilities(x[1], x[2], x[4]), warmup=False)
    enc = timed(lambda: [encoder(block) for encoder, block in encoders], warmup=True)
    batches = math.ceil(len(starts) / batch)
    return {"tiles": len(starts), "tile": list(tile), "batch": len(blocks), "batches": batches,
            "input_sides": {str(s): list(x[s].shape[2:]) for s in config.scales},
            "batch_forward_s": full, "encoders_s": enc, "decoder_s": max(full - enc, 0.0),
            "forward_total_estimate_s": full * batches}


def warmup_crop(fixed: sitk.Image, moving: sitk.Image, tile_size: int, batch: int) -> tuple[sitk.Image, sitk.Image]:
    """The centre of the pair, cut to hold ``batch`` or more full-size 1 mm tiles (every tile shape gets warmed).

    Rounded down so that the 1 mm grid does not grow a thin extra row of tiles.
    """
    mm = max(2, math.ceil(batch ** (1 / 3))) * tile_size
    size = [min(n, max(1, math.floor(mm / s))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    start = [(n - c) // 2 for n, c in zip(fixed.GetSize(), size)]
    box = tuple(slice(a, a + c) for a, c in zip(start, size))
    return fixed[box], moving[box]


def run_job(job: dict) -> dict:
    """Measure one configuration.

    Job keys: kind ("predict" or "naive"), model, fixed, moving (paths), device, tile_size and
    tile_batch (None: the model's), repeats, warmup ("small", "full", "none"), threads (None: torch's),
    naive_patch (x1 input side of the naive loop), profile_tiles (add the encoder/decoder split), precision
    ("auto" or "float32") and body_only (predict's; the last run's tiles computed / in all are reported).
    """
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    device = resolve_device(job["device"])
    fixed, moving = sitk.ReadImage(job["fixed"]), sitk.ReadImage(job["moving"])
    model = load_model(job["model"], device=device)
    tile_size = job.get("tile_size") or default_tile_size(model.config, device)
    batch = job.get("tile_batch") or model.config.tile_batch
    rss_loaded = current_rss_bytes()

    if job["kind"] == "naive":
        def run(f: sitk.Image, m: sitk.Image) -> dict[str, float]:
            return naive_predict(f, m, model, device, job["naive_patch"])
    else:
        def run(f: sitk.Image, m: sitk.Image) -> dict[str, float]:
            prediction = predict(f, m, model, device=device, tile_size=tile_size, tile_batch=batch,
                                 precision=job.get("precision", "auto"), body_only=job.get("body_only", True))
            tiles[:] = prediction.tiles
            return prediction.timings

    tiles = [0, 0]

    warmup = job.get("warmup", "small")
    if warmup == "full":
        run(fixed, moving)
    elif warmup == "small":
        run(*warmup_crop(fixed, moving, tile_size, batch))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    runs = [run(fixed, moving) for _ in range(job["repeats"])]
    totals = [sum(r.values()) for r in runs]
    result = {
        "timings_s": {s: statistics.median(r[s] for r in runs) for s in STAGES},
        "total_s": statistics.median(totals),
        "runs_total_s": totals,
        "rss_after_load_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
        "torch_threads": torch.get_num_threads(),
        "tile_size": tile_size if job["kind"] != "naive" else None,
        "tile_batch": batch if job["kind"] != "naive" else 1,
        "device": str(device),
        "model_name": model.name,
        "decoder": model.decoder,
        "precision": job.get("precision", "auto") if job["kind"] != "naive" else "float32",
        "body_only": job.get("body_only", True) if job["kind"] != "naive" else False,
        "tiles_computed": tiles[0],
        "tiles_total": tiles[1],
    }
    if device.type == "cuda":
        result["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if job.get("profile_tiles") and job["kind"] == "predict" and model.decoder != "regnet-t":
        result["tile_profile"] = tile_profile(fixed, moving, model, device, tile_size, batch, job["repeats"])
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(run_job(json.loads(argv[0]))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
