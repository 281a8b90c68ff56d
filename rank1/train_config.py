"""What one paired training run is: :class:`TrainConfig`, every field with its help, type and
checks, and the arms' conventions (:data:`ARM_CHOICES`, :data:`ARM_SPECIFIC`).

Torch-free, so that the CLI can build its options from it without importing torch (``rank1
--help`` answers in a moment): the choice fields whose values live in a registry (datasets,
models, init schemes) import that registry's module, and torch with it, only when a value is
checked, and :meth:`TrainConfig.check_environment` imports torch. :mod:`rank1.train` re-exports
``TrainConfig``, ``parse_projection`` and the arms' tables.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Literal

from rank1.config import ConfigError, check_choices, check_range, to_dict
from rank1.config import doc_field as _f

__all__ = ["ARM_CHOICES", "ARM_SPECIFIC", "PER_ARM", "TrainConfig", "default_config", "parse_projection"]


def _registry(module: str, name: str):
    """The names a registry holds, read when a choice is checked (importing the registry's module)."""
    return lambda: getattr(importlib.import_module(module), name)


ARM_CHOICES = {
    "pair": ("rank1", "flat1d"),
    "all": ("rank1", "flat1d", "dense"),
    "rank1": ("rank1",),
    "flat1d": ("flat1d",),
    "dense": ("dense",),
}
PER_ARM = ("lr", "momentum", "weight_decay")  # optimiser settings each arm may set for itself
# Fields that change one arm only (the others train exactly the same without them): a
# non-default value for an arm that is not trained is an error, pairing across trials
# ignores them, and a grid design need not repeat the other arms over them.
ARM_SPECIFIC: dict[str, tuple[str, ...]] = {
    "rank1": ("projection", "projection_norm", "projection_momentum", "bn_recalibrate",
              *(f"rank1_{k}" for k in PER_ARM)),
    "flat1d": ("flat1d_init", *(f"flat1d_{k}" for k in PER_ARM)),
    "dense": tuple(f"dense_{k}" for k in PER_ARM),
}


def parse_projection(spec: str) -> tuple[str, int]:
    """``"epoch:N"`` / ``"step:N"`` / ``"end"`` -> ``(unit, N)``; ``("end", 0)`` for end-only."""
    if spec == "end":
        return "end", 0
    unit, _, n = spec.partition(":")
    if unit in ("epoch", "step") and n.isdigit() and int(n) >= 1:
        return unit, int(n)
    raise ConfigError(
        f"projection: {spec!r} is not allowed (allowed: 'epoch:N', 'step:N' with N >= 1, or 'end')"
    )


@dataclass
class TrainConfig:
    """One paired training run. Every field can come from YAML or a CLI option."""

    # data
    dataset: str = _f("digits", "dataset name (digits needs no files; others read ROOT)", choices=_registry("rank1.data", "DATASETS"))
    root: str | None = _f(None, "folder holding the dataset files (not needed for digits)")
    image_size: int | None = _f(None, "resize images to SIZE x SIZE (digits: 16; others: native)")
    download: bool = _f(False, "download the dataset into ROOT with torchvision if missing")
    augment: bool = _f(False, "random translation (and flips where label-preserving)")
    val_fraction: float = _f(0.2, "fraction of train held out for validation when the dataset has none")
    split_seed: int = _f(0, "seed of the train/val split (fixed across trials and seeds)")
    train_subset: int | None = _f(None, "train on a stratified subset of this many training images (drawn with "
                                        "split_seed; unset: all)")
    val_subset: int | None = _f(None, "validate on a stratified subset of this many validation images (unset: all)")
    # model
    model: str = _f("vgg", "network family", choices=_registry("rank1.models", "MODELS"))
    depth: int = _f(8, "vgg: conv layers (1-32); resnet: basic blocks (1-32)")
    width: int = _f(32, "channels of the first stage (doubling per stage)")
    stages: int = _f(3, "resolution stages (pooling / stride 2 between them)")
    batchnorm: bool = _f(False, "batch norm after every conv")
    kernel_size: int = _f(3, "spatial kernel size (odd)")
    init: str = _f("kaiming", "factor initialisation scheme (rescaled to the He norm)", choices=_registry("rank1.init", "INIT_SCHEMES"))
    # the arms and their conventions
    arm: Literal["pair", "all", "rank1", "flat1d", "dense"] = _f(
        "pair", "arms to train: pair (rank1+flat1d), all (+dense), rank1, flat1d or dense")
    rank1_start: Literal["rank1", "full"] = _f(
        "rank1", "rank1 (and dense) arm's initial filters: rank1 (outer products from init) or full "
                 "(full-rank He-normal, rank-1 from the first projection on)")
    flat1d_init: Literal["shared", "torch", "he"] = _f(
        "shared", "flat1d arm's initial factors: shared (the rank1 arm's: the same initial function), torch "
                  "(each 1-D conv as nn.Conv2d initialises it: ||W||^2 ~ 1/27) or he (each 1-D conv He on its "
                  "own fan-in: ||W||^2 ~ 8)")
    # rank-1 training
    projection: str = _f("epoch:1", "rank1 projection period: epoch:N, step:N or end")
    projection_norm: Literal["keep", "rescale"] = _f(
        "keep", "keep (best rank-1) or rescale (rank-1 direction, original norm)")
    projection_momentum: Literal["keep", "reset", "tangent"] = _f(
        "keep", "rank1 optimiser state after a projection: keep, reset (all of it, Adam's second moments "
                "included) or tangent (momentum projected onto the rank-1 set's tangent space)")
    bn_recalibrate: int = _f(20, "training batches on which the rank1 arm's batch-norm statistics are "
                                 "recomputed for projected weights before it is evaluated (0: off)")
    # optimisation
    optimizer: Literal["sgd", "adamw"] = _f("sgd", "sgd (with momentum) or adamw")
    lr: float = _f(0.05, "peak learning rate (every arm, unless ARM_lr is set)")
    momentum: float = _f(0.9, "SGD momentum / AdamW beta1 (every arm, unless ARM_momentum is set)")
    weight_decay: float = _f(5e-4, "weight decay, decoupled for AdamW (every arm, unless ARM_weight_decay is set)")
    rank1_lr: float | None = _f(None, "rank1 arm's own peak learning rate (default: lr)")
    flat1d_lr: float | None = _f(None, "flat1d arm's own peak learning rate (default: lr)")
    dense_lr: float | None = _f(None, "dense arm's own peak learning rate (default: lr)")
    rank1_momentum: float | None = _f(None, "rank1 arm's own momentum (default: momentum)")
    flat1d_momentum: float | None = _f(None, "flat1d arm's own momentum (default: momentum)")
    dense_momentum: float | None = _f(None, "dense arm's own momentum (default: momentum)")
    rank1_weight_decay: float | None = _f(None, "rank1 arm's own weight decay on W (default: weight_decay)")
    flat1d_weight_decay: float | None = _f(None, "flat1d arm's own weight decay on a, b, c (default: weight_decay)")
    dense_weight_decay: float | None = _f(None, "dense arm's own weight decay (default: weight_decay)")
    schedule: Literal["constant", "step", "cosine"] = _f("cosine", "learning-rate schedule: constant, step or cosine")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs")
    step_epochs: int = _f(10, "step schedule: decay every this many epochs")
    gamma: float = _f(0.1, "step schedule: decay factor")
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(32, "training batch size")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value (off when unset)")
    # execution
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto, cpu or cuda")
    bf16: bool = _f(False, "bf16 autocast (CUDA only)")
    seed: int = _f(0, "seed of the initial weights and the data order (shared by the arms)")
    threads: int | None = _f(None, "torch CPU threads (default: torch's)")
    measure_latency: bool = _f(True, "time dense vs decomposed inference at the end")
    latency_batch: int = _f(64, "the larger batch size of the latency measurement (the other is 1)")
    latency_repeats: int = _f(20, "timed repeats per latency measurement")
    # what is measured besides accuracy
    gradflow_batches: int = _f(4, "fixed training batches of the per-element gradient-flow measurement at "
                                  "initialisation, after epoch 1 and at the end (0: off)")
    effective_rank: Literal["end", "epoch", "off"] = _f(
        "end", "effective rank of every conv layer's output and the penultimate features: at the end, "
               "after every epoch too, or off")
    rank_images: int = _f(64, "validation images of the fixed batch the effective ranks are measured on")

    def __post_init__(self) -> None:
        check_choices(self)
        parse_projection(self.projection)
        check_range("depth", self.depth, 1, 32)
        for name in ("width", "stages", "epochs", "batch_size", "step_epochs", "latency_batch", "rank_images"):
            check_range(name, getattr(self, name), 1)
        check_range("latency_repeats", self.latency_repeats, 2)
        for name in ("bn_recalibrate", "gradflow_batches"):
            check_range(name, getattr(self, name), 0)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: {self.kernel_size!r} must be odd and >= 1")
        for prefix in ("", "rank1_", "flat1d_", "dense_"):
            lr, mom, wd = (getattr(self, prefix + k) for k in PER_ARM)
            if lr is not None:
                check_range(prefix + "lr", lr, 0, lo_open=True)
            if mom is not None:
                check_range(prefix + "momentum", mom, 0, 1)
            if wd is not None:
                check_range(prefix + "weight_decay", wd, 0)
        defaults = default_config()
        for arm, names in ARM_SPECIFIC.items():
            if arm in self.arms:
                continue
            for name in names:
                if getattr(self, name) != getattr(defaults, name):
                    raise ConfigError(
                        f"{name}: set to {getattr(self, name)!r} for the {arm} arm, which is not trained "
                        f"(arm: {self.arm!r} trains {', '.join(self.arms)}); drop it or train the {arm} arm"
                    )
        check_range("warmup_epochs", self.warmup_epochs, 0)
        check_range("gamma", self.gamma, 0, 1, lo_open=True)
        check_range("val_fraction", self.val_fraction, 0, 1, lo_open=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"val_fraction: {self.val_fraction!r} must be < 1")
        if self.grad_clip is not None:
            check_range("grad_clip", self.grad_clip, 0, lo_open=True)
        if self.image_size is not None:
            check_range("image_size", self.image_size, 4)
        for name in ("train_subset", "val_subset"):
            if getattr(self, name) is not None:
                check_range(name, getattr(self, name), 1)
        if self.threads is not None:
            check_range("threads", self.threads, 1)

    @property
    def arms(self) -> tuple[str, ...]:
        return ARM_CHOICES[self.arm]

    def optim(self, arm: str) -> tuple[float, float, float]:
        """``(lr, momentum, weight_decay)`` of ``arm``: its own where set, else the shared ones."""
        return tuple(  # type: ignore[return-value]
            v if (v := getattr(self, f"{arm}_{k}")) is not None else getattr(self, k) for k in PER_ARM)

    @property
    def same_start(self) -> bool:
        """Whether every arm starts as the same function (the paired design's premise)."""
        return self.flat1d_init == "shared" and self.rank1_start == "rank1"

    def start_note(self) -> str | None:
        """Why the arms do not start from the same function, when they do not."""
        why = []
        if self.rank1_start != "rank1" and len(self.arms) > 1:
            why.append(f"rank1_start={self.rank1_start} (the rank1 and dense arms start full rank)")
        if self.flat1d_init != "shared" and "flat1d" in self.arms and len(self.arms) > 1:
            why.append(f"flat1d_init={self.flat1d_init} (the flat1d arm initialises its own factors)")
        return ("the arms do not start from the same function: " + "; ".join(why)) if why else None

    def check_environment(self) -> None:
        """What can only be checked on this machine: the dataset files and the device."""
        import torch

        from rank1.data import check_dataset
        from rank1.train import resolve_device

        try:
            check_dataset(self.dataset, self.root, self.download)
        except ValueError as e:
            raise ConfigError(f"root: {e}" if "root" in str(e) else str(e)) from None
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was asked for but no CUDA device is available (allowed here: auto, cpu)")
        if self.bf16 and resolve_device(self.device).type != "cuda":
            raise ConfigError("bf16: bf16 autocast needs a CUDA device; set bf16: false on the CPU")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @property
    def source_key(self) -> tuple[Any, ...]:
        """What the decoded splits depend on (before any subset)."""
        return (self.dataset, self.root, self.image_size, self.val_fraction, self.split_seed)

    @property
    def data_key(self) -> tuple[Any, ...]:
        """What the data of a run depends on: runs with equal keys train on the same images."""
        return (*self.source_key, self.train_subset, self.val_subset)


_DEFAULTS: list[TrainConfig] = []


def default_config() -> TrainConfig:
    """The default config, built once and not checked (comparing fields against it and showing the
    CLI's defaults need no check, which would read the registries); shared: read it, never change it."""
    if not _DEFAULTS:
        _DEFAULTS.append(object.__new__(TrainConfig))
        for f in dataclasses.fields(TrainConfig):
            setattr(_DEFAULTS[0], f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
    return _DEFAULTS[0]
