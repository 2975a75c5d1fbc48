"""Models on disk: a TorchScript file plus a JSON model card beside it.

The card says what the weights are (decoder, split, configuration, training data, metrics) and
carries the sha256 of the .pt file. Loading refuses a file whose hash or card does not match, with a
message that says which, so a half-copied or swapped file never silently predicts. Nothing is ever
downloaded: models are files shipped in ``Resources/Models`` or given by path.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from RegistrationMisalignmentLib.config import MisalignmentConfig
from RegistrationMisalignmentLib.errors import InputError

CARD_FORMAT = "regmis-model/1"
KINDS = ("lstm", "multiscale", "singlescale", "regnet-t")
DEFAULT_MODEL_NAME = "regmis_lstm_631"
MODEL_DIR_ENV = "REGMIS_MODEL_DIR"


@dataclass
class LoadedModel:
    """A verified TorchScript module with its card and the configuration it was trained with."""

    module: torch.jit.ScriptModule
    card: dict
    config: MisalignmentConfig
    path: Path

    @property
    def decoder(self) -> str:
        return self.card["decoder"]

    @property
    def name(self) -> str:
        return self.card["name"]


def models_dir() -> Path:
    """Where shipped models live: $REGMIS_MODEL_DIR, else ``Resources/Models`` of this checkout."""
    env = os.environ.get(MODEL_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "Models"


def available_models(directory: Path | None = None) -> list[Path]:
    """Model files (.pt with a .json card beside them) in ``directory`` (default: ``models_dir()``)."""
    directory = directory or models_dir()
    return sorted(p for p in directory.glob("*.pt") if p.with_suffix(".json").exists())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model(module: torch.nn.Module, card: dict, path: str | os.PathLike) -> Path:
    """Script ``module`` (eval mode, CPU) to ``path`` (.pt) and write its card (.json) beside it.

    ``card`` must hold at least name, decoder and config; format, sha256, size and date are added.
    """
    path = Path(path).with_suffix(".pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    missing = {"name", "decoder", "config"} - card.keys()
    if missing:
        raise ValueError(f"model card lacks {sorted(missing)}")
    if card["decoder"] not in KINDS:
        raise ValueError(f"decoder {card['decoder']!r} is not one of {KINDS}")
    scripted = torch.jit.script(module.cpu().eval())
    scripted.save(str(path))
    full = {"format": CARD_FORMAT, **card, "sha256": sha256_of(path), "size_bytes": path.stat().st_size,
            "created": card.get("created") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.with_suffix(".json").write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    return path


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A .pt path from a .pt/.json path, a model name in ``models_dir()``, or None (the default)."""
    if path is None:
        candidate = models_dir() / f"{DEFAULT_MODEL_NAME}.pt"
        if not candidate.exists():
            raise InputError(f"the default model {candidate} is missing; pass --model PATH to a .pt model file "
                             f"or set {MODEL_DIR_ENV} to a folder holding {DEFAULT_MODEL_NAME}.pt")
        return candidate
    p = Path(path)
    if p.suffix == ".json":
        p = p.with_suffix(".pt")
    if not p.suffix and not p.exists():
        p = models_dir() / f"{p.name}.pt"
    if not p.exists():
        names = ", ".join(m.stem for m in available_models()) or "none"
        raise InputError(f"model {path} not found (shipped models: {names})")
    return p


def load_model(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Load and verify a model; ``None`` loads the shipped default (LSTM 6-3-1)."""
    pt = resolve_model_path(path)
    card_path = pt.with_suffix(".json")
    if not card_path.exists():
        raise InputError(f"model {pt} has no model card {card_path.name} beside it; a model is the .pt plus its .json")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"model card {card_path} is not readable JSON ({exc})") from None
    if card.get("format") != CARD_FORMAT:
        raise InputError(f"model card {card_path} has format {card.get('format')!r}, expected {CARD_FORMAT!r}")
    if card.get("decoder") not in KINDS:
        raise InputError(f"model card {card_path} names decoder {card.get('decoder')!r}, expected one of {KINDS}")
    actual = sha256_of(pt)
    if actual != card.get("sha256"):
        raise InputError(f"model {pt} does not match its card: sha256 {actual[:12]}... but the card says "
                         f"{str(card.get('sha256'))[:12]}...; the file is damaged or belongs to another card")
    try:
        config = MisalignmentConfig.from_dict(card["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"model card {card_path} holds an invalid configuration ({exc})") from None
    try:
        module = torch.jit.load(str(pt), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError or pickle errors for corrupt archives
        raise InputError(f"model {pt} is not a readable TorchScript file ({type(exc).__name__}: {exc})") from None
    return LoadedModel(module=module, card=card, config=config, path=pt)
