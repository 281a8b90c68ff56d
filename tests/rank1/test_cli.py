"""The rank1 command line end to end, as a user runs it (in-process and as a real process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rank1.cli import main


def test_train_smoke_prints_both_arms_and_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", "--smoke", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank1" in text and "flat1d" in text and "val acc (decomposed)" in text
    data = json.loads(out.read_text())
    assert data["config"]["depth"] == 2 and data["config"]["epochs"] == 1  # --smoke
    assert set(data["arms"]) == {"rank1", "flat1d"}
    assert data["arms"]["rank1"]["status"] == "finished"


def test_config_file_then_cli_options_override(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("depth: 3\nwidth: 4\nepochs: 1\nmeasure_latency: false\narm: rank1\n")
    out = tmp_path / "r.json"
    assert main(["train", "--config", str(cfg), "--depth", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert (data["config"]["depth"], data["config"]["width"], data["config"]["arm"]) == (1, 4, "rank1")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--depth", "0"], "depth: 0 must be >= 1"),
        (["train", "--projection", "sometimes"], "projection: 'sometimes' is not allowed"),
        (["train", "--dataset", "mnist", "--root", "/nonexistent/data"], "/nonexistent/data"),
        (["train", "--lr", "-1"], "lr: -1.0 must be > 0"),
        (["bench", "--model", "alexnet"], "--model: 'alexnet' is not allowed (allowed: 'resnet', 'vgg')"),
        (["bench", "--repeats", "1"], "--repeats must be >= 2"),
        (["bench", "--depth", "40"], "--depth: 40 must be <= 32"),
        (["bench", "--max-gmac", "nan"], "--max-gmac: nan is not allowed (allowed: a finite number > 0)"),
        (["bench", "--networks", "--thread-counts", "0"], "--thread-counts: 0 is not allowed"),
        (["bench", "--networks", "--depths", "4", "64"], "--depths: depth: 64 must be <= 32"),
        (["bench", "--networks", "--widths", "0"], "--widths: width: 0 must be >= 1"),
        (["bench", "--networks", "--sizes", "0"], "--sizes: 0 is not allowed (allowed: integers >= 1)"),
        (["bench", "--depths", "4"], "--depths: allowed only with --networks"),
        (["train", "--lr", "nan"], "lr: nan is not allowed (allowed: a finite number)"),
        (["train", "--gamma", "inf"], "gamma: inf is not allowed (allowed: a finite number)"),
        (["train", "--warmup-epochs", "nan"], "warmup_epochs: nan is not allowed"),
        (["train", "--rank1-lr", "-0.1"], "rank1_lr: -0.1 must be > 0"),
        (["train", "--dense-lr", "0.1"], "dense_lr: set to 0.1 for the dense arm, which is not trained"),
        (["train", "--train-subset", "0"], "train_subset: 0 must be >= 1"),
        (["sweep", "--grid", "lr=nan"], "lr: expected float, got 'nan' (str)"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_dataset_that_cannot_be_read_is_one_line_not_a_traceback(tmp_path, capsys):
    folder = tmp_path / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for n in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / n).write_bytes(b"not an idx file")
    assert main(["train", "--dataset", "mnist", "--root", str(tmp_path), "--smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rank1 train: error: mnist: could not read the dataset under") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("depht: 3\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "depht: unknown key (allowed:" in capsys.readouterr().err
    cfg.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "is not valid YAML" in capsys.readouterr().err


def test_argparse_errors_exit_2_from_a_real_process():
    p = subprocess.run([sys.executable, "-m", "rank1.cli", "train", "--init", "he"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "argument --init: invalid choice: 'he'" in p.stderr


def test_the_programs_quick_exit_keeps_its_code_output_and_exit_handlers(tmp_path):
    """``exit_program`` skips the collector's passes at exit, nothing else: the exit code, output
    not yet flushed, atexit handlers and the finalizer of garbage left at the end all happen."""
    code = (
        "import atexit, gc, sys\n"
        "from rank1.cli import exit_program\n"
        "class Note:\n"
        "    def __init__(self): self.me = self  # garbage in a cycle: only the collector finalizes it\n"
        f"    def __del__(self): open({str(tmp_path / 'finalized')!r}, 'w').close()\n"
        "Note()\n"
        "atexit.register(lambda: print(f'frozen={gc.get_freeze_count() > 0}', flush=True))\n"
        "sys.stdout.write('unflushed;')\n"
        "exit_program(3)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 3 and p.stdout == "unflushed;frozen=True\n", p.stdout + p.stderr
    assert (tmp_path / "finalized").exists()
    # the `rank1` console script ends the same way
    from importlib.metadata import entry_points

    assert {e.name: e.value for e in entry_points(group="console_scripts")}["rank1"] == "study.cli:program"


def test_sweep_writes_a_markdown_table(tmp_path, capsys):
    assert main(["sweep", "--smoke", "--depths", "1", "2", "--seeds", "2", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "sweep.md").read_text()
    assert "| depth | rank1 | flat1d |" in md
    assert md.count("±") >= 4
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert len(data["rows"]) == 4 and {r["depth"] for r in data["rows"]} == {1, 2}


def test_sweep_expands_arm_options_for_their_arm_only_selects_per_arm_and_resumes(tmp_path, capsys):
    argv = ["sweep", "--smoke", "--arm", "all", "--grid", "lr=0.05,0.2", "projection=epoch:1,step:5",
            "flat1d_init=shared,torch", "--depths", "2", "--select", "lr", "--seeds", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    # per (lr, seed): rank1 twice (two periods), flat1d twice (two inits), dense once -- nothing repeated
    assert len(runs) == 2 * 2 * (2 + 2 + 1) and len({r["key"] for r in runs}) == len(runs)
    assert {r["config"]["flat1d_init"] for r in runs if r["arm"] != "flat1d"} == {"shared"}
    assert {r["config"]["projection"] for r in runs if r["arm"] != "rank1"} == {"epoch:1"}
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert {r["variant"] for r in rows} == {"rank1 (epoch:1)", "rank1 (step:5)", "flat1d (shared)", "flat1d (torch)",
                                           "dense"}
    for row in rows:  # each variant at its own best lr, by mean validation accuracy over the seeds
        mine = [r for r in runs if r["arm"] == row["arm"] and (row["arm"] != "rank1" or row["variant"].endswith(
            f"({r['config']['projection']})")) and (row["arm"] != "flat1d" or row["variant"].endswith(
            f"({r['config']['flat1d_init']})"))]
        means = {lr: sum(r["val_acc"] for r in mine if r["config"]["lr"] == lr) / 2 for lr in (0.05, 0.2)}
        assert row["lr"] == max(sorted(means), key=lambda k: means[k])
        tests = [r["test_acc"] for r in mine if r["config"]["lr"] == row["lr"]]
        assert row["test_acc"] == sum(tests) / 2 and row["n"] == 2
    # running again trains nothing: every run is in runs.jsonl
    before = (tmp_path / "runs.jsonl").read_text()
    assert main(argv) == 0
    assert (tmp_path / "runs.jsonl").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["sweep", "--grid", "lr"], "--grid: 'lr' is not allowed (allowed: FIELD=VALUE"),
    (["sweep", "--grid", "seed=1,2"], "--grid: 'seed' is not allowed"),
    (["sweep", "--grid", "lr=0.1,-1"], "lr: -1.0 must be > 0"),
    (["sweep", "--grid", "lr=0.1,0.2", "--select", "momentum"], "--select: 'momentum' must be a --grid field with two"),
    (["sweep", "--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_sweep_options(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_networks_on_a_chosen_grid(tmp_path, capsys):
    assert main(["bench", "--networks", "--smoke", "--depths", "2", "3", "--widths", "8", "--batches", "2",
                 "--sizes", "16", "--thread-counts", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "networks.json").read_text())["networks"]
    assert [(r["depth"], r["width"], r["batch"], r["size"], r["threads"]) for r in rows] == [(2, 8, 2, 16, 1), (3, 8, 2, 16, 1)]
    md = (tmp_path / "networks.md").read_text()
    assert "--networks --depths 2 3 --widths 8 --batches 2 --sizes 16 --thread-counts 1" in md
    assert "on 2 of 2 networks" in md or "on 1 of 2 networks" in md or "on 0 of 2 networks" in md
    lo, hi = rows[0]["speedup_paired_range"]
    assert f"{rows[0]['speedup_paired']:.2f}x [{lo:.2f}, {hi:.2f}]" in md and "speedup vs dense, paired" in md
    assert not (tmp_path / "networks.partial.json").exists()


def test_bench_a_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # a wide terminal: rich wraps cells at pytest's default of 80
    assert main(["bench", "--model", "vgg", "--depth", "2", "--width", "8", "--size", "16", "--batch", "2",
                 "--repeats", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "network.json").read_text())
    row = data["network"]["rows"][0]
    assert row["flop_ratio"] > 1 and row["speedup"] == pytest.approx(row["dense_ms"] / row["auto_ms"])
    assert {"dense", "dense-cl", "chain", "chain-cl", "greedy", "greedy-cl", "auto"} <= set(row["times_ms"])
    singles = {k: v for k, v in row["times_ms"].items() if not k.startswith(("greedy", "auto"))}
    assert row["auto_vs_best_single_first_pass"] == pytest.approx(row["auto_ms"] / min(singles.values()))
    # judged re-timed beside the best single form, paired, with a copy of that form as the noise floor
    lo, hi = row["auto_vs_best_single_range"]
    assert lo <= row["auto_vs_best_single"] <= hi and row["best_single"] in singles
    lo, hi = row["best_single_copy_range"]
    assert lo <= row["best_single_copy_ratio"] <= hi
    # and its speedup over the faster dense form paired too (dense / auto within each round)
    lo, hi = row["speedup_paired_range"]
    assert 0 < lo <= row["speedup_paired"] <= hi
    assert row["fraction_of_flop_ratio_paired"] == pytest.approx(row["speedup_paired"] / row["flop_ratio"])
    assert f"{row['speedup_paired']:.2f}x [{lo:.2f}, {hi:.2f}]" in capsys.readouterr().out  # the table prints it
    assert data["machine"]["threads"] >= 1 and {k["name"] for k in data["kernels"]} >= {"chain", "dw2d", "dense"}
