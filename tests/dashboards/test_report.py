"""The study report: built from the smoke study, checked against MLflow, opened in a real browser."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dashboards.data import StudyData, TrialRecord
from dashboards.report import build_report
from study.names import experiment_url
from tests.study.conftest import REPO, trial_runs

SECTIONS = ["frontier", "gradients", "lowrank", "projection", "init", "speed", "search", "verdict", "champion"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"


def _browser():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed: `make browser` (run by .ci/run) installs it")
        pytest.skip("Debian's chromium is not installed here (`make browser` installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright, CHROMIUM


_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
          "--disable-component-update", "--disable-sync"]


@pytest.mark.slow
def test_report_from_the_smoke_study(smoke_study, smoke_tracking):
    tmp, _, _ = smoke_study
    home = tmp / "home"
    out = home / "report"
    html = (out / "report.html").read_text()
    for key in SECTIONS:
        assert f"data-section='{key}'" in html, key
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 7 and all(p.stat().st_size > 5000 for p in pngs)
    assert "http://" not in html.split("<body>")[1].split("built")[0]  # self-contained
    assert "<script" not in html and "src='http" not in html
    verdict = json.loads((out / "verdict.json").read_text())
    # Recompute the paired difference from MLflow: one seed per trial, so per-trial metrics are the pairs.
    client = smoke_tracking[0]
    runs = trial_runs(client, "smoke")
    diffs = [r.data.metrics["final/rank1.decomposed_val_acc"] - r.data.metrics["final/flat1d.decomposed_val_acc"]
             for r in runs if r.data.tags["rank1.status"] == "finished"]
    exp = client.get_experiment_by_name("smoke")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'parent'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    confirms = client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'confirm'")
    assert verdict["n_pairs"] == len(diffs) == 4
    assert verdict["mean_diff"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    assert f"{verdict['mean_diff']:+.3f}" in verdict["sentence"] and "too few pairs" in verdict["sentence"]
    # Each variant pair's own verdict counts the trials it came from (it said "(0 trials)").
    assert verdict["pairs"]["rank1 vs flat1d"]["n_trials"] == 4 and len(verdict["pairs"]) > 1
    for pair in verdict["pairs"].values():
        n = pair["n_trials"]
        assert n >= 1 and f"({n} trial{'s' if n != 1 else ''})" in pair["sentence"], pair
    assert {"report/report.html", "report/frontier.png", "report/verdict.json", "report/low_rank.png"} <= logged
    # Best vs best, recomputed from the confirmation runs in MLflow: 2 fresh seeds per arm, on test.
    from dashboards.stats import best_vs_best

    tests = {a: [r.data.metrics[f"final/{a}.test_acc"] for r in sorted(confirms, key=lambda r: r.data.tags["rank1.seed"])
                 if r.data.tags["rank1.arm"] == a] for a in ("rank1", "flat1d", "dense")}
    assert {a: len(v) for a, v in tests.items()} == {"rank1": 2, "flat1d": 2, "dense": 2}
    bvb = verdict["best_vs_best"]["rank1 vs flat1d"]
    ref = best_vs_best("rank1", tests["rank1"], "flat1d", tests["flat1d"])
    assert bvb["diff"] == pytest.approx(ref.diff, abs=1e-12) and bvb["ci_low"] == pytest.approx(ref.ci_low)
    assert bvb["mean_a"] == pytest.approx(sum(tests["rank1"]) / 2, abs=1e-12)
    assert "rank1 vs dense" in verdict["best_vs_best"] and "Too few seeds" in bvb["sentence"]
    assert "Tuned best vs best answers" in html and "Paired at equal settings answers" in html
    assert "Low-rank outputs: rank1 vs flat1d vs dense" in html
    # The champion's speed says where it was measured, as the study's summary does.
    assert "speed measured" in html and "inside the trial: 1 thread, " in html and "running beside it" in html


@pytest.mark.slow(seconds=16)
def test_report_and_mlflow_ui_in_a_real_browser(smoke_study, smoke_tracking):
    sync_playwright, chromium = _browser()
    tmp, _, _ = smoke_study
    home = tmp / "home"
    ARTIFACTS.mkdir(exist_ok=True)
    n_png = len(list((home / "report").glob("*.png")))
    client, url = smoke_tracking
    with sync_playwright() as pw:
        exp = client.get_experiment_by_name("smoke")
        parent = client.search_runs([exp.experiment_id], filter_string="tags.`rank1.role` = 'parent'")[0]
        browser = pw.chromium.launch(executable_path=chromium, args=_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((home / "report" / "report.html").as_uri())
            assert page.locator("section[data-section]").count() == len(SECTIONS)
            widths = page.eval_on_selector_all("img.figure", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len(widths) == n_png and all(w > 100 for w in widths), widths
            assert "paired run" in page.locator("#headline").inner_text()
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
            assert errors == []

            ui = browser.new_page(viewport={"width": 1400, "height": 900})
            ui.goto(f"{url}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}/artifacts")
            folder = ui.get_by_text("report", exact=True).first
            folder.wait_for(timeout=60000)
            folder.click()
            ui.keyboard.press("ArrowRight")  # expand the folder in the artifact tree
            listed = ui.get_by_text("report.html").first
            listed.wait_for(timeout=60000)
            listed.click()  # MLflow previews the HTML in place
            ui.get_by_text("report/report.html").first.wait_for(timeout=60000)
            ui.wait_for_timeout(2000)
            ui.screenshot(path=str(ARTIFACTS / "mlflow-ui-report.png"))

            # The experiment opens on its training runs (model-training mode), not on GenAI traces.
            assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
            runs_page = browser.new_page(viewport={"width": 1400, "height": 900})
            runs_page.goto(experiment_url(url, exp.experiment_id))  # the link `rank1 ui` and the summary print
            runs_page.get_by_text("smoke (study)", exact=True).first.wait_for(timeout=60000)  # the runs table
            n_runs = len(client.search_runs([exp.experiment_id], max_results=1000))
            runs_page.get_by_text(f"{n_runs} matching runs").first.wait_for(timeout=60000)
            runs_page.wait_for_timeout(1500)
            runs_page.screenshot(path=str(ARTIFACTS / "mlflow-ui-experiment.png"))
            assert "/runs" in runs_page.url and "traces" not in runs_page.url.lower()
            # The registered model version shows its model card as its description.
            mv = client.get_model_version_by_alias("smoke-decomposed", "champion")
            card = browser.new_page(viewport={"width": 1400, "height": 900})
            card.goto(f"{url}/#/models/smoke-decomposed/versions/{mv.version}")
            card.get_by_text("Pull it:", exact=False).first.wait_for(timeout=60000)
            assert "validation accuracy (decomposed)" in card.content()
            card.screenshot(path=str(ARTIFACTS / "mlflow-ui-model-version.png"), full_page=True)
        finally:
            browser.close()


def _record(trial_id: str, status: str, results, depth=2) -> TrialRecord:
    return TrialRecord(trial_id, f"run-{trial_id}", status, None if status == "finished" else "loss became nan",
                       {"depth": depth, "init": "kaiming"}, {"projection": "epoch:1", "projection_norm": "keep"},
                       {}, results, "COMPLETE" if status == "finished" else "FAIL", [0.5] if status == "finished" else None)


def _data(trials) -> StudyData:
    order = [(i, t.optuna_state, t.values) for i, t in enumerate(trials)]
    return StudyData("tiny", "1", "p", "http://127.0.0.1:1", trials, 3, 1, "tiny-decomposed", None, order, None,
                     "importances need at least 3 completed trials")


@pytest.fixture(scope="module")
def one_result():
    from rank1.train import TrainConfig, train_pair

    return train_pair(TrainConfig(depth=2, width=4, epochs=2, latency_repeats=2, latency_batch=4)).to_dict()


def test_a_single_trial_still_renders_and_says_what_is_missing(tmp_path, one_result):
    summary = build_report(_data([_record("a", "finished", [one_result])]), tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert summary["sections"] == SECTIONS
    assert "Too few to conclude anything" in html and "too few pairs to conclude" in html
    assert "Only one depth was trained" in html and "No model was registered" in html


def test_failed_trials_only_still_render(tmp_path, one_result):
    bad = dict(one_result)
    bad["arms"] = {a: {**r, "status": "diverged"} for a, r in one_result["arms"].items()}
    build_report(_data([_record("a", "diverged", [bad]), _record("b", "failed", None)]), tmp_path)
    html = (tmp_path / "report.html").read_text()
    assert "No trial finished both arms" in html and "Data: 0 finished trials" in html
    assert "could not be drawn" not in html


def test_the_champion_section_reads_the_arm_it_ships(one_result):
    """A flat1d champion (a study whose objective is flat1d): its own speed and sizes, not rank1's
    (which such a card may hold too), and the pull that reaches the study's store."""
    from dashboards.figures import champion

    data = _data([_record("a", "finished", [one_result])])
    metrics = {"flat1d.speedup_b1": 2.0, "flat1d.speedup_b8": 3.5, "flat1d.threads": 1.0, "flat1d.dense_params": 900.0,
               "flat1d.decomposed_params": 300.0, "rank1.speedup_b1": 9.0, "rank1.dense_params": 1.0}
    data.champion = {"name": "tiny-decomposed", "version": "1", "alias": "champion",
                     "pull": "rank1 pull tiny-decomposed@champion --home /h --out model/",
                     "card": {"arm": "flat1d", "trial_id": "a", "params": {"depth": 2}, "val_acc": 0.9, "metrics": metrics}}
    s = champion(data, [])
    assert s.data["arm"] == "flat1d" and s.data["speedup vs dense"] == "batch 1: 2.00x, batch 8: 3.50x"
    assert s.data["parameters (dense / decomposed)"] == "900 / 300"
    assert s.data["pull"] == "rank1 pull tiny-decomposed@champion --home /h --out model/"
