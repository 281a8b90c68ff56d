"""The model registry: the best decomposed model, its aliases, and ``rank1 pull``.

The best trial's trained weights come from its final checkpoint. The network is
rebuilt, decomposed into 1-D convolutions and evaluated again (the accuracy must
equal what the trial recorded), and registered as ``<study>-decomposed``: the version
is the servable pyfunc of :mod:`study.serving`, which plans the fastest decomposed
form for the machine that loads it, and holds the exportable ``chain`` form as a
``torch.export`` program. Its model card is the version's description in the UI.
Alias ``champion`` moves only to a version that beats the current champion on the
same dataset and metric; otherwise the version is the ``challenger``. Aliases, not
stages (stages are deprecated in MLflow).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

import rank1
from rank1 import decompose_model
from rank1.config import ConfigError
from rank1.data import TensorLoader
from rank1.measure import batch_of, batched
from rank1.models import model_for
from rank1.train import data_for
from study.names import counted

__all__ = ["parse_model_ref", "pull", "register_champion"]

CARD = "model_card.json"
EXAMPLE = "example_batch.pt"
WEIGHTS = "state_dict.pt"  # the trained arm's weights (serving.py rebuilds and decomposes them)
EXPORTABLE = "exportable.pt2"  # the chain form as a torch.export program
SERVING = Path(__file__).with_name("serving.py")  # the registered pyfunc, logged as a model from code


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
    """Rebuild, re-check, log and register the best trial's model; set its alias.

    The registered version is the servable pyfunc of :mod:`study.serving` (the fastest
    decomposed form of the puller's machine), holding the exportable ``chain`` form too.
    """
    import mlflow
    from mlflow.entities import LoggedModelOutput

    (arm, models), = state["models"].items()
    accs = state["val_acc"][arm]
    idx = max(range(len(accs)), key=lambda i: (accs[i], -i))  # the best seed of the trial ships
    train_cfg = cfg.trial_config(state["params"], seed=cfg.base.seed + idx)
    metric = f"{arm}.decomposed_val_acc"  # the shipped arm's own (objective `arm`: not always rank1's)
    existing = _registered(client, cfg.model_name, cfg.name, best["trial_id"], train_cfg.seed)
    if existing is not None:  # a resumed study that had registered it already: the same version
        alias = _set_alias(client, cfg.model_name, existing, train_cfg.dataset, existing.tags.get("metric", metric),
                           float(existing.tags["value"]))
        return {"model_uri": f"models:/{cfg.model_name}@{alias}", "version": existing.version, "alias": alias,
                "val_acc": float(existing.tags["value"])}
    data = data_for(train_cfg)
    card = {
        "name": cfg.model_name, "study": cfg.name, "trial_id": best["trial_id"], "seed": train_cfg.seed, "arm": arm,
        "dataset": train_cfg.dataset, "metric": metric, "trial_value": best["value"], "params": best["params"],
        "train_config": train_cfg.to_dict(), "latency_batch": train_cfg.latency_batch,
        "input": {"channels": data.in_channels, "size": list(data.image_size), "mean": list(data.mean),
                  "std": list(data.std), "classes": data.num_classes},
        "arch": "per rank-1 layer: 1x1 conv -> depthwise kx1 -> depthwise 1xk (decomposed); served in the fastest "
                "implementation of the machine that loads it",
        "metrics": {k: v for k, v in best.get("metrics", {}).items()
                    if isinstance(v, (int, float)) and k.startswith((f"{arm}.", "paired.", "latency."))
                    and ".gradflow." not in k and ".lowrank." not in k},
    }
    model = model_for(train_cfg, arm, data.in_channels, data.num_classes)
    model.load_state_dict(models[idx])
    exportable = decompose_model(model)
    loader = TensorLoader(data.val, 256, data.mean, data.std)
    acc, _ = _val_accuracy(exportable, loader)
    if not math.isclose(acc, accs[idx], abs_tol=1e-9):
        raise RuntimeError(
            f"the decomposed champion scores {acc:.6f} on validation, but its trial recorded {accs[idx]:.6f}"
        )
    card["val_acc"] = acc
    x_example = next(iter(TensorLoader(data.val, 4, data.mean, data.std)))[0]
    run_id = best["run_id"]
    with _tracking_uri(uri), tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / CARD).write_text(json.dumps(card, indent=2, default=str))
        torch.save(model.state_dict(), d / WEIGHTS)
        xs, ys = next(iter(TensorLoader(data.val, 16, data.mean, data.std)))
        torch.save({"x": xs, "y": ys}, d / EXAMPLE)
        batch = torch.export.Dim("batch", min=1)  # any batch size; the image shape is fixed
        torch.export.save(torch.export.export(exportable, (x_example,), dynamic_shapes=({0: batch},)),
                          d / EXPORTABLE)
        for f in (CARD, WEIGHTS, EXAMPLE):
            client.log_artifact(run_id, str(d / f), artifact_path="decomposed_model_card")
        with torch.no_grad():
            logits = exportable(x_example).numpy()
        # The model belongs to the trial's run (its source run, and the run's output), but is
        # logged outside an active run: inside one, MLflow links it by fetching the history of
        # every metric the run has, one request each (hundreds here, 3 s of the wrap-up).
        logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id,
                                                experiment_id=client.get_run(run_id).info.experiment_id)
        # MLflow checks the model by loading it here and predicting the input example. Loading plans
        # `auto` (every candidate form timed on the whole network at two batch sizes: ~20 s for vgg
        # depth 8 width 128 on 32x32 images, 2 cores) for the driver's machine, a plan thrown away:
        # the check loads the `chain` form instead, which measures nothing.
        with _serve_form("chain"), _quiet_mlflow(), warnings.catch_warnings(record=True) as caught:
            info = mlflow.pyfunc.log_model(
                name="model", model_id=logged.model_id, python_model=str(SERVING),
                code_paths=[str(Path(rank1.__file__).parent)],
                artifacts={"card": str(d / CARD), "weights": str(d / WEIGHTS), "exportable": str(d / EXPORTABLE)},
                signature=mlflow.models.infer_signature(x_example.numpy(), logits), input_example=x_example.numpy(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
            )
        # All but MLflow's advice to type-hint `predict` (for its data validation: the signature does
        # that), printed twice per study otherwise; MLflow resets filters inside, so it is caught here
        for w in caught:
            if "type hints to the `predict` method" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=int(state.get("epoch", 0)))])
        with _quiet_mlflow():
            version = mlflow.register_model(info.model_uri, cfg.model_name, tags={
                "dataset": train_cfg.dataset, "metric": metric, "value": f"{acc:.6f}", "study": cfg.name,
                "trial_id": best["trial_id"], "seed": str(train_cfg.seed), "arm": arm,
            })
    alias = _set_alias(client, cfg.model_name, version, train_cfg.dataset, metric, acc)
    describe_version(client, cfg, card, version.version)
    return {"model_uri": f"models:/{cfg.model_name}@{alias}", "version": version.version, "alias": alias,
            "val_acc": acc}


def _registry_contents(client, name: str) -> str:
    """What a reference could have named: the model's versions and aliases, else the models there."""
    try:
        model = client.get_registered_model(name)
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        aliases = ", ".join(f"@{a} (version {v})" for a, v in sorted((model.aliases or {}).items()))
        return f"{name} versions {', '.join(map(str, versions)) or 'none'}" + (f", aliases {aliases}" if aliases else "")
    except Exception:  # no such model: which ones there are
        try:
            names = sorted(m.name for m in client.search_registered_models(max_results=50))
        except Exception:
            return "nothing it could list"
        return "the models " + ", ".join(names) if names else "no registered model"


def pull_command(cfg, ref: str) -> str:
    """The ``rank1 pull`` that finds ``ref`` where the study keeps its registry: its tracking
    server, or (an embedded store) its home."""
    where = f"--tracking-uri {shlex.quote(cfg.tracking_uri)}" if cfg.tracking_uri else f"--home {shlex.quote(str(cfg.home_path))}"
    return f"rank1 pull {shlex.quote(ref)} {where} --out model/"


def card_markdown(card: dict[str, Any], version: str | None = None, cfg=None) -> str:
    """The model card as the registry shows it: what the model is, how good, how fast, how to
    pull (from ``cfg``'s store when given)."""
    m, arm = card.get("metrics", {}), card.get("arm", "rank1")
    c = card["train_config"]
    speed = "; ".join(
        f"batch {batch_of(k)}: {v:.2f}x ({m.get(batched(f'{arm}.deploy', batch_of(k)), '')})"
        for k, v in sorted(m.items(), key=lambda kv: batch_of(kv[0]) or 0) if k.startswith(f"{arm}.speedup_b"))
    frac = ", ".join(f"{v:.0%}" for k, v in sorted(m.items()) if k.startswith(f"{arm}.fraction_of_flop_ratio_b"))
    ref = f"{card['name']}/{version}" if version else f"{card['name']}@champion"
    lines = [
        f"**{card['name']}**: the {arm} arm of study `{card['study']}` (trial {card['trial_id']}, seed {card['seed']}), "
        f"a decomposed rank-1 {c['model']} (depth {c['depth']}, width {c['width']}, batch norm "
        f"{'on' if c['batchnorm'] else 'off'}) trained on {card['dataset']}.",
        "",
        f"- validation accuracy (decomposed): {card.get('val_acc', float('nan')):.4f}; test accuracy: "
        f"{m.get(f'{arm}.test_acc', float('nan')):.4f}",
        (f"- speedup over its dense form where it was trained ({counted(m[f'{arm}.threads'], 'thread')}): {speed}"
         if speed and f"{arm}.threads" in m else f"- speedup over its dense form: {speed or 'not measured'}")
        + f"; FLOP ratio {m.get(f'{arm}.flop_ratio', float('nan')):.2f}x"
        + (f" (reached: {frac})" if frac else ""),
        "- config: " + " ".join(f"{k}={v}" for k, v in sorted(card.get("params", {}).items())),
        f"- input: float32 N x {card['input']['channels']} x {card['input']['size'][0]} x {card['input']['size'][1]}, "
        f"normalised with mean {[round(v, 4) for v in card['input']['mean']]} and std "
        f"{[round(v, 4) for v in card['input']['std']]}; output: logits of {card['input']['classes']} classes",
        "",
        f"Pull it: `{pull_command(cfg, ref) if cfg is not None else f'rank1 pull {ref} --out model/'}`, or serve "
        f"it: `mlflow models serve -m models:/{ref} "
        "--env-manager local`. Loading it plans the fastest decomposed form for that machine; the exportable "
        "chain form is the artifact `exportable.pt2` (`torch.export.load`).",
    ]
    return "\n".join(lines)


def describe_version(client, cfg, card: dict[str, Any], version: str) -> None:
    """The model card as the registered model's and the version's description in the UI."""
    client.update_model_version(cfg.model_name, version, description=card_markdown(card, version, cfg))
    client.update_registered_model(cfg.model_name, description=(
        f"Decomposed rank-1 networks from the study `{cfg.name}`; alias `champion` is the best on {card.get('metric', cfg.metric)}. "
        f"Each version's description is its model card.\n\n" + card_markdown(card, cfg=cfg)))


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


SERVE_FORM_ENV = "RANK1_SERVE_FORM"  # study/serving.py's FORM_ENV (the model carries rank1 only, not study)


@contextlib.contextmanager
def _quiet_mlflow():
    """Without MLflow's progress lines while the champion is logged and registered (it validates
    the input example, "Successfully registered model", it waits for the version, "Created
    version": four lines with timestamps amid the study's own output, which says the same in one
    row of its summary). MLflow's warnings still show, and anything else it writes to stderr is
    passed on."""
    log = logging.getLogger("mlflow")
    level = log.level
    log.setLevel(logging.WARNING)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            yield
    finally:
        log.setLevel(level)
        for line in buf.getvalue().splitlines(keepends=True):
            if not line.startswith(("Successfully registered model", "Created version")):
                sys.stderr.write(line)


@contextlib.contextmanager
def _serve_form(form: str):
    """The form the registered model deploys when loaded in this process, for the block. Put back
    after it as it was, or as ``auto`` (the default's value) if it was unset: deleting a variable
    while another thread walks ``os.environ`` is the race MLflow's telemetry had (study/__init__.py)."""
    before = os.environ.get(SERVE_FORM_ENV)
    os.environ[SERVE_FORM_ENV] = form
    try:
        yield
    finally:
        os.environ[SERVE_FORM_ENV] = "auto" if before is None else before


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """MLflow's fluent API pointed at ``uri`` for the block, and put back after: MLflow also
    writes it to ``$MLFLOW_TRACKING_URI``, which would leave every later reader in this
    process (a notebook's ``study.results``) at a server that has since stopped."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


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


def pull(ref: str, out: str | Path, tracking_uri: str, where: str | None = None) -> dict[str, Any]:
    """Download a registered model and its card to ``out``; returns the card. ``where``: how an
    error names the registry (default: ``at TRACKING_URI``)."""
    import mlflow
    from mlflow import MlflowClient

    uri = parse_model_ref(ref)
    client = MlflowClient(tracking_uri)
    name = uri[len("models:/"):].split("@")[0].split("/")[0]
    try:
        if "@" in uri:
            mv = client.get_model_version_by_alias(name, uri.split("@", 1)[1])
        else:
            mv = client.get_model_version(name, uri.rsplit("/", 1)[1])
    except Exception as e:
        raise ConfigError(f"model: {ref!r} was not found in the registry {where or 'at ' + tracking_uri} ({e}); "
                          f"it holds {_registry_contents(client, name)}") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with _tracking_uri(tracking_uri):
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{mv.version}", dst_path=str(out / "model"))
        mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path="decomposed_model_card", dst_path=str(out))
    card = json.loads((out / "decomposed_model_card" / CARD).read_text())
    card["version"] = mv.version
    card["aliases"] = list(getattr(mv, "aliases", []) or [])
    card["model_uri"] = f"models:/{name}/{mv.version}"
    (out / CARD).write_text(json.dumps(card, indent=2))
    return card


def check_pulled(out: str | Path) -> dict[str, Any]:
    """Load a pulled model as a user does (``mlflow.pyfunc.load_model``: the fastest form of
    this machine is planned while loading), run its example batch, and time the deployed
    form against its dense form here."""
    import mlflow
    import numpy as np

    from rank1.convert import dense_model
    from rank1.measure import keep_freed_memory, machine_info, time_forward

    out = Path(out)
    model = mlflow.pyfunc.load_model(str(out / "model"))
    batch = torch.load(out / "decomposed_model_card" / EXAMPLE, weights_only=True)
    pred = np.asarray(model.predict(batch["x"].numpy())).argmax(1)
    served = model.unwrap_python_model()
    keep_freed_memory()
    timing = {}
    for b, deployed in sorted(served.deployed.items()):
        x = torch.randn(b, *batch["x"].shape[1:], device=served.device)
        dense = dense_model(served.net)
        td = time_forward(dense, x, repeats=10, min_time_s=0.2).median_ms
        tf = time_forward(deployed, x, repeats=10, min_time_s=0.2).median_ms
        timing[b] = {"plan": deployed.plan.summary(), "deployed_ms": tf, "dense_ms": td, "speedup": td / tf,
                     "impls": deployed.plan.impls}
    labels = batch["y"].numpy()
    info = machine_info(served.device)
    return {"predicted": pred.tolist(), "labels": labels.tolist(), "correct": int((pred == labels).sum()),
            "batch": len(labels), "timing": timing, "machine": info.get("cpu", info.get("gpu", str(served.device))),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":  # python -m study.registry DIR: the fresh-process check of `rank1 pull`
    import sys

    from rank1.cli import exit_program

    print(json.dumps(check_pulled(sys.argv[1])))
    exit_program(0)
