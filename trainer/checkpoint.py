"""A compact, resumable checkpoint: one folder, one file per stage, small enough to commit.

Layout: ``state.json`` (the stage and epoch reached, seconds per stage), ``<stage>.pt`` per stage
(its weights in float32, their running average when the run keeps one (``ema_decay``), and Adam's state
with both moments in bfloat16) and, where the run selects its model by validation (``select_by``),
``<stage>.best.pt``: the best-validated weights so far, rewritten only when they change. A finished stage's
file never changes again, so a git history of a growing run stores each finished stage once; only the
current stage's file (~8 bytes per parameter, 12 with the average: 16 MB for the LSTM model; stage 2's DVF heads,
``dvf_loss_weight``, add 8 MB) changes from
one commit to the next.

Bit-for-bit resume: at every save the live optimiser's moments are rounded to bfloat16 in place, so the
process that goes on training and a process that resumes from the files hold identical numbers.
Everything else a run draws comes from (seed, stage, epoch) and needs no saved state.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from RegistrationMisalignmentLib.errors import InputError

MOMENTS = ("exp_avg", "exp_avg_sq")
BEST_SUFFIX = ".best.pt"
"""``<stage>.best.pt``: the stage's best-validated weights (``TrainConfig.select_by``)."""


def round_moments(optimizer_state: dict) -> dict:
    """Adam's state with its moments rounded to bfloat16, in place on the live tensors; returns the
    compact copy to save (moments stored as bfloat16)."""
    compact = {"state": {}, "param_groups": optimizer_state["param_groups"]}
    for key, entry in optimizer_state["state"].items():
        saved = dict(entry)
        for name in MOMENTS:
            if name in entry:
                rounded = entry[name].to(torch.bfloat16)
                entry[name].copy_(rounded)
                saved[name] = rounded.cpu()
        compact["state"][key] = saved
    return compact


def expand_moments(optimizer_state: dict) -> dict:
    """The optimiser state as ``Optimizer.load_state_dict`` wants it (moments back in float32)."""
    state = {key: {name: (value.float() if name in MOMENTS else value) for name, value in entry.items()}
             for key, entry in optimizer_state["state"].items()}
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


def save(folder: Path, stage: str, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         seconds: dict[str, float], finished: dict[str, dict] | None = None,
         average: torch.nn.Module | None = None, best: dict | None = None,
         dvf_heads: torch.nn.Module | None = None) -> None:
    """Write ``stage``'s file and then ``state.json`` (each atomically: a stopped run leaves the last
    complete checkpoint). ``finished`` stages (weights only, e.g. RegNets reused from another run) are
    written once, when their file is missing; ``average``: the weights' running average (float32);
    ``best``: the stage's best-validated weights on the CPU (``{"epoch", "metric", "value", "judge", "blocks",
    "since", "weights"}``), written when its epoch is this one; None removes the stage's earlier ones (a
    selection that holds no epoch yet, e.g. none beats the shipped model on new blocks); ``dvf_heads``: stage 2's
    auxiliary DVF heads (``trainer.dvf_heads``), trained beside the model (its optimiser's second group); ``rewind``
    keeps them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, weights in (finished or {}).items():
        if not (folder / f"{name}.pt").exists():
            torch.save({"epoch": None, "model": weights, "optimizer": None}, folder / f"{name}.pt")
    if best is not None and best["epoch"] == epoch:  # first, so that state.json never names an epoch it lacks
        _save_atomic(best, folder / f"{stage}{BEST_SUFFIX}")
    elif best is None:
        (folder / f"{stage}{BEST_SUFFIX}").unlink(missing_ok=True)
    payload = {"epoch": epoch, "model": _cpu_copy(model), "optimizer": round_moments(optimizer.state_dict()),
               "average": None if average is None else _cpu_copy(average),
               "dvf_heads": None if dvf_heads is None else _cpu_copy(dvf_heads)}
    _save_atomic(payload, folder / f"{stage}.pt")
    _write_state(folder, stage, epoch, seconds)


def _save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights and buffers, copied to the CPU (the live tensors go on training)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _write_state(folder: Path, stage: str, epoch: int, seconds: dict[str, float]) -> None:
    state = folder / "state.json.tmp"
    state.write_text(json.dumps({"stage": stage, "epoch": epoch, "seconds": seconds}, indent=2) + "\n", encoding="utf-8")
    state.replace(folder / "state.json")


def load(folder: Path) -> dict:
    """``{"stage", "epoch", "seconds", "models": {stage: weights}, "averages": {stage: weights}, "bests":
    {stage: best}, "optimizer", "dvf_heads"}``: the optimiser state is that of the last stage (float32 moments), as
    are the DVF heads (None where it kept none), the models
    every stage saved, the averages those a stage kept, the best-validated weights of a stage that selects
    (as ``save`` takes them)."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if not (folder / f"{state['stage']}.pt").exists():
        raise RuntimeError(f"{folder}: state.json is at {state['stage']} but {state['stage']}.pt is missing (a "
                           f"--drop-stage cut short?): run regmis-train --drop-stage {state['stage']} again")
    models, averages, bests, optimizer, dvf_heads = {}, {}, {}, None, None
    for path in sorted(folder.glob(f"*{BEST_SUFFIX}")):
        best = torch.load(path, map_location="cpu", weights_only=True)
        stage = path.name.removesuffix(BEST_SUFFIX)
        if not (stage == state["stage"] and best["epoch"] > state["epoch"]):  # written by an epoch that did not finish
            bests[stage] = best
    for path in sorted(p for p in folder.glob("*.pt") if not p.name.endswith(BEST_SUFFIX)):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        models[path.stem] = payload["model"]
        if payload.get("average") is not None:  # files of runs before ema_decay have none
            averages[path.stem] = payload["average"]
        if path.stem == state["stage"]:
            if payload["epoch"] != state["epoch"]:
                raise RuntimeError(f"{path} holds epoch {payload['epoch']} but state.json says {state['epoch']}")
            optimizer = expand_moments(payload["optimizer"])
            dvf_heads = payload.get("dvf_heads")
    return {**state, "models": models, "averages": averages, "bests": bests, "optimizer": optimizer,
            "dvf_heads": dvf_heads}


