"""The speed benchmark (benchmarks/speed.py): its pair, its helpers, and the tiny CI run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from benchmarks.speed import fit_exponent, markdown, timing_basis
from benchmarks.speed_run import STAGES, PairGeometry, make_pair, naive_patch_output

REPO = Path(__file__).resolve().parents[1]


def test_chest_geometry_and_scales_keep_spacing():
    chest = PairGeometry()
    assert chest.shape == (512, 512, 130) and chest.spacing == (0.97, 0.97, 2.5)
    assert chest.grid_1mm_shape() == (497, 497, 325)
    for factor in (0.25, 0.5, 2.0):
        scaled = chest.scaled(factor)
        assert scaled.spacing == chest.spacing
        assert scaled.voxels / chest.voxels == pytest.approx(factor, rel=0.02)


def test_pair_is_seeded_deformed_and_on_the_fixed_grid():
    geometry = PairGeometry((40, 40, 14))
    fixed, moving = make_pair(geometry, seed=3)
    again, _ = make_pair(geometry, seed=3)
    for image in (fixed, moving):
        assert image.GetSize() == geometry.shape
        assert np.allclose(image.GetSpacing(), geometry.spacing)
    a, b = sitk.GetArrayFromImage(fixed), sitk.GetArrayFromImage(moving)
    assert np.array_equal(a, sitk.GetArrayFromImage(again))
    assert a.min() < -900 and a.max() > 300, "air and bone, like a chest CT"
    assert np.mean(np.abs(a - b)) > 10, "the moving image must be deformed"


def test_exponent_fit_and_naive_patch_geometry():
    assert fit_exponent([1, 2, 4], [3, 6, 12]) == pytest.approx(1.0)
    assert fit_exponent([1, 2, 4], [5, 5, 5]) == pytest.approx(0.0, abs=1e-9)
    assert fit_exponent([8, 8], [1, 2]) is None
    assert naive_patch_output(205) == 120  # 205^3 seed patches: 120^3 output voxels each
    assert naive_patch_output(101) == 16
    with pytest.raises(ValueError):
        naive_patch_output(200)


def test_timing_basis_names_a_single_run_as_such():
    assert timing_basis(3, "crop") == "medians of 3 runs after a crop warm-up"
    assert timing_basis(1, "none") == "from 1 run without warm-up"


def test_ci_run_writes_well_formed_json_and_one_table_row_per_configuration(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--ci", "--out", str(out), "--cache",
                           str(tmp_path / "cache"), "--name", "ci"], cwd=REPO, capture_output=True, text=True, encoding="utf-8",
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "ci.json").read_text(encoding="utf-8"))
    assert {"name", "date", "command", "machine", "settings", "rows", "scaling"} <= report.keys()
    assert report["complete"] is True and "Unfinished" not in (out / "ci.md").read_text(encoding="utf-8")
    assert report["machine"]["cpu"] and report["machine"]["cpu_cores"] >= 1 and report["machine"]["torch"]
    rows = report["rows"]
    assert [r["kind"] for r in rows].count("naive") == 1
    assert {r["decoder"] for r in rows} == {"lstm", "regnet-t"}
    for r in rows:
        assert "error" not in r, r
        assert set(r["timings_s"]) == set(STAGES) and all(t > 0 for t in r["timings_s"].values())
        assert len(r["runs_total_s"]) == 3 and r["total_s"] == pytest.approx(sorted(r["runs_total_s"])[1])
        assert r["voxels_per_s"] == pytest.approx(r["voxels"] / r["total_s"])
        assert r["voxels_1mm"] == math.prod(r["shape_1mm"]) and r["peak_rss_bytes"] > 10**8
    naive = next(r for r in rows if r["kind"] == "naive")
    assert naive["speedup_vs_naive"] == pytest.approx(1.0)
    profile = rows[0]["tile_profile"]
    assert 0 < profile["encoders_s"] and profile["decoder_s"] >= 0 and profile["tiles"] >= 1
    scaling = report["scaling"]
    assert len(scaling["points"]) == 2 and len({p["voxels_1mm"] for p in scaling["points"]}) == 2
    assert math.isfinite(scaling["time_exponent"]) and math.isfinite(scaling["memory_exponent"])

    table = (out / "ci.md").read_text(encoding="utf-8").split("Scaling")[0]
    body = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert [line.split(" | ")[0][2:] for line in body] == [r["label"] for r in rows]
    assert markdown(report) == (out / "ci.md").read_text(encoding="utf-8")
    failed = {**rows[0], "error": "killed by signal 9"}
    text = markdown({**report, "rows": [failed, *rows[1:]]})
    assert f"| {failed['label']} |" in text and "failed: killed by signal 9" in text
    assert "**Unfinished**" in markdown({**report, "complete": False})
