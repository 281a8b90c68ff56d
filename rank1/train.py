"""Paired training of the arms: what every study trial runs.

:func:`train_pair` trains the ``rank1`` arm (3-D filters, projected to rank-1 on a
schedule — Kim et al. 2018) and the ``flat1d`` arm (the 1-D factors trained directly)
— and optionally the unconstrained ``dense`` arm — from the same seed, the same
initial function, and the same data order, in lockstep one epoch at a time. A
difference between the arms is therefore a difference of training dynamics.

Metrics reach the caller through :class:`TrainCallback`; the whole run can be
checkpointed at any epoch boundary with :meth:`PairTrainer.state_dict` and resumed
bit-for-bit with :meth:`PairTrainer.load_state_dict`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rank1.bench import count_flops, count_params, time_forward
from rank1.config import ConfigError, check_choice, check_range, to_dict
from rank1.config import doc_field as _f
from rank1.convert import decompose_model, dense_model
from rank1.data import DATASETS, DataBundle, TensorLoader, check_dataset, load_dataset
from rank1.functional import PROJECTION_NORMS
from rank1.gradstats import GradientMonitor
from rank1.init import INIT_SCHEMES
from rank1.layers import Rank1Conv2d
from rank1.models import MODELS, build_model

__all__ = [
    "ARM_CHOICES",
    "ArmResult",
    "ArmTrainer",
    "PairResult",
    "PairTrainer",
    "TrainCallback",
    "TrainConfig",
    "parse_projection",
    "resolve_device",
    "train_arm",
    "train_pair",
]

ARM_CHOICES = {
    "pair": ("rank1", "flat1d"),
    "all": ("rank1", "flat1d", "dense"),
    "rank1": ("rank1",),
    "flat1d": ("flat1d",),
    "dense": ("dense",),
}
# A decomposed model may differ from its projected 3-D form only by rounding.
LOGIT_TOLERANCE = 1e-4


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
    dataset: str = _f("digits", "dataset name (digits needs no files; others read ROOT)")
    root: str | None = _f(None, "folder holding the dataset files (not needed for digits)")
    image_size: int | None = _f(None, "resize images to SIZE x SIZE (digits: 16; others: native)")
    download: bool = _f(False, "download the dataset into ROOT with torchvision if missing")
    augment: bool = _f(False, "random translation (and flips where label-preserving)")
    val_fraction: float = _f(0.2, "fraction of train held out for validation when the dataset has none")
    split_seed: int = _f(0, "seed of the train/val split (fixed across trials and seeds)")
    # model
    model: str = _f("vgg", "network family")
    depth: int = _f(8, "vgg: conv layers (1-32); resnet: basic blocks (1-32)")
    width: int = _f(32, "channels of the first stage (doubling per stage)")
    stages: int = _f(3, "resolution stages (pooling / stride 2 between them)")
    batchnorm: bool = _f(False, "batch norm after every conv")
    kernel_size: int = _f(3, "spatial kernel size (odd)")
    init: str = _f("kaiming", "factor initialisation scheme")
    # rank-1 training
    arm: str = _f("pair", "arms to train: pair (rank1+flat1d), all (+dense), rank1, flat1d or dense")
    projection: str = _f("epoch:1", "rank1 projection period: epoch:N, step:N or end")
    projection_norm: str = _f("keep", "keep (best rank-1) or rescale (rank-1 direction, original norm)")
    reset_momentum: bool = _f(False, "zero the optimizer momentum of rank1 weights after each projection")
    # optimisation
    optimizer: str = _f("sgd", "sgd (with momentum) or adamw")
    lr: float = _f(0.05, "peak learning rate")
    momentum: float = _f(0.9, "SGD momentum / AdamW beta1")
    weight_decay: float = _f(5e-4, "weight decay (decoupled for AdamW)")
    schedule: str = _f("cosine", "learning-rate schedule: constant, step or cosine")
    warmup_epochs: float = _f(0.0, "linear warm-up length in epochs")
    step_epochs: int = _f(10, "step schedule: decay every this many epochs")
    gamma: float = _f(0.1, "step schedule: decay factor")
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(32, "training batch size")
    grad_clip: float | None = _f(None, "clip the gradient norm to this value (off when unset)")
    # execution
    device: str = _f("auto", "auto, cpu or cuda")
    bf16: bool = _f(False, "bf16 autocast (CUDA only)")
    seed: int = _f(0, "seed of the initial weights and the data order (shared by the arms)")
    threads: int | None = _f(None, "torch CPU threads (default: torch's)")
    measure_latency: bool = _f(True, "time dense vs decomposed inference at the end")
    latency_batch: int = _f(64, "the larger batch size of the latency measurement (the other is 1)")
    latency_repeats: int = _f(20, "timed repeats per latency measurement")

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, sorted(DATASETS))
        check_choice("model", self.model, sorted(MODELS))
        check_choice("init", self.init, sorted(INIT_SCHEMES))
        check_choice("arm", self.arm, list(ARM_CHOICES))
        check_choice("projection_norm", self.projection_norm, PROJECTION_NORMS)
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        check_choice("schedule", self.schedule, ("constant", "step", "cosine"))
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        parse_projection(self.projection)
        check_range("depth", self.depth, 1, 32)
        for name in ("width", "stages", "epochs", "batch_size", "step_epochs", "latency_batch"):
            check_range(name, getattr(self, name), 1)
        check_range("latency_repeats", self.latency_repeats, 2)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"kernel_size: {self.kernel_size!r} must be odd and >= 1")
        check_range("lr", self.lr, 0, lo_open=True)
        check_range("momentum", self.momentum, 0, 1)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("warmup_epochs", self.warmup_epochs, 0)
        check_range("gamma", self.gamma, 0, 1, lo_open=True)
        check_range("val_fraction", self.val_fraction, 0, 1, lo_open=True)
        if self.val_fraction >= 1:
            raise ConfigError(f"val_fraction: {self.val_fraction!r} must be < 1")
        if self.grad_clip is not None:
            check_range("grad_clip", self.grad_clip, 0, lo_open=True)
        if self.image_size is not None:
            check_range("image_size", self.image_size, 4)
        if self.threads is not None:
            check_range("threads", self.threads, 1)

    @property
    def arms(self) -> tuple[str, ...]:
        return ARM_CHOICES[self.arm]

    def check_environment(self) -> None:
        """What can only be checked on this machine: the dataset files and the device."""
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based)."""
    warmup = config.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "step":
        return config.gamma ** (step // (config.step_epochs * steps_per_epoch))
    total = config.epochs * steps_per_epoch
    progress = (step - warmup) / max(1.0, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class TrainCallback:
    """Receives metrics as training goes; subclass and override what you need."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, dict[str, float]], trainer: PairTrainer) -> bool | None:
        """After every arm finished epoch ``epoch`` (1-based). Return True to stop all arms."""
        return None

    def on_projection(self, arm: str, epoch: int, step: int, residuals: dict[str, float]) -> None:
        """After each projection of the rank1 arm: each layer's residual just before it."""

    def on_arm_end(self, arm: str, result: ArmResult) -> None:
        """When an arm is done (finished, diverged, stopped or failed)."""


@dataclass
class ArmResult:
    """Everything one arm produced. ``status``: finished, diverged, stopped or failed."""

    arm: str
    status: str = "running"
    reason: str | None = None
    epochs_run: int = 0
    steps: int = 0
    diverged_epoch: int | None = None
    n_projections: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    train_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairResult:
    config: dict[str, Any]
    data: dict[str, Any]
    arms: dict[str, ArmResult]
    paired: dict[str, float]
    time_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "data": self.data, "arms": {k: v.to_dict() for k, v in self.arms.items()},
            "paired": self.paired, "time_s": self.time_s,
        }


def _accuracy_loss(model: nn.Module, loader: TensorLoader) -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and all logits of ``model`` over ``loader`` (eval mode, fp32)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            logits.append(model(x).float())
            labels.append(y)
    model.train(was_training)
    out, y = torch.cat(logits), torch.cat(labels)
    loss = float(F.cross_entropy(out, y))
    acc = float((out.argmax(1) == y).float().mean())
    return loss, acc, out


class ArmTrainer:
    """Trains one arm one epoch at a time; its whole state is checkpointable."""

    def __init__(self, config: TrainConfig, arm: str, data: DataBundle, device: torch.device) -> None:
        self.config, self.arm, self.data, self.device = config, arm, data, device
        torch.manual_seed(config.seed)  # same seed -> same initial factors in every arm
        self.model = build_model(
            config.model, arm=arm, depth=config.depth, width=config.width, stages=config.stages,
            batchnorm=config.batchnorm, kernel_size=config.kernel_size, in_channels=data.in_channels,
            num_classes=data.num_classes, init=config.init, projection_norm=config.projection_norm,
        ).to(device)
        self.generator = torch.Generator().manual_seed(config.seed)  # same data order in every arm
        self.train_loader = TensorLoader(
            data.train, config.batch_size, data.mean, data.std, device, shuffle=True,
            generator=self.generator, augment=config.augment, flip=data.flip,
        )
        eval_batch = max(256, config.batch_size)
        self.val_loader = TensorLoader(data.val, eval_batch, data.mean, data.std, device)
        self.test_loader = TensorLoader(data.test, eval_batch, data.mean, data.std, device)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps_per_epoch, config)
        )
        self.monitor = GradientMonitor(self.model)
        self.rank1_layers = [m for m in self.model.modules() if isinstance(m, Rank1Conv2d)]
        self.projection = parse_projection(config.projection) if arm == "rank1" else ("none", 0)
        self.result = ArmResult(arm)
        self._residuals: dict[str, float] = {}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.AdamW(self.model.parameters(), lr=c.lr, betas=(c.momentum, 0.999), weight_decay=c.weight_decay)

    @property
    def running(self) -> bool:
        return self.result.status == "running"

    # -- projection ---------------------------------------------------------------------------

    def project(self, callbacks: list[TrainCallback]) -> None:
        names = [f"L{i:02d}" for i in range(len(self.rank1_layers))]
        residuals = {n: float(m.project_()) for n, m in zip(names, self.rank1_layers)}
        self.result.n_projections += 1
        self._residuals = residuals
        if self.config.reset_momentum:
            for m in self.rank1_layers:
                state = self.optimizer.state.get(m.weight, {})
                for key in ("momentum_buffer", "exp_avg"):
                    if isinstance(state.get(key), torch.Tensor):
                        state[key].zero_()
        for cb in callbacks:
            cb.on_projection(self.arm, self.result.epochs_run + 1, self.result.steps, residuals)

    # -- one epoch ------------------------------------------------------------------------------

    def train_epoch(self, callbacks: list[TrainCallback]) -> dict[str, float] | None:
        """One epoch; returns its metrics, or None when the arm diverged."""
        c, res = self.config, self.result
        unit, every = self.projection
        self.model.train()
        t0 = time.perf_counter()
        total_loss, correct, seen = 0.0, 0, 0
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=c.bf16 and self.device.type == "cuda")
        for x, y in self.train_loader:
            with autocast:
                out = self.model(x)
                loss = F.cross_entropy(out.float(), y)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                res.status, res.diverged_epoch = "diverged", res.epochs_run + 1
                res.reason = f"loss became {loss_value} at epoch {res.diverged_epoch}, step {res.steps + 1}"
                self.model.zero_grad(set_to_none=True)
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.monitor.after_backward()
            if c.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            res.steps += 1
            total_loss += loss_value * len(y)
            correct += int((out.argmax(1) == y).sum())
            seen += len(y)
            if unit == "step" and res.steps % every == 0:
                self.project(callbacks)
        if unit == "epoch" and (res.epochs_run + 1) % every == 0:
            self.project(callbacks)
        epoch_time = time.perf_counter() - t0
        res.epochs_run += 1
        res.train_time_s += epoch_time
        val_loss, val_acc, _ = _accuracy_loss(self.model, self.val_loader)
        if not math.isfinite(val_loss):
            res.status, res.diverged_epoch = "diverged", res.epochs_run
            res.reason = f"validation loss became {val_loss} at epoch {res.epochs_run}"
            return None
        metrics = {
            "epoch": res.epochs_run,
            "train_loss": total_loss / max(1, seen),
            "train_acc": correct / max(1, seen),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_time_s": epoch_time,
            **self.monitor.summary(),
            **{f"residual.{k}": v for k, v in self._residuals.items()},
        }
        if self._residuals:
            metrics["residual.mean"] = sum(self._residuals.values()) / len(self._residuals)
        self._residuals = {}
        res.history.append(metrics)
        return metrics

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> ArmResult:
        """Final projection, decomposition, the agreement check, test accuracy, inference."""
        res, c = self.result, self.config
        self.monitor.close()
        final: dict[str, Any] = {}
        _, final["trained_val_acc"], _ = _accuracy_loss(self.model, self.val_loader)
        if self.arm == "dense":
            shipped, dense_form = self.model.eval(), self.model.eval()
        else:
            if self.arm == "rank1":
                self.project([])
                # How far training had moved the weights off rank-1 since the last projection.
                final["final_residual_mean"] = sum(self._residuals.values()) / max(1, len(self._residuals))
                self._residuals = {}
            _, final["projected_val_acc"], ref_logits = _accuracy_loss(self.model, self.val_loader)
            shipped = decompose_model(self.model).to(self.device)
            _, final["decomposed_val_acc"], logits = _accuracy_loss(shipped, self.val_loader)
            scale = max(1.0, float(ref_logits.abs().max()))
            final["max_logit_diff"] = float((logits - ref_logits).abs().max()) / scale
            dense_form = dense_model(self.model).to(self.device)
            if not final["max_logit_diff"] <= LOGIT_TOLERANCE:
                res.status = "failed"
                res.reason = (
                    f"decomposed model disagrees with the projected model: max logit difference "
                    f"{final['max_logit_diff']:.2e} (relative) > {LOGIT_TOLERANCE:g}"
                )
        final["val_loss"], final["val_acc"], _ = _accuracy_loss(shipped, self.val_loader)
        final["test_loss"], final["test_acc"], _ = _accuracy_loss(shipped, self.test_loader)
        res.final = final
        res.inference = self._inference(dense_form, shipped) if c.measure_latency else self._sizes(dense_form, shipped)
        self.shipped = shipped
        if res.status == "running":
            res.status = "finished"
        return res

    def _example(self, batch: int) -> torch.Tensor:
        h, w = self.data.image_size
        return torch.randn(batch, self.data.in_channels, h, w, device=self.device)

    def _sizes(self, dense_form: nn.Module, shipped: nn.Module) -> dict[str, Any]:
        x = self._example(1)
        out = {"dense_params": count_params(dense_form), "dense_flops": count_flops(dense_form, x)}
        if shipped is not dense_form:
            out["decomposed_params"] = count_params(shipped)
            out["decomposed_flops"] = count_flops(shipped, x)
            out["flop_ratio"] = out["dense_flops"] / out["decomposed_flops"]
        return out

    def _inference(self, dense_form: nn.Module, shipped: nn.Module) -> dict[str, Any]:
        out = self._sizes(dense_form, shipped)
        out["device"] = str(self.device)
        out["threads"] = torch.get_num_threads()
        for batch in sorted({1, self.config.latency_batch}):
            x = self._example(batch)
            t = time_forward(dense_form, x, repeats=self.config.latency_repeats)
            out[f"dense_latency_ms_b{batch}"] = t.median_ms
            out[f"dense_latency_spread_ms_b{batch}"] = [t.p10_ms, t.p90_ms]
            if shipped is not dense_form:
                t2 = time_forward(shipped, x, repeats=self.config.latency_repeats)
                out[f"decomposed_latency_ms_b{batch}"] = t2.median_ms
                out[f"decomposed_latency_spread_ms_b{batch}"] = [t2.p10_ms, t2.p90_ms]
                out[f"speedup_b{batch}"] = t.median_ms / t2.median_ms
        return out

    # -- checkpoint -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "result": self.result.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.result = ArmResult(**state["result"])


