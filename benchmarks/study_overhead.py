"""What the study service costs: the same trials through Ray Tune + MLflow vs a plain loop.

    python benchmarks/study_overhead.py [--trials 8] [--out benchmarks/results]

Runs N identical trials (digits, vgg depth 4, both arms) three ways:
  plain    a loop over rank1.train.train_pair in this process (data loaded once)
  c=1      `rank1 study run` with one trial at a time
  c=2      `rank1 study run` with two trials at a time (this machine has 2 cores)
and reports the service's fixed start-up cost (MLflow server, Ray), its overhead per
trial (worker start, MLflow logging, checkpoints) and its parallel speedup.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"dataset": "digits", "model": "vgg", "depth": 4, "width": 16, "epochs": 3, "batch_size": 32,
         "latency_repeats": 5, "latency_batch": 32}


def plain(n: int) -> float:
    import torch

    from rank1.data import load_dataset
    from rank1.train import TrainConfig, train_pair

    torch.set_num_threads(1)  # as a trial gets with resources.cpu = 1
    cfg = TrainConfig(**TRAIN)
    t0 = time.perf_counter()
    data = load_dataset("digits")
    for _ in range(n):
        train_pair(cfg, data=data)
    return time.perf_counter() - t0


def service(n: int, concurrent: int, tmp: Path) -> dict[str, float]:
    study = {"name": f"overhead-c{concurrent}", "train": TRAIN, "search": {"init": ["kaiming"]},
             "n_trials": n, "max_concurrent": concurrent, "sampler": "random", "home": str(tmp / f"c{concurrent}"),
             "resources": {"cpu": 1}}
    path = tmp / f"c{concurrent}.yaml"
    path.write_text(yaml.safe_dump(study))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "study.cli", "study", "run", str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
    timings = json.loads((tmp / f"c{concurrent}" / "outcome.json").read_text())["timings"]
    return {"wall_s": wall, **timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    from rank1.measure import machine_info

    with tempfile.TemporaryDirectory(prefix="rank1-overhead-") as d:
        tmp = Path(d)
        t_plain = plain(args.trials)
        c1 = service(args.trials, 1, tmp)
        c2 = service(args.trials, 2, tmp)
    n = args.trials
    res = {
        "trials": n, "train": TRAIN, "plain_s": t_plain, "c1": c1, "c2": c2,
        "per_trial_plain_s": t_plain / n,
        "overhead_per_trial_s": (c1["fit_s"] - t_plain) / n,
        "startup_s": c1["startup_s"], "finish_s": c1["finish_s"],
        "parallel_speedup_fit": c1["fit_s"] / c2["fit_s"],
        "speedup_vs_plain_wall": t_plain / c2["wall_s"],
        "machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_overhead.json").write_text(json.dumps(res, indent=2))
    md = (
        f"| {n} identical trials (digits, vgg depth 4 width 16, 3 epochs, rank1 + flat1d) | seconds |\n|---|---|\n"
        f"| plain loop over `train_pair`, one process | {t_plain:.1f} ({t_plain / n:.1f} per trial) |\n"
        f"| service, 1 trial at a time: Tuner.fit | {c1['fit_s']:.1f} |\n"
        f"| service, 2 trials at a time: Tuner.fit | {c2['fit_s']:.1f} |\n"
        f"| service start-up (MLflow server + Ray), once per study | {c1['startup_s']:.1f} |\n"
        f"| service wrap-up (reconcile, register champion), once | {c1['finish_s']:.1f} |\n"
        f"| **overhead per trial** (c=1 fit − plain) / {n} | **{res['overhead_per_trial_s']:.2f}** |\n"
        f"| **parallel speedup** of fit, 2 vs 1 at a time | **{res['parallel_speedup_fit']:.2f}x** |\n"
        f"| whole study wall time, c=2, vs plain loop | {c2['wall_s']:.1f} vs {t_plain:.1f} |\n"
    )
    (out / "study_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
