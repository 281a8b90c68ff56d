"""The smoke study end to end on a real local Ray, a real MLflow server, real SQLite stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from rank1.data import TensorLoader, load_dataset
from rank1.models import model_for
from study.config import load_study
from study.names import counted, experiment_url
from study.trial import load_checkpoint
from tests.study.conftest import cli, mlflow_client, optuna_trials, trial_runs, write_study

pytestmark = pytest.mark.slow


@pytest.fixture
def smoke(smoke_study):
    return smoke_study


def test_summary_and_home(smoke):
    tmp, path, p = smoke
    home = tmp / "home"
    assert "study smoke: 4 finished" in p.stdout
    assert "best vs best" in p.stdout
    assert "models:/smoke-decomposed@champion" in p.stdout
    assert "rank1 ui --home" in p.stdout  # how to open the UI
    # piped (80 columns), the summary cuts nothing off, and the runs' link is whole on its own line
    summary = p.stdout[p.stdout.index("study smoke: 4 finished"):]
    assert "…" not in summary
    exp = json.loads((home / "state.json").read_text())["experiment_id"]
    assert experiment_url("http://127.0.0.1:5000", exp) in summary.splitlines()
    assert "Failed to fetch metrics" not in p.stdout + p.stderr  # Tune read back what it wrote (result.json)
    # registering the champion: none of MLflow's progress lines (the summary's model row says it)
    for chatter in ("Validating input example", "Successfully registered model", "Waiting up to", "Created version"):
        assert chatter not in p.stdout + p.stderr, chatter
    # the champion's speedup says how it was timed: one thread, with the other trials counted
    outcome = json.loads((home / "outcome.json").read_text())
    others = counted(outcome["best"]["metrics"]["latency.other_trials_running"], "other trial")
    assert f"inside the trial: 1 thread, {others} running" in " ".join(p.stdout.split()).replace("│ ", "")
    for f in ("study.yaml", "resolved.yaml", "state.json", "optuna.db", "mlflow.db", "outcome.json", "confirm.json"):
        assert (home / f).exists(), f
    assert not (home / "mlflow-server.json").exists()  # the embedded server was stopped
    # Tune got the short view of each trial's end (its experiment state keeps statistics of every key
    # it is sent, per trial); the champion's numbers in the outcome are all of them, from its checkpoint
    finals = [json.loads(f.read_text().splitlines()[-1]) for f in (home / "ray_results" / "tune").glob("*/result.json")]
    assert len(finals) == 4 and all(r["final"] for r in finals)
    from study.trial import tune_view

    for r in finals:
        numbers = {k for k in r if k.startswith(("rank1.", "flat1d.", "dense.", "paired.", "latency.", "overhead."))}
        assert numbers == {k for k in tune_view(r) if k in numbers} and "rank1.decomposed_val_acc" in numbers
    best = outcome["best"]["metrics"]
    assert {"rank1.speedup_b1", "rank1.flop_ratio", "rank1.decomposed_val_acc", "trial_id"} <= set(best)
    assert len(best) > 4 * len(tune_view(best))


def test_registering_the_champion_plans_no_kernels_on_the_driver(smoke):
    """MLflow checks a model before it is registered by loading it; the driver has that load the
    `chain` form, so `auto` plans nothing for the driver's machine: every plan in the study's
    kernel cache is a trial's (one thread each), none the driver's (all the cores)."""
    tmp, _, _ = smoke
    if (os.cpu_count() or 1) < 2:
        pytest.skip("on one core the driver's plans and the trials' have the same key")
    keys = list(json.loads((tmp / "impl_cache.json").read_text()))
    assert keys and all(", 1 threads:" in k for k in keys), keys


def test_one_parent_and_exactly_one_child_run_per_trial(smoke, smoke_tracking):
    tmp, _, p = smoke
    # Every trial's end was written by the driver while the study ran (study.ends), none left for after it.
    assert "MLflow lacked the end" not in p.stdout
    client = smoke_tracking[0]
    exp = client.get_experiment_by_name("smoke")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"study.yaml", "resolved.yaml", "resolved_train.yaml"} <= artifacts
    assert parent.data.tags["rank1.version"]
    runs = trial_runs(client, "smoke")
    ids = [r.data.tags["rank1.trial_id"] for r in runs]
    assert len(ids) == 4 and len(set(ids)) == 4
    for r in runs:
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["rank1.status"] == "finished" and r.info.status == "FINISHED"
        m = r.data.metrics
        # per-epoch curves unprefixed; per-layer detail under layers/; end-of-trial numbers under final/
        for key in ("rank1.val_acc", "flat1d.val_acc", "dense.val_acc", "paired.val_acc_diff", "objective",
                    "rank1.grad.out.ratio", "layers/rank1.grad.out.L00", "layers/flat1d.grad.out.L00",
                    "layers/dense.grad.out.L00", "layers/rank1.weight.L00",
                    "final/rank1.decomposed_val_acc", "final/flat1d.decomposed_val_acc", "final/paired.val_acc_diff",
                    "final/rank1.flop_ratio", "final/rank1.decomposed_latency_ms_b1", "final/rank1.speedup_b8",
                    "final/rank1.chain_speedup_b8", "final/rank1.fraction_of_flop_ratio_b8",
                    "final/dense.shipped_val_acc", "final/paired.rank1_minus_dense_val_acc",
                    "final/rank1.gradflow.init.out.ratio", "final/flat1d.gradflow.epoch1.out.L00",
                    "final/dense.gradflow.end.out.min", "final/rank1.lowrank.mean.entropy_frac",
                    "final/dense.lowrank.penultimate.energy99", "final/latency.threads",
                    "final/latency.other_trials_running"):
            assert key in m, key
        assert not [k for k in m if "/" not in k and (".L0" in k or k.startswith(("final", "rank1.decomposed")))]
        assert r.data.tags["rank1.rank1.deploy_b8"] and "deploy_plan.json" in {
            a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"rank1_lr", "flat1d_lr", "search.rank1_lr", "search.flat1d_lr"} <= set(r.data.params)
        searched = {k[len("search."):]: v for k, v in r.data.params.items() if k.startswith("search.")}
        assert r.info.run_name.startswith(f"d{searched['depth']} ") and searched["projection"] in r.info.run_name
        hist = client.get_metric_history(r.info.run_id, "rank1.val_acc")
        assert sorted(h.step for h in hist) == [1, 2]  # per epoch, each once
        assert {"depth", "init", "projection", "search.depth"} <= set(r.data.params)
        assert "trial_result.json" in {a.path for a in client.list_artifacts(r.info.run_id)}
        # the run ends when the trial ended (its end's own time), not when the driver wrote it
        history = client.get_metric_history(r.info.run_id, "final/rank1.decomposed_val_acc")
        assert [h.timestamp for h in history] == [r.info.end_time]


def test_optuna_storage_holds_every_value(smoke, smoke_tracking):
    tmp, _, _ = smoke
    trials = optuna_trials(tmp / "home", "smoke")
    assert len(trials) == 4
    client = smoke_tracking[0]
    by_id = {r.data.tags["rank1.trial_id"]: r for r in trial_runs(client, "smoke")}
    for t in trials:
        assert t.state.name == "COMPLETE"
        run = by_id[t.user_attrs["ray_trial_id"]]
        assert t.values[0] == pytest.approx(run.data.metrics["objective"])
        assert t.values[0] == pytest.approx(run.data.metrics["final/rank1.decomposed_val_acc"])
        assert sorted(t.intermediate_values) == [1, 2]


def _trial_model(home, path, card):
    """The champion trial's own network, rebuilt from its final checkpoint (weights only)."""
    cfg = load_study(path)
    ckpts = sorted((home / "ray_results" / "tune").glob(f"*{card['trial_id']}*/checkpoint_*"))
    state = load_checkpoint(ckpts[-1])
    assert state["final"]
    tc = cfg.trial_config(state["params"], seed=card["seed"])
    data = load_dataset(tc.dataset, image_size=tc.image_size)
    model = model_for(tc, "rank1", 1, 10).eval()
    model.load_state_dict(state["models"]["rank1"][card["seed"] - cfg.base.seed])
    x, _ = next(iter(TensorLoader(data.val, len(data.val), data.mean, data.std)))
    return model, x, data


