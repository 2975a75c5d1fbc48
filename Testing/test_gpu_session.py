"""The GPU session continues the canonical run: its command resumes that run's config on the cache, with a limit,
and what the stretch runs (the cache, the pairs, the blocks) calls no SimpleITK, which the GPU machine lacks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk

from benchmarks import gpu_session
from benchmarks.gpu_session import ASIDE, CANONICAL, HELD_OUT, SITK_ABSENT, TRAVELS, aside, bring_in, train_command
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.synthetic.phantom import make_chest_phantom
from trainer.cache import write_cache
from trainer.config import TrainConfig
from trainer.train import parse_args

REPO = Path(__file__).resolve().parents[1]


def test_train_command_resumes_the_canonical_run_with_a_time_limit():
    command = train_command("python", "runs/cache", "cuda", 4, 8.5, ["steps_per_epoch=1"])
    assert command[:3] == ["python", "-m", "trainer.train"]
    cfg, export_only, _ = parse_args(command[3:])
    canonical = TrainConfig.from_toml(CANONICAL)
    assert not export_only and cfg.resume and cfg.out == canonical.out
    assert (cfg.data, cfg.device, cfg.batch_size, cfg.pool_on_device, cfg.time_limit_minutes) == \
        ("runs/cache", "cuda", 4, True, 8.5)
    assert canonical.bank_pairs and cfg.bank_pairs == 0  # the bank's files are not carried
    assert cfg.pool_pairs == canonical.pool_pairs + canonical.bank_pairs  # synthetic pairs take their place
    assert canonical.select_by and cfg.select_by == ""  # the run's best weights are not judged anew there
    # no elastix, no POPI scan, no phantoms (SimpleITK) there: validated on synthetic pairs of the crop
    assert canonical.val_registrations and not cfg.val_registrations
    assert cfg.holdout == (HELD_OUT,) and canonical.phantoms and cfg.phantoms == 0
    assert cfg.steps_per_epoch == 1  # a rehearsal's own overrides come last
    cpu, _, _ = parse_args(train_command("python", "runs/cache", "cpu", 1, 2.0)[3:])
    assert cpu.pool_on_device is False and cpu.device == "cpu"


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="needs a git checkout")
def test_what_is_moved_aside_for_the_call_keeps_the_runs_files():
    out = TrainConfig.from_toml(CANONICAL).out
    moved = aside(out)
    assert moved and all(path.startswith(ASIDE) for path in moved)
    assert not {f"{out}/{name}" for name in TRAVELS} & set(moved)
    assert f"{out}/checkpoint/regnet1.pt" in moved  # a finished stage: a stage-2 resume does without it


def test_what_a_call_brings_back_replaces_the_runs_files_parts_joined(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_session, "PART_BYTES", 7)
    run_dir, back = tmp_path / "run", tmp_path / "back"
    (run_dir / "checkpoint").mkdir(parents=True)
    back.mkdir()
    contents = {name: f"{name} of epoch 765 ".encode() * 3 for name in TRAVELS}
    for name, data in contents.items():
        (tmp_path / Path(name).name).write_bytes(data)
        gpu_session.copy_back(tmp_path / Path(name).name, back)
    assert len(list(back.glob("misalignment.pt.part*"))) > 10  # beyond .part9: joined by number, not by name
    (run_dir / "history.jsonl").write_text("older\n", encoding="utf-8")
    for part in back.glob("state.json*"):
        part.unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint/state.json"):
        bring_in(back, run_dir)
    assert (run_dir / "history.jsonl").read_text(encoding="utf-8") == "older\n"  # nothing written before the check
    gpu_session.copy_back(tmp_path / "state.json", back)
    assert sorted(bring_in(back, run_dir)) == sorted(run_dir / name for name in TRAVELS)
    assert all((run_dir / name).read_bytes() == data for name, data in contents.items())


STRETCH = """
import numpy as np, SimpleITK, sys
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.io import read_image
from RegistrationMisalignmentLib.synthetic.dvf import DVFSettings
from trainer.data import load_images
from trainer.dataset import BlockSampler, build_pool
import trainer.train  # every module the trainer imports
assert "sitk_absent" in SimpleITK.__file__, SimpleITK.__file__
[image] = load_images(sys.argv[1], DEFAULT_CONFIG)
pool = [pair for share in (0.0, 1.0)  # a synthetic pair, and one as a registration leaves it
        for pair in build_pool([image], 1, 0, DEFAULT_CONFIG, DVFSettings(), registered_share=share, motion_left=0.3)]
batch = BlockSampler(pool, DEFAULT_CONFIG, np.random.default_rng(0), 101).batch(1)
print(image.name, image.hu.shape, sum(p.registered for p in pool), tuple(batch.final_labels.shape))
try:
    read_image(sys.argv[2])
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def test_the_stretch_reads_the_cache_and_makes_pairs_and_blocks_without_simpleitk(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    sitk.WriteImage(make_chest_phantom((96.0, 96.0, 96.0), 1.0, 3), str(source / "phantom.nii.gz"))
    cache = tmp_path / "cache"
    write_cache(source, cache)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITK_ABSENT), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", STRETCH, str(cache), str(source / "phantom.nii.gz")], cwd=REPO, env=env,
                          capture_output=True, text=True, encoding="utf-8")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "phantom.nii.gz (96, 96, 96) 1 (1, 19, 19, 19)"
    assert lines[1].startswith("InputError") and "SimpleITK.ReadImage was called, but SimpleITK is not installed" in lines[1]
