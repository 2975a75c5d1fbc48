"""RegNet Uadv geometry and size, decoders, and the explicit alignment of the three scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG, SPLITS, MisalignmentConfig
from RegistrationMisalignmentLib.networks.model import DECODERS, MisalignmentNet, align_to_fine
from RegistrationMisalignmentLib.networks.regnet import RegNet, RegNetEncoder
from RegistrationMisalignmentLib import preprocess
from RegistrationMisalignmentLib.preprocess import block_geometry, extract_block, pyramid_level, smooth

from conftest import randomise_batch_norm

PAPER_PARAMETERS = 737_430


def test_regnet_with_dvf_head_has_the_papers_parameter_count():
    count = sum(p.numel() for p in RegNet().parameters())
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.02, count


@pytest.mark.parametrize("n", [101, 85, 93, 117])
def test_encoder_maps_n_to_n_minus_76_and_regnet_to_n_minus_80(n):
    regnet = RegNet().eval()
    x = torch.randn(1, 2, n, n, n)
    with torch.no_grad():
        assert regnet.encoder(x).shape == (1, RegNetEncoder.out_channels, n - 76, n - 76, n - 76)
        assert regnet(x).shape == (1, 3, n - 80, n - 80, n - 80)


def test_encoder_is_exactly_equivariant_to_shifts_of_four():
    """The property tiled inference rests on: no zero-padded border reaches the output."""
    torch.manual_seed(0)
    encoder = RegNetEncoder().eval()
    big = torch.randn(1, 2, 105, 105, 105)
    with torch.no_grad():
        whole = encoder(big)                       # 29^3, voxel i on input i + 38
        shifted = encoder(big[:, :, 4:, 4:, 4:])   # 25^3, voxel i on big input i + 42
    torch.testing.assert_close(shifted, whole[:, :, 4:, 4:, 4:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("decoder", DECODERS)
def test_decoders_give_step_logits_and_probabilities_that_sum_to_one(decoder):
    torch.manual_seed(0)
    model = MisalignmentNet(decoder, DEFAULT_CONFIG).eval()
    x1, x2, x4 = torch.randn(1, 2, 101, 101, 101), torch.randn(1, 2, 93, 93, 93), torch.randn(1, 2, 85, 85, 85)
    with torch.no_grad():
        logits = model(x1, x2, x4)
        probs = model.probabilities(x1, x2, x4)
    t = DEFAULT_CONFIG.train_output
    expected = [2, 3, 4] if decoder == "lstm" else [3]
    assert [l.shape[1] for l in logits] == expected
    assert all(l.shape[2:] == (t, t, t) for l in logits)
    assert probs.shape == (1, 3, t, t, t)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, t, t, t))


@pytest.mark.parametrize("split,edges,classes,merge", [
    ("6-3-1", [(6,), (3, 6), (1, 3, 6)], [2, 3, 4], [0, 0, 1, 2]),
    ("12-6-3", [(12,), (6, 12), (3, 6, 12)], [2, 3, 4], [0, 1, 2, 2]),
    ("6-3-3", [(6,), (3, 6), (3, 6)], [2, 3, 3], [0, 1, 2]),
])
def test_hierarchical_labels_per_split(split, edges, classes, merge):
    config = MisalignmentConfig(split=split)
    assert config.step_edges() == [tuple(float(e) for e in es) for es in edges]
    assert config.step_num_classes() == classes
    assert config.final_class_map().tolist() == merge
    mm = np.array([0.5, 2.0, 4.0, 7.0, 13.0])
    steps = config.step_labels(mm)
    # The merged last step must equal the direct 3-class answer for every magnitude.
    assert config.final_class_map()[steps[-1]].tolist() == config.classify_mm(mm).tolist() == [0, 0, 1, 2, 2]
    if split == "6-3-1":
        assert [s.tolist() for s in steps] == [[0, 0, 0, 1, 1], [0, 0, 1, 2, 2], [0, 1, 2, 3, 3]]
    assert set(SPLITS) == {"6-3-1", "12-6-3", "6-3-3"}


@pytest.mark.parametrize("scale,phase", [(2, 1), (4, 1), (4, 3), (2, 0)])
def test_align_to_fine_puts_a_bright_coarse_voxel_on_the_right_fine_voxel(scale, phase):
    coarse = torch.zeros(1, 1, 12, 12, 12)
    q = 4
    coarse[0, 0, q, q, q] = 1.0
    fine = align_to_fine(coarse, [20, 20, 20], phase, scale)[0, 0]
    j = scale * q - phase   # fine voxel j sits at coarse (phase + j) / scale
    assert fine[j, j, j] == pytest.approx(1.0)
    profile = fine[j, j, :].numpy()
    assert np.argmax(profile) == j
    # Symmetric fall-off on both sides: no half-voxel shift.
    for k in range(1, scale):
        assert profile[j - k] == pytest.approx(profile[j + k])
        assert profile[j - k] == pytest.approx(1 - k / scale)


def test_scale_blocks_and_alignment_reproduce_the_fine_grid():
    """A linear ramp survives smoothing, so level s of it, cut by ``block_geometry`` and aligned back,
    must equal the 1 mm ramp itself on the output block: scales agree to the voxel."""
    config = DEFAULT_CONFIG
    shape = (40, 200, 200)
    x = np.arange(shape[2], dtype=np.float32)
    ramp = torch.from_numpy(np.broadcast_to(0.01 * x, shape).copy())[None]
    p0, out = (12, 80, 96), (19, 19, 19)
    geometry = block_geometry(p0, out, config)
    ctx = config.encoder_context
    fine_start = [s + ctx for s in geometry[1][0]]
    fine_size = [n - 2 * ctx for n in geometry[1][1]]
    expected = extract_block(ramp, tuple(fine_start), tuple(fine_size), 0.0)[0]
    for s in (2, 4):
        start, size = geometry[s]
        level = pyramid_level(ramp, s, config)
        block = extract_block(level, start, size, 0.0)
        feature_like = block[:, ctx : size[0] - ctx, ctx : size[1] - ctx, ctx : size[2] - ctx]  # encoder output grid
        aligned = align_to_fine(feature_like[None], fine_size, (-config.decoder_margin) % s, s)[0, 0]
        centre = (slice(None), slice(None), slice(None))
        torch.testing.assert_close(aligned[10:-10, 10:-10, 10:-10], expected[centre][10:-10, 10:-10, 10:-10],
                                   atol=1e-4, rtol=0)


def test_pyramid_level_keeps_a_bright_voxel_in_place():
    volume = torch.zeros(1, 40, 40, 40)
    volume[0, 16, 20, 24] = 1.0
    for s in (2, 4):
        level = pyramid_level(volume, s, DEFAULT_CONFIG)[0]
        assert np.unravel_index(int(level.argmax()), level.shape) == (16 // s, 20 // s, 24 // s)


@pytest.mark.parametrize("sigma,stride", [(1.0, 2), (2.0, 4), ((1.0, 0.0, 2.0), 2)])
def test_strided_smoothing_equals_smoothing_then_subsampling(sigma, stride):
    volume = torch.randn(2, 37, 50, 43, generator=torch.Generator().manual_seed(0))
    expected = smooth(volume, sigma)[:, ::stride, ::stride, ::stride]
    torch.testing.assert_close(smooth(volume, sigma, stride=stride), expected, atol=1e-6, rtol=0)


def test_smoothing_in_chunks_equals_smoothing_at_once(monkeypatch):
    """Each pass is cut into slices along an axis it does not mix (bounded memory); the numbers must not change."""
    volume = torch.randn(2, 37, 50, 43, generator=torch.Generator().manual_seed(1))
    at_once = smooth(volume, (1.5, 0.0, 2.0), stride=2)
    monkeypatch.setattr(preprocess, "SMOOTH_CHUNK_VOXELS", 300)  # a few slices per chunk, uneven last chunk
    torch.testing.assert_close(smooth(volume, (1.5, 0.0, 2.0), stride=2), at_once, atol=1e-6, rtol=0)


def straightforward_logits(model: MisalignmentNet, x1, x2, x4) -> list[torch.Tensor]:
    """The method as written: align the encoders' full feature maps, reduce them, run the decoder from
    an explicit zero state. The reference that the optimised ``forward`` must reproduce."""
    fine = model.encoder1(x1)
    size = list(fine.shape[2:])
    features = [fine]
    if model.multiscale:
        features = [align_to_fine(model.encoder4(x4), size, model.phase4, 4),
                    align_to_fine(model.encoder2(x2), size, model.phase2, 2), fine]
    reduced = [reduce(f) for reduce, f in zip(model.decoder.reduce, features)]
    if model.decoder_name == "lstm":
        h = torch.zeros_like(reduced[0])
        c = torch.zeros_like(h)
        logits = []
        for r, classify in zip(reduced, model.decoder.classifiers):
            h, c = model.decoder.cell(r, h, c)
            logits.append(classify(h))
    else:
        logits = [model.decoder.head(torch.cat(reduced, 1))]
    m = model.margin
    return [logit[:, :, m:-m, m:-m, m:-m] for logit in logits]


@pytest.mark.parametrize("decoder", DECODERS)
def test_optimised_forward_equals_the_straightforward_one(decoder):
    """Reducing before aligning and skipping the zero state change the cost, not the numbers."""
    torch.manual_seed(0)
    model = randomise_batch_norm(MisalignmentNet(decoder, DEFAULT_CONFIG), seed=3)
    geometry = block_geometry((0, 0, 0), (16, 16, 16), DEFAULT_CONFIG)
    x = {s: torch.rand(1, 2, *geometry[s][1]) * 2 - 1 for s in DEFAULT_CONFIG.scales}
    with torch.no_grad():
        fast = model(x[1], x[2], x[4])
        reference = straightforward_logits(model, x[1], x[2], x[4])
    assert len(fast) == len(reference)
    for a, b in zip(fast, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.999
