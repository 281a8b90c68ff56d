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
