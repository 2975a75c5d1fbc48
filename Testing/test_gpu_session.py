"""The GPU session continues the canonical run: its command resumes that run's config on the cache, with a limit."""

from benchmarks.gpu_session import CANONICAL, train_command
from trainer.config import TrainConfig
from trainer.train import parse_args


def test_train_command_resumes_the_canonical_run_with_a_time_limit():
    command = train_command("python", "runs/cache", "cuda", 4, 8.5)
    assert command[:3] == ["python", "-m", "trainer.train"]
    cfg, export_only, _ = parse_args(command[3:])
    canonical = TrainConfig.from_toml(CANONICAL)
    assert not export_only and cfg.resume and cfg.out == canonical.out and cfg.holdout == canonical.holdout
    assert (cfg.data, cfg.device, cfg.batch_size, cfg.pool_on_device, cfg.time_limit_minutes) == \
        ("runs/cache", "cuda", 4, True, 8.5)
    assert canonical.bank_pairs and cfg.bank_pairs == 0  # the bank's files are not carried
    assert cfg.pool_pairs == canonical.pool_pairs + canonical.bank_pairs  # synthetic pairs take their place
    assert canonical.select_by and cfg.select_by == ""  # the run's best weights are not judged anew there
    cpu, _, _ = parse_args(train_command("python", "runs/cache", "cpu", 1, 2.0)[3:])
    assert cpu.pool_on_device is False and cpu.device == "cpu"