def _same_classes(logits, ref):
    """The same predicted class, except where the reference's top two are within float rounding."""
    top2 = ref.topk(2, dim=1).values
    tie = (top2[:, 0] - top2[:, 1]) < 1e-4
    return bool(((logits.argmax(1) == ref.argmax(1)) | tie).all())


@pytest.mark.slow(seconds=15)
def test_champion_is_registered_and_pull_serves_it_like_the_trial(smoke, tmp_path):
    tmp, path, _ = smoke
    home = tmp / "home"
    outcome = json.loads((home / "outcome.json").read_text())
    assert outcome["alias"] == "champion" and outcome["model_version"] == "1"
    out = tmp_path / "pulled"
    p = cli("pull", "smoke-decomposed@champion", "--home", str(home), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "fresh-process check" in p.stdout and "on this machine, batch 1" in p.stdout and "vs dense" in p.stdout
    card = json.loads((out / "model_card.json").read_text())
    assert card["trial_id"] == outcome["best"]["trial_id"] and card["aliases"] == ["champion"]
    model, x, data = _trial_model(home, path, card)
    import mlflow

    # The pulled pyfunc deploys the fastest form of this machine and predicts as the trial's model ...
    served = mlflow.pyfunc.load_model(str(out / "model"))
    plans = served.unwrap_python_model().deployed
    assert set(plans) == {1, card["latency_batch"]} and all(d.plan.measured for d in plans.values())
    with torch.no_grad():
        ref = model(x)
        logits = torch.as_tensor(served.predict(x.numpy()))
        assert torch.allclose(logits, ref, rtol=1e-4, atol=1e-4) and _same_classes(logits, ref)
    acc = float((logits.argmax(1) == data.val.y).float().mean())
    assert acc == pytest.approx(card["val_acc"], abs=1e-9)
    # The loader's choice of form (what the driver's check before registering uses): one form for
    # every batch size, nothing measured, the same predictions; a form that is none, a clear error.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANK1_SERVE_FORM", "chain")
        chain = mlflow.pyfunc.load_model(str(out / "model"))
        (deployed,) = chain.unwrap_python_model().deployed.values()
        assert not hasattr(deployed, "plan") and "Conv2d" in repr(deployed)
        with torch.no_grad():
            assert torch.allclose(torch.as_tensor(chain.predict(x.numpy())), ref, rtol=1e-4, atol=1e-4)
        mp.setenv("RANK1_SERVE_FORM", "fastest")
        with pytest.raises(Exception, match=r"RANK1_SERVE_FORM=fastest: impl must be one of \(.*'chain'.*'auto'\)"):
            mlflow.pyfunc.load_model(str(out / "model"))
    # ... and the exportable chain form inside it loads with torch.export alone (no rank1, no pickle).
    prog = torch.export.load(str(out / "model" / "artifacts" / "exportable.pt2"))
    with torch.no_grad():
        assert torch.allclose(prog.module()(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_mlflow_models_serve_answers_over_http_with_the_trials_predictions(smoke, tmp_path):
    """``mlflow models serve -m models:/NAME@champion`` for real, on 127.0.0.1, a batch over HTTP."""
    import subprocess
    import sys
    import time
    import urllib.request

    from study.services import MlflowServer, free_port

    tmp, path, _ = smoke
    home = tmp / "home"
    outcome = json.loads((home / "outcome.json").read_text())
    server = MlflowServer(home).start()
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/smoke-decomposed@champion",
                             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            # mlflow execs uvicorn from PATH: the virtual environment's, as in an activated shell
                            env={**os.environ, "MLFLOW_TRACKING_URI": server.url,
                                 "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not come up"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).close()
                break
            except OSError:
                time.sleep(1)
        card = json.loads((home / "outcome.json").read_text())["best"]
        with mlflow_client(home, server.url) as (client, _):
            mv = client.get_model_version_by_alias("smoke-decomposed", "champion")
            run = client.get_run(mv.run_id)
        seed = int(mv.tags["seed"])
        model, x, _ = _trial_model(home, path, {"trial_id": card["trial_id"], "seed": seed})
        batch = x[:16]
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                     data=json.dumps({"inputs": batch.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        logits = torch.tensor(answer["predictions"])
        with torch.no_grad():
            ref = model(batch)
        assert logits.shape == ref.shape and torch.allclose(logits, ref, rtol=1e-4, atol=1e-4)
        assert _same_classes(logits, ref) and run.data.tags["rank1.trial_id"] == outcome["best"]["trial_id"]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        server.stop()


def test_the_registry_shows_the_model_card(smoke, smoke_tracking):
    tmp, _, _ = smoke
    client = smoke_tracking[0]
    mv = client.get_model_version_by_alias("smoke-decomposed", "champion")
    rm = client.get_registered_model("smoke-decomposed")
    # the version comes from the champion trial's run, and that run lists the model as its output
    outcome = json.loads((tmp / "home" / "outcome.json").read_text())
    run = client.get_run(outcome["best"]["run_id"])
    assert mv.run_id == run.info.run_id
    (output,) = run.outputs.model_outputs
    assert output.model_id in mv.source, (output.model_id, mv.source)
    for text in (mv.description, rm.description):
        assert "rank1 pull smoke-decomposed" in text and "validation accuracy (decomposed)" in text
        assert "speedup over its dense form" in text and "mlflow models serve" in text


def test_confirmation_retrains_each_arms_best_with_fresh_seeds_on_test(smoke, smoke_tracking):
    tmp, path, p = smoke
    home = tmp / "home"
    confirm = json.loads((home / "confirm.json").read_text())
    client = smoke_tracking[0]
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'confirm'")
    by_trial = {r.data.tags["rank1.trial_id"]: r for r in trial_runs(client, "smoke")}
    assert sorted((r.data.tags["rank1.arm"], r.data.tags["rank1.seed"]) for r in runs) == [
        (a, s) for a in ("dense", "flat1d", "rank1") for s in ("1000", "1001")]  # fresh seeds: search used 0
    for arm, best in confirm["best"].items():
        # the best trial of each arm by that arm's own validation accuracy
        accs = {tid: r.data.metrics.get(f"final/{arm}.decomposed_val_acc", r.data.metrics.get(f"final/{arm}.shipped_val_acc"))
                for tid, r in by_trial.items()}
        assert best["val_acc"] == max(accs.values()) == accs[best["trial_id"]]
    for r in runs:
        arm = r.data.tags["rank1.arm"]
        assert r.data.tags["rank1.status"] == "finished" and r.data.params["arm"] == arm
        assert r.data.tags["rank1.confirm_of"] == confirm["best"][arm]["trial_id"]
        assert 0 <= r.data.metrics[f"final/{arm}.test_acc"] <= 1
        assert r.data.metrics["objective"] == r.data.metrics[f"final/{arm}.test_acc"]
        other = {"rank1": "flat1d_lr", "flat1d": "rank1_lr", "dense": "rank1_lr"}[arm]
        assert r.data.params[other] == "None"  # another arm's own setting does not travel with it
    assert "confirmation:" in p.stdout


def test_export_writes_what_mlflow_and_the_home_hold(smoke, tmp_path):
    """`rank1 study export`: every record once (runs.jsonl), the results table (trials.csv), and
    the summary's experiment, runs, champion and when the study ran, as MLflow holds them."""
    import csv

    tmp, _, _ = smoke
    home, out = tmp / "home", tmp_path / "export"
    p = cli("study", "export", str(home), "--out", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs) and {r["run_id"] for r in rows} == {r["run_id"] for r in recs}
    summary = json.loads((out / "summary.json").read_text())
    outcome = json.loads((home / "outcome.json").read_text())
    with mlflow_client(home) as (client, _):
        exp = client.get_experiment_by_name("smoke")
        children = client.search_runs([exp.experiment_id], max_results=1000)
        parent = client.get_run(outcome["parent_run_id"]).info
    assert summary["mlflow_experiment_id"] == exp.experiment_id
    assert set(summary["mlflow_run_ids"]) == {r.info.run_id for r in children if r.data.tags.get("rank1.role")
                                              in ("trial", "confirm")}
    assert summary["champion"]["version"] == outcome["model_version"] and summary["outcome"] == outcome
    assert summary["started"] and summary["ended"] and parent.end_time >= parent.start_time
    # every search trial x seed x arm, and one record per confirmation run
    search = [r for r in recs if r["phase"] == "search"]
    trials, arms, seeds = ({r[k] for r in search} for k in ("trial_id", "arm", "seed"))
    assert len(search) == len(trials) * len(arms) * len(seeds) and len(trials) == 4
    confirms = [r for r in children if r.data.tags.get("rank1.role") == "confirm"]
    assert len([r for r in recs if r["phase"] == "confirm"]) == len(confirms) > 0


def test_status_reads_the_storage(smoke):
    tmp, _, _ = smoke
    p = cli("study", "status", str(tmp / "home"), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["states"] == {"finished": 4} and s["best"] is not None
    # each value named (the smoke study's objective: rank1's accuracy), the best by its trial id
    assert s["value_names"] == ["rank1 val acc"]
    best = s["best"]
    assert best["trial_id"] == next(t["trial_id"] for t in s["trials"] if t["number"] == best["number"])
    p = cli("study", "status", str(tmp / "home"))
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("best so far:"))
    assert line.startswith(f"best so far: #{best['number']} ({best['trial_id']}) ")
    assert line.endswith(f": rank1 val acc {best['values'][0]:.4f}")


def test_a_second_study_in_the_same_home_is_refused(smoke):
    _, path, _ = smoke
    p = cli("study", "run", str(path), timeout=120)
    assert p.returncode == 2 and "already holds this study, which finished" in p.stderr  # not "continue it"


@pytest.mark.slow(seconds=35)
def test_asha_prunes_and_a_diverging_trial_is_recorded_while_the_study_goes_on(tmp_path):
    """ASHA-stopped trials are PRUNED in Optuna and MLflow (upstream records them COMPLETE); a
    trial whose loss diverges is FAIL with its reason (not pruned, though ASHA sees it last at its
    rung); the study goes on around both and picks its best from the finished trials."""
    # Random sampler, seed 0, one trial at a time (so later trials meet earlier rungs): lr 0.05, 1e6,
    # 0.0001, 0.05, 1e6.
    path = write_study(tmp_path, name="asha", scheduler="asha", grace_period=1, reduction_factor=2, n_trials=5,
                       max_concurrent=1, seed=0, train={"epochs": 4, "measure_latency": False},
                       search={"lr": [0.0001, 0.05, 0.1, 1000000.0]})
    p = cli("study", "run", str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "not measured (train.measure_latency: false)" in p.stdout  # the summary says why it has no speed
    home = tmp_path / "home"
    optuna = {t.user_attrs["ray_trial_id"]: t for t in optuna_trials(home, "asha")}
    with mlflow_client(home) as (client, _):
        runs = {r.data.tags["rank1.trial_id"]: r for r in trial_runs(client, "asha")}
    assert set(runs) == set(optuna) and len(runs) == 5
    statuses = {tid: r.data.tags["rank1.status"] for tid, r in runs.items()}
    assert {"diverged", "pruned", "finished"} <= set(statuses.values()), statuses
    for tid, r in runs.items():
        t = optuna[tid]
        if float(r.data.params["lr"]) == 1000000.0:
            assert statuses[tid] == "diverged" and r.info.status == "FAILED", statuses[tid]
            assert "loss became" in r.data.tags["rank1.reason"]
            assert (t.state.name, t.user_attrs.get("status")) == ("FAIL", "diverged")
        elif statuses[tid] == "pruned":
            assert t.state.name == "PRUNED" and r.info.status == "KILLED"
            assert "stopped early by ASHA" in r.data.tags["rank1.reason"]
            assert "final/rank1.decomposed_val_acc" not in r.data.metrics and "rank1.val_acc" in r.data.metrics
        else:
            assert statuses[tid] == "finished" and t.state.name == "COMPLETE"
    best = max((t for t in optuna.values() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    outcome = json.loads((home / "outcome.json").read_text())
    assert outcome["best"]["trial_id"] == best.user_attrs["ray_trial_id"] and outcome["best"]["params"] == best.params


@pytest.mark.slow(seconds=35)
def test_multi_objective_study_picks_from_the_pareto_front(tmp_path):
    path = write_study(tmp_path, name="multi", objective="multi", sampler="nsga2", latency_batch=1,
                       pareto_tolerance=0.05, n_trials=3)
    p = cli("study", "run", str(path))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    home = tmp_path / "home"
    trials = [t for t in optuna_trials(home, "multi") if t.state.name == "COMPLETE"]
    assert len(trials) == 3 and all(len(t.values) == 2 for t in trials)
    outcome = json.loads((home / "outcome.json").read_text())
    best = next(t for t in trials if t.user_attrs["ray_trial_id"] == outcome["best"]["trial_id"])
    top = max(t.values[0] for t in trials)
    # On the front, within the tolerance of the best accuracy, and the fastest of those.
    assert not any(t.values[0] >= best.values[0] and t.values[1] < best.values[1] for t in trials)
    near = [t for t in trials if t.values[0] >= top - 0.05
            and not any(u.values[0] >= t.values[0] and u.values[1] < t.values[1] for u in trials)]
    assert best.values[1] == min(t.values[1] for t in near)


def test_rank1_ui_serves_the_study_home_on_loopback(smoke_study):
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    from tests.study.conftest import REPO

    tmp, _, _ = smoke_study
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "ui", "--home", str(tmp / "home"), "--port", str(port)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5") as r:
                    names = [e["name"] for e in json.loads(r.read())["experiments"]]
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("rank1 ui did not come up")
        assert "smoke" in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)
