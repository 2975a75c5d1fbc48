"""``regmis benchmark``: the paper's evaluation protocol, run on our models and baselines.

For every case (a fixed image, a moving image, landmarks on the fixed image and a truth), elastix
registers the pair in five settings from poor to good (``benchmark.elastix``); each setting leaves a
residual misalignment at every landmark (``benchmark.cases``: ||T(x_F) - x_M|| for landmark pairs,
||T(x) + u(T(x)) - x|| for synthetic pairs with a known DVF u), classed at 3 and 6 mm. Every method
then classes the same landmarks from the fixed and the deformed moving image alone:

* each model in the models folder (LSTM, multi-scale, single-scale CNN, RegNet-t), via ``predict``;
* **elastix-t**: elastix B-spline (``benchmarks/elastix/elastix_t.txt``) re-registers the fixed and
  the deformed moving image; |displacement| at the landmark is thresholded at 3 / 6 mm;
* **all-correct**: the trivial answer "every landmark is correct", the floor any method must clear.

Studies: ``phantom`` and ``chest-ct`` (always available, known DVF; ``chest-ct`` is the whole held-out
chest CT moved by physiological breathing fields, see ``benchmark.cases``), ``dirlab`` and ``pairs``
(the user's landmark data). The report (``benchmark.report``) gives the paper's columns per setting and
over all settings, with the published numbers beside ours, labelled as not re-measured.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from RegistrationMisalignmentLib.config import DEFAULT_CONFIG
from RegistrationMisalignmentLib.errors import InputError
from RegistrationMisalignmentLib.benchmark.cases import SHARED_CHEST, TINY_SIZE_MM, Case, chest_ct_cases, phantom_cases
from RegistrationMisalignmentLib.benchmark.elastix import (
    ELASTIX_DIR, ELASTIX_T_FILE, SETTINGS, TINY_CHANGES, ElastixRunner, setting_files,
)
from RegistrationMisalignmentLib.benchmark.report import CSV_NAME, ProtocolRow, read_rows, write_report

STUDIES = ("phantom", "chest-ct", "dirlab", "pairs")
SYNTHETIC_STUDIES = ("phantom", "chest-ct")
ELASTIX_T = "elastix-t"
ALL_CORRECT = "all-correct"
DEFAULT_SYNTHETIC_CASES = 10
"""Phantom study: as many cases as DIR-Lab 4DCT has (10 x 300 landmarks x 5 settings = 15 000 points)."""
DEFAULT_CHEST_CASES = 2
"""Chest-CT study: two breathing fields of the whole held-out chest CT (seeds 7 030 000 + i; 300 landmarks x 5
settings x 2 = 3 000 points). One case left candidates within its landmarks' noise of each other (a paired
bootstrap's 95 % interval of kappa +-0.03, ``benchmarks/compare_protocols.py``). Each prediction covers the
lungs' box (~23 M voxels at 1 mm, 2.5-4 min per model and setting on 2 CPU cores): about 25 min per case for
one model beside elastix-t."""
TRUTH_DEFINITION = {
    "synthetic": "Truth: the moving image is M(y) = I(y + u(y)) for a known DVF u and the fixed F = I; elastix "
                 "finds T (fixed -> moving points), the deformed moving image is D(x) = M(T(x)) = I(T(x) + u(T(x))), "
                 "so the residual misalignment at a fixed landmark x is ||T(x) + u(T(x)) - x|| (in the fixed "
                 "image's space, the quantity the network is trained to class), then 3 / 6 mm classes.",
    "landmarks": "Truth: TRE = ||T(x_F) - x_M|| per landmark pair after registration (T maps fixed to moving "
                 "points), then 3 / 6 mm classes.",
}


@dataclass
class BenchmarkOptions:
    """Everything ``regmis benchmark`` can be told."""

    study: str
    source: str | None = None
    """The DIR-Lab folder (study 'dirlab') or the pairs CSV (study 'pairs')."""
    cases: int | None = None
    """Synthetic studies: number of cases (``DEFAULT_SYNTHETIC_CASES``, ``DEFAULT_CHEST_CASES``); external: the first
    N cases found."""
    landmarks: int = 300
    """Landmarks per synthetic case (external data bring their own)."""
    settings: tuple[str, ...] = SETTINGS
    tiny: bool = False
    out: str = "regmis_benchmark"
    device: str = "auto"
    models_dir: str | None = None
    threads: int | None = None
    tile_size: int | None = None
    """``predict``'s tile side (default: the model's); it changes the speed, not the labels."""
    resume: bool = False
    """Continue the study already in ``out`` (same data, settings and models) instead of refusing to
    overwrite an unfinished one; finished cases are read back, not recomputed."""

    def __post_init__(self) -> None:
        if self.study not in STUDIES:
            raise InputError(f"study {self.study!r} is not one of {STUDIES}")
        if self.study in ("dirlab", "pairs") and not self.source:
            raise InputError(f"the {self.study} study needs its data: --{self.study} PATH")
        if self.cases is not None and self.cases < 1:
            raise InputError(f"--cases {self.cases}: give at least 1")
        if self.landmarks < 1:
            raise InputError(f"--landmarks {self.landmarks}: give at least 1")

    def command(self) -> str:
        """The canonical command line that reproduces this run."""
        words = ["regmis", "benchmark", f"--{self.study}"] + ([self.source] if self.source else [])
        cases = self.cases or {"phantom": DEFAULT_SYNTHETIC_CASES, "chest-ct": DEFAULT_CHEST_CASES}.get(self.study)
        if cases is not None:  # a synthetic study's count, given or default: the default may change
            words += ["--cases", str(cases)]
        if self.study in SYNTHETIC_STUDIES:
            words += ["--landmarks", str(self.landmarks)]
        if tuple(self.settings) != SETTINGS:
            words += ["--settings", ",".join(self.settings)]
        words += ["--tiny"] if self.tiny else []
        words += ["--out", self.out, "--device", self.device]
        words += ["--models-dir", self.models_dir] if self.models_dir else []
        words += ["--threads", str(self.threads)] if self.threads else []
        words += ["--tile-size", str(self.tile_size)] if self.tile_size else []
        return shlex.join(words)


def iter_cases(options: BenchmarkOptions) -> tuple[int, Iterator[Case]]:
    """How many cases the study has, and the cases one at a time (external data are checked completely
    before the first)."""
    from RegistrationMisalignmentLib.benchmark.datasets import find_dirlab_cases, load_case, read_pairs_csv

    if options.study == "phantom":
        count = options.cases or DEFAULT_SYNTHETIC_CASES
        return count, phantom_cases(count, options.landmarks, options.tiny)
    if options.study == "chest-ct":
        count = options.cases or DEFAULT_CHEST_CASES
        return count, chest_ct_cases(count, options.landmarks, options.tiny)
    files = find_dirlab_cases(options.source) if options.study == "dirlab" else read_pairs_csv(options.source)
    files = files[: options.cases]
    return len(files), (load_case(f) for f in files)


def load_models(models_dir: str | None) -> list:
    """Every model (.pt + card) of the folder (default: the shipped models), verified."""
    from RegistrationMisalignmentLib.weights import available_models, load_model, models_dir as shipped

    folder = Path(models_dir) if models_dir else shipped()
    paths = available_models(folder)
    if not paths:
        raise InputError(f"no model (.pt with its .json card) in {folder}; train one (regmis-train) or pass "
                         "--models-dir FOLDER")
    return [load_model(p) for p in paths]


@dataclass
class _Overlay:
    """The one labelmap the report draws: the first case, the best setting, the LSTM (or first) model."""

    model: str
    setting: str
    data: dict | None = field(default=None)


def _classes(values_mm: np.ndarray) -> np.ndarray:
    return np.asarray(DEFAULT_CONFIG.classify_mm(values_mm), dtype=np.int64)


def _rows(case: Case, setting: str, method: str, tre: np.ndarray, true: np.ndarray,
          predicted: np.ndarray) -> list[ProtocolRow]:
    return [ProtocolRow(case.name, setting, method, label, tuple(float(v) for v in p), float(d), int(t), int(c))
            for label, p, d, t, c in zip(case.landmarks.labels, case.landmarks.points_lps, tre, true, predicted)]


def run_case(case: Case, options: BenchmarkOptions, runner: ElastixRunner, models: list, device,
             overlay: _Overlay, log: Callable[[str], None]) -> tuple[list[ProtocolRow], dict]:
    """All settings x all methods on one case: its rows and its runtimes (s)."""
    from RegistrationMisalignmentLib.evaluation import labelmap_values_to_classes
    from RegistrationMisalignmentLib.inference import predict
    from RegistrationMisalignmentLib.landmarks import sample_labelmap

    points = case.landmarks.points_lps
    rows: list[ProtocolRow] = []
    registrations = runner.run_settings(case.fixed, case.moving, options.settings)
    seconds = {"registration": {s: r.seconds for s, r in registrations.items()},
               "methods": {m.name: {} for m in models} | {ELASTIX_T: {}, ALL_CORRECT: {}}}
    for setting in options.settings:
        registration = registrations[setting]
        tre = case.truth.residual_mm(points, registration.map_points)
        true = _classes(tre)
        log(f"{case.name} {setting}: elastix {registration.seconds:.1f} s, mean residual {tre.mean():.2f} mm, "
            f"classes {np.bincount(true, minlength=3).tolist()}")
        for model in models:
            prediction = predict(case.fixed, registration.deformed, model, device=device, tile_size=options.tile_size)
            predicted = labelmap_values_to_classes(sample_labelmap(prediction.labelmap, points))
            seconds["methods"][model.name][setting] = prediction.seconds
            rows += _rows(case, setting, model.name, tre, true, predicted)
            if overlay.data is None and (model.name, setting) == (overlay.model, overlay.setting):
                overlay.data = {"fixed": case.fixed, "labelmap": prediction.labelmap, "points": points,
                                "agree": predicted == true,
                                "caption": f"{model.name} on {case.name}, setting {setting}: landmarks where "
                                           "prediction and truth agree (cyan) or not (magenta), +-3 slices"}
        again = runner.register(case.fixed, registration.deformed, ELASTIX_T_FILE)
        found = np.linalg.norm(again.map_points(points) - points, axis=1)
        seconds["methods"][ELASTIX_T][setting] = again.seconds
        rows += _rows(case, setting, ELASTIX_T, tre, true, _classes(found))
        seconds["methods"][ALL_CORRECT][setting] = 0.0
        rows += _rows(case, setting, ALL_CORRECT, tre, true, np.zeros_like(true))
    return rows, seconds


def _environment(device) -> dict:
    import torch

    from RegistrationMisalignmentLib.inference import network_precision

    try:
        from importlib.metadata import version

        elastix = version("itk-elastix")
    except Exception:  # noqa: BLE001 - the report says unknown rather than failing after hours of work
        elastix = "unknown"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "itk_elastix": elastix, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "network_precision": network_precision(device)}


def _tiny_changes(synthetic: bool) -> list[str]:
    """What --tiny shrinks, in words for the report."""
    size = " x ".join(f"{v:g}" for v in TINY_SIZE_MM)
    return ([f"synthetic images {size} mm (x, y, z; phantom of that size, or a box of the held-out chest CT at the "
             "centre of its right lung)"] if synthetic else []) + [TINY_CHANGES]


def study_fingerprint(options: BenchmarkOptions, models: list, device) -> dict:
    """What must not change between a study and its resumed part: data, settings, models, device kind."""
    return {"study": options.study, "source": options.source, "landmarks": options.landmarks,
            "settings": list(options.settings), "tiny": options.tiny, "device": device.type,
            "models": {m.name: m.card.get("sha256") for m in models}}


def finished_part(out: Path, fingerprint: dict, resume: bool) -> tuple[list[dict], list[ProtocolRow], dict]:
    """The cases, rows and overlay figure an earlier run of this study left in ``out`` (``--resume``).

    Without ``resume`` an unfinished study there is refused rather than overwritten: it may hold hours
    of work. A finished one is overwritten, as any output file is.
    """
    path = out / "report.json"
    if not path.is_file():
        return [], [], {}
    earlier = json.loads(path.read_text(encoding="utf-8"))
    done = f"{len(earlier.get('cases', []))} of {earlier.get('cases_planned', '?')} cases"
    if not resume:
        if earlier.get("complete", True):
            return [], [], {}
        raise InputError(f"{out} holds an unfinished study ({done}, `{earlier.get('command')}`); add --resume to "
                         "continue it, or choose another --out")
    differs = sorted(k for k in fingerprint if earlier.get("fingerprint", {}).get(k) != fingerprint[k])
    if differs:
        raise InputError(f"cannot resume {out}: its study differs in {', '.join(differs)} "
                         f"(`{earlier.get('command')}`); run it again without --resume into another --out")
    names = [c["name"] for c in earlier["cases"]]
    rows = [r for r in read_rows(out / CSV_NAME) if r.case in names]
    figures = {k: v for k, v in earlier.get("figures", {}).items() if k in ("overlay", "overlay_caption")}
    return earlier["cases"], rows, figures


def _report_header(options: BenchmarkOptions, models: list, device, fingerprint: dict, cases: list[dict],
                   planned: int) -> dict:
    """Everything of report.json except the scores, which ``write_report`` computes from the rows."""
    methods = {m.name: {"kind": m.decoder, "file": m.path.name, "sha256": m.card.get("sha256")} for m in models}
    methods[ELASTIX_T] = {"kind": ELASTIX_T, "file": ELASTIX_T_FILE, "sha256": None}
    methods[ALL_CORRECT] = {"kind": ALL_CORRECT, "file": None, "sha256": None}
    runtime = {"total_s": sum(c["seconds"]["total"] for c in cases), "methods": {
        m: {"total_s": sum(sum(c["seconds"]["methods"][m].values()) for c in cases),
            "per_case_mean_s": float(np.mean([sum(c["seconds"]["methods"][m].values()) for c in cases]))}
        for m in methods}}
    synthetic = options.study in SYNTHETIC_STUDIES
    return {
        "format": "regmis-benchmark/1",
        "command": options.command(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "study": options.study,
        **({"held_out_scan": SHARED_CHEST.name} if options.study == "chest-ct" else {}),
        "complete": len(cases) == planned,
        "cases_planned": planned,
        "fingerprint": fingerprint,
        "tiny": options.tiny,
        "tiny_changes": _tiny_changes(synthetic) if options.tiny else [],
        "settings": list(options.settings),
        "elastix": {"directory": ELASTIX_DIR.relative_to(ELASTIX_DIR.parents[1]).as_posix(),
                    "files": {s: setting_files(s) for s in options.settings}, "elastix_t": ELASTIX_T_FILE},
        "truth_definition": TRUTH_DEFINITION["synthetic" if synthetic else "landmarks"],
        "methods": methods,
        "cases": cases,
        "environment": _environment(device),
        "runtime": runtime,
    }


def run_benchmark(options: BenchmarkOptions, log: Callable[[str], None] = print) -> dict:
    """Run the study and write report.md, report.json, landmarks.csv and the PNGs under ``options.out``.

    The report is rewritten after every case, so an unfinished study can be read (it says so) and
    continued with ``resume``; its runtime is the sum of the cases' times over all runs.
    """
    import torch

    from RegistrationMisalignmentLib.inference import resolve_device

    device = resolve_device(options.device)
    planned, iterator = iter_cases(options)  # checks the data before the slow imports
    models = load_models(options.models_dir)
    out = Path(options.out)
    fingerprint = study_fingerprint(options, models, device)
    cases, rows, kept_figures = finished_part(out, fingerprint, options.resume)
    if len(cases) > planned:
        raise InputError(f"{out} already holds {len(cases)} finished cases, more than the {planned} asked for; "
                         "resume with at least as many --cases, or choose another --out")
    if cases:
        log(f"resuming {out}: {len(cases)} of {planned} cases done, read back from {out / CSV_NAME}")
    if options.threads:
        torch.set_num_threads(options.threads)
    runner = ElastixRunner(tiny=options.tiny, threads=options.threads)
    lstm = next((m.name for m in models if m.decoder == "lstm"), models[0].name)
    overlay = _Overlay(lstm, options.settings[-1])
    def write(overlay_data: dict | None) -> dict:
        header = _report_header(options, models, device, fingerprint, cases, planned)
        return write_report(out, rows, {**header, "figures": kept_figures}, overlay_data)

    report: dict | None = None
    for index in range(planned):
        t0 = time.perf_counter()
        case = next(iterator)
        if index < len(cases):
            if case.name != cases[index]["name"]:
                raise InputError(f"cannot resume {out}: its case {index + 1} is {cases[index]['name']}, the data now "
                                 f"give {case.name}; run again without --resume into another --out")
            continue
        built = time.perf_counter() - t0
        log(f"case {index + 1}/{planned}: {case.name} ({case.description})")
        case_rows, seconds = run_case(case, options, runner, models, device, overlay, log)
        rows += case_rows
        seconds = {"build": built, **seconds, "total": time.perf_counter() - t0}
        cases.append({"name": case.name, "description": case.description, "size": list(case.fixed.GetSize()),
                      "spacing": list(case.fixed.GetSpacing()), "landmarks": len(case.landmarks), "seconds": seconds})
        report = write(overlay.data)
    if report is None:  # every case was already done: refresh the report (e.g. a lost report.md)
        report = write(None)
    log(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'landmarks.csv'} and the figures")
    return report


__all__ = ["BenchmarkOptions", "STUDIES", "ELASTIX_T", "ALL_CORRECT", "run_benchmark", "run_case", "iter_cases",
           "load_models", "study_fingerprint", "finished_part"]
