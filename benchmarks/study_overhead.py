"""What the study service costs: the same trials through Ray Tune + MLflow vs a plain loop.

    python benchmarks/study_overhead.py [--trials 4 12] [--repeats 3] [--out benchmarks/results]

Runs identical trials (digits, vgg depth 4 width 16, 3 epochs, both arms) as
  plain      a loop over rank1.train.train_pair in this process (data loaded once), before
             and after the service runs (the machine drifts; the mean is the baseline), and
             the same loop in two processes at once: what this machine gives two trials
  service    `rank1 study run` with one and with two trials at a time, each with a small
             and a large number of trials.

The service's fixed costs (start-up: MLflow server, Ray, data; first start of each trial
worker; wrap-up) are paid once per study, so the cost *per trial* is the slope between the
small and the large study: (fit(large) - fit(small)) / (large - small), less the plain
loop's time per trial. The trials' own clocks (``final/overhead.*_s`` in MLflow) say where
a trial's time goes inside it; what is left of the slope is outside it (Tune's bookkeeping,
handing the worker to the next trial, the trial's last report; its end in MLflow, which the
driver writes beside the next trial).

The same clocks also give what the service adds to a trial without comparing two runs: for two
trials in a row on one worker, start to start, less the first one's training and finish and the
second one's build (:func:`_own_clock`). The plain loop's phases are timed the same way, so the
trial's own work in the service and in the plain loop stand side by side.

One repeat's slope moves between runs by more than the effects it measures (0.22-2.56 s per
trial over 13 runs on the same machine), so the four studies are measured ``--repeats`` times,
each repeat between two plain loops, and the headline numbers are the medians, every repeat's
listed beside them (~4.5 min per repeat on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"dataset": "digits", "model": "vgg", "depth": 4, "width": 16, "epochs": 3, "batch_size": 32,
         "latency_repeats": 5, "latency_batch": 32}
PHASES = ("setup", "data", "mlflow", "checkpoint", "report", "build", "train", "finish")  # the trial's _Clock
SERVICE = ("setup", "data", "mlflow", "checkpoint", "report")  # what the service adds inside a trial


def plain(n: int) -> tuple[float, float, dict[str, float]]:
    """``n`` trials in a loop in this process, data loaded once: (wall, CPU) seconds, and the
    median seconds of a trial's phases as the service's trials clock them (build, train, finish).
    Each trial is ``train_pair``'s own steps (``PairTrainer``, its epochs, ``finish``), as the
    service's trial takes them."""
    import torch

    from rank1.data import load_dataset
    from rank1.train import PairTrainer, TrainConfig, train_pair

    torch.set_num_threads(1)  # as a trial gets with resources.cpu = 1
    cfg = TrainConfig(**TRAIN)
    data = load_dataset("digits")
    train_pair(cfg, data=data)  # warm: the service's workers are warm after their first trial too
    spent: dict[str, list[float]] = {"build": [], "train": [], "finish": []}
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        pair = PairTrainer(cfg, data=data)
        spent["build"].append(time.perf_counter() - t)
        t = time.perf_counter()
        while not pair.done():
            pair.train_epoch([])
        spent["train"].append(time.perf_counter() - t)
        t = time.perf_counter()
        pair.finish([])
        spent["finish"].append(time.perf_counter() - t)
    return time.perf_counter() - t0, time.process_time() - c0, {k: statistics.median(v) for k, v in spent.items()}


