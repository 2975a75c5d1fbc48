"""The GPU session's training plan: stages sized to the measured throughput and the seconds left."""

import tomllib

import pytest

from benchmarks.gpu_session import BASE_CONFIG, EXPORT_S, STARTUP_S, plan
from benchmarks.train_throughput import PAIR_STAGE, REGNET_STAGE, misalignment_stage
from trainer.config import TrainConfig


def throughput(pair_on_gpu: bool) -> dict:
    rows = [{"stage": f"{PAIR_STAGE} on cpu", "device": "cpu", "seconds_per_step": 4.4},
            {"stage": REGNET_STAGE, "seconds_per_step": 0.065},
            {"stage": misalignment_stage("lstm"), "seconds_per_step": 0.14}]
    if pair_on_gpu:
        rows.insert(1, {"stage": f"{PAIR_STAGE} on cuda", "device": "cuda", "seconds_per_step": 0.45})
    else:
        rows.insert(1, {"stage": f"{PAIR_STAGE} on cuda", "error": "no kernel"})
    return {"rows": rows}


@pytest.mark.parametrize("pair_on_gpu", [True, False])
def test_plan_fits_the_seconds_and_makes_a_valid_config(pair_on_gpu):
    base = tomllib.loads(BASE_CONFIG.read_text())
    seconds = 300.0
    config = plan(throughput(pair_on_gpu), seconds, base)
    assert config["pool_on_device"] is pair_on_gpu
    steps, pair = config["steps_per_epoch"], 0.45 if pair_on_gpu else 4.4
    overhead = config["pool_pairs"] * pair + 2.0
    planned = (3 * config["regnet_epochs"] * (steps * 0.065 + overhead) + config["epochs"] * (steps * 0.14 + overhead))
    assert planned <= seconds - STARTUP_S - EXPORT_S
    assert 0 < 60 * config["time_limit_minutes"] < seconds - EXPORT_S
    (first, _), (second, _) = config["lr_schedule"]
    assert 1 < first < second
    TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})  # every key is a setting
