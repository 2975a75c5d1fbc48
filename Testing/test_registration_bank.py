"""The registration bank (``trainer.registration_bank``): training pairs as elastix leaves them, of the training chest
CTs only, registered once and read back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import trainer.registration_bank
from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.synthetic.images import TrainingImage
from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom
from trainer.config import TrainConfig
from trainer.registration_bank import Augmentation, RegistrationBank, chest_lungs, shown
from trainer.registration_judge import register_breathing

pytest.importorskip("itk")


@pytest.fixture(scope="module")
def chest():
    return TrainingImage("chest", sitk.GetArrayFromImage(make_chest_phantom((112.0, 96.0, 96.0), 1.0, seed=7_600_001)))


def solid(shape=(40, 48, 48)) -> TrainingImage:
    """A body of soft tissue with a small air pocket: no chest."""
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[4:-4, 6:-6, 6:-6] = 40.0
    hu[18:22, 20:24, 20:24] = -900.0
    return TrainingImage("abdomen", hu)


def test_only_scans_whose_lungs_fill_a_tenth_of_the_body_are_chest_cts(chest):
    assert chest_lungs(chest) is not None
    assert chest_lungs(solid()) is None
    assert chest_lungs(TrainingImage("water", np.full((20, 20, 20), 0.0, dtype=np.float32))) is None  # no air in the body
    with pytest.raises(InputError, match="chest CT"):
        RegistrationBank([solid()], ("affine",), 1, None, DEFAULT_CONFIG)


def test_shown_is_where_the_mapped_voxel_falls_inside_the_bounds():
    displacement = np.zeros((3, 4, 5, 6), dtype=np.float32)
    displacement[0] = 1.5   # x + 1.5 mm: the last two columns map beyond the image
    displacement[2, 0] = -0.5  # the first slice maps below it
    inside = shown(displacement, ((0, 0, 0), (3, 4, 5)))
    assert inside[1:, :, :4].all() and not inside[:, :, 4:].any() and not inside[0].any()
    wider = shown(displacement, ((-1, 0, 0), (3, 4, 6)))  # a scan reaching one voxel below and beside the box
    assert wider[:, :, :5].all() and not wider[:, :, 5].any()


def test_a_bank_pair_is_the_judges_residual_supervised_where_the_registered_image_shows(chest, tmp_path):
    bank = RegistrationBank([chest, solid()], ("affine",), 2, tmp_path, DEFAULT_CONFIG, threads=1)
    assert [case.image.name for case in bank.cases] == ["chest", "chest"]  # no abdomen
    assert [case.phase for case in bank.cases] == [1, -1] and bank.cases[0].seed != bank.cases[1].seed
    pair = bank.draw(1, np.random.default_rng(0))[0]
    case = next(c for c in bank.cases if str(c.seed) in pair.name)
    made = register_breathing(chest, ("affine",), case.seed, threads=1, phase=case.phase)  # elastix is deterministic
    displacement = made.registrations["affine"].displacement(made.moving)
    assert pair.registered and pair.registration == "affine"
    assert torch.allclose(pair.dvf, made.residual("affine", displacement), atol=0.02)  # float16 on disk
    in_box = shown(displacement, ((0, 0, 0), tuple(n - 1 for n in made.body.shape)))
    in_scan = shown(made.residual("affine", displacement).numpy(), made.scan_box)
    assert in_box.mean() < 1 and in_scan.mean() < 1  # the phantom's box is the whole scan: both bite at its faces
    assert np.array_equal(pair.body, made.body & in_box & in_scan) and pair.body.mean() > 0.3
    assert np.allclose(pair.magnitude, pair.dvf.square().sum(0).sqrt().numpy())
    assert pair.magnitude[pair.body].max() > 3.0  # the affine leaves misalignment to learn
    assert not torch.equal(pair.pyramid[1][0], pair.pyramid[1][1])
    mirrored = bank.pair(case, "affine", augmentation=Augmentation(mirrored=True))  # left-right: x reversed, the residual's x negated
    assert mirrored.name == pair.name + "/mirrored" and np.array_equal(mirrored.body, pair.body[..., ::-1])
    assert torch.equal(mirrored.dvf, pair.dvf.flip(-1) * torch.tensor([-1.0, 1, 1]).view(3, 1, 1, 1))
    assert torch.allclose(mirrored.pyramid[1], pair.pyramid[1].flip(-1))
    assert np.allclose(mirrored.magnitude, pair.magnitude[..., ::-1])
    lungs = RegistrationBank([chest, solid()], ("affine",), 2, tmp_path, DEFAULT_CONFIG, threads=1, region="lungs")
    in_lungs = lungs.draw(1, np.random.default_rng(0))[0]  # the same files, read back
    assert in_lungs.name == pair.name and np.array_equal(lungs.lungs["chest"], made.lung)
    assert np.array_equal(in_lungs.body, pair.body & made.lung) and 0 < in_lungs.body.sum() < pair.body.sum()
    assert torch.equal(in_lungs.dvf, pair.dvf)
    with pytest.raises(ValueError, match="bank region 'lung'"):
        RegistrationBank([chest], ("affine",), 1, tmp_path, DEFAULT_CONFIG, region="lung")


def test_the_scans_bounds_are_counted_from_the_box(chest):
    """20 slices of air below the scan move its lungs' box up by 20: the scan then begins 20 voxels further below
    the box, and ends where it did above it."""
    padded = TrainingImage("padded", np.concatenate([np.full((20, *chest.hu.shape[1:]), -1000.0, np.float32), chest.hu]))
    plain, lifted = (register_breathing(image, ("affine",), threads=1).scan_box for image in (chest, padded))
    assert lifted[0] == (plain[0][0] - 20, *plain[0][1:]) and lifted[1] == plain[1]


def test_the_bank_registers_each_case_once_and_a_larger_bank_only_the_new_ones(chest, tmp_path, monkeypatch):
    RegistrationBank([chest], ("affine",), 1, tmp_path, DEFAULT_CONFIG, threads=1).build()
    registered = []
    real = trainer.registration_bank.register_breathing
    monkeypatch.setattr(trainer.registration_bank, "register_breathing",
                        lambda *a, **k: registered.append(a[2]) or real(*a, **k))
    again = RegistrationBank([chest], ("affine",), 1, tmp_path, DEFAULT_CONFIG, threads=1)
    first = again.draw(1, np.random.default_rng(0))[0]
    assert registered == []  # read back
    larger = RegistrationBank([chest], ("affine",), 2, tmp_path, DEFAULT_CONFIG, threads=1)
    larger.build()
    assert registered == [larger.cases[1].seed]
    with pytest.raises(InputError, match="bank_pairs 3"):
        larger.draw(3, np.random.default_rng(0))
    assert first.name == RegistrationBank([chest], ("affine",), 1, tmp_path, DEFAULT_CONFIG).draw(
        1, np.random.default_rng(0))[0].name


def test_the_config_asks_for_a_whole_bank():
    with pytest.raises(ValueError, match="bank_pairs 2 needs"):
        TrainConfig(bank_pairs=2)
    with pytest.raises(ValueError, match="bank_registrations"):
        TrainConfig(bank_pairs=1, bank_cases=1, bank_registrations=("bspline7",))
    with pytest.raises(ValueError, match="bank_region 'lung'"):
        TrainConfig(bank_region="lung")
    TrainConfig(bank_pairs=1, bank_cases=1, bank_registrations=("affine",), bank_region="lungs")
    with pytest.raises(ValueError, match="no training pair"):
        TrainConfig(pool_pairs=0)
    TrainConfig(pool_pairs=0, bank_pairs=1, bank_cases=1, bank_registrations=("affine",))


def test_a_run_draws_bank_pairs_of_its_real_scans_beside_the_synthetic_ones(chest, tmp_path):
    from trainer.train import Trainer

    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(chest.hu), str(data / "chest.nii.gz"))
    cfg = TrainConfig.smoke(data=str(data), holdout_fraction=0.2, out=str(tmp_path / "run"), bank_pairs=1,
                            bank_cases=1, bank_registrations=("affine",), bank_region="lungs")
    run = Trainer(cfg)
    scan = run.train_scans[0].name
    assert len(run.train_scans) == 1 and scan.startswith("chest.nii.gz[z")  # phantoms are not in the bank
    pool = run._pool_sampler(3, 0).pairs
    assert len(pool) == cfg.pool_pairs + 1
    assert [pair.registration for pair in pool] == ["", "", "affine"]
    assert pool[-1].name.startswith(f"{scan}/breathing")
    assert pool[-1].body.any() and not (pool[-1].body & ~run.bank.lungs[scan]).any()  # bank_region reaches the bank


def test_bank_weights_draw_a_setting_as_often_as_its_weight_says(chest, tmp_path, monkeypatch):
    bank = RegistrationBank([chest], ("affine", "bspline500"), 2, tmp_path, DEFAULT_CONFIG)
    monkeypatch.setattr(bank, "build", lambda: None)  # no registration: only which entries are drawn
    monkeypatch.setattr(bank, "pair", lambda case, setting, device, augmentation: (case.seed, setting, augmentation.mirrored))
    rng = np.random.default_rng(0)
    weighted = [s for _ in range(1000) for _, s, _ in bank.draw(1, rng, weights=(9, 1))]
    assert 0.86 < weighted.count("affine") / len(weighted) < 0.94
    both = [bank.draw(2, rng, weights=(9, 1)) for _ in range(200)]
    assert all(len(set(d)) == 2 for d in both)  # still different pairs within one draw
    mirrored = [m for _ in range(500) for m in bank.draw(1, rng, mirror_share=0.5)]
    assert 0.4 < np.mean([m[-1] for m in mirrored]) < 0.6
    uniform = [s for _ in range(1000) for _, s, _ in bank.draw(1, rng)]
    assert 0.44 < uniform.count("affine") / len(uniform) < 0.56
    with pytest.raises(ValueError, match="one positive weight per setting"):
        bank.draw(1, rng, weights=(1,))


def test_the_config_asks_for_one_positive_bank_weight_per_setting():
    bank = dict(bank_pairs=1, bank_cases=1, bank_registrations=("affine", "bspline500"))
    assert TrainConfig(**bank, bank_weights=(3, 1)).bank_weights == (3, 1)
    for weights in ((3,), (3, 0)):
        with pytest.raises(ValueError, match="bank_weights .* one positive weight per bank_registrations"):
            TrainConfig(**bank, bank_weights=weights)


def test_a_mirrored_pair_still_holds_its_registration(chest, tmp_path):
    """D(x) = F(x + r(x)) (the registered image reads the fixed one at x plus the residual): a pair shifted by
    +2 mm along x, mirrored left-right, reads it at x - 2 mm, and its residual must say -2."""
    bank = RegistrationBank([chest], ("affine",), 1, tmp_path, DEFAULT_CONFIG)
    case = bank.cases[0]
    fixed = np.random.default_rng(0).integers(-900, 300, (24, 20, 28)).astype(np.int16)
    deformed = np.concatenate([fixed[..., 2:], fixed[..., -2:]], axis=-1)  # D[..., i] = F[..., i + 2]
    residual = torch.zeros((3, *fixed.shape), dtype=torch.float16)
    residual[0] = 2.0
    torch.save({"fixed": torch.from_numpy(fixed), "deformed": torch.from_numpy(deformed), "residual": residual,
                "supervised": torch.ones(fixed.shape, dtype=torch.bool), "seed": case.seed, "phase": case.phase},
               case.path(tmp_path, "affine"))
    plain, mirrored = bank.pair(case, "affine"), bank.pair(case, "affine", augmentation=Augmentation(mirrored=True))
    for pair, step in ((plain, 2), (mirrored, -2)):
        assert torch.all(pair.dvf[0] == step) and not pair.dvf[1:].any()
        images = pair.pyramid[1]  # (fixed, registered), normalised
        inner = slice(2, -2)
        assert torch.equal(images[1][..., inner], images[0][..., 2 + step : fixed.shape[-1] - 2 + step])


def test_a_zoomed_pair_still_holds_its_registration():
    """D(x) = F(x + r(x)) must hold after a zoom by s with the residual scaled: on a linear ramp (which trilinear
    resampling keeps exactly) a 2 mm shift along x and -3 mm along z become s times that, the registered image
    still reads the fixed one there, and supervision shrinks only at its edge."""
    shape = (21, 16, 25)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    ramp = lambda dz, dx: torch.from_numpy(-500.0 + 10.0 * (x + dx) + 7.0 * (z + dz) + 3.0 * y)
    fixed, deformed = ramp(0, 0), ramp(-3, 2)  # D(x) = F(x + (2, 0, -3))
    residual = torch.zeros((3, *shape))
    residual[0], residual[2] = 2.0, -3.0
    supervised = torch.ones(shape, dtype=torch.bool)
    supervised[:, :, :4] = False
    for zoom in (0.8, 1.2):
        f, d, r, s = Augmentation(zoom=zoom).apply(fixed, deformed, residual, supervised)
        size = [round(n * zoom) for n in shape]
        assert list(f.shape) == size and list(r.shape) == [3, *size] and s.dtype == torch.bool
        scale = [(m - 1) / (n - 1) for m, n in zip(size, shape)]  # (z, y, x)
        assert torch.allclose(r[0], torch.tensor(2.0 * scale[2])) and torch.allclose(r[2], torch.tensor(-3.0 * scale[0]))
        assert not r[1].any()
        # F' is a ramp of 10 / scale_x HU per voxel along x and 7 / scale_z along z: D' - F' = F'(y + r') - F'(y)
        expected = 10.0 / scale[2] * r[0] + 7.0 / scale[0] * r[2]
        assert torch.allclose(d - f, expected, atol=1e-3)
        columns = s.all(dim=(0, 1))
        first = int(columns.float().argmax())
        assert columns[first:].all() and first == math.ceil(4 * scale[2] - 1e-6)  # the 4 columns, scaled


def test_noise_is_independent_per_image_and_reproducible():
    shape = (30, 30, 30)
    flat = torch.zeros(shape)
    residual, supervised = torch.zeros((3, *shape)), torch.ones(shape, dtype=torch.bool)
    augmentation = Augmentation(noise_hu=12.0, seed=5)
    f, d, r, s = augmentation.apply(flat, flat, residual, supervised)
    assert 11.5 < float(f.std()) < 12.5 and 11.5 < float(d.std()) < 12.5
    assert abs(float(torch.corrcoef(torch.stack([f.ravel(), d.ravel()]))[0, 1])) < 0.02
    assert torch.equal(augmentation.apply(flat, flat, residual, supervised)[0], f)
    assert torch.equal(r, residual) and torch.equal(s, supervised)
    assert Augmentation(True, 1.07, 12.5, 3).suffix == "/mirrored/zoom1.07/noise12.5_3" and Augmentation().suffix == ""


def test_bank_draws_zoom_and_noise_within_their_ranges_and_as_before_without_them(chest, tmp_path, monkeypatch):
    bank = RegistrationBank([chest], ("affine", "bspline500"), 2, tmp_path, DEFAULT_CONFIG)
    monkeypatch.setattr(bank, "build", lambda: None)
    monkeypatch.setattr(bank, "pair", lambda case, setting, device, augmentation: augmentation)
    varied = [a for _ in range(300) for a in bank.draw(1, np.random.default_rng(_), zoom=0.1, noise_hu=20.0)]
    zooms, sigmas = np.array([a.zoom for a in varied]), np.array([a.noise_hu for a in varied])
    assert 0.9 <= zooms.min() < 0.93 and 1.07 < zooms.max() <= 1.1 and 0 <= sigmas.min() < 2 and 18 < sigmas.max() <= 20
    assert len({a.seed for a in varied}) > 290
    drawn, by_hand = np.random.default_rng(1), np.random.default_rng(1)
    plain = bank.draw(2, drawn, mirror_share=0.5)  # without zoom and noise: what draw took before them
    by_hand.choice(len(bank.entries), size=2, replace=False)
    assert [a.mirrored for a in plain] == list(by_hand.random(2) < 0.5) and all(a == Augmentation(a.mirrored) for a in plain)
    assert drawn.random() == by_hand.random()  # nothing more drawn: a run without them resumes as it drew before
    for bad in (dict(bank_zoom=0.5), dict(bank_zoom=-0.1), dict(bank_noise_hu=-1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_kept_transforms_give_a_new_machine_the_same_pairs_without_registering(chest, tmp_path, monkeypatch):
    """The bank keeps each registration's elastix transform; a bank on a new machine (empty folder) applies them by
    transformix: the same registered image (float32 parameters: within 0.01 HU before int16 rounding), residual
    and supervised voxels, and no elastix registration."""
    kept = tmp_path / "transforms"
    first = RegistrationBank([chest], ("affine", "bspline20"), 1, tmp_path / "a", DEFAULT_CONFIG, threads=1,
                             transforms=kept)
    first.build()
    case = first.cases[0]
    assert sorted(p.name for p in kept.iterdir()) == [f"{case.key}_affine.npz", f"{case.key}_bspline20.npz"]
    monkeypatch.setattr(ElastixRunner, "run_settings",
                        lambda *a, **k: pytest.fail("registered although its transforms are kept"))
    again = RegistrationBank([chest], ("affine", "bspline20"), 1, tmp_path / "b", DEFAULT_CONFIG, threads=1,
                             transforms=kept)
    again.build()
    for setting in ("affine", "bspline20"):
        old, new = (torch.load(case.path(bank.folder, setting), weights_only=True) for bank in (first, again))
        assert torch.equal(old["fixed"], new["fixed"]) and torch.equal(old["supervised"], new["supervised"])
        assert (old["deformed"] - new["deformed"]).abs().max() <= 1  # rounding to int16 HU
        assert torch.allclose(old["residual"].float(), new["residual"].float(), atol=0.01)  # float16 on disk
    (kept / f"{case.key}_bspline20.npz").unlink()  # one transform missing: the case is registered again
    monkeypatch.undo()
    RegistrationBank([chest], ("affine", "bspline20"), 1, tmp_path / "c", DEFAULT_CONFIG, threads=1,
                     transforms=kept).build()
    assert (kept / f"{case.key}_bspline20.npz").exists()


def test_an_applied_registration_has_no_transform_to_map_points_with(chest, tmp_path):
    from RegistrationMisalignmentLib.benchmark.elastix import load_parameters, save_parameters

    made = register_breathing(chest, ("affine",), threads=1)
    save_parameters(made.registrations["affine"].parameters, tmp_path / "affine.npz")
    applied = ElastixRunner(threads=1).apply(made.fixed, made.moving, load_parameters(tmp_path / "affine.npz"))
    assert np.abs(sitk.GetArrayFromImage(applied.deformed)
                  - sitk.GetArrayFromImage(made.registrations["affine"].deformed)).max() < 0.01
    with pytest.raises(ValueError, match="kept transform parameters"):
        applied.map_points(np.zeros((1, 3)))
