"""The registration judge (``trainer.registration_judge``): held-out pairs as elastix leaves them, the truth
their dense residual, the same as the protocol's truth at its landmarks."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RegistrationMisalignmentLib.benchmark.cases import SyntheticTruth, chest_ct_cases
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.metrics import evaluate_classes
from RegistrationMisalignmentLib.synthetic.images import TrainingImage
from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom
from trainer.config import TrainConfig, setting_group
from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS as ALL_SETTINGS
from trainer.registration_judge import register_breathing, registration_pairs

pytest.importorskip("itk")
SETTINGS = ("affine", "bspline100")


@pytest.fixture(scope="module")
def image():
    return TrainingImage("phantom", sitk.GetArrayFromImage(make_chest_phantom((112.0, 96.0, 96.0), 1.0, seed=7_600_001)))


def test_the_residual_is_the_protocols_truth_at_every_lung_point(image):
    """r(x) = t(x) + u(x + t(x)) on the grid equals the protocol's ``SyntheticTruth`` residual, which maps the
    points with elastix's own transform: the order of composition and the axes are the protocol's."""
    case = register_breathing(image, SETTINGS, threads=1, tiny=True)
    truth = SyntheticTruth(case.field.dvf.numpy(), case.fixed)
    voxels = np.argwhere(case.lung)[np.random.default_rng(3).choice(int(case.lung.sum()), 40, replace=False)]
    points = voxels[:, ::-1].astype(np.float64)  # (x, y, z) mm: origin 0, 1 mm, identity direction
    for setting in SETTINGS:
        residual = case.residual(setting).numpy()
        on_grid = np.linalg.norm(residual[:, voxels[:, 0], voxels[:, 1], voxels[:, 2]], axis=0)
        expected = truth.residual_mm(points, case.registrations[setting].map_points)
        assert expected.mean() > 1.0  # the tiny registrations leave a residual worth checking
        assert np.abs(on_grid - expected).max() < 0.05


def test_one_registered_pair_per_setting_supervised_in_the_lungs(image):
    pairs = registration_pairs(image, SETTINGS, DEFAULT_CONFIG, threads=1, tiny=True)
    assert [p.name.split("/")[-1] for p in pairs] == list(SETTINGS)
    for pair in pairs:
        assert pair.registered and pair.dvf.shape[1:] == pair.body.shape == pair.pyramid[1].shape[1:]
        assert 0 < pair.body.mean() < 0.6  # the lungs of the box, not the whole body
        assert np.allclose(pair.magnitude, pair.dvf.square().sum(0).sqrt().numpy())
        assert not np.array_equal(pair.pyramid[1][0].numpy(), pair.pyramid[1][1].numpy())


def test_kept_exact_transforms_give_the_judge_again_without_registering(image, tmp_path, monkeypatch):
    """A new machine's judge: its registrations applied from the transforms the first kept (float64), the very
    same pairs (its blocks' fingerprint keeps the run's selection comparable), and no elastix registration."""
    from RegistrationMisalignmentLib.benchmark.elastix import ElastixRunner

    first = registration_pairs(image, SETTINGS, DEFAULT_CONFIG, threads=1, tiny=True, transforms=tmp_path)
    assert len(list(tmp_path.glob("phantom_*.npz"))) == len(SETTINGS)
    monkeypatch.setattr(ElastixRunner, "run_settings", lambda *a, **k: pytest.fail("registered again"))
    again = registration_pairs(image, SETTINGS, DEFAULT_CONFIG, threads=1, tiny=True, transforms=tmp_path)
    for old, new in zip(first, again):
        assert old.name == new.name and torch.equal(old.dvf, new.dvf) and np.array_equal(old.body, new.body)
        assert all(torch.equal(old.pyramid[k], new.pyramid[k]) for k in old.pyramid)
    with pytest.raises(pytest.fail.Exception, match="registered again"):  # another field: not the kept transforms
        registration_pairs(image, SETTINGS, DEFAULT_CONFIG, seed=12, threads=1, tiny=True, transforms=tmp_path)


def test_the_judge_takes_only_the_protocols_settings_and_seeds():
    with pytest.raises(ValueError, match="val_registrations"):
        TrainConfig(val_registrations=("bspline42",))
    with pytest.raises(InputError, match="at most 1000"):
        chest_ct_cases(1001, 10, tiny=True)


def test_a_run_judged_on_registrations_builds_its_judge_when_stage_2_first_asks(image, tmp_path, monkeypatch):
    import trainer.train
    from trainer.train import Trainer

    data = tmp_path / "data"
    data.mkdir()
    scan = sitk.GetImageFromArray(image.hu)
    sitk.WriteImage(scan, str(data / "held_out_chest.nii.gz"))
    common = dict(data=str(data), holdout=("held_out_chest.nii.gz",), out=str(tmp_path / "run"))
    judged = Trainer(TrainConfig.smoke(**common, val_registrations=("affine",)))
    assert judged._judge is None  # stage 1 and an export never pay for the registrations
    assert judged.judge.blocks.endswith(", elastix affine") and judged.val_batch is judged.judge.batch
    assert judged.val_judge != Trainer(TrainConfig.smoke(**common)).val_judge  # a new count for the selection

    def register_again(*args, **kwargs):
        raise AssertionError("a restart registers the held-out scan again")

    monkeypatch.setattr(trainer.train, "registration_pairs", register_again)
    restarted = Trainer(TrainConfig.smoke(**common, val_registrations=("affine",)))
    assert restarted.val_judge == judged.val_judge  # the very same blocks, read back
    assert torch.equal(restarted.val_batch.inputs[1], judged.val_batch.inputs[1])


def test_the_judge_is_built_in_float32_inside_the_validations_autocast(image, tmp_path):
    """Validation first asks for the judge inside bf16 autocast: the judge was then built in bf16 on CPUs that
    compute it natively and in float32 elsewhere, and its truth (and fingerprint) differed by machine. With the
    held-out transforms kept, the judge asked for inside autocast is the one asked for outside it."""
    from trainer.train import Trainer

    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image.hu), str(data / "held_out_chest.nii.gz"))
    judges = []
    for run, autocast in (("plain", False), ("autocast", True)):
        cfg = TrainConfig.smoke(data=str(data), holdout=("held_out_chest.nii.gz",), out=str(tmp_path / run),
                                val_registrations=("bspline20",))
        if judges:  # the second run applies the first's kept transforms: the same registration
            (tmp_path / run).mkdir()
            (tmp_path / "plain" / "judge_transforms").rename(tmp_path / run / "judge_transforms")
        trainer = Trainer(cfg)  # outside autocast: its synthetic pool smooths fields, minutes in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            judges.append(trainer.judge)
    assert judges[0].fingerprint == judges[1].fingerprint
    assert torch.equal(judges[0].batch.inputs[1], judges[1].batch.inputs[1])


def test_the_judge_scores_affine_and_bspline_blocks_apart(image, tmp_path):
    """Every held-out block keeps the setting that registered its pair, and validation scores each setting group's
    blocks apart beside all of them (a model can gain after affine and lose after B-spline): a group's numbers are
    those of its blocks' body voxels alone. A judge kept before its blocks were tagged is made again: the same
    blocks, now tagged."""
    from trainer.train import Trainer

    data = tmp_path / "data"
    data.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(image.hu), str(data / "held_out_chest.nii.gz"))
    cfg = TrainConfig.smoke(data=str(data), holdout=("held_out_chest.nii.gz",), out=str(tmp_path / "run"),
                            val_registrations=SETTINGS, val_patches=6)
    trainer = Trainer(cfg)
    batch = trainer.val_batch
    tags = batch.registrations
    assert len(tags) == len(batch.final_labels) and set(tags) == set(SETTINGS)

    outputs = []

    def probabilities(x1, x2, x4):
        shape = (1, 3, *batch.final_labels.shape[1:])
        outputs.append(torch.rand(shape, generator=torch.Generator().manual_seed(len(outputs))))
        return outputs[-1]

    reports = trainer._class_reports(probabilities)
    assert set(reports) == {"", "affine", "bspline"}
    assert reports["affine"].n + reports["bspline"].n == reports[""].n
    for group, setting in (("affine", "affine"), ("bspline", "bspline100")):
        blocks = [i for i, r in enumerate(tags) if r == setting]
        inside = [batch.weights[i].numpy() > 0 for i in blocks]
        truth = np.concatenate([batch.final_labels[i].numpy()[m] for i, m in zip(blocks, inside)])
        guess = np.concatenate([outputs[i][0].argmax(0).numpy()[m] for i, m in zip(blocks, inside)])
        assert np.array_equal(reports[group].confusion, evaluate_classes(truth, guess).confusion)
    row = trainer._report_row(reports, "val")
    assert row["val_kappa"] == reports[""].kappa and row["val_bspline_cw"] == reports["bspline"].cw

    cached = trainer._judge_cache()
    untagged = trainer.judge
    untagged.batch.registrations = ()
    torch.save(untagged, cached)
    again = Trainer(cfg).judge
    assert again.fingerprint == trainer.val_judge and again.batch.registrations == tags
    assert torch.load(cached, weights_only=False).batch.registrations == tags


def test_every_protocol_setting_falls_in_one_group():
    assert {s: setting_group(s) for s in ALL_SETTINGS} == {"affine": "affine", "bspline20": "bspline", "bspline100": "bspline",
                                                           "bspline500": "bspline", "bspline2000": "bspline"}
    assert setting_group("") == ""  # a synthetic pair's block: in no group
