"""Trainer: dense blocks cut by the Lib's code, class-balanced weights, smoke run, bit-for-bit resume, export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.preprocess import scale_blocks
from RegistrationMisalignmentLib.weights import load_model, models_dir
from conftest import SHARED_DATA
from trainer.config import TrainConfig
from RegistrationMisalignmentLib.synthetic.images import phantom_images
from trainer import checkpoint
from trainer.dvf_heads import DVFHeads, encoder_features
from trainer.dataset import CLASS_BALANCE, BlockSampler, DeformedPair, build_pool, class_weights
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings
from RegistrationMisalignmentLib.networks.regnet import RegNet
from RegistrationMisalignmentLib.networks.model import MisalignmentNet
from RegistrationMisalignmentLib.errors import InputError
from trainer.history import read_events, read_history, record_event, rewind_label
from trainer.train import Trainer, main


@pytest.fixture(scope="module")
def pool():
    images = phantom_images(1, (96.0, 96.0, 80.0), 3, DEFAULT_CONFIG)
    return build_pool(images, 4, 11, DEFAULT_CONFIG, DVFSettings(), kinds=("single", "mixed", "respiratory"))


def test_registered_share_makes_that_share_of_pairs_as_a_registration_leaves_them(pool):
    images = phantom_images(1, (96.0, 96.0, 80.0), 3, DEFAULT_CONFIG)
    kinds = ("single", "mixed", "respiratory")
    registered = build_pool(images, 4, 11, DEFAULT_CONFIG, DVFSettings(), kinds=kinds, registered_share=1.0)
    assert all("/registered/" in p.name and p.registered for p in registered)
    assert not any("/registered/" in p.name for p in pool)  # the default share is 0: the paper's pairs
    for plain, moved in zip(pool, registered):  # the same images, kinds, seeds and truths; other moving images
        assert moved.name == plain.name.replace(plain.name.split("/")[1], plain.name.split("/")[1] + "/registered")
        assert torch.equal(moved.dvf, plain.dvf)
        assert not torch.equal(moved.pyramid[1], plain.pyramid[1])
        assert not (moved.body & ~plain.body).any()  # supervised only where the registered image shows the scan
    assert sum(int(p.body.sum()) for p in registered) < sum(int(p.body.sum()) for p in pool)
    with pytest.raises(ValueError, match="registered_share"):
        TrainConfig(registered_share=1.5)
    with pytest.raises(ValueError, match="val_registered_share"):
        TrainConfig(val_registered_share=-0.1)
    with pytest.raises(ValueError, match="registered_motion_left"):
        TrainConfig(registered_motion_left=2.0)


def test_registered_pairs_may_keep_part_of_their_breathing_motion_in_the_truth():
    images = phantom_images(1, (96.0, 96.0, 80.0), 3, DEFAULT_CONFIG)
    kinds = ("single", "mixed", "respiratory")
    perfect = build_pool(images, 3, 11, DEFAULT_CONFIG, DVFSettings(), kinds=kinds, registered_share=1.0)
    partial = build_pool(images, 3, 11, DEFAULT_CONFIG, DVFSettings(), kinds=kinds, registered_share=1.0,
                         motion_left=1.0)
    assert [p.name for p in partial] == [p.name for p in perfect]
    left = [(a.dvf - b.dvf) for a, b in zip(partial, perfect)]  # the same DVF and motion drawn: only the share left
    assert max(float(d.abs().max()) for d in left) > 1.0  # the motion left is part of the truth


def test_a_judge_of_registered_pairs_has_its_own_fingerprint(tmp_path):
    plain = Trainer(TrainConfig.smoke(out=str(tmp_path / "plain")))
    registered = Trainer(TrainConfig.smoke(out=str(tmp_path / "registered"), val_registered_share=1.0))
    assert (plain.val_registered, registered.val_registered) == (0, TrainConfig.smoke().val_pairs)
    assert not torch.equal(plain.val_batch.inputs[1], registered.val_batch.inputs[1])  # other moving images
    assert plain.val_judge != registered.val_judge  # so the selection starts a new count
    row = registered.validate("misalignment", MisalignmentNet("lstm", DEFAULT_CONFIG).eval())
    assert row["val_blocks"].endswith("1 of 1 pairs registered") and row["val_judge"] == registered.val_judge


def test_class_weights_give_the_60_20_20_balance_over_the_body(pool):
    sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0))
    mass = np.zeros(3)
    for pair in pool:
        classes = DEFAULT_CONFIG.classify_mm(pair.magnitude[::2, ::2, ::2][pair.body[::2, ::2, ::2]])
        mass += np.bincount(classes, minlength=3) * sampler.weights
    np.testing.assert_allclose(mass / mass.sum(), CLASS_BALANCE, rtol=1e-5)
    # a class the pool lacks gets no weight, and the others share its part
    identity = [DeformedPair(p.name, p.pyramid, p.dvf * 0, p.magnitude * 0, p.body, p.centres) for p in pool]
    assert class_weights(identity, DEFAULT_CONFIG).tolist() == [1.0, 0.0, 0.0]


def test_class_drawn_centres_follow_the_60_20_20_balance_and_weigh_every_body_voxel_alike(pool):
    sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(3), centres="class")
    counts = np.zeros(3)
    for _ in range(3000):
        pair, centre = sampler.draw_centre()
        assert pair.body[tuple(centre)]
        counts[DEFAULT_CONFIG.classify_mm(pair.magnitude[tuple(centre)])] += 1
    np.testing.assert_allclose(counts / counts.sum(), CLASS_BALANCE, atol=0.03)
    batch = sampler.batch(2)
    assert set(np.unique(batch.weights.numpy())) <= {0.0, 1.0}
    # a class the pool lacks is never drawn: its share goes to the others
    identity = [DeformedPair(p.name, p.pyramid, p.dvf * 0, p.magnitude * 0, p.body, p.centres) for p in pool]
    only_correct = BlockSampler(identity, DEFAULT_CONFIG, np.random.default_rng(4), centres="class")
    assert only_correct.class_share.tolist() == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="centres 'centre'"):
        BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0), centres="centre")
    assert only_correct.class_quota(5) == [0] * 5
    for name in ("centre_sampling", "val_centre_sampling"):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: "balanced"})


def test_stratified_blocks_hold_each_class_in_the_exact_balance(pool):
    """Validation's class-drawn blocks: their centres' classes are the balance's exact shares of the blocks
    (largest remainders), not 12 lucky or unlucky draws; uniform samplers ignore ``stratified``."""
    sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(5), centres="class")
    assert sampler.class_quota(12) == [0] * 7 + [1] * 3 + [2] * 2 and sampler.class_quota(5) == [0, 0, 0, 1, 2]
    sampler.rng = np.random.default_rng(6)
    batch = sampler.batch(5, stratified=True)
    side = sampler.labels_side
    sampler.rng = np.random.default_rng(6)
    for i, klass in enumerate(sampler.class_quota(5)):
        pair, centre = sampler.draw_centre(klass)
        assert DEFAULT_CONFIG.classify_mm(pair.magnitude[tuple(centre)]) == klass
        start = [int(c - side // 2) // 4 * 4 for c in centre]
        assert int(batch.final_labels[i][tuple(int(c) - s for c, s in zip(centre, start))]) == klass
    uniform = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(7))
    uniform.rng, same = np.random.default_rng(8), BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(8))
    assert torch.equal(uniform.batch(2, stratified=True).final_labels, same.batch(2).final_labels)


@pytest.mark.parametrize("block_input", [101, 109])
def test_dense_blocks_are_cut_by_the_shared_block_code(pool, block_input):
    sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(1), block_input)
    side = block_input - 82
    assert sampler.labels_side == side and sampler.dvf_side == block_input - 80
    sampler.rng = np.random.default_rng(5)
    batch = sampler.batch(3)
    sampler.rng = np.random.default_rng(5)
    for i in range(3):
        pair, centre = sampler.draw_centre()
        assert pair.body[tuple(centre)]                       # blocks sit on the body
        start = tuple(int(c - side // 2) // 4 * 4 for c in centre)
        assert all(s % 4 == 0 for s in start)                 # the model's alignment
        blocks = scale_blocks(pair.pyramid, start, (side,) * 3, DEFAULT_CONFIG)
        for s in DEFAULT_CONFIG.scales:
            assert torch.equal(batch.inputs[s][i], blocks[s])
        lo = [max(a, 0) for a in start]
        hi = [min(a + side, n) for a, n in zip(start, pair.magnitude.shape)]
        inner = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
        mm = pair.magnitude[tuple(slice(l, h) for l, h in zip(lo, hi))]
        body = pair.body[tuple(slice(l, h) for l, h in zip(lo, hi))]
        assert np.array_equal(batch.final_labels[i][inner].numpy(), DEFAULT_CONFIG.classify_mm(mm))
        weights = batch.weights[i].numpy()
        assert np.array_equal(weights[inner] > 0, body)     # every body voxel is supervised, nothing else
        outside = np.ones(weights.shape, bool)
        outside[inner] = False
        assert (weights[outside] == 0).all()                  # nothing outside the image
        for step, n in zip(batch.step_labels, DEFAULT_CONFIG.step_num_classes()):
            assert step.shape == (3, side, side, side) and int(step.max()) < n


@pytest.mark.parametrize("scale", [4, 2, 1])
def test_regnet_targets_are_the_dvf_on_the_level_grid(pool, scale):
    sampler = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(2))
    sampler.rng = np.random.default_rng(7)
    x, y, weights = sampler.regnet_batch(2, scale)
    assert x.shape == (2, 2, 101, 101, 101) and y.shape == (2, 3, 21, 21, 21) and weights.shape == (2, 1, 21, 21, 21)
    assert float(y.abs().max()) <= DVFSettings().max_displacement_mm + 1e-3
    sampler.rng = np.random.default_rng(7)
    for i in range(2):
        pair, centre = sampler.draw_centre()
        level = [int(c) // scale for c in centre]
        full = pair.dvf[:, ::scale, ::scale, ::scale]
        start = [q - 10 for q in level]
        lo = [max(a, 0) for a in start]
        hi = [min(a + 21, n) for a, n in zip(start, full.shape[1:])]
        inner = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, start))
        assert torch.equal(y[i][(slice(None), *inner)], full[(slice(None), *(slice(l, h) for l, h in zip(lo, hi)))])
        outside = torch.ones(21, 21, 21, dtype=torch.bool)
        outside[inner] = False
        assert float(weights[i, 0][outside].abs().sum()) == 0.0      # no target where the DVF is unknown
        assert float(weights[i, 0][10, 10, 10]) > 0                  # the centre is a body voxel


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Three smoke runs with the rate lowered at epoch 2, RegNets started from the coarser one, two steps per
    epoch of two batches each and the weights' running average: 2 epochs straight; 1 epoch, then resumed to
    2 (bit-for-bit check, the schedule and the average included)."""
    straight = tmp_path_factory.mktemp("straight")
    resumed = tmp_path_factory.mktemp("resumed")
    schedule = ["--set", "lr_schedule=[[2, 1e-4]]", "--set", "regnet_init=coarser", "--set", "accumulate=2",
                "--set", "ema_decay=0.5", "--set", "steps_per_epoch=2"]
    assert main(["--smoke", "--out", str(straight), *schedule]) == 0
    assert main(["--smoke", "--out", str(resumed), "--epochs", "1", *schedule]) == 0
    assert main(["--smoke", "--out", str(resumed), "--epochs", "2", "--resume", *schedule]) == 0
    return straight, resumed


