"""The model registry: the best decomposed model, its aliases, and ``rank1 pull``.

The best trial's projected rank1 weights come from its final checkpoint; they are
decomposed into 1-D convolutions, evaluated again (the accuracy must equal what the
trial recorded), logged with ``mlflow.pytorch.log_model`` (torch.export ``pt2``
format, signature and input example) to the trial's run and registered as
``<study>-decomposed``. Alias ``champion`` moves only to a version that beats the
current champion on the same dataset and metric; otherwise the version is the
``challenger``. Aliases, not stages (stages are deprecated in MLflow).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from rank1 import decompose_model
from rank1.config import ConfigError
from rank1.data import TensorLoader, load_dataset
from rank1.models import build_model

__all__ = ["parse_model_ref", "pull", "register_champion"]

CARD = "model_card.json"
EXAMPLE = "example_batch.pt"
WEIGHTS = "decomposed_state_dict.pt"


def _val_accuracy(model: torch.nn.Module, loader: TensorLoader) -> tuple[float, torch.Tensor]:
    model.eval()
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(model(x).argmax(1))
            labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    return float((p == y).float().mean()), p


def register_champion(cfg, client, uri: str, state: dict[str, Any], best: dict[str, Any]) -> dict[str, Any]:
    """Decompose, re-check, log and register the best trial's model; set its alias."""
    import mlflow

    (arm, models), = state["models"].items()
    accs = state["val_acc"][arm]
    idx = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the best seed of the trial ships
    train_cfg = cfg.trial_config(state["params"], seed=cfg.base.seed + idx)
    existing = _registered(client, cfg.model_name, cfg.name, best["trial_id"], train_cfg.seed)
    if existing is not None:  # a resumed study that had registered it already: the same version
        alias = _set_alias(client, cfg.model_name, existing, train_cfg.dataset, cfg.metric,
                           float(existing.tags["value"]))
        return {"model_uri": f"models:/{cfg.model_name}@{alias}", "version": existing.version, "alias": alias,
                "val_acc": float(existing.tags["value"])}
    data = load_dataset(train_cfg.dataset, train_cfg.root, train_cfg.image_size, False, train_cfg.val_fraction,
                        train_cfg.split_seed)
    model = build_model(train_cfg.model, arm=arm, depth=train_cfg.depth, width=train_cfg.width,
                        stages=train_cfg.stages, batchnorm=train_cfg.batchnorm, kernel_size=train_cfg.kernel_size,
                        in_channels=data.in_channels, num_classes=data.num_classes, init=train_cfg.init,
                        projection_norm=train_cfg.projection_norm, flat1d_init=train_cfg.flat1d_init,
                        rank1_start=train_cfg.rank1_start)
    model.load_state_dict(models[idx])
    fast = decompose_model(model)
    loader = TensorLoader(data.val, 256, data.mean, data.std)
    acc, _ = _val_accuracy(fast, loader)
    if not math.isclose(acc, accs[idx], abs_tol=1e-9):
        raise RuntimeError(
            f"the decomposed champion scores {acc:.6f} on validation, but its trial recorded {accs[idx]:.6f}"
        )
    x_example = next(iter(TensorLoader(data.val, 4, data.mean, data.std)))[0]
    card = {
        "name": cfg.model_name, "study": cfg.name, "trial_id": best["trial_id"], "seed": train_cfg.seed, "arm": arm,
        "dataset": train_cfg.dataset, "metric": cfg.metric, "val_acc": acc,
        "trial_value": best["value"], "params": best["params"], "train_config": train_cfg.to_dict(),
        "input": {"channels": data.in_channels, "size": list(data.image_size), "mean": list(data.mean),
                  "std": list(data.std), "classes": data.num_classes},
        "arch": "1x1 conv -> depthwise kx1 -> depthwise 1xk per rank-1 layer (decomposed)",
        "metrics": {k: v for k, v in best.get("metrics", {}).items()
                    if isinstance(v, (int, float)) and k.startswith(("rank1.", "flat1d.", "paired."))},
    }
    run_id = best["run_id"]
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            fast, name="decomposed_model", input_example=x_example.numpy(), serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / CARD).write_text(json.dumps(card, indent=2, default=str))
            torch.save(fast.state_dict(), Path(d) / WEIGHTS)
            xs, ys = next(iter(TensorLoader(data.val, 16, data.mean, data.std)))
            torch.save({"x": xs, "y": ys}, Path(d) / EXAMPLE)
            for f in (CARD, WEIGHTS, EXAMPLE):
                mlflow.log_artifact(str(Path(d) / f), artifact_path="decomposed_model_card")
    version = mlflow.register_model(info.model_uri, cfg.model_name, tags={
        "dataset": train_cfg.dataset, "metric": cfg.metric, "value": f"{acc:.6f}", "study": cfg.name,
        "trial_id": best["trial_id"], "seed": str(train_cfg.seed), "arm": arm,
    })
    alias = _set_alias(client, cfg.model_name, version, train_cfg.dataset, cfg.metric, acc)
    return {"model_uri": f"models:/{cfg.model_name}@{alias}", "version": version.version, "alias": alias,
            "val_acc": acc}


