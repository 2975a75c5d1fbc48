"""The on-device stages (torch resampling, stitching and resampling back) give the host path's outputs."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib import inference
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.grid_resample import resample_to_grid
from RegistrationMisalignmentLib.inference import predict
from RegistrationMisalignmentLib.weights import load_model


def oblique_source() -> sitk.Image:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 30, 25)).astype(np.float32))
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((3.0, -2.0, 5.0))
    image.SetDirection(sitk.VersorTransform((0.1, 0.2, 0.3), 0.4).GetMatrix())
    return image


@pytest.mark.parametrize("default", [-7.0, None])
def test_resampling_matches_simpleitk_inside_outside_and_in_slabs(default):
    source = oblique_source()
    target = sitk.Image([31, 27, 40], sitk.sitkUInt8)
    target.SetOrigin((2.0, -4.0, 3.0))
    if default is None:  # nearest-voxel extrapolation, as to_fixed_grid asks SimpleITK for
        expected = sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32,
                                 useNearestNeighborExtrapolator=True)
    else:
        expected = sitk.Resample(source, target, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    expected = sitk.GetArrayFromImage(expected)
    volume = torch.from_numpy(sitk.GetArrayFromImage(source))[None].repeat(2, 1, 1, 1)
    got = resample_to_grid(volume, source, target, default, slab_voxels=31 * 27 * 7).numpy()  # 6 slabs
    if default is not None:
        assert 0.1 < (expected == default).mean() < 0.9, "the target must straddle the source's edge"
    for channel in got:
        np.testing.assert_allclose(channel, expected, atol=1e-4)


def test_resampling_refuses_a_volume_of_another_grid():
    with pytest.raises(ValueError, match="is not"):
        resample_to_grid(torch.zeros(1, 5, 5, 5), oblique_source(), oblique_source(), 0.0)


@pytest.mark.parametrize("name", ["test_lstm", "test_regnet_t"])
def test_stages_on_device_give_the_host_paths_outputs(model_dir, small_pair, monkeypatch, name):
    """CUDA keeps every stage on the device; forced here on the CPU, that path must reproduce the SimpleITK one
    (host storage and the network in float32 here, so that only the stages differ), and the network's
    channels-last layout (every device) the contiguous layout's outputs."""
    monkeypatch.setattr(inference, "host_storage_dtype", lambda decoder: torch.float32)
    monkeypatch.setattr(inference, "NETWORK_MEMORY_FORMAT", torch.contiguous_format)
    fixed, moving = small_pair
    model = load_model(model_dir / f"{name}.pt")
    mask = sitk.Image(fixed.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(fixed)
    mask[2:20, 0:15, 1:12] = 1
    host = predict(fixed, moving, model, mask=mask, tile_size=16, with_probabilities=True, device="cpu",
                   precision="float32")
    monkeypatch.setattr(inference, "stages_on_device", lambda device: True)
    monkeypatch.setattr(inference, "NETWORK_MEMORY_FORMAT", torch.channels_last_3d)
    on_device = predict(fixed, moving, model, mask=mask, tile_size=16, with_probabilities=True, device="cpu",
                        precision="float32")
    expected = sitk.GetArrayFromImage(host.probabilities)
    assert expected.std() > 1e-3, "outputs must vary in space for the comparison to mean anything"
    np.testing.assert_allclose(sitk.GetArrayFromImage(on_device.probabilities), expected, atol=1e-4)
    a, b = (sitk.GetArrayFromImage(p.labelmap) for p in (host, on_device))
    assert (a == 0).any() and (a > 0).any(), "the mask must cut the labelmap"
    assert (a == b).mean() >= 0.999
    assert on_device.probabilities.GetSize() == fixed.GetSize()
    assert predict(fixed, moving, model, tile_size=16, device="cpu").probabilities is None


def test_way_back_in_slabs_gives_one_simpleitk_resampling():
    """The host resamples the 1 mm probabilities back slab by slab, each from the crop it reads (bounded RAM):
    on an oblique grid, and in slabs down to 3 slices, the result must be SimpleITK's on the whole volume."""
    grid = oblique_source()
    probabilities = torch.from_numpy(np.random.default_rng(1).random((20, 30, 25, 3), dtype=np.float32))
    fixed = sitk.Image([31, 27, 40], sitk.sitkUInt8)
    fixed.SetOrigin((2.0, -4.0, 3.0))
    fixed.SetSpacing((0.8, 0.9, 1.3))
    vector = sitk.GetImageFromArray(probabilities.numpy(), isVector=True)
    vector.CopyInformation(grid)
    expected = sitk.GetArrayFromImage(sitk.Resample(vector, fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                                    sitk.sitkVectorFloat32, useNearestNeighborExtrapolator=True))
    for slab_slices in (3, 7, 40):
        labelmap, resampled = inference.to_fixed_grid(probabilities, grid, fixed, None, DEFAULT_CONFIG,
                                                      slab_voxels=31 * 27 * slab_slices)
        np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), expected, atol=1e-6)
        assert np.array_equal(sitk.GetArrayFromImage(labelmap), expected.argmax(axis=-1) + 1)
