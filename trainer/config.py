"""Everything a training run can be told, in one dataclass (TOML file + command-line overrides)."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from RegistrationMisalignmentLib.benchmark.elastix import SETTINGS as ELASTIX_SETTINGS

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REGNET_INITS = ("fresh", "coarser")
MISALIGNMENT_INITS = ("encoders", "shipped")
SELECT_BY = ("", "val_kappa", "val_mean_f1", "val_kappa_over_shipped", "val_kappa_over_shipped_keeping_wrong",
             "val_kappa_over_shipped_per_setting_group")
"""Stage-2 validation numbers a run may select its exported model by (higher is better; "": the last epoch).
``val_kappa_over_shipped`` is the ship rule on the held-out blocks: the highest kappa among the epochs that
beat the shipped model on the same blocks on all three counts (kappa and mean F1 higher, fewer correct<->wrong
voxels). ``val_kappa_over_shipped_keeping_wrong`` adds a fourth: F1 of the wrong class no lower than the shipped
model's. ``val_kappa_over_shipped_per_setting_group``: the three counts on all blocks and on the blocks of each kind
of registration apart (affine, B-spline: ``SETTING_GROUPS``; needs ``val_registrations`` of both kinds); it stands in for the F1-wrong count, a proxy for the B-spline blocks' loss."""
CENTRE_SAMPLING = ("uniform", "class")
"""The block placements of ``trainer.dataset.BlockSampler`` (kept here so that the config needs no torch)."""
BANK_REGIONS = ("body", "lungs")
"""Where a registration bank pair is supervised (``trainer.registration_bank``)."""
SETTING_GROUPS = ("affine", "bspline")
"""The judge's blocks scored apart by the kind of registration that left them (``setting_group``; kept here so
that the config needs no torch): after affine a large smooth motion is left, after B-spline small local
residuals, and a model can gain on one while losing on the other (the canonical run's epochs 452, 467 and 491 on
the protocol: mean F1 up to +1.4 after affine, down to -8.3 after B-spline 2000, against the shipped model)."""


def setting_group(setting: str) -> str:
    """The ``SETTING_GROUPS`` member an elastix setting (``benchmark.elastix.SETTINGS``) belongs to; "" for none
    (a synthetic pair)."""
    return next((group for group in SETTING_GROUPS if setting.startswith(group)), "")


