"""Weight interpolation between two misalignment models ("model soup"), written as model files to be judged.

    python benchmarks/model_soup.py --ends runs/cand_e491/regmis_lstm_631.pt \
        benchmarks/results/training/canonical/checkpoint/misalignment.pt --alphas 0.25 0.5 0.75 --out runs/soup
    python benchmarks/judge_group_confusion.py --models runs/soup/*.pt --out ...

Why: from the shipped epoch 255, the canonical run's training mix steers which registrations the model serves
(judge_probe_setting_groups.md, canonical.toml's bank_weights): mostly affine pairs (491) rose on the judge's affine
blocks and lost on its B-spline ones, B-spline pairs alone (540) the reverse, and no epoch beat the shipped model
on both. Fine-tuned from one start at a small learning rate, both ends lie in one basin, where the average of
their weights often keeps the gains of each (Wortsman et al., "Model soups", ICML 2022, section 3). Each mixture
``(1 - alpha) * first + alpha * second`` is written as an exported model (TorchScript + card), so that the judge
scripts and the protocol (``regmis benchmark --models-dir``; ``compare_protocols.py --method NAME_soupALPHA``)
score it as they score any candidate.

An end is an exported model file (.pt with its card beside it) or a training checkpoint's ``misalignment.pt``
(its running average of the weights, which the run validates and exports); the first exported end lends its card.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RegistrationMisalignmentLib.networks.model import MisalignmentNet  # noqa: E402
from RegistrationMisalignmentLib.weights import LoadedModel, load_model, save_model  # noqa: E402

CARD_KEPT = ("decoder", "split", "architecture", "thresholds_mm", "input_spacing_mm", "normalisation", "config")
"""What a mixture's card takes from the end that lends it (the network and its input); its name (the protocol's
method name) says it is a soup, training and metrics are its own."""


def end_weights(path: Path) -> tuple[str, dict[str, torch.Tensor], LoadedModel | None]:
    """(label, state dict, the loaded model or None) of an exported model or of a checkpoint's running average."""
    if path.with_suffix(".json").exists():
        model = load_model(path, device="cpu")
        return f"{path} ({model.card['sha256'][:12]})", model.module.state_dict(), model
    payload = torch.load(path, map_location="cpu", weights_only=True)
    kind = "average" if payload.get("average") else "weights"
    return f"{path} epoch {payload['epoch']} ({kind})", payload.get("average") or payload["model"], None


def mix(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], alpha: float,
        keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * first + alpha * second`` of the network's state ``keys`` (a scripted model also holds its
    non-persistent buffers); integer buffers (batch norm's step count) are not averaged: the first's below alpha
    0.5, the second's from it. Raises ValueError where an end lacks one of ``keys`` or holds it in another shape
    (another network configuration)."""
    keys = list(keys)
    missing = [k for k in keys if k not in first or k not in second]
    if missing:
        raise ValueError(f"the two ends are not the same network: {missing[:5]} missing")
    reshaped = [k for k in keys if first[k].shape != second[k].shape]
    if reshaped:
        raise ValueError(f"the two ends are not the same network: {reshaped[:5]} differ in shape")
    return {k: torch.lerp(first[k].float(), second[k].float(), alpha) if first[k].is_floating_point()
            else (first[k] if alpha < 0.5 else second[k]) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ends", nargs=2, type=Path, required=True, help="the two models (alpha 0 and 1)")
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--out", type=Path, required=True, help="folder for soup_<alpha>.pt and .json")
    args = parser.parse_args(argv)
    ends = [end_weights(p) for p in args.ends]
    lender = next((loaded for _, _, loaded in ends if loaded is not None), None)
    if lender is None:
        parser.error("give at least one exported model (.pt with its .json card) as an end: it lends the card")
    network = MisalignmentNet(lender.decoder, lender.config).eval()
    for alpha in args.alphas:
        network.load_state_dict(mix(ends[0][1], ends[1][1], alpha, network.state_dict().keys()))
        card = {k: lender.card[k] for k in CARD_KEPT if k in lender.card} | {"name": f"{lender.name}_soup{alpha:g}",
            "description": f"model soup: (1 - {alpha:g}) x {ends[0][0]} + {alpha:g} x {ends[1][0]}",
            "training": {"soup": {"alpha": alpha, "first": ends[0][0], "second": ends[1][0]}}, "metrics": {}}
        path = save_model(network, card, args.out / f"soup_{alpha:g}.pt")
        print(f"alpha {alpha:g}: {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
