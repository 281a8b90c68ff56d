"""A study home: the study file as given, its resolved form, and the locations it runs with.

A home is where a study's state lives on this machine (``state.json``: its MLflow
experiment and parent run, its fingerprint) and how it is found again: ``resume``,
``status`` and ``report`` read the locations it started with from ``resolved.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rank1.config import ConfigError
from study.config import StudyConfig, load_study

__all__ = ["LOCATIONS", "OUTCOME_FILE", "STATE_FILE", "STUDY_FILE", "home_locations", "load_home", "write_home"]

STATE_FILE = "state.json"
OUTCOME_FILE = "outcome.json"  # written when a study has finished (its trials, best, champion, timings)


LOCATIONS = ("tracking_uri", "storage", "storage_path")  # where a study's state lives, fixed at its start


STUDY_FILE = "study.yaml"


def write_home(cfg: StudyConfig, study_text: str) -> None:
    home = cfg.home_path
    home.mkdir(parents=True, exist_ok=True)
    import yaml

    (home / STUDY_FILE).write_text(study_text)
    (home / "resolved.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def home_locations(home: str | Path) -> tuple[Path, dict[str, Any], bool]:
    """A study home, the overrides that put its study back where it ran, and whether
    ``$MLFLOW_TRACKING_URI`` may still fill an unset tracking URI.

    The locations are the ones the study started with (flags and ``$MLFLOW_TRACKING_URI``
    included), not today's: another tracking server or trial storage would start the study
    over beside the old one.
    """
    home = Path(home).expanduser().resolve()
    if not (home / STUDY_FILE).exists():
        raise ConfigError(f"home: {str(home)!r} is not a study home (no {STUDY_FILE} in it)")
    resolved = home / "resolved.yaml"
    where: dict[str, Any] = {}
    if resolved.exists():
        import yaml

        data = yaml.safe_load(resolved.read_text()) or {}
        where = {k: data.get(k) for k in LOCATIONS}
    return home, {"home": str(home), **where}, not resolved.exists()


def load_home(home: str | Path) -> StudyConfig:
    """The study of a home, with the locations it ran with."""
    home, overrides, env_fallback = home_locations(home)
    return load_study(home / STUDY_FILE, overrides, env_fallback)
