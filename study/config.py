"""The study file: YAML validated into typed config before anything starts.

A study searches over any :class:`rank1.train.TrainConfig` field: a list is a
categorical choice, a mapping ``{low, high, log?, step?}`` a numeric range. The
fields not searched are fixed by ``train``. Every choice value is checked by
building the TrainConfig it would produce, so an unknown init scheme or a depth
of 0 fails here, naming the field, not in a trial an hour later.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from rank1.config import ConfigError, check_choices, check_range, from_dict, load_yaml, to_dict, type_hints
from rank1.config import doc_field as _f
from rank1.train_config import ARM_CHOICES, ARM_SPECIFIC, TrainConfig
from study.samplers import SAMPLERS

__all__ = [
    "Range",
    "check_no_secret",
    "Resources",
    "StudyConfig",
    "load_study",
]

# What a study maximises. A single arm's decomposed validation accuracy (the dense arm:
# its own), both rank-1 arms' at once (two objectives: each arm tuned with the same
# budget), or the rank1 arm's accuracy against its decomposed latency. "single" is the
# old name of "rank1".
OBJECTIVE_ARMS: dict[str, tuple[str, ...]] = {
    "rank1": ("rank1",), "flat1d": ("flat1d",), "dense": ("dense",), "pair": ("rank1", "flat1d"),
    "multi": ("rank1",), "single": ("rank1",), "arm": (),
}
# Searching these would change what a trial *is*, not how it trains.
_NOT_SEARCHABLE = {"seed", "dataset", "root", "download", "device", "threads", "split_seed"}


_SECRET_KEYS = ("password", "passwd", "passfile", "token", "secret", "credential")


def check_no_secret(field: str, url: str | None, where: str) -> None:
    """Credentials come from the environment only: a study file is logged to MLflow as is."""
    if not url:
        return
    parts = urlsplit(url)
    keys = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)]
    if parts.password is not None or any(w in k.lower() for k in keys for w in _SECRET_KEYS):
        raise ConfigError(
            f"{field}: the URL carries a password, which is not allowed (study files are logged and shared); "
            f"drop it from the URL and set {where} in the environment"
        )


@dataclass
class Range:
    """A numeric search range: ``{low: 1, high: 8}`` (ints when both ends are ints)."""

    low: float
    high: float
    log: bool = False
    step: float | None = None

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ConfigError(f"low {self.low!r} must be <= high {self.high!r}")
        if self.log and self.low <= 0:
            raise ConfigError(f"a log range needs low > 0, got {self.low!r}")

    @property
    def is_int(self) -> bool:
        return float(self.low).is_integer() and float(self.high).is_integer() and (
            self.step is None or float(self.step).is_integer())


@dataclass
class Resources:
    """What one trial asks Ray for."""

    cpu: float = _f(1.0, "CPU cores per trial")
    gpu: float = _f(0.0, "GPU (fraction) per trial; 0 on machines without one")

    def __post_init__(self) -> None:
        check_range("resources.cpu", self.cpu, 0, lo_open=True)
        check_range("resources.gpu", self.gpu, 0)


@dataclass
class StudyConfig:
    """One hyperparameter study of rank-1 training (see studies/*.yaml)."""

    name: str = _f("", "study name = MLflow experiment name = Optuna study name")
    train: dict = _f({}, "fixed training settings: any rank1 train option")
    search: dict | list = _f({}, "searched options: FIELD: [choices] or FIELD: {low, high, log, step}; with "
                                 "sampler grid, lists only, or a list of such grids (a design: their union)")
    objective: Literal["rank1", "flat1d", "dense", "pair", "multi", "arm", "single"] = _f(
        "rank1", "rank1 / flat1d / dense: max that arm's decomposed val acc; pair: both rank-1 arms' (two "
                 "objectives); multi: rank1's and min its decomposed latency; arm: each trial's own first arm "
                 "(designs whose cells train different arms); single: old name of rank1")
    pareto_tolerance: float = _f(0.01, "multi: the champion is the fastest Pareto trial within this accuracy of the best")
    latency_batch: int = _f(1, "multi: batch size of the latency objective (1 or train.latency_batch)")
    confirm_seeds: int | None = _f(None, "retrain the best configuration of each arm (by its own val acc) with this "
                                         "many fresh seeds and score it on test (unset: no confirmation)")
    sampler: str = _f("tpe", "Optuna sampler", choices=lambda: SAMPLERS)
    seed: int = _f(0, "sampler seed")
    n_trials: int | None = _f(None, "trials in the study (default 8; a grid: its number of cells, which it must "
                                    "equal when given)")
    max_concurrent: int = _f(2, "trials running at once")
    scheduler: Literal["none", "asha"] = _f("none", "none or asha (stops weak trials early on the objective)")
    grace_period: int = _f(1, "asha: epochs before a trial can be stopped")
    reduction_factor: float = _f(2.0, "asha: keep 1/reduction_factor of trials at each rung")
    seeds_per_trial: int = _f(1, "seeds per trial; the trial's value is the mean over them")
    max_failures: int = _f(2, "retries of a trial whose worker died (from its last checkpoint)")
    resources: Resources = _f(Resources(), "per-trial resources")
    home: str = _f("", "study home: state, logs, embedded stores (default runs/NAME)")
    tracking_uri: str | None = _f(None, "MLflow tracking server URL; unset: $MLFLOW_TRACKING_URI, else one is "
                                  "started on 127.0.0.1")
    storage: str | None = _f(None, "Optuna RDB storage URL; unset: SQLite in the study home")
    storage_path: str | None = _f(None, "Ray Tune trial storage (shared on a cluster); unset: the study home")
    registered_model: str | None = _f(None, "registry name (default NAME-decomposed)")

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", self.name or ""):
            raise ConfigError(
                f"name: {self.name!r} is not allowed (allowed: 1-64 letters, digits, '_', '.', '-')"
            )
        check_choices(self)
        check_no_secret("tracking_uri", self.tracking_uri, "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        check_no_secret("storage", self.storage, "PGPASSWORD (or ~/.pgpass) for PostgreSQL")
        for name in ("max_concurrent", "seeds_per_trial", "grace_period", "latency_batch"):
            check_range(name, getattr(self, name), 1)
        if self.n_trials is not None:
            check_range("n_trials", self.n_trials, 1)
        if self.confirm_seeds is not None:
            check_range("confirm_seeds", self.confirm_seeds, 1)
        check_range("max_failures", self.max_failures, 0)
        check_range("pareto_tolerance", self.pareto_tolerance, 0)
        check_range("reduction_factor", self.reduction_factor, 1, lo_open=True)
        self.base = self._base_train()
        self.cells: list[dict[str, Any]] | None = None  # a grid design's cells, in order
        self.space = self._space()
        if self.cells is not None:
            if self.n_trials is not None and self.n_trials != len(self.cells):
                raise ConfigError(f"n_trials: {self.n_trials} does not match the grid's {len(self.cells)} cells "
                                  f"(allowed: {len(self.cells)}, or leave n_trials out)")
            self.n_trials = len(self.cells)
        elif self.n_trials is None:
            self.n_trials = 8
        if self.objective == "multi" and self.latency_batch not in (1, self.base.latency_batch):
            raise ConfigError(
                f"latency_batch: {self.latency_batch!r} is not measured (allowed: 1, {self.base.latency_batch})"
            )
        if self.objective == "multi" and not self.base.measure_latency:
            raise ConfigError("train.measure_latency: must be true for objective 'multi' (latency is an objective)")
        if self.scheduler == "asha" and self.grace_period > self.base.epochs:
            raise ConfigError(f"grace_period: {self.grace_period} must be <= train.epochs ({self.base.epochs})")
        trained = self._trained_arms()
        missing = [a for a in self.objective_arms if a not in trained]
        if missing:
            need = "two arms, rank1 and flat1d" if self.objective == "pair" else f"the {missing[0]} arm"
            where = (f"train.arm is {self.base.arm!r} ({', '.join(self.base.arms)})" if "arm" not in self.space
                     else f"some cells train only {', '.join(sorted(trained))}")
            raise ConfigError(
                f"objective: {self.objective!r} needs {need} trained in every trial, but {where}; set train.arm: "
                f"{'pair or all' if self.objective == 'pair' else 'all'}, or objective: arm for a design whose "
                "cells train different arms"
            )
        if self.objective == "pair" and self.scheduler == "asha":
            raise ConfigError("scheduler: 'asha' stops trials on one objective, which would tune one arm and "
                              "not the other under objective 'pair' (allowed with pair: 'none')")

    # -- the training config and the space -------------------------------------------------------

    def _trained_arms(self) -> set[str]:
        """The arms every trial trains (the intersection over the arm values the space allows)."""
        arms = self.space.get("arm", [self.base.arm]) if isinstance(self.space.get("arm", []), list) else []
        sets = [set(ARM_CHOICES[a]) for a in arms] or [set(self.base.arms)]
        return set.intersection(*sets)

    @property
    def objective_arms(self) -> tuple[str, ...]:
        """The arms whose accuracy the search maximises (the first is the Tune metric's)."""
        return OBJECTIVE_ARMS[self.objective]

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """``(result key, direction)`` per Optuna objective: ``objective`` (the first arm's
        accuracy, which Tune and ASHA see), then ``objective.flat1d`` (pair) or ``latency_ms`` (multi)."""
        out = [("objective", "maximize")]
        if self.objective == "pair":
            out.append(("objective.flat1d", "maximize"))
        if self.objective == "multi":
            out.append(("latency_ms", "minimize"))
        return out

    @property
    def shipped_arm(self) -> str | None:
        """The arm whose decomposed model the registry gets (None: only the dense arm is tuned;
        objective ``arm``: the best trial's own, see :meth:`shipped_arm_of`)."""
        arm = self.objective_arms[0] if self.objective_arms else "rank1"
        return None if arm == "dense" else arm

    def _base_train(self) -> TrainConfig:
        return from_dict(TrainConfig, self.train, prefix="train.")

    def _space(self) -> dict[str, list[Any] | Range]:
        grid = self.sampler == "grid"
        if isinstance(self.search, list):
            if not grid:
                raise ConfigError("search: a list of grids is a design for sampler: grid (allowed otherwise: a "
                                  "mapping of option -> choices or range)")
            if not self.search:
                raise ConfigError("search: an empty design (give at least one grid)")
            blocks = [(f"search[{i}]", b) for i, b in enumerate(self.search)]
        else:
            blocks = [("search", self.search)]
        spaces = []
        for where, block in blocks:
            if not isinstance(block, dict):
                raise ConfigError(f"{where}: expected a mapping of option -> choices or range, got {block!r}")
            if grid and not block:
                raise ConfigError(f"{where}: an empty grid (give at least one option with a list of values)")
            spaces.append((where, self._block_space(where, block, grid)))
        if not grid:
            return spaces[0][1]
        cells: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        for where, space in spaces:
            keys = sorted(space)
            for values in itertools.product(*(space[k] for k in keys)):
                cell = dict(zip(keys, values))
                key = repr(sorted(cell.items()))
                if key in seen:
                    raise ConfigError(f"{where}: the cell {cell} is already in {seen[key]} (a design runs each cell once)")
                seen[key] = where
                try:  # every cell as a whole, before anything runs
                    from_dict(TrainConfig, {**self.train, **cell})
                except ConfigError as e:
                    raise ConfigError(f"{where}: the cell {cell} is not a valid run: {e}") from None
                cells.append(cell)
        self.cells = cells
        merged: dict[str, list[Any]] = {}
        for _, space in spaces:
            for k, vs in space.items():
                merged.setdefault(k, [])
                merged[k] += [v for v in vs if not any(repr(v) == repr(w) for w in merged[k])]
        return merged

    def _block_space(self, where: str, block: dict[str, Any], grid: bool) -> dict[str, list[Any] | Range]:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        hints = type_hints(TrainConfig)
        space: dict[str, list[Any] | Range] = {}
        for key, spec in block.items():
            name = f"{where}.{key}"
            if key not in fields:
                raise ConfigError(f"{name}: unknown option (allowed: {', '.join(sorted(fields - _NOT_SEARCHABLE))})")
            if key in _NOT_SEARCHABLE:
                raise ConfigError(f"{name}: cannot be searched (set it under train instead)")
            if isinstance(spec, list):
                if not spec:
                    raise ConfigError(f"{name}: empty choice list (give at least one value)")
                if len(set(map(repr, spec))) != len(spec):
                    raise ConfigError(f"{name}: choices repeat a value: {spec!r}")
                space[key] = [self._check_value(key, v, name) for v in spec]
            elif isinstance(spec, dict):
                if grid:
                    raise ConfigError(f"{name}: a grid takes a list of values, not a range (sampler: grid); "
                                      f"got {spec!r}")
                r = from_dict(Range, spec, prefix=f"{name}.")
                tp = hints[key]
                base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
                if base not in (int, float):
                    raise ConfigError(f"{name}: a range needs a numeric option; {key} takes {base.__name__}")
                if base is int and not r.is_int:
                    raise ConfigError(f"{name}: {key} takes integers; low, high and step must be integers")
                for v in (r.low, r.high):
                    self._check_value(key, int(v) if base is int else float(v), name)
                space[key] = r
            else:
                raise ConfigError(f"{name}: expected a list of choices or a mapping {{low, high}}, got {spec!r}")
        return space

    def _check_value(self, key: str, value: Any, name: str | None = None) -> Any:
        """``value`` if a TrainConfig with it is valid; otherwise a ConfigError naming search.KEY.
        (An arm's own option is checked with that arm trained: in a design it may sit beside ``arm``.)"""
        data = {**self.train, key: value}
        if any(key in names for names in ARM_SPECIFIC.values()) and "arm" in self._searched_keys():
            data["arm"] = "all"
        try:
            cfg = from_dict(TrainConfig, data)
        except ConfigError as e:
            raise ConfigError(f"{name or 'search.' + key}: {str(e).split(': ', 1)[-1]}") from None
        return getattr(cfg, key)

    def _searched_keys(self) -> set[str]:
        blocks = self.search if isinstance(self.search, list) else [self.search]
        return {k for b in blocks if isinstance(b, dict) for k in b}

    def trial_config(self, params: dict[str, Any], seed: int | None = None) -> TrainConfig:
        """The TrainConfig of a trial: fixed settings, then the sampled parameters."""
        data = {**self.train, **params}
        if seed is not None:
            data["seed"] = seed
        return from_dict(TrainConfig, data)

    def value_arms(self, config: TrainConfig) -> tuple[str, ...]:
        """The arms a trial of ``config`` is scored on (its Optuna values, in order)."""
        return self.objective_arms or config.arms[:1]

    def shipped_arm_of(self, config: TrainConfig) -> str | None:
        """The arm of a trial of ``config`` whose decomposed model may be registered."""
        if self.objective == "arm":
            return None if config.arms[0] == "dense" else config.arms[0]
        return self.shipped_arm

    def confirm_config(self, arm: str, params: dict[str, Any], seed: int) -> TrainConfig:
        """The confirmation run of ``arm`` at a trial's ``params``: that arm alone, a fresh
        ``seed``; the other arms' own settings (their learning rates, rank1's projection, ...)
        are dropped, since they would not change this arm."""
        data = {**self.train, **params, "arm": arm, "seed": seed}
        for other, names in ARM_SPECIFIC.items():
            if other != arm:
                for name in names:
                    data.pop(name, None)
        return from_dict(TrainConfig, data)

    @property
    def confirm_seed_list(self) -> list[int]:
        """Fresh seeds for the confirmation phase: disjoint from the search's ``seed + i``."""
        return [self.base.seed + 1000 + i for i in range(self.confirm_seeds or 0)]

    # -- places ------------------------------------------------------------------------------------

    @property
    def home_path(self) -> Path:
        return Path(self.home or f"runs/{self.name}").expanduser().resolve()

    @property
    def model_name(self) -> str:
        return self.registered_model or f"{self.name}-decomposed"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.home_path / 'optuna.db'}"

    @property
    def tune_path(self) -> Path | str:
        return self.storage_path or str(self.home_path / "ray_results")

    @property
    def metric(self) -> str:
        """What the registry compares champions on."""
        return f"{self.shipped_arm}.decomposed_val_acc"

    def fingerprint(self) -> str:
        """Identifies the search (not its locations): a resumed study must match it."""
        keep = {k: v for k, v in to_dict(self).items() if k not in ("home", "tracking_uri", "storage", "storage_path")}
        return hashlib.sha256(repr(sorted(keep.items())).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None, env_fallback: bool = True) -> StudyConfig:
    """Read and validate a study file (``yaml.safe_load``; nothing in it is executed).

    ``env_fallback``: an unset ``tracking_uri`` is taken from ``$MLFLOW_TRACKING_URI``
    (not on resume, which keeps the locations the study started with).
    """
    data = load_yaml(path)
    if overrides:
        data.update({k: v for k, v in overrides.items() if v is not None})
    if (env_fallback and isinstance(data, dict) and not data.get("tracking_uri")
            and os.environ.get("MLFLOW_TRACKING_URI")):
        data["tracking_uri"] = os.environ["MLFLOW_TRACKING_URI"]  # MLflow's own variable, as every client reads it
    return from_dict(StudyConfig, data)
