"""A model soup's mixture is the weighted average of its two ends, written as a model file the judge can load."""

import pytest
import torch

from benchmarks.model_soup import main, mix
from RegistrationMisalignmentLib.weights import load_model


def test_the_ends_come_back_at_alpha_0_and_1_and_the_middle_is_their_average(model_dir, tmp_path):
    model = load_model(model_dir / "test_lstm.pt")
    first = model.module.state_dict()
    second = {k: v + 1 if v.is_floating_point() else v + 7 for k, v in first.items()}
    keys = [k for k in first if k != "merge"]  # as MisalignmentNet's state: scripted models hold non-persistent buffers
    assert any(not first[k].is_floating_point() for k in keys)  # batch norm's step counts: the integer branch runs
    # a training checkpoint as the second end: its running average is what the run validates and exports
    torch.save({"epoch": 3, "model": first, "optimizer": None, "average": second}, tmp_path / "misalignment.pt")
    assert main(["--ends", str(model_dir / "test_lstm.pt"), str(tmp_path / "misalignment.pt"),
                 "--alphas", "0", "0.25", "0.5", "1", "--out", str(tmp_path / "soup")]) == 0
    written = {a: load_model(tmp_path / "soup" / f"soup_{a}.pt").module.state_dict() for a in ("0", "0.25", "0.5", "1")}
    for k in keys:
        if first[k].is_floating_point():
            assert torch.allclose(written["0"][k], first[k]) and torch.allclose(written["1"][k], second[k])
            assert torch.allclose(written["0.25"][k], first[k] + 0.25, atol=1e-6)
            assert torch.allclose(written["0.5"][k], first[k] + 0.5, atol=1e-6)
        else:  # step counts are not averaged: the first's below 0.5, the second's from it
            assert torch.equal(written["0.25"][k], first[k]) and torch.equal(written["0.5"][k], second[k])
    card = load_model(tmp_path / "soup" / "soup_0.25.pt").card
    assert card["decoder"] == "lstm" and card["training"]["soup"]["alpha"] == 0.25
    assert card["name"] == "test_lstm_soup0.25"  # the protocol's method name: soups do not overwrite each other


def test_ends_of_different_networks_are_refused(model_dir):
    lstm = load_model(model_dir / "test_lstm.pt").module.state_dict()
    single = load_model(model_dir / "test_singlescale.pt").module.state_dict()
    with pytest.raises(ValueError, match="missing"):
        mix(lstm, single, 0.5, lstm.keys())
    wider = {k: torch.zeros(2, *v.shape) if k == "encoder1.r1_first.0.weight" else v for k, v in lstm.items()}
    with pytest.raises(ValueError, match="differ in shape"):
        mix(lstm, wider, 0.5, lstm.keys())