def drop_stage(folder: Path, stage: str, stages: tuple[str, ...]) -> int:
    """Forget ``stage`` (the last one begun) so that the next resume begins it again; returns the epoch it
    had reached. Its file goes first, then the state returns to the end of the stage before it, whose
    file still holds its last epoch and optimiser (a drop cut short between the two is finished by
    running it again). Its seconds stay in the state, so the model card counts them. For a stage that
    began worse than a better start (e.g. ``regnet_init``) would; stop the run first."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["stage"] != stage:
        raise InputError(f"{folder} is at {state['stage']}: only the last stage begun ({state['stage']}) can be dropped")
    index = stages.index(stage)
    if index == 0:
        raise InputError(f"{stage} is the first stage: start a new run instead")
    before = stages[index - 1]
    epoch = torch.load(folder / f"{before}.pt", map_location="cpu", weights_only=True)["epoch"]
    if epoch is None:
        raise InputError(f"{before} was reused from another run (--pretrained): start that run's next stage anew instead")
    (folder / f"{stage}{BEST_SUFFIX}").unlink(missing_ok=True)  # the dropped attempt's best goes with it
    (folder / f"{stage}.pt").unlink(missing_ok=True)
    _write_state(folder, before, epoch, state["seconds"])
    return state["epoch"]


def rewind(folder: Path, stage: str, weights: dict[str, torch.Tensor]) -> int:
    """Set the weights (and their running average) of ``stage``, the last stage begun, to ``weights`` and
    clear Adam's moments, so that ``--resume`` goes on training from them; returns the epoch reached, which
    the count goes on from. For a stage whose later epochs drifted from an earlier, better model of the run
    (its export). Its best-validated weights and its history stay. Stop the run first.

    Raises InputError when ``stage`` is not the last stage begun or ``weights`` miss or mis-shape one of
    its tensors."""
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    if state["stage"] != stage:
        raise InputError(f"{folder} is at {state['stage']}: only the last stage begun ({state['stage']}) can be rewound")
    path = folder / f"{stage}.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True)
    wrong = [k for k, v in payload["model"].items() if k not in weights or weights[k].shape != v.shape]
    if wrong:
        raise InputError(f"the weights to rewind {stage} to do not fit its model ({len(wrong)} of "
                         f"{len(payload['model'])} tensors missing or of another shape, e.g. {wrong[0]}): give an "
                         "export of this run's stage (same decoder and split)")
    start = {k: weights[k].detach().to(v.dtype).clone() for k, v in payload["model"].items()}
    payload["model"] = start
    if payload.get("average") is not None:
        payload["average"] = {k: v.clone() for k, v in start.items()}
    payload["optimizer"] = {"state": {}, "param_groups": payload["optimizer"]["param_groups"]}
    _save_atomic(payload, path)
    return state["epoch"]


def clear(folder: Path) -> None:
    """Remove a checkpoint's files (a run started afresh in its folder), ``state.json`` first."""
    (folder / "state.json").unlink(missing_ok=True)
    for path in folder.glob("*.pt*"):
        path.unlink()


def exists(folder: Path) -> bool:
    return (folder / "state.json").is_file()