def test_smoke_run_writes_models_curves_and_history(smoke_runs):
    straight, _ = smoke_runs
    for name in ("smoke_lstm_631.pt", "smoke_lstm_631.json", "regmis_regnet_t.pt", "curves.png", "history.jsonl",
                 "ledger.md"):
        assert (straight / name).exists(), name
    ledger = (straight / "ledger.md").read_text(encoding="utf-8")
    assert "5 epochs in all" in ledger and "core-hours" in ledger
    assert "| misalignment | 2 | 8 |" in ledger and "zero predictor" in ledger  # 2 epochs x 2 steps x 2 batches
    rows = [json.loads(l) for l in (straight / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["stage"] for r in rows] == ["regnet4", "regnet2", "regnet1", "misalignment", "misalignment"]
    assert [r["lr"] for r in rows] == [1e-3, 1e-3, 1e-3, 1e-3, 1e-4]
    # stage 2's rows say what judged them: the held-out blocks and their true class mix
    assert [r["val_blocks"] for r in rows[3:]] == ["2 x uniform"] * 2
    assert rows[3]["val_truth_share"] == rows[4]["val_truth_share"] and sum(rows[3]["val_truth_share"]) == pytest.approx(1)
    assert "judged on 2 x uniform blocks of" in ledger
    # stage 2's validation carries the shipped model's numbers on the same blocks (none without one)
    card = models_dir() / "regmis_lstm_631.json"
    if not card.exists():
        assert not any(k.startswith("val_shipped_") for r in rows for k in r)
        return
    shipped_sha = json.loads(card.read_text(encoding="utf-8"))["sha256"][:12]
    reference = [(r["val_shipped_sha256"], r["val_shipped_kappa"], r["val_shipped_f1"], r["val_shipped_cw"]) for r in rows[3:]]
    assert reference[0] == reference[1] and reference[0][0] == shipped_sha and -1 <= reference[0][1] <= 1
    assert f"the shipped model ({shipped_sha}) on the same blocks: kappa" in ledger
    exported = json.loads((straight / "smoke_lstm_631.json").read_text(encoding="utf-8"))
    assert not any(k.startswith("val_shipped_") for k in exported["metrics"]["validation_patches"])


def test_the_running_average_is_validated_and_exported_beside_the_last_steps_numbers(smoke_runs):
    straight, _ = smoke_runs
    rows = [json.loads(l) for l in (straight / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all("val_live_endpoint_error_mm" in r for r in rows[:3]) and all("val_live_kappa" in r for r in rows[3:])
    assert "weights averaged; the last step's own: kappa" in (straight / "ledger.md").read_text(encoding="utf-8")
    state = checkpoint.load(straight / "checkpoint")
    average, last = state["averages"]["misalignment"], state["models"]["misalignment"]
    assert any(not torch.equal(average[k], last[k]) for k in average if average[k].is_floating_point())
    # the RegNets' averages are what stage 2's encoders and RegNet-t get (stage 2's: next test)
    regnet_t = torch.jit.load(str(straight / "regmis_regnet_t.pt"), map_location="cpu").state_dict()
    for stage in ("regnet4", "regnet2", "regnet1"):
        kept = state["averages"][stage]
        assert all(torch.equal(regnet_t[f"regnet{stage[-1]}.{k}"], v) for k, v in kept.items())
        assert any(not torch.equal(v, state["models"][stage][k]) for k, v in kept.items())  # 2 steps: not the last
    # integer buffers (batch norm's step count) are the live model's, not averaged
    counts = {k: v for k, v in average.items() if not v.is_floating_point()}
    assert counts and all(torch.equal(v, last[k]) for k, v in counts.items())
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_a_stage_resumed_without_the_average_hands_on_its_own_weights(smoke_runs, tmp_path):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "average_off"
    shutil.copytree(straight, out)
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--resume", "--set", "ema_decay=0"]) == 0
    state = checkpoint.load(out / "checkpoint")
    assert "misalignment" not in state["averages"] and "regnet1" in state["averages"]  # finished stages keep theirs
    exported = torch.jit.load(str(out / "smoke_lstm_631.pt"), map_location="cpu").state_dict()
    assert all(torch.equal(exported[k], v) for k, v in state["models"]["misalignment"].items())


def test_lr_schedule_picks_the_last_entry_reached_and_rejects_bad_entries():
    cfg = TrainConfig(lr=1e-3, lr_schedule=((37, 1e-4), (9, 3e-4)))
    assert [cfg.lr_at(e) for e in (1, 8, 9, 36, 37, 42)] == [1e-3, 1e-3, 3e-4, 3e-4, 1e-4, 1e-4]
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule=((0, 1e-4),))


def test_a_regnet_stage_can_start_from_the_coarser_trained_regnet(tmp_path):
    torch.manual_seed(0)
    coarse = RegNet()
    for name, buffer in coarse.named_buffers():  # statistics of its own, which the finer stage must take over
        if "running" in name:
            buffer.uniform_(0.5, 1.5)
    coarse.eval()
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), regnet_init="coarser"))
    state = {"stage": "regnet4", "epoch": 1, "models": {"regnet4": coarse.state_dict()}, "optimizer": None,
             "seconds": {}}
    fine = RegNet()
    trainer.fit("regnet2", fine, 0, state)  # no epoch: only how the stage starts
    x = torch.randn(1, 2, 101, 101, 101)
    with torch.no_grad():  # the same shift in voxels: half the mm on the finer level
        torch.testing.assert_close(fine.eval()(x), 0.5 * coarse(x))
    untouched = RegNet()
    start = {k: v.clone() for k, v in untouched.state_dict().items()}
    Trainer(TrainConfig.smoke(out=str(tmp_path / "fresh"))).fit("regnet2", untouched, 0, state)
    assert all(torch.equal(v, start[k]) for k, v in untouched.state_dict().items())  # "fresh": as it was
    with pytest.raises(ValueError, match="regnet_init"):
        TrainConfig(regnet_init="finer")


