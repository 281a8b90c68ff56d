"""Optuna samplers by name: one registry that study files, the searcher and the CLI read.

Each entry builds the sampler from the study config, so a sampler that needs more
than a seed (the grid needs the whole design) gets it without an if-chain anywhere.
Optuna is imported lazily: validating a study file never loads it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["SAMPLERS", "make_sampler", "register_sampler"]

SAMPLERS: dict[str, Callable[[Any], Any]] = {}


def register_sampler(name: str) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """Decorator: ``fn(cfg) -> optuna sampler`` under ``name``."""

    def deco(fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} is already registered")
        SAMPLERS[name] = fn
        return fn

    return deco


def make_sampler(name: str, cfg: Any) -> Any:
    """The sampler ``name`` for a study config ``cfg`` (needs ``seed``; the grid also ``space``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}; got {name!r}")
    return SAMPLERS[name](cfg)


@register_sampler("tpe")
def _tpe(cfg: Any) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=cfg.seed)


@register_sampler("gp")
def _gp(cfg: Any) -> Any:
    import optuna

    return optuna.samplers.GPSampler(seed=cfg.seed)


@register_sampler("nsga2")
def _nsga2(cfg: Any) -> Any:
    import optuna

    return optuna.samplers.NSGAIISampler(seed=cfg.seed)


@register_sampler("random")
def _random(cfg: Any) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _design_sampler(cells: list[dict[str, Any]]) -> Any:
    """Optuna's :class:`~optuna.samplers.GridSampler` over a design's explicit cells (the
    union of its grids), in the order the study file gives them. GridSampler's own
    bookkeeping does the rest: trial ``n`` of the first ``len(cells)`` takes cell ``n``, a
    later one an unvisited cell, and every trial records its cell in the storage, so a
    resumed driver neither repeats nor skips one."""
    import optuna
    from optuna.samplers._lazy_random_state import LazyRandomState

    class DesignGridSampler(optuna.samplers.GridSampler):
        def __init__(self, cells: list[dict[str, Any]]) -> None:  # noqa: D107 - not GridSampler's product
            names = sorted({k for c in cells for k in c})
            # The columns identify the design in every trial's system attributes.
            self._search_space = {n: [c.get(n) for c in cells] for n in names}
            self._all_grids = [tuple(c.get(n) for n in names) for c in cells]
            self._param_names = names
            self._n_min_trials = len(cells)
            self._rng = LazyRandomState(0)

    return DesignGridSampler(cells)


@register_sampler("grid")
def _grid(cfg: Any) -> Any:
    return _design_sampler(cfg.cells)
