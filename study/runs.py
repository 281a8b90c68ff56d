"""The study's MLflow experiment and its parent run: created once, found again on resume.

Trials log their own child runs (:mod:`study.trial`); this is the study's side: the
tracking server it talks to (the embedded one over the home unless the study names one),
the experiment (tagged so the MLflow UI opens it as model training), the parent run with
its description, params and study files, and the trial runs found by their tags.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from rank1.train import ARM_CHOICES
from study.config import StudyConfig
from study.home import STATE_FILE, STUDY_FILE
from study.names import TAG_ROLE, TAG_STUDY, TAG_TRIAL
from study.services import MlflowServer

__all__ = ["EXPERIMENT_TAGS", "parent_run", "study_description", "trial_runs", "tracking"]


@contextlib.contextmanager
def tracking(cfg: StudyConfig, keep_ui: bool = False, server: MlflowServer | None = None) -> Iterator[str]:
    """The tracking URI: the study's server, or an embedded one over the study home
    (``server``: one launched already, while Ray started, waited for here and at the end only
    signalled to stop, its launcher waiting for it; if it did not come up, say because another
    process took its port first, a fresh one is started now)."""
    if cfg.tracking_uri:
        yield cfg.tracking_uri
        return
    launched = server
    if server is not None:
        try:
            server = server.ready(timeout=60)
        except RuntimeError:
            server.stop()
            server = None
    server = server or MlflowServer(cfg.home_path).start()
    try:
        yield server.url
    finally:
        if keep_ui:
            print(f"MLflow UI stays up at {server.url} (pid {server.proc.pid}); stop it with Ctrl-C")
            try:
                server.wait()
            except KeyboardInterrupt:
                pass
        # The launched server's exit overlaps Ray's shutdown (study.driver.run_study waits for it)
        server.stop(wait=server is not launched)


# The MLflow UI opens an experiment of this kind on its runs (model training), not on
# GenAI traces; the description is the experiment page's text.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development",
                   "mlflow.note.content": "A rank1-study hyperparameter study: rank-1 filters (rank1) against "
                                          "consecutive 1-D filters (flat1d) and the dense control; one parent run per "
                                          "study, a child run per trial; the report is in the parent run's artifacts."}


def study_description(cfg: StudyConfig, exp_id: str, run_id: str) -> str:
    """The parent run's description: what the study is, where its report is."""
    arms = ", ".join(sorted({a for arm in cfg.space.get("arm", [cfg.base.arm]) for a in ARM_CHOICES[arm]}))
    what = (f"a pre-registered grid of {cfg.n_trials} cells" if cfg.cells is not None else
            f"{cfg.n_trials} trials of an Optuna {cfg.sampler} search over {', '.join(sorted(cfg.space)) or 'nothing'}")
    return (f"**Study `{cfg.name}`**: {what}, each trial training {arms} on {cfg.base.dataset} "
            f"({cfg.base.model}, {cfg.base.epochs} epochs, {cfg.seeds_per_trial} seed(s) per trial"
            + (f"; then each arm's best configuration on {cfg.confirm_seeds} fresh seeds, scored on test" if
               cfg.confirm_seeds else "") + f"); objective {cfg.objective}.\n\n"
            f"- **Report**: [report/report.html](#/experiments/{exp_id}/runs/{run_id}/artifacts/report/report.html) "
            "in this run's artifacts (also `rank1 study report HOME`).\n"
            "- **Trials**: the child runs, named by their parameters; per-epoch curves are the unprefixed "
            "metrics, per-layer detail is under `layers/`, end-of-trial numbers under `final/`.\n"
            f"- **Model**: `{cfg.model_name}` in the registry (alias `champion`): `rank1 pull {cfg.model_name}@champion "
            "--out model/`.")


def parent_run(client, cfg: StudyConfig, study_text: str) -> tuple[str, str]:
    """The study's experiment and its one parent run (found again on resume)."""
    import rank1

    home = cfg.home_path
    exp = client.get_experiment_by_name(cfg.name)
    exp_id = exp.experiment_id if exp else client.create_experiment(cfg.name, tags=EXPERIMENT_TAGS)
    if exp and exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp_id)
    for k, v in EXPERIMENT_TAGS.items():  # an experiment made before these tags existed gets them too
        client.set_experiment_tag(exp_id, k, v)
    state_path = home / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            client.get_run(run_id)
        except Exception:
            run_id = None
    if run_id is None:
        run = client.create_run(exp_id, run_name=f"{cfg.name} (study)", tags={
            TAG_ROLE: "parent", TAG_STUDY: cfg.name, "rank1.home": str(home),
            "rank1.version": rank1.__version__, "rank1.fingerprint": cfg.fingerprint(),
        })
        run_id = run.info.run_id
        client.set_tag(run_id, "mlflow.note.content", study_description(cfg, exp_id, run_id))
        from mlflow.entities import Param

        flat = {"n_trials": cfg.n_trials, "sampler": cfg.sampler, "objective": cfg.objective,
                "scheduler": cfg.scheduler, "seeds_per_trial": cfg.seeds_per_trial,
                "search": ",".join(sorted(cfg.space)), **{f"train.{k}": v for k, v in cfg.train.items()}}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in flat.items()])
        client.log_text(run_id, study_text, STUDY_FILE)
        import yaml

        client.log_text(run_id, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "resolved.yaml")
        client.log_text(run_id, yaml.safe_dump(cfg.base.to_dict(), sort_keys=False), "resolved_train.yaml")
    state_path.write_text(json.dumps({"parent_run_id": run_id, "experiment_id": exp_id,
                                      "fingerprint": cfg.fingerprint()}, indent=2))
    client.set_terminated(run_id, "RUNNING")
    return exp_id, run_id


def trial_runs(client, exp_id: str) -> dict[str, Any]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=5000)
    out: dict[str, Any] = {}
    for r in runs:
        out.setdefault(r.data.tags.get(TAG_TRIAL), []).append(r)
    return out
