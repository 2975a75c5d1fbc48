"""Whole-image prediction: exact tiling, fixed-grid geometry, mask, progress, cancel, devices."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib import inference
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError, PredictionCancelled
from RegistrationMisalignmentLib.inference import default_tile_size, predict, resolve_device, tile_shape
from RegistrationMisalignmentLib.weights import load_model


@pytest.mark.parametrize("name", ["test_lstm", "test_regnet_t"])
def test_tiled_prediction_equals_one_shot(model_dir, small_pair, name):
    fixed, moving = small_pair
    model = load_model(model_dir / f"{name}.pt")
    one_shot = predict(fixed, moving, model, tile_size=32, with_probabilities=True,   # 1 mm grid fits one tile
                       precision="float32")
    tiled = predict(fixed, moving, model, tile_size=16, with_probabilities=True,      # 2 x 2 x 2 tiles
                    precision="float32")
    a = sitk.GetArrayFromImage(one_shot.probabilities)
    b = sitk.GetArrayFromImage(tiled.probabilities)
    assert a.std() > 1e-3, "outputs must vary in space for the comparison to mean anything"
    np.testing.assert_allclose(b, a, atol=1e-5)
    assert np.array_equal(sitk.GetArrayFromImage(one_shot.labelmap), sitk.GetArrayFromImage(tiled.labelmap))


def test_half_precision_storage_on_the_host_keeps_the_float32_outputs(model_dir, small_pair, monkeypatch):
    """The CPU stores the pyramid and the stitched probabilities in float16 (half the RAM that grows with the
    image); with the network in float32 the outputs stay within half-precision rounding."""
    fixed, moving = small_pair
    model = load_model(model_dir / "test_lstm.pt")
    assert inference.host_storage_dtype(model.decoder) == torch.float16
    half = predict(fixed, moving, model, tile_size=16, with_probabilities=True, device="cpu", precision="float32")
    monkeypatch.setattr(inference, "host_storage_dtype", lambda decoder: torch.float32)
    full = predict(fixed, moving, model, tile_size=16, with_probabilities=True, device="cpu", precision="float32")
    a, b = (sitk.GetArrayFromImage(p.probabilities) for p in (full, half))
    assert a.std() > 1e-3, "outputs must vary in space for the comparison to mean anything"
    difference = np.abs(a - b)
    assert 0 < difference.max() < 1e-3, "float16 storage must be in effect, and within its rounding"
    labels = [sitk.GetArrayFromImage(p.labelmap) for p in (full, half)]
    assert (labels[0] == labels[1]).mean() >= 0.999


def test_labelmap_lies_on_the_fixed_grid_with_valid_labels(model_dir, small_pair):
    fixed, moving = small_pair
    result = predict(fixed, moving, load_model(model_dir / "test_singlescale.pt"), with_probabilities=True,
                     body_only=False, precision="float32")  # bf16 probabilities sum to 1 within 4e-3 only
    for image in (result.labelmap, result.probabilities):
        assert image.GetSize() == fixed.GetSize()
        assert np.allclose(image.GetOrigin(), fixed.GetOrigin())
        assert np.allclose(image.GetSpacing(), fixed.GetSpacing())
        assert np.allclose(image.GetDirection(), fixed.GetDirection())
    labels = sitk.GetArrayFromImage(result.labelmap)
    assert result.labelmap.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(labels)) <= {1, 2, 3}
    probs = sitk.GetArrayFromImage(result.probabilities)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-3)  # stored in float16 on the host
    assert np.array_equal(labels, probs.argmax(-1) + 1)
    assert set(result.timings) == {"prepare", "resample", "pyramid", "network", "resample_back"}


def test_mask_restricts_the_output(model_dir, small_pair):
    fixed, moving = small_pair
    mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(fixed)
    mask[0:10, 0:10, 0:7] = 1
    labels = sitk.GetArrayFromImage(predict(fixed, moving, load_model(model_dir / "test_singlescale.pt"),
                                            mask=mask).labelmap)
    inside = sitk.GetArrayFromImage(mask) == 1
    assert (labels[~inside] == 0).all() and (labels[inside] > 0).all()


def test_progress_reaches_one_and_cancel_stops_without_output(model_dir, small_pair):
    fixed, moving = small_pair
    model = load_model(model_dir / "test_singlescale.pt")
    seen: list[float] = []
    predict(fixed, moving, model, tile_size=16, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    calls = []

    def cancel_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(PredictionCancelled):
        predict(fixed, moving, model, tile_size=16, cancel=cancel_after_two)


def test_bad_inputs_are_refused_before_any_work(model_dir, small_pair):
    fixed, moving = small_pair
    model = load_model(model_dir / "test_singlescale.pt")
    flat = sitk.Image(fixed.GetSize(), sitk.sitkFloat32)
    flat.CopyInformation(fixed)
    with pytest.raises(InputError, match="constant"):
        predict(fixed, flat, model)
    far = sitk.Image(moving)
    far.SetOrigin((5000.0, 0.0, 0.0))
    with pytest.raises(InputError, match="overlap"):
        predict(fixed, far, model)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            resolve_device("cuda")


@pytest.mark.parametrize("tile_size", [0, 40, 100])
def test_tile_size_that_breaks_exact_tiling_is_refused(model_dir, small_pair, tile_size):
    fixed, moving = small_pair
    with pytest.raises(InputError, match="multiple of 16"):
        predict(fixed, moving, load_model(model_dir / "test_lstm.pt"), tile_size=tile_size)


@pytest.mark.parametrize("n,tile_size,expected", [(313, 128, 112), (497, 128, 128), (325, 128, 112), (20, 128, 32),
                                                   (128, 128, 128), (129, 128, 80), (40, 16, 16)])
def test_tiles_cover_the_axis_with_little_overshoot(n, tile_size, expected):
    side = tile_shape((n, n, n), tile_size)[0]
    count = -(-n // side)
    assert side == expected and side % 16 == 0 and side <= tile_size
    assert count == -(-n // tile_size), "no more tiles than tile_size itself needs"
    assert count * side - n < 16 * count


def test_default_tile_size_is_per_device_and_checked():
    cpu, cuda = (default_tile_size(DEFAULT_CONFIG, torch.device(d)) for d in ("cpu", "cuda"))
    assert (cpu, cuda) == (DEFAULT_CONFIG.tile_size, DEFAULT_CONFIG.cuda_tile_size) and cuda > cpu
    with pytest.raises(ValueError, match="cuda_tile_size must be a multiple of 16"):
        DEFAULT_CONFIG.replace(cuda_tile_size=100)