def test_resume_continues_bit_for_bit(smoke_runs):
    straight, resumed = smoke_runs
    a = checkpoint.load(straight / "checkpoint")
    b = checkpoint.load(resumed / "checkpoint")
    assert a["epoch"] == b["epoch"] == 2
    for stage, state in a["models"].items():
        for key, value in state.items():
            assert torch.equal(value, b["models"][stage][key]), f"{stage}.{key}"
    assert a["averages"].keys() == b["averages"].keys() == a["models"].keys()
    for stage, state in a["averages"].items():
        for key, value in state.items():
            assert torch.equal(value, b["averages"][stage][key]), f"average {stage}.{key}"
    for key, entry in a["optimizer"]["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, b["optimizer"]["state"][key][name]), f"optimizer {key}.{name}"


def test_a_dropped_stage_begins_again_and_the_ledger_keeps_its_first_attempt(smoke_runs, tmp_path, capsys):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "dropped"
    shutil.copytree(straight, out)
    assert main(["--smoke", "--out", str(out), "--drop-stage", "regnet1"]) == 2   # not the last stage begun
    assert "only the last stage begun (misalignment)" in capsys.readouterr().err
    seconds = checkpoint.load(out / "checkpoint")["seconds"]
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(out), "--drop-stage", "misalignment", "--resume"])  # alone, or not at all
    (out / "checkpoint" / "misalignment.pt").unlink()        # a drop cut short after its first step...
    with pytest.raises(RuntimeError, match="--drop-stage misalignment again"):
        checkpoint.load(out / "checkpoint")
    assert main(["--smoke", "--out", str(out), "--drop-stage", "misalignment"]) == 0   # ...is finished by running it again
    state = checkpoint.load(out / "checkpoint")
    assert (state["stage"], state["epoch"], "misalignment" in state["models"]) == ("regnet1", 1, False)
    assert state["seconds"] == seconds                       # the dropped attempt's time still counts
    assert main(["--smoke", "--out", str(out), "--epochs", "1", "--resume"]) == 0
    rows = read_history(out / "history.jsonl")
    assert [(r["attempt"], r["epoch"]) for r in rows][-3:] == [
        ("misalignment, attempt 1, dropped after epoch 2", 1), ("misalignment, attempt 1, dropped after epoch 2", 2),
        ("misalignment", 1)]
    ledger = (out / "ledger.md").read_text(encoding="utf-8")
    assert "| misalignment, attempt 1, dropped after epoch 2 | 2 | 8 |" in ledger and "| misalignment | 1 | 1 |" in ledger
    assert "6 epochs in all" in ledger
    assert load_model(out / "smoke_lstm_631.pt").card["training"]["epochs_done"]["misalignment"] == 1


