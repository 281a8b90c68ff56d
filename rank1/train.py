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

import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rank1.autotune import FORMATS, formatted, in_format
from rank1.config import check_choice
from rank1.convert import decompose_model, dense_model, project_model_
from rank1.data import (
    DataBundle,
    ImageData,
    TensorLoader,
    load_dataset,
    with_subsets,
)
from rank1.functional import tangent_project
from rank1.gradstats import GradientMonitor, measure_gradient_flow
from rank1.layers import Rank1Conv2d
from rank1.lowrank import output_ranks
from rank1.measure import batched, count_flops, count_params, time_forward
from rank1.models import model_for
from rank1.train_config import ARM_CHOICES, ARM_SPECIFIC, TrainConfig, parse_projection

__all__ = [
    "ARM_CHOICES",
    "ARM_SPECIFIC",
    "ArmResult",
    "ArmTrainer",
    "PairResult",
    "PairTrainer",
    "TrainCallback",
    "TrainConfig",
    "data_for",
    "parse_projection",
    "recalibrate_batchnorm",
    "resolve_device",
    "train_arm",
    "train_pair",
]

# A decomposed model may differ from its projected 3-D form only by rounding.
LOGIT_TOLERANCE = 1e-4


def source_data(config: TrainConfig) -> DataBundle:
    """The dataset a config's :attr:`~TrainConfig.source_key` names, decoded (or read from the
    cache) and split, before the subsets the config asks for."""
    return load_dataset(config.dataset, config.root, config.image_size, config.download, config.val_fraction,
                        config.split_seed)


def data_for(config: TrainConfig) -> DataBundle:
    """The splits a config trains on: the (cached) dataset, then the stratified subsets it asks for."""
    return with_subsets(source_data(config), config.train_subset, config.val_subset, config.split_seed)


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
    """Everything one arm produced. ``status``: finished, diverged, stopped or failed.

    ``gradflow``: per-element gradient flow (:func:`rank1.gradstats.measure_gradient_flow`)
    at ``init``, after ``epoch1`` and at the ``end``; ``lowrank``: effective ranks of the
    shipped network's outputs (:func:`rank1.lowrank.output_ranks`).
    """

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
    gradflow: dict[str, dict[str, float]] = field(default_factory=dict)
    lowrank: dict[str, float] = field(default_factory=dict)
    train_time_s: float = 0.0
    bn_recal_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PairResult:
    config: dict[str, Any]
    data: dict[str, Any]
    arms: dict[str, ArmResult]
    paired: dict[str, float]
    time_s: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config, "data": self.data, "arms": {k: v.to_dict() for k, v in self.arms.items()},
            "paired": self.paired, "time_s": self.time_s, "notes": self.notes,
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