def plain_parallel(n: int) -> float:
    """``n`` trials split over two processes running at once; wall seconds of the slower."""
    with ProcessPoolExecutor(2) as ex:
        return max(wall for wall, _, _ in ex.map(plain, [n // 2, n - n // 2]))


def service(n: int, concurrent: int, tmp: Path) -> dict[str, object]:
    name = f"overhead-c{concurrent}-n{n}"
    home = tmp / name
    study = {"name": name, "train": TRAIN, "search": {"init": ["kaiming"]}, "n_trials": n,
             "max_concurrent": concurrent, "sampler": "random", "home": str(home), "resources": {"cpu": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    t0 = time.perf_counter()
    with open(tmp / f"{name}.log", "w+") as log:
        p = subprocess.Popen([sys.executable, "-m", "study.cli", "study", "run", str(path)], stdout=log,
                             stderr=subprocess.STDOUT, text=True, cwd=REPO)
        cpu = _cpu_while(p)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            log.seek(0)
            raise SystemExit(log.read()[-6000:])
    timings = json.loads((home / "outcome.json").read_text())["timings"]
    runs = _trial_runs(home)
    return {"n": n, "concurrent": concurrent, "wall_s": wall, **timings, "phases": _phases(runs),
            "cadence_s": _cadence(runs, concurrent), "own_clock": _own_clock(runs), "cpu_s": cpu}


KINDS = ("trials", "mlflow_server", "driver", "ray")  # where the study's CPU time goes


def _kind(proc, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    cmd = " ".join(proc.cmdline())
    if "mlflow" in cmd:  # the server and its uvicorn worker
        return "mlflow_server"
    if cmd.startswith("ray::") and "Agent" not in cmd:  # the trial workers (ray::ImplicitFunc, ray::IDLE)
        return "trials"
    return "ray"  # GCS, raylet, dashboard, agents, log monitor


def _cpu_while(p: subprocess.Popen, interval_s: float = 0.2) -> dict[str, float]:
    """CPU seconds (user + system) of the study's process tree by kind, sampled until ``p`` exits.
    A process's last < ``interval_s`` before it exits is not seen (the trial workers live to the end)."""
    import psutil

    root = psutil.Process(p.pid)
    seen: dict[tuple[int, float], list] = {}  # (pid, start time) -> [kind, cpu seconds]
    while p.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                with proc.oneshot():
                    key, t = (proc.pid, proc.create_time()), proc.cpu_times()
                    kind, sec = seen.get(key, ("ray", 0.0))
                    if kind == "ray":  # a worker's title is set after it starts
                        kind = _kind(proc, p.pid)  # (a process gone by now is not recorded half-known)
                    seen[key] = [kind, max(sec, t.user + t.system)]
            except psutil.Error:
                continue
        time.sleep(interval_s)
    out = dict.fromkeys(KINDS, 0.0)
    for kind, sec in seen.values():
        out[kind] += sec
    return out


def _trial_runs(home: Path) -> list:
    """The study's search-trial runs from its MLflow store, in the order they started."""
    from mlflow import MlflowClient

    from study.names import TAG_ROLE

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"tags.`{TAG_ROLE}` = 'trial'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def _phases(runs: list) -> dict[str, float]:
    """Median seconds per trial in each phase of the trials' clocks (the median: a worker's first
    trial pays its imports and warm-up, which the slope cancels)."""
    from study.names import FINAL

    return {ph: statistics.median(r.data.metrics.get(f"{FINAL}overhead.{ph}_s", 0.0) for r in runs) for ph in PHASES}


def _cadence(runs: list, concurrent: int) -> float:
    """Seconds per trial in the study's steady state, from its trials' start times (each trial's
    MLflow run is created as it starts): from the first trial that started on a worker another
    trial had left to the last trial's start, over the trials started in between. Unlike the slope
    it is one study's own clock, so the start-up and wrap-up of two studies do not enter it; every
    cost a trial pays in the steady state does."""
    starts = [r.info.start_time / 1000 for r in runs]
    if len(starts) < concurrent + 2:
        return float("nan")
    return (starts[-1] - starts[concurrent]) / (len(starts) - 1 - concurrent)


def _own_clock(runs: list) -> dict[str, float]:
    """What the service adds to each trial, read off the trials' own clocks: for two trials one
    after the other on the same worker (process), the time from the first's start to the second's
    (each trial's MLflow run starts once its set-up, data and models are ready, and ends when the
    trial has measured its end: the run's end time is the trial's, the driver writes the end after
    it) less the trial work a plain loop does too: the first's training and finish, the second's
    build. Split at the first run's end: ``in_run_s`` (the epochs' MLflow calls, checkpoints and
    Tune reports) and ``between_s`` (the final checkpoint and report, Tune's hand-over of the worker,
    the next trial's set-up and data). Medians over the pairs.
    Unlike the slope and the steady state it compares no two clocks of separate runs (a plain
    loop's, another study's), so the machine's drift between them does not enter it; what it
    leaves out is whether the trial work itself runs slower beside the service's processes (the
    trial's phases against the plain loop's say that)."""
    from study.names import FINAL, TAG_PID

    def spent(run, phase: str) -> float:
        return run.data.metrics.get(f"{FINAL}overhead.{phase}_s", 0.0)

    workers: dict[str, list] = {}
    for r in runs:
        workers.setdefault(r.data.tags.get(TAG_PID, ""), []).append(r)
    total, in_run, between = [], [], []
    for rs in workers.values():
        rs.sort(key=lambda r: r.info.start_time)
        for a, b in zip(rs, rs[1:]):
            if a.info.end_time is None:
                continue
            start_a, end_a, start_b = (t / 1000 for t in (a.info.start_time, a.info.end_time, b.info.start_time))
            in_run.append(end_a - start_a - spent(a, "train") - spent(a, "finish"))
            between.append(start_b - end_a - spent(b, "build"))
            total.append(in_run[-1] + between[-1])
    if not total:
        return {"per_trial_s": float("nan"), "in_run_s": float("nan"), "between_s": float("nan"), "pairs": 0}
    return {"per_trial_s": statistics.median(total), "in_run_s": statistics.median(in_run),
            "between_s": statistics.median(between), "pairs": len(total)}


def _one(runs: dict, small: int, large: int, t_before: float, t_after: float) -> dict[str, object]:
    """One repeat's numbers: the four studies and the plain loops that bracket them."""
    per_plain = (t_before + t_after) / 2 / large
    slope = {c: (runs[c, large]["fit_s"] - runs[c, small]["fit_s"]) / (large - small) for c in (1, 2)}
    cadence = {c: runs[c, large]["cadence_s"] for c in (1, 2)}
    return {"per_trial_plain_s": per_plain, "plain_before_s": t_before, "plain_after_s": t_after,
            "per_trial_service_s": slope, "overhead_per_trial_s": slope[1] - per_plain,
            "parallel_speedup": slope[1] / slope[2], "cadence_s": cadence,
            "overhead_steady_s": cadence[1] - per_plain, "parallel_speedup_steady": cadence[1] / cadence[2]}


def _median_dict(ds: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(d[k] for d in ds) for k in ds[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, nargs=2, default=[4, 12], metavar=("SMALL", "LARGE"))
    ap.add_argument("--repeats", type=int, default=3, metavar="R",
                    help="measure the four studies R times, each bracketed by the plain loop; the "
                         "headline numbers are the medians, with every repeat's listed (default 3)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    small, large = args.trials
    if not 0 < small < large:
        ap.error(f"--trials: SMALL < LARGE, both positive (got {small} {large})")
    if args.repeats < 1:
        ap.error(f"--repeats: {args.repeats} must be >= 1")
    from rank1.measure import machine_info

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rank1-overhead-") as d:
        tmp = Path(d)
        plains = [plain(large)]
        t_plain2 = plain_parallel(large)
        all_runs = []
        for r in range(args.repeats):
            rt = tmp / f"r{r}"
            rt.mkdir()
            all_runs.append({(c, n): service(n, c, rt) for c in (1, 2) for n in (small, large)})
            plains.append(plain(large))  # the machine drifts: plain loops before and after bracket each repeat
            print(f"repeat {r + 1}/{args.repeats} done ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    reps = [_one(runs, small, large, plains[r][0], plains[r + 1][0]) for r, runs in enumerate(all_runs)]
    med = lambda k: statistics.median(x[k] for x in reps)  # noqa: E731
    t_before = plains[0][0]
    t_after = plains[-1][0]
    t_plain = statistics.mean(t for t, _, _ in plains)
    plain_ph = _median_dict([p for _, _, p in plains])
    per_plain = med("per_trial_plain_s")
    slope = {c: statistics.median(x["per_trial_service_s"][c] for x in reps) for c in (1, 2)}
    ph = _median_dict([runs[1, large]["phases"] for runs in all_runs])
    inside = sum(ph[p] for p in SERVICE)
    outside = slope[1] - sum(ph.values())
    # CPU seconds per trial by process kind (slopes, as the wall times): what the service's own
    # processes take from the trials when they share the cores.
    cpu = {c: _median_dict([{k: (runs[c, large]["cpu_s"][k] - runs[c, small]["cpu_s"][k]) / (large - small)
                             for k in KINDS} for runs in all_runs]) for c in (1, 2)}
    cpu_plain = statistics.mean(c for _, c, _ in plains) / large
    # What the service adds to each trial by the trials' own clocks (the large studies'), 1 and 2 at a time
    own = {c: _median_dict([{k: v for k, v in runs[c, large]["own_clock"].items() if k != "pairs"}
                            for runs in all_runs]) for c in (1, 2)}
    res = {
        "trials": [small, large], "repeats": args.repeats, "train": TRAIN, "plain_s": t_plain,
        "plain_before_s": t_before, "plain_after_s": t_after, "plain_2proc_s": t_plain2,
        "per_trial_plain_s": per_plain, "plain_2proc_speedup": plains[0][0] / t_plain2,
        "runs": {f"r{r}_c{c}_n{n}": x for r, rs in enumerate(all_runs) for (c, n), x in rs.items()},
        "per_repeat": reps,
        "per_trial_service_s": slope,
        "overhead_per_trial_s": med("overhead_per_trial_s"),
        "overhead_inside_trial_s": {p: ph[p] for p in SERVICE},
        "overhead_outside_trial_s": outside,
        "trial_work_s": {"build": ph["build"], "train": ph["train"], "finish": ph["finish"]},
        "plain_work_s": plain_ph,
        "overhead_own_clock_s": {f"c{c}": v for c, v in own.items()},
        "parallel_speedup": med("parallel_speedup"),
        "per_trial_steady_s": {c: statistics.median(x["cadence_s"][c] for x in reps) for c in (1, 2)},
        "overhead_steady_s": med("overhead_steady_s"), "parallel_speedup_steady": med("parallel_speedup_steady"),
        "cpu_per_trial_s": {f"c{c}": v for c, v in cpu.items()}, "plain_cpu_per_trial_s": cpu_plain,
        "startup_s": statistics.median(rs[1, large]["startup_s"] for rs in all_runs),
        "finish_s": statistics.median(rs[1, large]["finish_s"] for rs in all_runs),
        # the process's time outside the driver's clock: its start (imports, reading the study
        # file) and, after the summary, the MLflow server's and Ray's shutdown and the exit
        "outside_clock_s": statistics.median(rs[1, large]["wall_s"] - rs[1, large]["total_s"] for rs in all_runs),
        "fixed_s": statistics.median(rs[1, small]["fit_s"] - small * x["per_trial_service_s"][1]
                                     for rs, x in zip(all_runs, reps)),
        "machine": machine_info("cpu"), "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/study_overhead.py " + " ".join(sys.argv[1:]),
        "benchmark_s": time.perf_counter() - t_start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_overhead.json").write_text(json.dumps(res, indent=2))
    f = res["overhead_inside_trial_s"]
    each_overhead = ", ".join(f"{x['overhead_per_trial_s']:.2f}" for x in reps)
    each_speedup = ", ".join(f"{x['parallel_speedup']:.2f}x" for x in reps)
    each_steady = ", ".join(f"{x['overhead_steady_s']:.2f}" for x in reps)
    each_steady_speedup = ", ".join(f"{x['parallel_speedup_steady']:.2f}x" for x in reps)
    steady = res["per_trial_steady_s"]
    each_own = ", ".join(f"{runs[1, large]['own_clock']['per_trial_s']:.2f}" for runs in all_runs)
    repeats_md = "" if len(reps) == 1 else (
        f"Medians of {len(reps)} repeats (each: the four studies, bracketed by the plain loop). Every repeat's "
        f"overhead per trial: {each_overhead} s by the slope, {each_steady} s in the steady state, "
        f"{each_own} s by the trials' own clocks; its 2-at-a-time "
        f"speedup: {each_speedup} by the slope, {each_steady_speedup} in the steady state.\n\n")
    md = (
        f"Identical trials (digits, vgg depth 4 width 16, 3 epochs, rank1 + flat1d); {res['machine'].get('cpu', '')}, "
        f"{res['date']}; `{res['command']}` ({res['benchmark_s'] / 60:.1f} min).\n\n"
        + repeats_md
        + f"| per trial | seconds |\n|---|---|\n"
        f"| plain loop over `train_pair`, one process (the loops around the service's studies: "
        f"{', '.join(f'{t / large:.2f}' for t, _, _ in plains)}; a repeat's baseline is the mean of the two "
        f"around it) | {per_plain:.2f} |\n"
        f"| service, 1 trial at a time (slope {small} → {large} trials) | {slope[1]:.2f} |\n"
        f"| **overhead per trial** (service − plain) | **{res['overhead_per_trial_s']:.2f}** |\n"
        f"| … inside the trial: setup {f['setup']:.3f}, data {f['data']:.3f}, MLflow {f['mlflow']:.3f}, "
        f"checkpoints {f['checkpoint']:.3f}, Tune reports {f['report']:.3f} | {inside:.2f} |\n"
        f"| … outside it (Tune's bookkeeping, next trial's hand-over, the driver writing the end to MLflow) "
        f"| {outside:.2f} |\n"
        f"| … the trial's own work here (medians): build {ph['build']:.2f} + train {ph['train']:.2f} + finish "
        f"{ph['finish']:.2f}; in the plain loop: {plain_ph['build']:.2f} + {plain_ph['train']:.2f} + "
        f"{plain_ph['finish']:.2f} | {ph['build'] + ph['train'] + ph['finish']:.2f} vs "
        f"{sum(plain_ph.values()):.2f} |\n"
        f"| **overhead per trial, by the trials' own clocks** (two trials in a row on one worker: start to "
        f"start, less the first's train and finish and the second's build), 1 / 2 trials at a time | "
        f"**{own[1]['per_trial_s']:.2f} / {own[2]['per_trial_s']:.2f}** |\n"
        f"| … in the first's MLflow run: the epochs' MLflow calls, checkpoints and Tune reports "
        f"| {own[1]['in_run_s']:.2f} / {own[2]['in_run_s']:.2f} |\n"
        f"| … between the two runs: the final checkpoint and report (the driver writes the end to MLflow after "
        f"it), Tune's hand-over of the worker, the next trial's set-up and data "
        f"| {own[1]['between_s']:.2f} / {own[2]['between_s']:.2f} |\n"
        f"| service, 2 trials at a time (slope) | {slope[2]:.2f} |\n"
        f"| **parallel speedup**, 2 vs 1 trial at a time | **{res['parallel_speedup']:.2f}x** |\n"
        f"| plain loop in 2 processes vs 1 (what this machine gives) | {res['plain_2proc_speedup']:.2f}x |\n"
        f"| service in the steady state, one study's own clock ({large} trials: from the first trial on a reused "
        f"worker to the last trial's start), 1 / 2 trials at a time | {steady[1]:.2f} / {steady[2]:.2f} |\n"
        f"| **overhead per trial, steady state** (service − plain) | **{res['overhead_steady_s']:.2f}** |\n"
        f"| **parallel speedup, steady state**, 2 vs 1 trial at a time | **{res['parallel_speedup_steady']:.2f}x** |\n"
        f"| CPU per trial, 2 at a time (slope): the trial {cpu[2]['trials']:.2f} (the plain loop's {cpu_plain:.2f}), "
        f"MLflow server {cpu[2]['mlflow_server']:.2f}, driver {cpu[2]['driver']:.2f}, Ray's own processes "
        f"{cpu[2]['ray']:.2f} | {sum(cpu[2].values()):.2f} |\n\n"
        f"| once per study | seconds |\n|---|---|\n"
        f"| start-up (Ray, MLflow server, data into the object store) | {res['startup_s']:.1f} |\n"
        f"| first start of the trial workers (fit − trials × slope, {small} trials) | {res['fixed_s']:.1f} |\n"
        f"| wrap-up (reconcile, register the champion, report) | {res['finish_s']:.1f} |\n"
        f"| outside the driver's clock: the process's start; after the summary, the MLflow server's and "
        f"Ray's shutdown and the exit (wall − total) | {res['outside_clock_s']:.1f} |\n"
    )
    (out / "study_overhead.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