def test_history_marks_each_dropped_attempt_however_its_epochs_ran(tmp_path):
    path = tmp_path / "history.jsonl"
    epochs = [("regnet4", 1), ("regnet4", 2), ("regnet2", 1), ("regnet2", 2), ("regnet2", 3), ("regnet2", 3)]
    path.write_text("".join(json.dumps({"stage": s, "epoch": e}) + "\n" for s, e in epochs), encoding="utf-8")
    record_event(path, "drop", "regnet2", 3)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": "regnet2", "epoch": 1}) + "\n")
    record_event(path, "drop", "regnet2", 1)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"stage": "regnet2", "epoch": 1}) + "\n")
    assert [r["attempt"] for r in read_history(path)] == (
        ["regnet4"] * 2 + ["regnet2, attempt 1, dropped after epoch 3"] * 4 + ["regnet2, attempt 2, dropped after epoch 1"]
        + ["regnet2"])


def test_checkpoint_is_compact_and_keeps_finished_stages_unchanged(smoke_runs):
    straight, resumed = smoke_runs
    folder = straight / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == [
        "misalignment.pt", "regnet1.pt", "regnet2.pt", "regnet4.pt", "state.json"]
    saved = torch.load(folder / "misalignment.pt", weights_only=True)
    params = sum(v.numel() for v in saved["model"].values() if v.is_floating_point())
    assert {v["exp_avg"].dtype for v in saved["optimizer"]["state"].values()} == {torch.bfloat16}
    assert saved["average"] is not None  # the smoke runs keep the weights' running average
    assert (folder / "misalignment.pt").stat().st_size < 13 * params  # fp32 weights and average + two bf16 moments
    for stage in ("regnet4", "regnet2", "regnet1"):   # stage 2 never rewrites stage 1's files
        assert (folder / f"{stage}.pt").read_bytes() == (resumed / "checkpoint" / f"{stage}.pt").read_bytes()


def test_exported_model_equals_the_eager_model(smoke_runs):
    from RegistrationMisalignmentLib.networks.model import MisalignmentNet

    straight, _ = smoke_runs
    loaded = load_model(straight / "smoke_lstm_631.pt")
    assert loaded.card["training"]["images"] and "validation_patches" in loaded.card["metrics"]
    eager = MisalignmentNet("lstm", loaded.config)
    eager.load_state_dict(Trainer.weights("misalignment", checkpoint.load(straight / "checkpoint")))  # the average
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
                 "--pretrained", str(straight / "checkpoint")]) == 0
    stages = [l.split('"stage": "')[1].split('"')[0] for l in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert stages == ["misalignment"]
    first = Trainer.weights("regnet1", checkpoint.load(straight / "checkpoint"))  # what that run handed on
    again = checkpoint.load(out / "checkpoint")["models"]["regnet1"]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert load_model(out / "smoke_ms.pt").decoder == "multiscale"


def test_time_limit_stops_stage_2_after_an_epoch_and_still_exports(smoke_runs, tmp_path):
    straight, _ = smoke_runs
    out = tmp_path / "limited"
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--pretrained", str(straight / "checkpoint"),
                 "--set", "time_limit_minutes=1e-6"]) == 0
    rows = [json.loads(l) for l in (out / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["stage"], r["epoch"]) for r in rows] == [("misalignment", 1)]
    card = load_model(out / "smoke_lstm_631.pt").card
    assert card["training"]["epochs_done"] == {"misalignment": 1}
    assert card["training"]["trainer_config"]["epochs"] == 3
    with pytest.raises(ValueError, match="time_limit_minutes"):
        TrainConfig(time_limit_minutes=-1)


@pytest.mark.skipif(not (SHARED_DATA / "chest_ct_1.5mm.nii.gz").exists(), reason="needs ../shared/data")
def test_compact_cache_round_trips_within_half_a_step_and_holds_out_by_stem(tmp_path):
    from RegistrationMisalignmentLib.io import read_image
    from RegistrationMisalignmentLib.synthetic.images import TrainingImage, to_training_image
    from dataclasses import replace

    from trainer.cache import read_cache, write_cache
    from trainer.data import load_images
    from trainer.train import split_by_name

    written = write_cache(SHARED_DATA, tmp_path, scans=["chest_ct_1.5mm"])
    assert [p.name for p in written] == ["chest_ct_1.5mm.npz"]
    full = to_training_image(read_image(SHARED_DATA / "chest_ct_1.5mm.nii.gz"), "full", DEFAULT_CONFIG).hu
    [cached] = load_images(tmp_path, DEFAULT_CONFIG)
    step = (DEFAULT_CONFIG.hu_window[1] - DEFAULT_CONFIG.hu_window[0]) / 255
    assert cached.name == "chest_ct_1.5mm.nii.gz" and cached.hu.dtype == np.float32
    assert cached.hu.shape == full.shape
    assert np.abs(np.clip(full, *DEFAULT_CONFIG.hu_window) - cached.hu).max() <= step / 2 + 1e-3
    images = [cached, TrainingImage("lidc.nii.gz", cached.hu[:8])]
    train, val = split_by_name(images, ("chest_ct_1.5mm.nii.gz",))
    assert [i.name for i in val] == ["chest_ct_1.5mm.nii.gz"] and [i.name for i in train] == ["lidc.nii.gz"]
    with pytest.raises(InputError, match="made for a 1 mm grid and HU window"):
        read_cache(written[0], replace(DEFAULT_CONFIG, hu_window=(-1000.0, 500.0)))
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(InputError, match="not a compact copy of a scan"):
        load_images(tmp_path, DEFAULT_CONFIG)
    (tmp_path / "other.npz").unlink()
    (tmp_path / "chest_ct_1.5mm.nii.gz").symlink_to(SHARED_DATA / "chest_ct_1.5mm.nii.gz")
    with pytest.raises(InputError, match="holds chest_ct_1.5mm twice"):
        load_images(tmp_path, DEFAULT_CONFIG)


