"""Trainer: balanced sampling, patches cut by the Lib's code, smoke run, bit-for-bit resume, export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.preprocess import scale_blocks
from RegistrationMisalignmentLib.weights import load_model
from trainer.config import TrainConfig
from trainer.data import phantom_images
from trainer.dataset import IGNORE, PatchSampler, build_pool
from trainer.deformations import DVFSettings
from trainer.train import main


@pytest.fixture(scope="module")
def pool():
    images = phantom_images(1, (96.0, 96.0, 80.0), 3, DEFAULT_CONFIG)
    return build_pool(images, 4, 11, DEFAULT_CONFIG, DVFSettings(), kinds=("single", "mixed", "respiratory"))


def test_centre_classes_follow_the_60_20_20_balance(pool):
    sampler = PatchSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0))
    draws = np.array([sampler.draw_start()[2] for _ in range(4000)])
    shares = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.025)


def test_patch_labels_and_inputs_come_from_the_shared_block_code(pool):
    sampler = PatchSampler(pool, DEFAULT_CONFIG, np.random.default_rng(1))
    for _ in range(20):
        pair, start, cls = sampler.draw_start()
        labels = sampler.labels(pair, start)
        t = DEFAULT_CONFIG.train_output
        assert labels[-1][t // 2, t // 2, t // 2] == cls   # the centre voxel has the drawn class
        mm = pair.magnitude[start[0] : start[0] + t, start[1] : start[1] + t, start[2] : start[2] + t]
        inside = labels[-1][: mm.shape[0], : mm.shape[1], : mm.shape[2]]
        assert np.array_equal(inside, DEFAULT_CONFIG.classify_mm(mm))
        assert (labels[-1][mm.shape[0] :] == IGNORE).all() and (labels[-1][:, mm.shape[1] :] == IGNORE).all()
        assert [l.max() < n for l, n in zip(labels[:-1], DEFAULT_CONFIG.step_num_classes())] == [True] * 3
    sampler.rng = np.random.default_rng(5)
    batch = sampler.batch(2)
    sampler.rng = np.random.default_rng(5)
    pair, start, _ = sampler.draw_start()
    blocks = scale_blocks(pair.pyramid, start, (DEFAULT_CONFIG.train_output,) * 3, DEFAULT_CONFIG)
    for s in DEFAULT_CONFIG.scales:
        assert torch.equal(batch.inputs[s][0], blocks[s])


def test_regnet_targets_are_the_dvf_on_the_level_grid(pool):
    sampler = PatchSampler(pool, DEFAULT_CONFIG, np.random.default_rng(2))
    x, y, inside = sampler.regnet_batch(2, 2)
    assert x.shape == (2, 2, 101, 101, 101) and y.shape == (2, 3, 21, 21, 21) and inside.shape == (2, 1, 21, 21, 21)
    assert float(y.abs().sum(1)[inside[:, 0] == 0].sum()) == 0.0  # no target where the DVF is unknown
    assert float(y.abs().max()) <= DVFSettings().max_displacement_mm + 1e-3


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Three smoke runs with the rate lowered at epoch 2: 2 epochs straight; 1 epoch, then resumed to 2
    (bit-for-bit check, the schedule included)."""
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    schedule = ["--set", "lr_schedule=[[2, 1e-4]]"]
    assert main(["--smoke", "--out", str(straight), *schedule]) == 0
    assert main(["--smoke", "--out", str(resumed), "--epochs", "1", *schedule]) == 0
    assert main(["--smoke", "--out", str(resumed), "--epochs", "2", "--resume", *schedule]) == 0
    return straight, resumed


def test_smoke_run_writes_models_curves_and_history(smoke_runs):
    straight, _ = smoke_runs
    for name in ("smoke_lstm_631.pt", "smoke_lstm_631.json", "regmis_regnet_t.pt", "curves.png", "history.jsonl"):
        assert (straight / name).exists(), name
    rows = [json.loads(l) for l in (straight / "history.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["regnet4", "regnet2", "regnet1", "misalignment", "misalignment"]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 1e-3, 1e-3, 1e-4]


def test_lr_schedule_picks_the_last_entry_reached_and_rejects_bad_entries():
    cfg = TrainConfig(lr=1e-3, lr_schedule=((37, 1e-4), (9, 3e-4)))
    assert [cfg.lr_at(e) for e in (1, 8, 9, 36, 37, 42)] == [1e-3, 1e-3, 3e-4, 3e-4, 1e-4, 1e-4]
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule=((0, 1e-4),))


def test_resume_continues_bit_for_bit(smoke_runs):
    straight, resumed = smoke_runs
    a = torch.load(straight / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for stage, state in a["models"].items():
        for key, value in state.items():
            assert torch.equal(value, b["models"][stage][key]), f"{stage}.{key}"


def test_exported_model_equals_the_eager_model(smoke_runs):
    from RegistrationMisalignmentLib.networks.model import MisalignmentNet

    straight, _ = smoke_runs
    loaded = load_model(straight / "smoke_lstm_631.pt")
    assert loaded.card["training"]["images"] and "validation_patches" in loaded.card["metrics"]
    eager = MisalignmentNet("lstm", loaded.config)
    eager.load_state_dict(torch.load(straight / "checkpoint.pt", weights_only=False)["models"]["misalignment"])
    eager.eval()
    torch.manual_seed(0)
    x1, x2, x4 = torch.randn(1, 2, 101, 101, 101), torch.randn(1, 2, 93, 93, 93), torch.randn(1, 2, 85, 85, 85)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module.probabilities(x1, x2, x4), eager.probabilities(x1, x2, x4))
    assert load_model(straight / "regmis_regnet_t.pt").decoder == "regnet-t"


def test_second_decoder_reuses_the_pretrained_regnets(smoke_runs, tmp_path):
    straight, _ = smoke_runs
    out = tmp_path / "multiscale"
    assert main(["--smoke", "--out", str(out), "--decoder", "multiscale", "--name", "smoke_ms", "--epochs", "1",
                 "--pretrained", str(straight / "checkpoint.pt")]) == 0
    stages = [l.split('"stage": "')[1].split('"')[0] for l in (out / "history.jsonl").read_text().splitlines()]
    assert stages == ["misalignment"]
    first = torch.load(straight / "checkpoint.pt", weights_only=False)["models"]["regnet1"]
    again = torch.load(out / "checkpoint.pt", weights_only=False)["models"]["regnet1"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert load_model(out / "smoke_ms.pt").decoder == "multiscale"


def test_time_limit_stops_stage_2_after_an_epoch_and_still_exports(smoke_runs, tmp_path):
    straight, _ = smoke_runs
    out = tmp_path / "limited"
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--pretrained", str(straight / "checkpoint.pt"),
                 "--set", "time_limit_minutes=1e-6"]) == 0
    rows = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("misalignment", 1)]
    card = load_model(out / "smoke_lstm_631.pt").card
    assert card["training"]["epochs_done"] == {"misalignment": 1}
    assert card["training"]["trainer_config"]["epochs"] == 3
    with pytest.raises(ValueError, match="time_limit_minutes"):
        TrainConfig(time_limit_minutes=-1)
