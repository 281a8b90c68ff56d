"""The per-claim verdicts follow their stated rules on records with a known answer."""

from __future__ import annotations

from dashboards.claims import claims


def _rec(arm, depth, seed, acc, ratio=1.0, erank=0.5, penult=10.0, lr=0.1, **cfg):
    config = {"depth": depth, "batchnorm": False, "lr": lr, "projection": "epoch:1", "flat1d_init": "shared", **cfg}
    return {"arm": arm, "seed": seed, "config": config, "status": "finished" if acc is not None else "diverged",
            "val_acc": acc, "test_acc": acc, "gradflow": {"epoch1": {"out.ratio": ratio}},
            "lowrank": {"mean.entropy_frac": erank, "penultimate.energy99": penult}}


def _study(flat_acc_deep, rank1_ratio=1.0, flat_ratio=1e-6, rank1_penult=5.0):
    out = []
    for depth in (4, 16):
        for seed in range(3):
            noise = 0.01 * seed
            out.append(_rec("rank1", depth, seed, 0.9 + noise, ratio=rank1_ratio, penult=rank1_penult))
            acc = flat_acc_deep if depth == 16 else 0.9
            out.append(_rec("flat1d", depth, seed, None if acc is None else acc + noise, ratio=flat_ratio))
            out.append(_rec("dense", depth, seed, 0.95 + noise, penult=10.0))
    return out


def test_trainability_holds_only_where_flat1d_fails_and_rank1_trains():
    c = claims(_study(flat_acc_deep=None), ["depth"], [])  # flat1d diverges at depth 16: scored as chance
    assert c["verdicts"]["trainability"].startswith("Holds only for flat1d at depth 16: there the consecutive")
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [])
    assert c["verdicts"]["trainability"].startswith("Does not hold here")


def test_gradient_flow_and_low_rank_verdicts():
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [])
    assert c["verdicts"]["gradient_flow"].startswith("Holds: after epoch 1, rank1's gradient flow is better than "
                                                     "flat1d's in 2 of 2 cells")
    assert c["verdicts"]["low_rank"].startswith("Holds: the final (penultimate) features")
    c = claims(_study(flat_acc_deep=0.85, rank1_ratio=1e-6, flat_ratio=1.0, rank1_penult=20.0), ["depth"], [])
    assert c["verdicts"]["gradient_flow"].startswith("Does not hold") and c["verdicts"]["low_rank"].startswith(
        "Does not hold")


def test_fast_inference_from_the_champion():
    champ = {"arm": "rank1", "metrics": {"rank1.speedup_b1": 1.5, "rank1.speedup_b32": 0.8, "rank1.flop_ratio": 8.0,
                                         "rank1.fraction_of_flop_ratio_b1": 0.19, "rank1.threads": 1.0}}
    c = claims(_study(flat_acc_deep=0.85), ["depth"], [], champion=champ)
    assert c["verdicts"]["fast_inference"].startswith("Holds only at some batch sizes: the champion's (rank1) deployed")
    assert "1.50x its dense form at batch 1" in c["verdicts"]["fast_inference"] and "| 32 |" in c["speed_markdown"]


def test_the_readme_tables_regenerate_from_an_export(tmp_path, monkeypatch):
    """benchmarks/replication/tables.py: one command from the committed export to the README's
    claims section and its introduction's verdicts, with where, when and on what it ran."""
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "replication" / "tables.py"
    spec = importlib.util.spec_from_file_location("replication_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    recs = [{**r, "phase": "search", "trial_id": f"t{r['config']['depth']}", "inference": {}}
            for r in _study(flat_acc_deep=None)]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    summary = {"study": "s", "study_config": {"n_trials": 2, "seeds_per_trial": 3, "confirm_seeds": 0,
                                              "train": {"dataset": "imagefolder", "train_subset": 4000, "seed": 0}},
               "machine": {"cpu": "Test CPU", "threads": 2, "torch": "2.x"}, "started": "2026-12-01T11:11:00Z",
               "ended": "2026-12-01T13:40:00Z", "outcome": {"timings": {"total_s": 9000.0}},
               "mlflow_experiment_id": "1", "mlflow_run_ids": ["a", "b"]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- verdicts:begin -->\nstale\n<!-- verdicts:end -->\nmid\n"
                      "<!-- claims:begin -->\nstale tables\n<!-- claims:end -->\nend\n")
    monkeypatch.setattr(sys, "argv", ["tables.py", "--dir", str(tmp_path), "--by", "depth", "--select",
                                      "--readme", str(readme), "--caveat", "JPEG caveat."])
    tables.main()
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("end\n")
    intro = text.split("<!-- verdicts:begin -->\n")[1].split("<!-- verdicts:end -->")[0]
    assert intro.startswith("- **Trainability.** Holds only for flat1d at depth 16") and "|" not in intro
    body = text.split("<!-- claims:begin -->\n")[1].split("<!-- claims:end -->")[0]
    assert "Ran on Test CPU (2 threads" in body and "2.48 h elapsed" in body and "train_subset 4,000" in body
    assert "3 seeds per cell" in body and "JPEG caveat." in body
    assert (tmp_path / "tables.md").read_text() == body