class PairTrainer:
    """The arms of one run, trained in lockstep, one epoch each at a time."""

    def __init__(self, config: TrainConfig, data: DataBundle | None = None) -> None:
        config.check_environment()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.data = data or load_dataset(
            config.dataset, config.root, config.image_size, config.download, config.val_fraction, config.split_seed
        )
        self.trainers = {arm: ArmTrainer(config, arm, self.data, self.device) for arm in config.arms}
        self.time_s = 0.0

    @property
    def epoch(self) -> int:
        """Epochs completed by the arms still running (or the most any arm ran)."""
        return max(t.result.epochs_run for t in self.trainers.values())

    def done(self) -> bool:
        """No arm has an epoch left to train."""
        return not any(t.running and t.result.epochs_run < self.config.epochs for t in self.trainers.values())

    def train_epoch(self, callbacks: list[TrainCallback] | None = None) -> dict[str, dict[str, float]]:
        """One more epoch of every running arm; an arm that diverges ends here, the others go on."""
        callbacks = list(callbacks or [])
        t0 = time.perf_counter()
        metrics: dict[str, dict[str, float]] = {}
        for arm, t in self.trainers.items():
            if t.running and t.result.epochs_run < self.config.epochs:
                m = t.train_epoch(callbacks)
                if m is None:
                    self._end(t, callbacks)
                else:
                    metrics[arm] = m
        self.time_s += time.perf_counter() - t0
        return metrics

    def finish(self, callbacks: list[TrainCallback] | None = None, stopped: bool = False) -> PairResult:
        """End every arm still running: project, decompose, measure (or mark it stopped)."""
        callbacks = list(callbacks or [])
        t0 = time.perf_counter()
        for t in self.trainers.values():
            if t.running:
                if stopped:
                    t.result.status, t.result.reason = "stopped", f"stopped by a callback after epoch {t.result.epochs_run}"
                else:
                    try:
                        t.finish()
                    except Exception as e:  # a broken arm must not take the others down
                        t.result.status, t.result.reason = "failed", f"{type(e).__name__}: {e}"
                self._end(t, callbacks)
        self.time_s += time.perf_counter() - t0
        return self.result()

    def run(self, callbacks: list[TrainCallback] | None = None) -> PairResult:
        """Train to the end, one epoch of every arm at a time; callbacks may stop early."""
        callbacks = list(callbacks or [])
        stopped = False
        while not stopped and not self.done():
            metrics = self.train_epoch(callbacks)
            if metrics:
                stopped = any(bool(cb.on_epoch_end(self.epoch, metrics, self)) for cb in callbacks)
        return self.finish(callbacks, stopped)

    def _end(self, t: ArmTrainer, callbacks: list[TrainCallback]) -> None:
        t.monitor.close()
        for cb in callbacks:
            cb.on_arm_end(t.arm, t.result)

    def result(self) -> PairResult:
        arms = {arm: t.result for arm, t in self.trainers.items()}
        paired: dict[str, float] = {}
        r, f = arms.get("rank1"), arms.get("flat1d")
        if r and f and r.history and f.history:
            key = "decomposed_val_acc"
            if key in r.final and key in f.final:
                paired["val_acc_diff"] = r.final[key] - f.final[key]
            paired["last_epoch_val_acc_diff"] = r.history[-1]["val_acc"] - f.history[-1]["val_acc"]
        return PairResult(self.config.to_dict(), self.data.summary(), arms, paired, self.time_s)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly here (at an epoch boundary)."""
        return {
            "config": self.config.to_dict(),
            "arms": {arm: t.state_dict() for arm, t in self.trainers.items()},
            "time_s": self.time_s,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError("checkpoint was written by a different configuration; refusing to resume from it")
        for arm, t in self.trainers.items():
            t.load_state_dict(state["arms"][arm])
        self.time_s = state.get("time_s", 0.0)


def train_pair(
    config: TrainConfig,
    callbacks: list[TrainCallback] | None = None,
    state: dict[str, Any] | None = None,
    data: DataBundle | None = None,
) -> PairResult:
    """Train ``config.arms`` (default rank1 and flat1d) side by side; see the module doc.

    ``state`` (from :meth:`PairTrainer.state_dict`) resumes a run where it stopped.
    """
    trainer = PairTrainer(config, data)
    if state is not None:
        trainer.load_state_dict(state)
    return trainer.run(callbacks)


def train_arm(
    config: TrainConfig, arm: str = "rank1", callbacks: list[TrainCallback] | None = None
) -> ArmResult:
    """Train one arm alone (same seed, data and initialisation as in a pair)."""
    check_choice("arm", arm, ("rank1", "flat1d", "dense"))
    return train_pair(dataclasses.replace(config, arm=arm), callbacks).arms[arm]