def test_stage2_can_start_from_the_shipped_model(tmp_path):
    try:
        shipped = load_model()
    except InputError:
        pytest.skip("no shipped model in Resources/Models")
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), misalignment_init="shipped"))
    state = {"stage": "regnet1", "epoch": 1, "models": {}, "optimizer": None, "seconds": {}}
    model = MisalignmentNet("lstm", DEFAULT_CONFIG)
    trainer.fit("misalignment", model, 0, state)  # no epoch: only how the stage starts
    weights = shipped.module.state_dict()
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    other = Trainer(TrainConfig.smoke(out=str(tmp_path / "other"), split="12-6-3", misalignment_init="shipped"))
    with pytest.raises(InputError, match="split '6-3-1' vs '12-6-3'"):
        other.fit("misalignment", MisalignmentNet("lstm", other.config), 0, dict(state))
    with pytest.raises(ValueError, match="misalignment_init"):
        TrainConfig(misalignment_init="random")
    with pytest.raises(ValueError, match="accumulate"):
        TrainConfig(accumulate=0)


def test_select_by_exports_the_best_validated_epoch_and_keeps_it_across_a_resume(smoke_runs, tmp_path, capsys):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "selected"
    shutil.copytree(straight, out)
    selecting = ["--set", "ema_decay=0.5", "--set", "select_by=val_mean_f1"]
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--resume", *selecting]) == 0
    assert main(["--smoke", "--out", str(out), "--epochs", "4", "--resume", *selecting]) == 0  # the best comes back
    rows = [r for r in read_history(out / "history.jsonl") if r["stage"] == "misalignment"]
    scores = [r["val_mean_f1"] if r["val_mean_f1"] == r["val_mean_f1"] else -1 for r in rows[2:]]
    best_row = rows[2 + int(scores[1] > scores[0])]  # epochs 3 and 4 ran with select_by; a tie keeps epoch 3
    assert [(r["selected_epoch"], r["selected_since"]) for r in rows[2:]] == [(3, 3), (best_row["epoch"], 3)]
    assert "selected_epoch" not in rows[1]
    best = checkpoint.load(out / "checkpoint")["bests"]["misalignment"]
    assert (best["epoch"], best["metric"], best["judge"]) == (best_row["epoch"], "val_mean_f1", best_row["val_judge"])
    exported = load_model(out / "smoke_lstm_631.pt")
    weights = exported.module.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in best["weights"].items())
    assert exported.card["training"]["selected"]["epoch"] == best_row["epoch"]
    assert exported.card["training"]["selected"]["since"] == 3
    assert exported.card["training"]["epochs_done"]["misalignment"] == 4
    assert exported.card["metrics"]["validation_patches"]["val_kappa"] == best_row["val_kappa"]
    assert "selected" not in load_model(out / "regmis_regnet_t.pt").card["training"]
    ledger = (out / "ledger.md").read_text(encoding="utf-8")
    assert f"misalignment's export: epoch {best_row['epoch']}, the best-validated since epoch 3" in ledger
    # stage 2 can be set back to it, under the rule that chose it
    assert main(["--smoke", "--out", str(out), "--rewind-to", "best", "--set", "select_by=val_kappa"]) == 2
    assert "were chosen by val_mean_f1, this config selects by val_kappa" in capsys.readouterr().err
    assert main(["--smoke", "--out", str(out), "--rewind-to", "best", *selecting]) == 0
    assert all(torch.equal(v, best["weights"][k]) for k, v in checkpoint.load(out / "checkpoint")["models"]["misalignment"].items())
    event = read_events(out / "history.jsonl")[-1]
    assert event["to"] == f"its best val_mean_f1 weights, epoch {best_row['epoch']}"
    assert rewind_label(event) == f"epoch {best_row['epoch']}"
    # a best written by an epoch that did not finish is not taken up
    ahead = {**best, "epoch": 5}
    torch.save(ahead, out / "checkpoint" / "misalignment.best.pt")
    assert "misalignment" not in checkpoint.load(out / "checkpoint")["bests"]
    # a drop forgets the attempt's best; a fresh start in the folder clears the old checkpoint
    assert main(["--smoke", "--out", str(out), "--drop-stage", "misalignment"]) == 0
    assert not (out / "checkpoint" / "misalignment.best.pt").exists()
    Trainer(TrainConfig.smoke(out=str(out))).load_checkpoint()
    assert not checkpoint.exists(out / "checkpoint") and not list((out / "checkpoint").glob("*.pt"))
    assert main(["--smoke", "--out", str(out), "--set", "select_by=val_loss"]) == 2


def test_selection_keeps_the_best_and_starts_anew_when_the_judge_or_metric_changes(tmp_path):
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), select_by="val_kappa"))
    model = torch.nn.Linear(2, 1)

    def row(epoch, kappa, judge="a", **more):
        return {"epoch": epoch, "val_kappa": kappa, "val_blocks": "6 x uniform", "val_judge": judge, **more}

    first = trainer._select("misalignment", row(1, 0.5), model, None)
    worse = row(2, 0.4)
    assert trainer._select("misalignment", worse, model, first) is first and worse["selected_epoch"] == 1
    assert trainer._select("misalignment", row(3, float("nan")), model, first) is first
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    better = trainer._select("misalignment", row(4, 0.6), model, first)
    assert (better["epoch"], better["since"], better["value"]) == (4, 1, 0.6)
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on: the best is a copy
    assert all(torch.equal(better["weights"][k], v) for k, v in kept.items())
    assert trainer._select("misalignment", row(5, 0.1, judge="b"), model, better)["since"] == 5  # other blocks
    trainer.cfg.select_by = "val_mean_f1"
    assert trainer._select("misalignment", row(6, 0.0, val_mean_f1=0.2), model, better)["since"] == 6  # other metric
    assert trainer._select("regnet1", {"epoch": 1}, model, None) is None  # stage 1 is not selected


