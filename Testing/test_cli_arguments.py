"""A new user's mistakes are caught before any work: exit 2, a message that names the fix, nothing written.

Each case makes reading an image or predicting fail the test, so "before any work" is checked, not
assumed; the input files are compared byte for byte afterwards.
"""

from __future__ import annotations

import pytest

import RegistrationMisalignmentLib.inference as inference
import RegistrationMisalignmentLib.io as io
from RegistrationMisalignmentLib.cli import main
from test_cli import write_pair


@pytest.fixture
def no_work(monkeypatch):
    """Reading an image or running a prediction fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(io, "read_image", refuse)
    monkeypatch.setattr(inference, "predict", refuse)


@pytest.fixture
def pair(tmp_path):
    write_pair(tmp_path)
    return tmp_path


def predict_args(pair, out, *extra):
    return ["predict", "--fixed", str(pair / "fixed.nii.gz"), "--moving", str(pair / "moving.nrrd"),
            "--out", str(out), *extra]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("name, message", [
    ("result.png", "2-D format"),
    ("result.jpg", "3-D format: .nii.gz"),
    ("result.xyz", "the extension .xyz; use .nii.gz"),
    ("result", "no extension"),
])
def test_a_labelmap_path_in_a_format_without_3d_is_refused(pair, no_work, capsys, name, message):
    before = snapshot(pair)
    assert main(predict_args(pair, pair / name)) == 2
    err = capsys.readouterr().err
    assert message in err and "--out" in err
    assert snapshot(pair) == before


@pytest.mark.parametrize("which", ["fixed.nii.gz", "moving.nrrd"])
def test_an_output_that_is_an_input_is_refused_and_the_input_kept(pair, no_work, capsys, which):
    before = snapshot(pair)
    assert main(predict_args(pair, pair / "sub" / ".." / which)) == 2
    assert "would overwrite that input" in capsys.readouterr().err
    assert snapshot(pair) == before


def test_probabilities_on_the_labelmap_path_or_into_an_input_dicom_folder_are_refused(pair, no_work, capsys, tmp_path):
    out = pair / "labels.nii.gz"
    assert main(predict_args(pair, out, "--probabilities", str(out))) == 2
    assert "name the same file" in capsys.readouterr().err
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    args = ["predict", "--fixed", str(dicom), "--moving", str(pair / "moving.nrrd"), "--out", str(dicom / "map.nrrd")]
    assert main(args) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not out.exists() and list(dicom.iterdir()) == []


def test_an_existing_folder_or_a_file_in_the_way_is_refused_before_any_work(pair, no_work, capsys):
    (pair / "folder").mkdir()
    assert main(predict_args(pair, pair / "folder")) == 2
    assert "is a folder; give a file name such as" in capsys.readouterr().err
    (pair / "afile").write_text("x", encoding="utf-8")
    assert main(predict_args(pair, pair / "afile" / "labels.nii.gz")) == 2
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("command", [
    ["predict", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--out", "o.nii.gz", "--device", "gpu"],
    ["demo", "--device", "gpu"],
    ["evaluate", "--labelmap", "l.nii.gz", "--fixed-landmarks", "f.csv", "--moving-landmarks", "m.csv", "--device", "gpu"],
])
def test_an_unknown_device_names_the_choices(no_work, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--device: invalid choice: 'gpu'" in err and all(choice in err for choice in ("auto", "cpu", "cuda"))


@pytest.mark.parametrize("value, message", [("100", "not a multiple of 16 (e.g. 96 or 112)"), ("0", "not a positive")])
def test_a_bad_tile_size_is_refused_by_the_parser(pair, no_work, capsys, value, message):
    with pytest.raises(SystemExit) as exit_:
        main(predict_args(pair, pair / "o.nii.gz", "--tile-size", value))
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_evaluate_outputs_are_checked_the_same_way(pair, no_work, capsys):
    args = ["evaluate", "--labelmap", str(pair / "fixed.nii.gz"), "--fixed-landmarks", str(pair / "f.csv"),
            "--moving-landmarks", str(pair / "m.csv")]
    (pair / "f.csv").write_text("label,x,y,z\n", encoding="utf-8")
    before = snapshot(pair)
    assert main([*args, "--out-csv", str(pair / "f.csv")]) == 2
    assert "would overwrite that input" in capsys.readouterr().err
    assert main([*args, "--out-json", str(pair / "metrics.txt")]) == 2
    assert "use .json" in capsys.readouterr().err
    assert main([*args, "--out-csv", str(pair / "rows.xlsx")]) == 2
    assert "use .csv" in capsys.readouterr().err
    assert snapshot(pair) == before


def test_demo_and_benchmark_refuse_a_file_as_their_output_folder(pair, no_work, capsys):
    assert main(["demo", "--out", str(pair / "fixed.nii.gz")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert main(["benchmark", "--phantom", "--tiny", "--out", str(pair / "moving.nrrd")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err


def test_every_help_text_is_ascii():
    """A console without UTF-8 (a C locale without Python's coercion, some Windows code pages) must still print
    --help: argparse writes it to sys.stdout, and one non-ASCII character would crash the command."""
    import argparse

    from RegistrationMisalignmentLib.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts += [sub.format_help() for sub in action.choices.values()]
    offenders = sorted({c for text in texts for c in text if ord(c) > 127})
    assert len(texts) > 5 and offenders == []


def test_evaluate_refuses_a_labelmap_beside_the_images_that_would_predict_one(pair, no_work, capsys):
    args = ["evaluate", "--labelmap", str(pair / "fixed.nii.gz"), "--fixed-landmarks", str(pair / "f.csv"),
            "--moving-landmarks", str(pair / "m.csv"), "--fixed", str(pair / "fixed.nii.gz")]
    assert main(args) == 2  # before: --fixed was ignored without a word
    assert "drop them to score the labelmap, or drop --labelmap" in capsys.readouterr().err