def _registered(client, name: str, study: str, trial_id: str, seed: int):
    """The version registered from this study's trial and seed, if there is one."""
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except Exception:  # no such model yet
        return None
    for v in versions:
        if v.tags.get("study") == study and v.tags.get("trial_id") == trial_id and v.tags.get("seed") == str(seed):
            return v
    return None


def _set_alias(client, name: str, version, dataset: str, metric: str, value: float) -> str:
    """``champion`` if no comparable champion beats ``value``; else ``challenger``."""
    try:
        current = client.get_model_version_by_alias(name, "champion")
    except Exception:  # no champion yet
        current = None
    if current is not None and current.version != version.version:
        same = current.tags.get("dataset") == dataset and current.tags.get("metric") == metric
        if not same or float(current.tags.get("value", "-inf")) >= value:
            client.set_registered_model_alias(name, "challenger", version.version)
            return "challenger"
    client.set_registered_model_alias(name, "champion", version.version)
    return "champion"


def parse_model_ref(ref: str) -> str:
    """``NAME``, ``NAME@alias`` or ``NAME/version`` -> an MLflow ``models:/`` URI."""
    if ref.startswith("models:/"):
        return ref
    if "@" in ref:
        name, alias = ref.split("@", 1)
        if name and alias:
            return f"models:/{name}@{alias}"
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return f"models:/{name}/{version}"
    elif ref:
        return f"models:/{ref}@champion"
    raise ConfigError(f"model: {ref!r} is not allowed (allowed: NAME, NAME@ALIAS or NAME/VERSION)")


def pull(ref: str, out: str | Path, tracking_uri: str) -> dict[str, Any]:
    """Download a registered model and its card to ``out``; returns the card."""
    import mlflow
    from mlflow import MlflowClient

    uri = parse_model_ref(ref)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    name = uri[len("models:/"):].split("@")[0].split("/")[0]
    try:
        if "@" in uri:
            mv = client.get_model_version_by_alias(name, uri.split("@", 1)[1])
        else:
            mv = client.get_model_version(name, uri.rsplit("/", 1)[1])
    except Exception as e:
        raise ConfigError(f"model: {ref!r} was not found in the registry at {tracking_uri} ({e})") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(out / "model"))
    mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="decomposed_model_card", dst_path=str(out))
    card = json.loads((out / "decomposed_model_card" / CARD).read_text())
    card["version"] = mv.version
    card["aliases"] = list(getattr(mv, "aliases", []) or [])
    card["model_uri"] = f"models:/{name}/{mv.version}"
    (out / CARD).write_text(json.dumps(card, indent=2))
    return card


def check_pulled(out: str | Path) -> dict[str, Any]:
    """Load a pulled model (torch.export's format; no pickle) and run its example batch."""
    import mlflow

    out = Path(out)
    model = mlflow.pytorch.load_model(str(out / "model"))
    batch = torch.load(out / "decomposed_model_card" / EXAMPLE, weights_only=True)
    with torch.no_grad():
        pred = model(batch["x"]).argmax(1)
    return {"predicted": pred.tolist(), "labels": batch["y"].tolist(),
            "correct": int((pred == batch["y"]).sum()), "batch": len(batch["y"])}


if __name__ == "__main__":  # python -m study.registry DIR: the fresh-process check of `rank1 pull`
    import sys

    print(json.dumps(check_pulled(sys.argv[1])))