def _bare_copy(model: nn.Module) -> nn.Module:
    """A deep copy without the forward hooks of the training monitor."""
    net = copy.deepcopy(model)
    for m in net.modules():
        m._forward_hooks.clear()
    return net


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches) -> int:
    """Recompute every batch norm's running mean and variance of ``model`` on ``batches``.

    After a projection the running statistics belong to weights that no longer exist.
    They are reset and re-estimated as the plain average over the batches (momentum
    ``None``: each batch's mean and unbiased variance count equally), in train mode and
    without gradients; then each layer's momentum and the model's mode are restored.
    Returns the number of batches used (0 when the model has no batch norm).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [(m, m.momentum) for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x, _ in batches:
            model(x)
            n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return n


def _take(loader: TensorLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for batch in loader:
        if len(out) == n:
            break
        out.append(batch)
    return out


# Salts of the dedicated generators: every fixed batch comes from its own stream, so
# measuring never shifts the training data order.
_GRADFLOW_SALT, _RECAL_SALT = 7919, 104729


class ArmTrainer:
    """Trains one arm one epoch at a time; its whole state is checkpointable."""

    def __init__(self, config: TrainConfig, arm: str, data: DataBundle, device: torch.device) -> None:
        self.config, self.arm, self.data, self.device = config, arm, data, device
        torch.manual_seed(config.seed)  # same seed -> same initial factors in every arm
        self.model = model_for(config, arm, data.in_channels, data.num_classes).to(device)
        self.generator = torch.Generator().manual_seed(config.seed)  # same data order in every arm
        self.train_loader = TensorLoader(
            data.train, config.batch_size, data.mean, data.std, device, shuffle=True,
            generator=self.generator, augment=config.augment, flip=data.flip,
        )
        eval_batch = max(256, config.batch_size)
        self.val_loader = TensorLoader(data.val, eval_batch, data.mean, data.std, device)
        self.test_loader = TensorLoader(data.test, eval_batch, data.mean, data.std, device)
        self.lr, self.momentum, self.weight_decay = config.optim(arm)
        self.optimizer = self._make_optimizer()
        self.steps_per_epoch = len(self.train_loader)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.steps_per_epoch, config)
        )
        self.monitor = GradientMonitor(self.model)
        self.rank1_layers = [m for m in self.model.modules() if isinstance(m, Rank1Conv2d)]
        self.projection = parse_projection(config.projection) if arm == "rank1" else ("none", 0)
        self.has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.result = ArmResult(arm)
        self._residuals: dict[str, float] = {}
        # rank1: optimiser steps since the last projection (0: the weights are rank-1; a
        # rank1_start=full network is not until its first projection) and whether the
        # batch-norm statistics still belong to the weights before the last projection.
        self._steps_since_projection = 0 if config.rank1_start == "rank1" else 1
        self._bn_stale = False

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(self.momentum, 0.999),
                                 weight_decay=self.weight_decay)

    @property
    def running(self) -> bool:
        return self.result.status == "running"

    def _fixed_batches(self, n: int, salt: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` training batches from a generator of their own (the training order is untouched):
        the same batches in every arm for the same seed and salt."""
        d, c, t = self.data, self.config, self.train_loader
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + salt)
        # The training loader's tensors are on the device already: no copy of the dataset.
        loader = TensorLoader(ImageData(t.x, t.y), c.batch_size, d.mean, d.std, self.device, shuffle=True,
                              generator=g, augment=c.augment, flip=d.flip)
        return _take(loader, n)

    # -- projection ---------------------------------------------------------------------------

    def project(self, callbacks: list[TrainCallback]) -> None:
        names = [f"L{i:02d}" for i in range(len(self.rank1_layers))]
        residuals = {n: float(m.project_()) for n, m in zip(names, self.rank1_layers)}
        self.result.n_projections += 1
        self._residuals = residuals
        self._steps_since_projection = 0
        self._bn_stale = True
        mode = self.config.projection_momentum
        for m in self.rank1_layers:
            if mode == "reset":  # every state of the projected weight: momentum, Adam's moments, its step
                self.optimizer.state.pop(m.weight, None)
            elif mode == "tangent":
                state = self.optimizer.state.get(m.weight, {})
                for key in ("momentum_buffer", "exp_avg"):
                    buf = state.get(key)
                    if isinstance(buf, torch.Tensor):
                        buf.copy_(tangent_project(buf, *m.factors))
        for cb in callbacks:
            cb.on_projection(self.arm, self.result.epochs_run + 1, self.result.steps, residuals)

    # -- the network the arm is scored as ------------------------------------------------------------

    def _recalibrate(self, model: nn.Module) -> None:
        if not (self.has_batchnorm and self.config.bn_recalibrate):
            return
        t0 = time.perf_counter()
        batches = self._fixed_batches(self.config.bn_recalibrate, _RECAL_SALT + self.result.steps)
        recalibrate_batchnorm(model, batches)
        self.result.bn_recal_s += time.perf_counter() - t0

    def evaluated_model(self) -> nn.Module:
        """The network this arm is scored as, now. For rank1 that is the *projected* network:
        the model itself right after a projection, else a projected copy (training has moved
        the weights off rank-1 since, or a ``projection: end`` run has not projected yet); its
        batch-norm statistics recomputed for the projected weights (``bn_recalibrate``). The
        training state is never changed, but for statistics that belonged to weights that no
        longer exist."""
        if self.arm != "rank1":
            return self.model
        if self._steps_since_projection == 0:
            if self._bn_stale:
                self._recalibrate(self.model)
                self._bn_stale = False
            return self.model
        net = _bare_copy(self.model)
        project_model_(net)
        self._recalibrate(net)
        return net

    def _gradflow(self, model: nn.Module) -> dict[str, float]:
        n = self.config.gradflow_batches
        return measure_gradient_flow(model, self._fixed_batches(n, _GRADFLOW_SALT)) if n else {}

    def _probe(self) -> torch.Tensor:
        x, _ = next(iter(TensorLoader(self.data.val, self.config.rank_images, self.data.mean, self.data.std,
                                      self.device)))
        return x

    # -- one epoch ------------------------------------------------------------------------------

    def train_epoch(self, callbacks: list[TrainCallback]) -> dict[str, float] | None:
        """One epoch; returns its metrics, or None when the arm diverged."""
        c, res = self.config, self.result
        unit, every = self.projection
        if "init" not in res.gradflow and c.gradflow_batches:
            res.gradflow["init"] = self._gradflow(self.evaluated_model())
        self.model.train()
        t0 = time.perf_counter()
        recal0 = res.bn_recal_s
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
            self._steps_since_projection += 1
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
        train_summary = self.monitor.summary()
        scored = self.evaluated_model()
        val_loss, val_acc, _ = _accuracy_loss(scored, self.val_loader)
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
            **train_summary,
            **{f"residual.{k}": v for k, v in self._residuals.items()},
        }
        if scored is not self.model:  # rank1 between projections: what the trained weights score as they are
            metrics["val_acc_unprojected"] = _accuracy_loss(self.model, self.val_loader)[1]
        if self.arm == "rank1" and self.has_batchnorm:
            metrics["bn_recal_s"] = res.bn_recal_s - recal0
        if self._residuals:
            metrics["residual.mean"] = sum(self._residuals.values()) / len(self._residuals)
        if res.epochs_run == 1 and c.gradflow_batches:
            res.gradflow["epoch1"] = self._gradflow(scored)
            metrics.update({f"gradflow.{k}": v for k, v in res.gradflow["epoch1"].items()})
        if c.effective_rank == "epoch":
            metrics.update({f"lowrank.{k}": v for k, v in output_ranks(scored, self._probe()).items()})
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
                self.evaluated_model()  # recomputes the batch-norm statistics for the final weights
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
        if self.arm == "rank1" and self.has_batchnorm:
            final["bn_recal_s"] = res.bn_recal_s
        res.final = final
        if c.gradflow_batches:
            res.gradflow["end"] = self._gradflow(self.model)
        if c.effective_rank != "off":
            res.lowrank = output_ranks(self.model, self._probe())
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
        """Latency as a user gets it: the dense form (the best of NCHW and channels-last) against
        the form ``decompose_model(model, "auto", example=x)`` deploys on this device, and the
        exportable ``chain`` form; the deployed plan (a kernel per layer) with them."""
        out = self._sizes(dense_form, shipped)
        out["device"] = str(self.device)
        out["threads"] = torch.get_num_threads()
        reps = self.config.latency_repeats
        for batch in sorted({1, self.config.latency_batch}):
            x = self._example(batch)
            t = min((time_forward(formatted(copy.deepcopy(dense_form), fmt), in_format(x, fmt), repeats=reps)
                     for fmt in FORMATS), key=lambda t: t.median_ms)
            out[batched("dense_latency_ms", batch)] = t.median_ms
            out[batched("dense_latency_spread_ms", batch)] = [t.p10_ms, t.p90_ms]
            if shipped is dense_form:
                continue
            deployed = decompose_model(self.model, "auto", example=x)
            t2 = time_forward(deployed, x, repeats=reps)
            t3 = time_forward(shipped, x, repeats=reps)
            out[batched("decomposed_latency_ms", batch)] = t2.median_ms
            out[batched("decomposed_latency_spread_ms", batch)] = [t2.p10_ms, t2.p90_ms]
            out[batched("speedup", batch)] = t.median_ms / t2.median_ms
            out[batched("fraction_of_flop_ratio", batch)] = out[batched("speedup", batch)] / out["flop_ratio"]
            out[batched("chain_latency_ms", batch)] = t3.median_ms
            out[batched("chain_speedup", batch)] = t.median_ms / t3.median_ms
            out[batched("deploy", batch)] = deployed.plan.summary()
            out[batched("deploy_impls", batch)] = dict(deployed.plan.impls)
        return out

    # -- checkpoint -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "result": self.result.to_dict(),
            "since_projection": self._steps_since_projection,
            "bn_stale": self._bn_stale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.result = ArmResult(**state["result"])
        self._steps_since_projection = state["since_projection"]
        self._bn_stale = state["bn_stale"]


class PairTrainer:
    """The arms of one run, trained in lockstep, one epoch each at a time."""

    def __init__(self, config: TrainConfig, data: DataBundle | None = None) -> None:
        config.check_environment()
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        self.data = data or data_for(config)
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
        r, f, d = arms.get("rank1"), arms.get("flat1d"), arms.get("dense")
        if r and f and r.history and f.history:
            key = "decomposed_val_acc"
            if key in r.final and key in f.final:
                paired["val_acc_diff"] = r.final[key] - f.final[key]
            paired["last_epoch_val_acc_diff"] = r.history[-1]["val_acc"] - f.history[-1]["val_acc"]
        for name, a in (("rank1", r), ("flat1d", f)):
            if a and d and "val_acc" in a.final and "val_acc" in d.final:
                paired[f"{name}_minus_dense_val_acc"] = a.final["val_acc"] - d.final["val_acc"]
        note = self.config.start_note()
        return PairResult(self.config.to_dict(), self.data.summary(), arms, paired, self.time_s,
                          [note] if note else [])

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