def test_selection_over_the_shipped_model_keeps_only_epochs_that_beat_it_on_all_three_counts(tmp_path):
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), select_by="val_kappa_over_shipped"))
    model = torch.nn.Linear(2, 1)
    shipped = {"val_shipped_kappa": 0.36, "val_shipped_mean_f1": 0.54, "val_shipped_cw": 1000}

    def row(epoch, kappa, mean_f1, cw, judge="a"):
        return {"epoch": epoch, "val_kappa": kappa, "val_mean_f1": mean_f1, "val_cw": cw,
                "val_blocks": "6 x class", "val_judge": judge, **shipped}

    stale = {"epoch": 1, "metric": "val_kappa", "value": 0.9, "judge": "a", "since": 1, "weights": {}}
    more_cw = row(2, 0.40, 0.55, 1200)
    assert trainer._select("misalignment", more_cw, model, stale) is None  # more cw: not kept
    assert more_cw["selected_epoch"] is None  # the history row says that nothing is selected
    assert trainer._select("misalignment", row(3, 0.40, 0.53, 900), model, None) is None  # lower mean F1
    assert trainer._select("misalignment", row(4, 0.36, 0.55, 900), model, None) is None  # kappa only equal
    first = trainer._select("misalignment", row(5, 0.37, 0.55, 999), model, None)
    assert (first["epoch"], first["since"], first["value"]) == (5, 5, 0.37)
    higher_but_more_cw = row(6, 0.45, 0.60, 1001)
    assert trainer._select("misalignment", higher_but_more_cw, model, first) is first
    assert higher_but_more_cw["selected_epoch"] == 5
    assert trainer._select("misalignment", row(7, 0.38, 0.541, 990), model, first)["epoch"] == 7
    assert trainer._select("misalignment", row(8, 0.50, 0.60, 500, judge="b"), model, first)["since"] == 8
    del shipped["val_shipped_kappa"]  # a row without the shipped model's numbers cannot beat it
    assert trainer._select("misalignment", row(9, 0.5, 0.6, 10), model, None) is None


def test_selection_keeping_wrong_also_wants_the_wrong_class_f1_no_lower_than_the_shipped_models(tmp_path):
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), select_by="val_kappa_over_shipped_keeping_wrong"))
    model = torch.nn.Linear(2, 1)
    shipped = {"val_shipped_kappa": 0.36, "val_shipped_mean_f1": 0.54, "val_shipped_cw": 1000,
               "val_shipped_f1": [0.85, 0.39, 0.388]}

    def row(epoch, kappa, f1_wrong, cw=900, mean_f1=0.55):
        return {"epoch": epoch, "val_kappa": kappa, "val_mean_f1": mean_f1, "val_cw": cw, "val_f1": [0.86, 0.4, f1_wrong],
                "val_blocks": "6 x class", "val_judge": "a", **shipped}

    assert trainer._select("misalignment", row(1, 0.376, 0.353), model, None) is None  # epoch 452's kind: F1 wrong fell
    assert trainer._select("misalignment", row(2, 0.37, float("nan")), model, None) is None  # nan: not kept
    assert trainer._select("misalignment", row(3, 0.37, 0.39, cw=1001), model, None) is None  # the ship rule still holds
    first = trainer._select("misalignment", row(4, 0.365, 0.388), model, None)  # F1 wrong equal: kept
    assert (first["epoch"], first["metric"]) == (4, "val_kappa_over_shipped_keeping_wrong")
    assert trainer._select("misalignment", row(5, 0.38, 0.387), model, first) is first  # higher kappa, F1 wrong fell
    assert trainer._select("misalignment", row(6, 0.37, 0.40), model, first)["epoch"] == 6


def test_selection_per_setting_group_wants_the_ship_rule_on_affine_and_bspline_blocks_apart(tmp_path):
    """Epoch 491's kind: better than the shipped model on all blocks and on the affine ones, worse on the B-spline
    ones (the protocol said the same), is not kept; rows without the groups' numbers cannot be kept either."""
    trainer = Trainer(TrainConfig.smoke(out=str(tmp_path), select_by="val_kappa_over_shipped_per_setting_group",
                                        val_registrations=("affine", "bspline100")))
    model = torch.nn.Linear(2, 1)
    shipped = {"val_shipped_kappa": 0.360, "val_shipped_mean_f1": 0.542, "val_shipped_cw": 223757,
               "val_shipped_affine_kappa": 0.223, "val_shipped_affine_mean_f1": 0.504, "val_shipped_affine_cw": 53806,
               "val_shipped_bspline_kappa": 0.156, "val_shipped_bspline_mean_f1": 0.373,
               "val_shipped_bspline_cw": 169951}

    def row(epoch, bspline_kappa, affine_cw=38110, **overall):
        return {"epoch": epoch, "val_kappa": 0.379, "val_mean_f1": 0.555, "val_cw": 220166, **overall,
                "val_affine_kappa": 0.264, "val_affine_mean_f1": 0.534, "val_affine_cw": affine_cw,
                "val_bspline_kappa": bspline_kappa, "val_bspline_mean_f1": 0.374, "val_bspline_cw": 169000,
                "val_blocks": "36 x class", "val_judge": "a", **shipped}

    assert trainer._select("misalignment", row(491, 0.146), model, None) is None  # lost on the B-spline blocks
    assert trainer._select("misalignment", row(2, 0.160, affine_cw=60000), model, None) is None  # affine cw rose
    assert trainer._select("misalignment", row(3, 0.160, val_cw=230000), model, None) is None  # all blocks' cw rose
    kept = trainer._select("misalignment", row(4, 0.160), model, None)
    assert (kept["epoch"], kept["value"]) == (4, 0.379)
    pooled = {k: v for k, v in row(5, 0.2).items() if "_bspline_" not in k and "_affine_" not in k}
    assert trainer._select("misalignment", pooled, model, None) is None  # a row judged before the groups


