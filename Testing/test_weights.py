"""Model files: the card and hash checks that keep a damaged or swapped model from predicting."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.weights import available_models, load_model


def test_round_trip_card_and_outputs(model_dir):
    model = load_model(model_dir / "test_lstm.pt")
    assert model.decoder == "lstm" and model.card["format"] == "regmis-model/1"
    assert len(model.card["sha256"]) == 64
    assert model.config.split == "6-3-1"
    assert {p.stem for p in available_models(model_dir)} == {"test_lstm", "test_singlescale", "test_regnet_t"}
    # The plain TorchScript file loads without the Lib or the trainer.
    plain = torch.jit.load(str(model_dir / "test_lstm.pt"))
    x1, x2, x4 = torch.randn(1, 2, 101, 101, 101), torch.randn(1, 2, 93, 93, 93), torch.randn(1, 2, 85, 85, 85)
    with torch.no_grad():
        torch.testing.assert_close(plain.probabilities(x1, x2, x4), model.module.probabilities(x1, x2, x4))


@pytest.fixture
def copy_of(model_dir, tmp_path):
    def make(name: str = "test_singlescale"):
        for suffix in (".pt", ".json"):
            shutil.copy(model_dir / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
        return tmp_path / f"{name}.pt"
    return make


def test_tampered_weights_are_refused(copy_of):
    pt = copy_of()
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256"):
        load_model(pt)


def test_missing_or_broken_card_is_refused(copy_of):
    pt = copy_of()
    card = pt.with_suffix(".json")
    card.write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match="not readable JSON"):
        load_model(pt)
    card.unlink()
    with pytest.raises(InputError, match="no model card"):
        load_model(pt)


def test_card_with_wrong_decoder_or_config_is_refused(copy_of):
    pt = copy_of()
    card_path = pt.with_suffix(".json")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card_path.write_text(json.dumps({**card, "decoder": "transformer"}), encoding="utf-8")
    with pytest.raises(InputError, match="decoder"):
        load_model(pt)
    card_path.write_text(json.dumps({**card, "config": {**card["config"], "split": "9-9-9"}}), encoding="utf-8")
    with pytest.raises(InputError, match="configuration"):
        load_model(pt)


def test_unreadable_torchscript_with_matching_hash_is_refused(copy_of):
    from RegistrationMisalignmentLib.weights import sha256_of

    pt = copy_of()
    pt.write_bytes(b"these are not weights")
    card_path = pt.with_suffix(".json")
    card_path.write_text(json.dumps({**json.loads(card_path.read_text(encoding="utf-8")), "sha256": sha256_of(pt)}),
                         encoding="utf-8")
    with pytest.raises(InputError, match="not a readable TorchScript"):
        load_model(pt)


def test_missing_model_names_what_is_shipped(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "nowhere.pt")


def test_rescript_keeps_weights_outputs_and_history(copy_of):
    from trainer.export import rescript

    path = copy_of("test_lstm")
    before = load_model(path)
    x1, x2, x4 = torch.randn(1, 2, 101, 101, 101), torch.randn(1, 2, 93, 93, 93), torch.randn(1, 2, 85, 85, 85)
    with torch.no_grad():
        expected = before.module.probabilities(x1, x2, x4)
    rescript(path, "test")
    after = load_model(path)  # the card's hash was renewed, so this loads
    assert after.card["rescripted"][-1]["from_sha256"] == before.card["sha256"]
    assert after.card["created"] == before.card["created"]
    with torch.no_grad():
        torch.testing.assert_close(after.module.probabilities(x1, x2, x4), expected)
