"""Write trained networks as shipped models: TorchScript + model card, and the training curves."""

from __future__ import annotations

import datetime
from pathlib import Path

import torch

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.networks.model import MisalignmentNet, RegNetT
from RegistrationMisalignmentLib.networks.regnet import RegNet
from RegistrationMisalignmentLib.preprocess import block_geometry
from RegistrationMisalignmentLib.weights import load_model, save_model
from trainer.history import read_events, read_history, rewind_label

ARCHITECTURE = {
    "lstm": "3 RegNet Uadv encoders (x4, x2, x1; 101^3 -> 25^3 features) + hierarchical conv-LSTM decoder",
    "multiscale": "3 RegNet Uadv encoders (x4, x2, x1) + multi-scale CNN decoder",
    "singlescale": "RegNet Uadv encoder (x1) + single-scale CNN decoder",
    "regnet-t": "3 RegNet Uadv registration networks used as a 3-level registration, |DVF| thresholded",
}


def _card(name: str, decoder: str, config: MisalignmentConfig, training: dict, metrics: dict, description: str) -> dict:
    return {
        "name": name,
        "decoder": decoder,
        "split": config.split,
        "description": description,
        "architecture": ARCHITECTURE[decoder],
        "thresholds_mm": list(config.thresholds_mm),
        "input_spacing_mm": config.spacing_mm,
        "normalisation": {"hu_window": list(config.hu_window), "maps_to": [-1.0, 1.0]},
        "config": config.to_dict(),
        "training": training,
        "metrics": metrics,
    }


def export_misalignment(model: MisalignmentNet, config: MisalignmentConfig, path: str | Path, training: dict,
                        metrics: dict, description: str = "") -> Path:
    name = Path(path).with_suffix("").name
    card = _card(name, model.decoder_name, config, training, metrics,
                 description or f"Misalignment classifier, {model.decoder_name} decoder, split {config.split}")
    return save_model(model, card, path)


def export_regnet_t(regnets: dict[int, RegNet], config: MisalignmentConfig, path: str | Path, training: dict,
                    metrics: dict) -> Path:
    baseline = RegNetT(config)
    for s, regnet in regnets.items():
        getattr(baseline, f"regnet{s}").load_state_dict(regnet.state_dict())
    name = Path(path).with_suffix("").name
    card = _card(name, "regnet-t", config, training, metrics,
                 "RegNet-t baseline: the pre-trained registration networks as a 3-level registration, "
                 "|DVF| classed at 3 and 6 mm (no misalignment training)")
    return save_model(baseline, card, path)


def rescript(path: str | Path, reason: str) -> Path:
    """Save a shipped model again with the current network code and the same weights.

    TorchScript files carry the code they were scripted from; an optimisation of the code reaches a
    trained model only through this. Refuses unless the new module's probabilities equal the old
    one's on a random block (max difference <= 1e-5); the card keeps its training record and metrics
    and gains a ``rescripted`` entry saying when and why.
    """
    old = load_model(path)
    if old.decoder == "regnet-t":
        module: torch.nn.Module = RegNetT(old.config)
    else:
        module = MisalignmentNet(old.decoder, old.config)
    expected = module.state_dict().keys()
    module.load_state_dict({k: v for k, v in old.module.state_dict().items() if k in expected})
    module.eval()
    if old.decoder != "regnet-t":
        geometry = block_geometry((0, 0, 0), (16, 16, 16), old.config)
        generator = torch.Generator().manual_seed(0)
        x = {s: torch.rand((1, 2, *geometry[s][1]), generator=generator) * 2 - 1 for s in old.config.scales}
        with torch.inference_mode():
            difference = (old.module.probabilities(x[1], x[2], x[4]) - module.probabilities(x[1], x[2], x[4])).abs().max()
        if float(difference) > 1e-5:
            raise RuntimeError(f"rescripted {old.name} differs from the saved model by {float(difference):.3g}; not saved")
    card = {k: v for k, v in old.card.items() if k not in ("format", "sha256", "size_bytes")}
    card["rescripted"] = card.get("rescripted", []) + [
        {"date": datetime.date.today().isoformat(), "from_sha256": old.card["sha256"], "reason": reason}]
    return save_model(module, card, old.path)


def plot_curves(history_path: Path, png_path: Path) -> Path:
    """Loss and validation curves of every stage from the JSON-lines history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_history(history_path)
    rewinds = [e for e in read_events(history_path) if e["event"] == "rewind"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for stage in dict.fromkeys(r["attempt"] for r in rows):
        rs = [r for r in rows if r["attempt"] == stage]
        epochs = [r["epoch"] for r in rs]
        line = axes[0].plot(epochs, [r["train_loss"] for r in rs], marker="o", ms=3, label=stage)[0]
        if "val_endpoint_error_mm" in rs[0]:
            axes[1].plot(epochs, [r["val_endpoint_error_mm"] for r in rs], marker="o", ms=3, color=line.get_color(),
                         label=f"{stage} EPE")
            axes[1].plot(epochs, [r["val_target_magnitude_mm"] for r in rs], ls="--", color=line.get_color(),
                         label=f"{stage} zero predictor")
        if "val_mean_f1" in rs[0]:
            axes[2].plot(epochs, [100 * r["val_mean_f1"] for r in rs], marker="o", ms=3, label=f"{stage} mean F1")
            kappa = axes[2].plot(epochs, [100 * r["val_kappa"] for r in rs], marker="s", ms=3, label=f"{stage} kappa")[0]
            live = [(r["epoch"], 100 * r["val_live_kappa"]) for r in rs if "val_live_kappa" in r]
            if live:  # with ema_decay the kappa above is the average's; the last step's own, faint
                axes[2].plot(*zip(*live), lw=0.8, alpha=0.5, color=kappa.get_color(), label=f"{stage} kappa, last step")
            for before, row in zip(rs, rs[1:]):  # numbers on either side of a change of judge do not compare
                if row.get("val_blocks") != before.get("val_blocks"):
                    axes[2].axvline(row["epoch"] - 0.5, color="grey", lw=0.8, ls=":")
                    axes[2].text(row["epoch"] - 0.5, 1, f" {row['val_blocks']} blocks", rotation=90, fontsize=7,
                                 color="grey", va="bottom")
            for event in rewinds:  # the weights went back to an earlier model here
                if event["stage"] == stage:
                    axes[2].axvline(event["epoch"] + 0.5, color="black", lw=0.8, ls="--")
                    axes[2].text(event["epoch"] + 0.5, 1, f" set back to {rewind_label(event)}", rotation=90, fontsize=7,
                                 va="bottom")
            shipped = [(r["epoch"], 100 * r["val_shipped_kappa"]) for r in rs if "val_shipped_kappa" in r]
            if shipped:  # rows before the reference was measured have none
                axes[2].plot(*zip(*shipped), ls="--", color=kappa.get_color(), label="shipped model's kappa")
    axes[0].set(xlabel="epoch of the stage", ylabel="training loss", yscale="log", title="training loss per stage")
    axes[1].set(xlabel="epoch of the stage", ylabel="mm", title="stage 1: validation end-point error")
    axes[2].set(xlabel="epoch of the stage", ylabel="%", title="stage 2: validation (held-out pairs)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