def test_selection_per_setting_group_needs_a_judge_of_both_kinds_of_registration():
    """Without affine and B-spline blocks the rule would keep no epoch, silently: refused at once, naming the fix."""
    rule = "val_kappa_over_shipped_per_setting_group"
    for registrations in ((), ("bspline20", "bspline2000"), ("affine",)):
        with pytest.raises(ValueError, match="an affine and a B-spline setting"):
            TrainConfig(select_by=rule, val_registrations=registrations)
    TrainConfig(select_by=rule, val_registrations=("affine", "bspline500"))


def test_the_ledger_says_when_the_selection_holds_no_epoch(smoke_runs, tmp_path):
    from trainer.ledger import write_ledger

    straight, _ = smoke_runs
    lines = (straight / "history.jsonl").read_text(encoding="utf-8").splitlines()
    last = json.loads(lines[-1])
    assert last["stage"] == "misalignment"
    history = tmp_path / "history.jsonl"
    history.write_text("\n".join([*lines[:-1], json.dumps({**last, "selected_epoch": None})]) + "\n", encoding="utf-8")
    assert "no epoch selected yet" in write_ledger(history, tmp_path).read_text(encoding="utf-8")
    history.write_text("\n".join(lines) + "\n", encoding="utf-8")  # a run without select_by: no word of it
    assert "misalignment's export" not in write_ledger(history, tmp_path).read_text(encoding="utf-8")


def test_a_selection_with_no_epoch_removes_the_checkpoints_earlier_best(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(model.parameters())
    best = {"epoch": 3, "metric": "val_kappa", "value": 0.5, "judge": "a", "blocks": "b", "since": 1,
            "weights": model.state_dict()}
    checkpoint.save(tmp_path, "misalignment", 3, model, optimizer, {"misalignment": 1.0}, best=best)
    assert checkpoint.load(tmp_path)["bests"]["misalignment"]["epoch"] == 3
    checkpoint.save(tmp_path, "misalignment", 4, model, optimizer, {"misalignment": 2.0}, best=None)
    assert checkpoint.load(tmp_path)["bests"] == {}


def test_a_resumed_run_takes_up_registered_pairs_and_counts_them(smoke_runs, tmp_path):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "registered"
    shutil.copytree(straight, out)
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--resume", "--set", "registered_share=1"]) == 0
    rows = [r for r in read_history(out / "history.jsonl") if r["stage"] == "misalignment"]
    assert "registered_pairs" not in rows[-2] and rows[-1]["registered_pairs"] == TrainConfig.smoke().pool_pairs
    assert json.loads((out / "smoke_lstm_631.json").read_text(encoding="utf-8"))["training"]["registered_share"] == 1.0


def test_rewind_sets_stage_2_back_to_an_earlier_export_and_training_goes_on(smoke_runs, tmp_path, capsys):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "rewound"
    shutil.copytree(straight, out)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for suffix in (".pt", ".json"):  # the export of epoch 2
        shutil.copy(straight / f"smoke_lstm_631{suffix}", earlier / f"smoke_lstm_631{suffix}")
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--resume", "--set", "ema_decay=0.5"]) == 0
    with pytest.raises(SystemExit):
        main(["--smoke", "--out", str(out), "--rewind-to", str(earlier / "smoke_lstm_631.pt"), "--resume"])
    other_split = ["--smoke", "--out", str(out), "--split", "6-3-3", "--rewind-to", str(earlier / "smoke_lstm_631.pt")]
    assert main(other_split) == 2 and "not a model of this run (split '6-3-1' vs '6-3-3')" in capsys.readouterr().err
    assert main(["--smoke", "--out", str(out), "--rewind-to", str(earlier / "smoke_lstm_631.pt")]) == 0
    state = checkpoint.load(out / "checkpoint")
    export = torch.jit.load(str(earlier / "smoke_lstm_631.pt"), map_location="cpu").state_dict()
    assert state["epoch"] == 3 and state["optimizer"]["state"] == {}
    for weights in (state["models"]["misalignment"], state["averages"]["misalignment"]):
        assert all(torch.equal(v, export[k]) for k, v in weights.items())
    assert main(["--smoke", "--out", str(out), "--resume", "--export"]) == 0  # set back, not yet validated:
    card = load_model(out / "smoke_lstm_631.pt").card                           # the card gives no numbers
    assert card["metrics"]["validation_patches"] == {} and card["training"]["rewound"][-1]["epoch"] == 3
    assert main(["--smoke", "--out", str(out), "--epochs", "4", "--resume", "--set", "ema_decay=0.5"]) == 0
    assert load_model(out / "smoke_lstm_631.pt").card["metrics"]["validation_patches"]["val_kappa"] is not None
    rows = read_history(out / "history.jsonl")
    assert [r["epoch"] for r in rows if r["stage"] == "misalignment"] == [1, 2, 3, 4]  # the count goes on
    ledger = (out / "ledger.md").read_text(encoding="utf-8")
    sha = load_model(earlier / "smoke_lstm_631.pt").card["sha256"][:12]
    assert f"misalignment set back after its epoch 3 to {earlier / 'smoke_lstm_631.pt'} ({sha})" in ledger
    assert rewind_label(read_events(out / "history.jsonl")[-1]) == sha
    assert main(["--smoke", "--out", str(out), "--rewind-to", "best"]) == 2  # nothing selected in this run
    assert "| misalignment | 4 | 10 |" in ledger  # 8 + 1 + 1 blocks: the rewound epochs still count
    with pytest.raises(InputError, match="do not fit"):
        checkpoint.rewind(out / "checkpoint", "misalignment", {"x": torch.zeros(1)})


def test_frozen_batch_norm_keeps_stage_2s_statistics_and_trains_the_rest(smoke_runs, tmp_path):
    import shutil

    straight, _ = smoke_runs
    out = tmp_path / "frozen"
    shutil.copytree(straight, out)
    before = checkpoint.load(out / "checkpoint")["models"]["misalignment"]
    assert main(["--smoke", "--out", str(out), "--epochs", "3", "--resume", "--set", "freeze_batch_norm=true"]) == 0
    after = checkpoint.load(out / "checkpoint")["models"]["misalignment"]
    statistics = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(before[k], after[k]) for k in statistics)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".weight"))  # the rest learns