@dataclass
class TrainConfig:
    """Defaults are the paper's where it gives one (Adam, lr 1e-3, batch 10, 30 epochs)."""

    data: str | None = None
    """Folder or list file of CT images; None uses phantoms only."""
    phantoms: int = 0
    """Procedural chest phantoms added to the training images (variety, not a replacement)."""
    phantom_size_mm: tuple[float, float, float] = (160.0, 128.0, 128.0)
    holdout_fraction: float = 0.25
    """Of every real image, the caudal slab of this fraction of slices is kept for validation only
    (used when ``holdout`` names no scan)."""
    holdout: tuple[str, ...] = ()
    """File names of whole scans kept out of training, for validation only (then no slab is cut)."""
    block_input: int = 101
    """Side (1 mm voxels) of the x1 input block of one training sample, 101 + 4k: the misalignment model
    is supervised on every body voxel of its block_input - 82 labels per side (19 for the paper's 101^3
    patch, 59 for 141^3), a RegNet on block_input - 80 DVF voxels."""
    out: str = "runs/regmis"
    name: str = "regmis_lstm_631"
    decoder: str = "lstm"
    split: str = "6-3-1"
    seed: int = 0

    batch_size: int = 10
    accumulate: int = 1
    """Forward passes of ``batch_size`` blocks whose gradients are summed before each optimiser step: a larger
    batch for the step without the memory of one (batch norm still sees ``batch_size`` blocks at a time)."""
    lr: float = 1e-3
    lr_schedule: tuple[tuple[int, float], ...] = ()
    """(first epoch, rate) pairs: from that 1-based epoch of a stage on, Adam's rate is ``rate``.
    Epochs are counted per stage, so a schedule past ``regnet_epochs`` only touches stage 2."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights, updated after every optimiser step with this decay
    (0: none; 0.95 averages about the last 20 steps), and validate, hand on and export the average instead of
    the last step's weights: one block's class mix moves a small-batch model's decision from step to step
    (stage 2's validation kappa swung 0.04-0.53 epoch to epoch), the average keeps what the steps agree on
    (Polyak & Juditsky 1992; ``torch.optim.swa_utils.AveragedModel``). History rows also give the last
    step's own numbers (``val_live_*``)."""
    freeze_batch_norm: bool = False
    """Stage 2 normalises with the batch-norm running statistics it starts from, in training as in inference,
    and leaves them unchanged (the affine scale and shift still learn). With one block per forward pass the
    running statistics follow the last ~10 training blocks: on the canonical run they carried most of its drift
    over stage 2's epochs 78-96 (those epochs' weights with the best epoch's statistics: kappa 0.558 instead of
    0.412, the best 0.580; ``benchmarks/results/training/bn_drift_probe.md``)."""
    dvf_loss_weight: float = 0.0
    """Stage 2 also regresses each scale's DVF from its encoder's features, through a RegNet DVF head of its own
    (``trainer.dvf_heads``: started from stage 1's heads, trained beside the model, never exported), and adds
    this weight times that Huber loss (mm) to the classification loss; 0: none. The encoders then keep
    registering while they learn to classify: after an affine registration the misalignment is a smooth 3-10 mm
    motion that only features which measure displacement can tell apart, where the classes alone give the
    encoders a weak signal (the canonical run's gap to elastix-t lies there). The heads live in the stage's
    checkpoint: a set-back (``--rewind-to``) keeps them, a resume at 0 drops them (back above 0 they start from
    stage 1's again)."""
    dvf_heads_lr: float = 1e-4
    """Adam's rate for the DVF heads (``lr`` and its schedule are the model's): the heads must follow the encoders'
    features, which stage 2 has moved since stage 1, at a rate a warm-started RegNet learnt at (1e-4,
    ``benchmarks/results/training/regnet_probe_x1_from_x4.md``), whatever rate the model is at."""
    select_by: str = ""
    """Export stage 2's best-validated weights instead of its last ones: after every epoch the weights just
    validated (the running average where the run keeps one) are kept in the checkpoint
    (``misalignment.best.pt``) when this number of theirs is the highest yet on the same held-out blocks (other
    blocks, told by their fingerprint ``val_judge``, or another metric start the count anew). A small-batch run drifts:
    the canonical run's kappa fell from 0.57-0.61 to 0.40-0.48 within 10 epochs, and its last weights were
    all it kept. "" exports the last epoch's weights. Training always goes on from the last weights."""
    regnet_epochs: int = 30
    """Pre-training epochs of each per-scale RegNet (DVF regression)."""
    regnet_init: str = "fresh"
    """How a RegNet stage starts: "fresh" (random weights) or "coarser": from the trained RegNet of the next
    coarser scale (x2 from x4, x1 from x2), its DVF output scaled to the finer level so that a shift of k
    voxels stays k voxels (measured: benchmarks/results/training/regnet_probe_x1_from_x4.md)."""
    epochs: int = 30
    """Epochs of the misalignment model (stage 2)."""
    misalignment_init: str = "encoders"
    """How stage 2 starts: "encoders": the three stage-1 RegNets' encoders and a fresh decoder (the paper), or
    "shipped": every weight of the shipped default model (same decoder and split), to train it further on
    this run's data (measured: benchmarks/results/training/stage2_recipe_*.md)."""
    steps_per_epoch: int = 100
    pool_pairs: int = 8
    """Deformed pairs generated per epoch (the paper: 28 DVFs per image over the run)."""
    pool_on_device: bool = False
    """Generate the training pairs on the training device. On CUDA this takes the DVFs, warps and pyramids
    off the CPU, which otherwise limits a GPU run; CPU runs are unaffected (they resume bit for bit)."""
    time_limit_minutes: float = 0.0
    """Wall-clock budget of this stretch of the run (0: none). Training stops after the first epoch that ends
    past it, whatever the stage; the checkpoint holds that epoch and what is complete is exported (a lent GPU
    comes back with its work). The card records the epochs done."""
    centre_sampling: str = "uniform"
    """How training blocks are placed (``trainer.dataset``): "uniform" body centres with per-voxel class weights
    (60/20/20 of the loss), or "class": the centre's class drawn 60/20/20 as the paper draws its patches, every
    body voxel weighted the same."""
    class_balance: tuple[float, float, float] = (0.6, 0.2, 0.2)
    """Share of the training loss (``"uniform"`` centres) or of the block centres (``"class"``) given to correct /
    poor / wrong: the paper's 60/20/20. Validation blocks keep 60/20/20 whatever this is, so that the judge
    stays the same."""
    registered_share: float = 0.0
    """Share of the training pairs whose moving image is made as a registration leaves it: a large breathing
    motion undone but for the pair's DVF (``synthetic.deform.registered_pair``; voxels it does not show are not
    supervised), so that density change, noise and two interpolations are seen where the truth is small. The
    paper: 0 (its pairs are only ever deformed by their truth). Validation pairs follow ``val_registered_share``,
    so that the judge stays the same."""
    registered_motion_left: float = 0.0
    """The largest share of a registered pair's breathing motion that its registration leaves (drawn per pair from
    0 to this; training pairs, and held-out ones with ``val_registered_share``): after an affine or a loose
    B-spline registration the residual follows the breathing, largest at the lung base, and comes with its
    density change. 0: every registration undoes the motion but for the pair's DVF, so that density change
    never means misalignment."""
    val_registered_share: float = 0.0
    """The same for the held-out pairs: a judge that also sees registered large motions, where density change and
    interpolation mean no misalignment (its fingerprint ``val_judge`` changes with it)."""
    val_registrations: tuple[str, ...] = ()
    """Stage 2's judge: the held-out chest CT moved by a breathing field and registered back by elastix with these
    of the protocol's settings (``benchmark.elastix.SETTINGS``), scored in the lungs against the dense residual
    (``trainer.registration_judge``). Empty: the synthetic held-out pairs (the paper's). Needs itk-elastix and a
    real held-out CT (``holdout``)."""
    bank_registrations: tuple[str, ...] = ()
    """The registration bank (``trainer.registration_bank``): every training chest CT moved by ``bank_cases`` breathing
    fields of its own (exhale and inhale in turn) and registered back by elastix with these settings
    (``benchmark.elastix.SETTINGS``), the truth the dense residual: pairs as a real registration leaves them.
    Built once (1.5-3.5 minutes per case on 2 cores) and kept in OUT/bank/ (not committed)."""
    bank_cases: int = 0
    """Breathing cases per training chest CT in the registration bank."""
    bank_pairs: int = 0
    """Pairs drawn from the registration bank into every epoch's pool, beside its ``pool_pairs`` synthetic ones."""
    bank_weights: tuple[float, ...] = ()
    """Relative chance of each ``bank_registrations`` setting in the epoch's draw from the bank (e.g. [3, 1, 1, 1, 1]:
    affine pairs three times as often as each B-spline one); empty: every pair equally likely."""
    bank_mirror: float = 0.0
    """Chance that a pair drawn from the bank is mirrored left-right: with three training scans, twice the
    anatomies to learn from."""
    bank_zoom: float = 0.0
    """A pair drawn from the bank is scaled as a whole by a factor drawn uniformly from [1 - this, 1 + this]: larger
    and smaller patients than the three training scans, the residual scaled with them
    (``trainer.registration_bank.Augmentation``); 0: none."""
    bank_noise_hu: float = 0.0
    """A pair drawn from the bank gets white Gaussian noise on each image, its sigma drawn uniformly from 0 to this
    (HU): noisier scanners than the training scans'; 0: none."""
    bank_region: str = "body"
    """Where the bank's pairs are supervised: "body" (wherever the registered image shows real anatomy) or
    "lungs" (only there; where the judge and the protocol score, and where the vessels show the residual: 71 %
    of the body's supervised voxels lie outside the lungs, ``benchmarks/results/training/registration_bank.md``)."""
    val_pairs: int = 4
    val_patches: int = 24
    val_centre_sampling: str = "uniform"
    """How the held-out blocks are placed, as ``centre_sampling``. Uniform blocks of a breathing-like DVF may
    hold no "wrong" voxel at all (the canonical run's 6 held no wrong and 12 % poor), so its F1 and kappa
    never see the class users need most; "class" centres put every class in the judge, in the exact
    60/20/20 proportion of blocks (12 random class draws held no wrong one on the canonical run). The validation
    numbers of the run's model and the shipped model's beside them are always on the same blocks. Stage 1
    (the RegNets) is always judged on uniform blocks."""
    device: str = "auto"
    amp: bool = True
    """bf16 autocast on CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX): forward + backward of a
    141^3 block 2.2x faster on this project's 2-core EPYC (benchmarks/results/train_throughput_cpu.md)."""
    num_threads: int = 0
    """CPU threads for torch (0: all cores)."""
    resume: bool = False
    """Continue from OUT/checkpoint/ when it exists (start afresh otherwise)."""
    pretrained: str | None = None
    """Checkpoint of an earlier run whose pre-trained RegNets are reused (stage 1 is skipped), e.g. to
    train a second decoder on the same encoders."""

    def __post_init__(self) -> None:
        if self.time_limit_minutes < 0:
            raise ValueError(f"time_limit_minutes {self.time_limit_minutes}: give 0 (no limit) or a positive budget")
        for entry in self.lr_schedule:
            if len(entry) != 2 or int(entry[0]) < 1 or float(entry[1]) <= 0:
                raise ValueError(f"lr_schedule entry {entry!r}: give [first_epoch >= 1, rate > 0]")
        if self.regnet_init not in REGNET_INITS:
            raise ValueError(f"regnet_init {self.regnet_init!r}: give one of {', '.join(REGNET_INITS)}")
        if self.misalignment_init not in MISALIGNMENT_INITS:
            raise ValueError(f"misalignment_init {self.misalignment_init!r}: give one of {', '.join(MISALIGNMENT_INITS)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay {self.ema_decay}: give 0 (no average) or a decay in (0, 1), e.g. 0.95")
        for name in ("registered_share", "val_registered_share", "registered_motion_left"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} {getattr(self, name)!r}: give a share from 0 to 1")
        if len(self.class_balance) != 3 or min(self.class_balance) <= 0 or abs(sum(self.class_balance) - 1) > 1e-6:
            raise ValueError(f"class_balance {self.class_balance!r}: give three positive shares of correct / poor / wrong "
                             "that add up to 1, e.g. [0.6, 0.2, 0.2]")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by {self.select_by!r}: give one of {', '.join(map(repr, SELECT_BY))}")
        kinds = {setting_group(s) for s in self.val_registrations}
        if self.select_by == "val_kappa_over_shipped_per_setting_group" and not set(SETTING_GROUPS) <= kinds:
            raise ValueError(f"select_by {self.select_by!r} scores the judge's affine and B-spline blocks apart: give "
                             "val_registrations an affine and a B-spline setting, e.g. [\"affine\", \"bspline100\"] "
                             f"(now {list(self.val_registrations)}), or another select_by")
        if self.accumulate < 1:
            raise ValueError(f"accumulate {self.accumulate}: give 1 (a step per batch) or more batches per step")
        for name in ("centre_sampling", "val_centre_sampling"):
            if getattr(self, name) not in CENTRE_SAMPLING:
                raise ValueError(f"{name} {getattr(self, name)!r}: give one of {', '.join(CENTRE_SAMPLING)}")
        for name in ("val_registrations", "bank_registrations"):
            unknown = [s for s in getattr(self, name) if s not in ELASTIX_SETTINGS]
            if unknown:
                raise ValueError(f"{name} {unknown}: give elastix settings among {', '.join(ELASTIX_SETTINGS)}")
        if self.bank_region not in BANK_REGIONS:
            raise ValueError(f"bank_region {self.bank_region!r}: give one of {', '.join(BANK_REGIONS)}")
        if self.bank_pairs < 0 or self.bank_cases < 0:
            raise ValueError(f"bank_pairs {self.bank_pairs}, bank_cases {self.bank_cases}: give counts of 0 or more")
        if self.pool_pairs + self.bank_pairs < 1:
            raise ValueError("pool_pairs 0 and bank_pairs 0 leave an epoch no training pair: give pool_pairs "
                             "(synthetic pairs per epoch) or bank_pairs (registration bank pairs per epoch)")
        if self.bank_weights and (len(self.bank_weights) != len(self.bank_registrations)
                                  or min(self.bank_weights) <= 0):
            raise ValueError(f"bank_weights {list(self.bank_weights)}: give one positive weight per bank_registrations "
                             f"setting ({len(self.bank_registrations)}: {', '.join(self.bank_registrations) or 'none'}), "
                             "or leave it empty for a uniform draw")
        if not 0.0 <= self.bank_mirror <= 1.0:
            raise ValueError(f"bank_mirror {self.bank_mirror}: give a chance from 0 to 1")
        if not 0.0 <= self.bank_zoom < 0.5:
            raise ValueError(f"bank_zoom {self.bank_zoom}: give a share of the size from 0 to below 0.5 (e.g. 0.1: "
                             "scaled by 0.9 to 1.1)")
        if self.bank_noise_hu < 0:
            raise ValueError(f"bank_noise_hu {self.bank_noise_hu}: give a noise sigma of 0 HU or more")
        if self.bank_pairs and not (self.bank_cases and self.bank_registrations):
            raise ValueError(f"bank_pairs {self.bank_pairs} needs a registration bank: give bank_cases (e.g. 2) and "
                             "bank_registrations (e.g. [\"affine\", \"bspline500\"]), or set bank_pairs = 0")
        if self.dvf_loss_weight < 0:
            raise ValueError(f"dvf_loss_weight {self.dvf_loss_weight}: give 0 (classes alone) or a positive weight")
        if self.dvf_heads_lr <= 0:
            raise ValueError(f"dvf_heads_lr {self.dvf_heads_lr}: give Adam's rate for the DVF heads, e.g. 1e-4")
        if self.block_input < 101 or (self.block_input - 101) % 4:
            raise ValueError(f"block_input {self.block_input}: give 101 + 4k voxels (101, 105, ..., 141, ...)")

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 1-based ``epoch``: ``lr``, or the last schedule entry it has reached."""
        rate = self.lr
        for first, value in sorted((int(e), float(r)) for e, r in self.lr_schedule):
            if epoch >= first:
                rate = value
        return rate

    @classmethod
    def smoke(cls, **overrides) -> "TrainConfig":
        """A preset that exercises every stage on 2 CPU cores in well under 3 minutes (CI)."""
        values = dict(phantoms=1, phantom_size_mm=(64.0, 64.0, 64.0), batch_size=1, regnet_epochs=1, epochs=2,
                      steps_per_epoch=1, pool_pairs=2, val_pairs=1, val_patches=2, out="runs/smoke",
                      name="smoke_lstm_631")
        values.update(overrides)
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "TrainConfig":
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training settings {sorted(unknown)}")
        values.update(overrides)
        return cls(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                      for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
