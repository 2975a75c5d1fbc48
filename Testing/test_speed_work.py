"""The work count of benchmarks/speed_work.py: MACs per part, tiling overhead, the report."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from torch import nn

from benchmarks.speed_work import counted, image_work, main, tile_macs
from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.networks.model import DECODERS, MisalignmentNet
from RegistrationMisalignmentLib.preprocess import block_geometry


def test_one_convolution_counts_its_multiply_accumulates():
    conv = nn.Conv3d(2, 12, 3, bias=False, device="meta")
    macs, out = counted(partial(conv, torch.empty(1, 2, 10, 11, 12, device="meta")))
    assert out.shape[2:] == (8, 9, 10)
    assert macs == 8 * 9 * 10 * 12 * 2 * 27


@pytest.mark.parametrize("decoder", DECODERS)
def test_part_counts_add_up_to_the_count_of_the_real_forward_pass(decoder):
    """Encoders, reductions, alignment and decoder counted apart on meta tensors = the model run for real."""
    out = (16, 20, 24)
    geometry = block_geometry((0, 0, 0), out, DEFAULT_CONFIG)
    torch.manual_seed(0)
    net = MisalignmentNet(decoder, DEFAULT_CONFIG).eval()
    x = {s: torch.randn(1, 2, *geometry[s][1]) for s in DEFAULT_CONFIG.scales}
    with torch.inference_mode():
        real, _ = counted(partial(net, x[1], x[2], x[4]))
    parts = tile_macs(decoder, out)
    assert sum(parts.values()) == real
    assert ("encoder_x4" in parts) == (decoder != "singlescale")
    assert parts["encoder_x1"] > parts.get("encoder_x2", 0) > 0 or decoder == "singlescale"


def test_tiling_overhead_shrinks_with_the_tile_and_totals_are_tiles_times_one_tile():
    grid = (40, 48, 56)
    small, large = image_work(grid, "lstm", 16), image_work(grid, "lstm", 32)
    assert small["tiles"] == 3 * 3 * 4 and large["tiles"] == 2 * 2 * 2
    for work in (small, large):
        assert work["total_macs"] == work["tiles"] * sum(work["per_tile_macs"].values())
        assert work["one_pass_macs"] == sum(tile_macs("lstm", grid).values())
    assert small["tiling_overhead"] > large["tiling_overhead"] > 1.0


def test_report_states_the_floor_against_the_goal(tmp_path):
    assert main(["--shape", "48,40,16", "--spacing", "1,1,2", "--threads", "1", "--throughput-side", "101",
                 "--repeats", "1", "--network-seconds", "10", "--out", str(tmp_path), "--name", "work"]) == 0
    report = json.loads((tmp_path / "work.json").read_text(encoding="utf-8"))
    work, floors = report["work"], report["floors"]
    assert work["grid_zyx"] == [32, 40, 48]
    assert work["voxels"] == 32 * 40 * 48
    assert report["throughput"]["macs_per_s"] > 0
    assert floors["one_pass_s"] == pytest.approx(work["one_pass_macs"] / report["throughput"]["macs_per_s"])
    assert floors["measured_macs_per_s"] == pytest.approx(work["total_macs"] / 10)
    text = (tmp_path / "work.md").read_text(encoding="utf-8")
    assert "tiling overhead" in text and "GMAC/s" in text