def test_trainer_log_lines_reach_a_log_file_at_once(monkeypatch):
    """`regmis-train ... >> run.log`: each progress line is flushed, not held in an 8 KB buffer for hours."""
    import io
    import types

    class Sink(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    sink = Sink()
    monkeypatch.setattr("sys.stdout", sink)
    Trainer.log(types.SimpleNamespace(main=True), "registration bank: case 1/12 registered")
    assert sink.flushed == "registration bank: case 1/12 registered\n"


def test_stage_two_dvf_targets_lie_under_each_encoders_heads_and_train_the_encoders(pool):
    """``batch(dvf=True)``: per scale, the DVF where a RegNet head on that encoder's features puts its output
    (level voxel q is 1 mm voxel s*q), read back from a field that holds each voxel's own 1 mm index, weighted
    exactly on the level's body; the heads' loss reaches every encoder."""
    pair = pool[0]
    shape = pair.magnitude.shape
    index = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
    marked = DeformedPair.of(pair.name, pair.pyramid, index, pair.body)
    sampler = BlockSampler([marked], DEFAULT_CONFIG, np.random.default_rng(3), 101)
    sampler.weights = np.ones(3, dtype=np.float32)  # every body voxel weighs 1, whatever its class
    sampler.rng = np.random.default_rng(5)
    batch = sampler.batch(1, dvf=True)
    sampler.rng = np.random.default_rng(5)
    _, centre = sampler.draw_centre()
    start = [int(c - sampler.labels_side // 2) // 4 * 4 for c in centre]
    model = MisalignmentNet("lstm", DEFAULT_CONFIG)
    heads = DVFHeads()
    with encoder_features(model) as features:
        model.train()(batch.inputs[1], batch.inputs[2], batch.inputs[4])
    for scale in (4, 2, 1):
        target, weights = batch.dvfs[scale]
        assert target.shape[2:] == tuple(n - 4 for n in features[scale].shape[2:])  # a head takes 2 voxels a side
        # the fine encoder's first output voxel is the label block's first minus the decoder margin
        first = [math.floor((p - DEFAULT_CONFIG.decoder_margin) / scale) + 2 for p in start]
        level = [first[a] + torch.arange(target.shape[2 + a]) for a in range(3)]
        inside = [(q >= 0) & (q < -(-n // scale)) for q, n in zip(level, shape)]
        grid = torch.meshgrid(*level, indexing="ij")
        mask = inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :]
        expected = torch.stack([torch.where(mask, scale * g, 0).float() for g in grid])
        assert mask.any() and torch.equal(target[0], expected)
        body = torch.from_numpy(pair.body[::scale, ::scale, ::scale])
        on_body = torch.zeros_like(mask)
        on_body[mask] = body[grid[0][mask], grid[1][mask], grid[2][mask]]
        assert torch.equal(weights[0, 0] > 0, on_body)
    zero = {s: (torch.zeros_like(y), w) for s, (y, w) in batch.dvfs.items()}
    loss, errors = heads.loss(features, zero)
    loss.backward()
    assert errors[1] == 0 and errors[0] > 0  # the zero predictor's error against zero targets; the heads' not
    for scale in (4, 2, 1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, f"encoder{scale}").parameters())
    regnet = RegNet()
    heads.start_from({1: regnet.state_dict()})
    assert all(torch.equal(v, regnet.head.state_dict()[k]) for k, v in heads.heads["1"].state_dict().items())


def test_dvf_heads_train_beside_stage_two_resume_bit_for_bit_and_can_be_dropped(smoke_runs, tmp_path):
    import shutil

    straight, _ = smoke_runs
    once, twice = tmp_path / "once", tmp_path / "twice"
    shutil.copytree(straight, once)
    shutil.copytree(straight, twice)
    dvf = ["--set", "dvf_loss_weight=0.5", "--set", "accumulate=2", "--set", "steps_per_epoch=2", "--set",
           "ema_decay=0.5", "--set", "lr_schedule=[[2, 1e-4]]", "--set", "regnet_init=coarser"]
    assert main(["--smoke", "--out", str(once), "--epochs", "4", "--resume", *dvf]) == 0
    assert main(["--smoke", "--out", str(twice), "--epochs", "3", "--resume", *dvf]) == 0
    assert main(["--smoke", "--out", str(twice), "--epochs", "4", "--resume", *dvf]) == 0
    a, b = checkpoint.load(once / "checkpoint"), checkpoint.load(twice / "checkpoint")
    assert a["dvf_heads"] is not None and a["dvf_heads"].keys() == b["dvf_heads"].keys()
    for key, value in a["dvf_heads"].items():
        assert torch.equal(value, b["dvf_heads"][key]), key
    for key, value in a["models"]["misalignment"].items():
        assert torch.equal(value, b["models"]["misalignment"][key]), key
    assert len(a["optimizer"]["param_groups"]) == 2
    # the heads started from stage 1's (the next test: exactly), then learnt: their trained weights moved
    regnet1 = checkpoint.load(straight / "checkpoint")["averages"]["regnet1"]
    learnt = [k for k, v in regnet1.items() if k.startswith("head.") and "running" not in k and v.is_floating_point()]
    assert learnt and all(not torch.equal(a["dvf_heads"][f"heads.1.{k.removeprefix('head.')}"], regnet1[k])
                          for k in learnt)
    rows = [json.loads(l) for l in (once / "history.jsonl").read_text(encoding="utf-8").splitlines()]
    assert all(r["train_dvf_zero_epe_mm"] > 0 and r["train_dvf_epe_mm"] > 0 for r in rows[-2:])
    assert "train_dvf_epe_mm" not in rows[-3]
    assert "DVF heads on the training blocks: EPE" in (once / "ledger.md").read_text(encoding="utf-8")
    # dropped again: the model's optimiser state goes on, the heads' is left behind
    assert main(["--smoke", "--out", str(once), "--epochs", "5", "--resume", "--set", "dvf_loss_weight=0",
                 "--set", "steps_per_epoch=1"]) == 0
    after = checkpoint.load(once / "checkpoint")
    assert after["epoch"] == 5 and after["dvf_heads"] is None and len(after["optimizer"]["param_groups"]) == 1
    model_group = a["optimizer"]["param_groups"][0]["params"]
    assert sorted(after["optimizer"]["state"]) == sorted(model_group)  # the model's entries, stepped on
    assert all(after["optimizer"]["state"][k]["step"] == a["optimizer"]["state"][k]["step"] + 1 for k in model_group)
    with pytest.raises(ValueError, match="dvf_loss_weight"):
        TrainConfig(dvf_loss_weight=-1.0)
