"""What the MLflow server's CPU costs per trial, alone and beside two trials training.

    python benchmarks/mlflow_server_cost.py [--trials 20] [--repeats 3] [--out benchmarks/results]

Two trials at a time on two cores (``benchmarks/study_overhead.py``) share both cores with
the study's own processes, and every CPU-second those spend per trial comes out of the
trials. This measures the largest of them, the MLflow server, without Ray, Tune or a driver:
a server started as a study starts it (:class:`study.services.MlflowServer`: SQLite, one
worker) is sent, per trial, the requests one trial of the overhead benchmark sends (counted
from its MLflow run: its run, 54 params, its three epochs of 83, 55 and 56 numbers, its end of
207 numbers with its status tags, its end time), in two forms:

  full       those numbers, as a study logs them;
  summary    without the per-layer numbers (``layers/...`` and every ``....Lnn`` key: 60, 36
             and 36 of the epochs' numbers, 112 of the end's), which a trial's
             ``trial_result.json`` holds anyway: what logging only the per-arm summaries
             would save.

Each form against a new server, alone and beside two processes running the overhead
benchmark's plain training loop (one thread each, as two trials at a time run), in turns
within each repeat. Per form and setting: the server's CPU seconds per trial (user + system,
its process and its uvicorn worker) and the wall seconds the client waited per trial; then
the same trials again with the server's CPU read around each request, for the split by
request (its sum reads a little apart from the total: each read is to 10 ms, and the server
works on between two reads).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARAMS, TAGS = 54, 12
# (numbers that are not per-layer, per-layer numbers) per request, from a trial of the overhead benchmark
EPOCHS = ((23, 60), (19, 36), (20, 36))
END = (95, 112)
FORMS = ("full", "summary")
SETTINGS = ("alone", "beside 2 trials")
REQUESTS = ("create_run", "params", "epochs", "end", "end_time")  # a trial's requests, in order


def _busy(stop) -> None:
    """The overhead benchmark's plain loop (its trials, one thread) until ``stop`` is set."""
    import torch

    from benchmarks.study_overhead import TRAIN
    from rank1.data import load_dataset
    from rank1.train import PairTrainer, TrainConfig

    torch.set_num_threads(1)
    cfg, data = TrainConfig(**TRAIN), load_dataset("digits")
    while not stop.is_set():
        pair = PairTrainer(cfg, data=data)
        while not pair.done() and not stop.is_set():
            pair.train_epoch([])


def _cpu(pid: int) -> float:
    import psutil

    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _trials(client, experiment_id: str, n: int, form: str, cpu=None) -> dict[str, float]:
    """``n`` trials' requests, in a trial's order; with ``cpu`` (a function giving the server's
    CPU seconds), the server's CPU seconds per trial by request."""
    from mlflow.entities import Metric, Param, RunTag

    from study.names import epoch_metric, final_metric

    def numbers(name, counts: tuple[int, int], step: int, now: int) -> list:
        """Named as a study names them (``name``: :func:`epoch_metric` or :func:`final_metric`)."""
        summary, per_layer = counts
        keys = [f"rank1.m{j}" for j in range(summary)]
        if form == "full":
            keys += [f"rank1.grad.out.L{j:02d}" for j in range(per_layer)]
        return [Metric(name(k), 0.01 * j + step, now, step) for j, k in enumerate(keys)]

    spent: dict[str, float] = {}

    def timed(kind: str, call, *args, **kwargs):
        c = cpu() if cpu else 0.0
        out = call(*args, **kwargs)
        if cpu:
            spent[kind] = spent.get(kind, 0.0) + (cpu() - c) / n
        return out

    for i in range(n):
        now = int(time.time() * 1000)
        tags = {"rank1.role": "trial", "rank1.trial_id": f"t{i}", **{f"rank1.tag{j}": "x" for j in range(TAGS - 2)}}
        run_id = timed("create_run", client.create_run, experiment_id, run_name=f"d4 kaiming {i}", tags=tags).info.run_id
        timed("params", client.log_batch, run_id, params=[Param(f"train.p{j}", str(j)) for j in range(PARAMS)])
        for epoch, counts in enumerate(EPOCHS, 1):
            timed("epochs", client.log_batch, run_id, metrics=numbers(epoch_metric, counts, epoch, now))
        timed("end", client.log_batch, run_id, metrics=numbers(final_metric, END, len(EPOCHS), now),
              tags=[RunTag("rank1.status", "finished")])
        timed("end_time", client.set_terminated, run_id, "FINISHED", end_time=now)
    return spent


def _measure(tmp: Path, form: str, setting: str, n: int, tag: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from study.services import MlflowServer, free_port

    server = MlflowServer(tmp / f"server-{tag}", port=free_port()).start()
    stop = mp.Event()
    busy = [mp.Process(target=_busy, args=(stop,)) for _ in range(2 if setting != "alone" else 0)]
    try:
        client = MlflowClient(server.url)
        experiment_id = client.create_experiment("cost")
        _trials(client, experiment_id, 2, form)  # warm: the server's first requests import and plan
        for p in busy:
            p.start()
        if busy:
            time.sleep(8)  # past their imports and data, into their epochs
        c0, t0 = _cpu(server.proc.pid), time.perf_counter()
        _trials(client, experiment_id, n, form)
        c1, t1 = _cpu(server.proc.pid), time.perf_counter()
        # Again, each request's CPU read apart (the reads slow the client, not the server)
        by_request = _trials(client, experiment_id, n, form, cpu=lambda: _cpu(server.proc.pid))
    finally:
        stop.set()
        for p in busy:
            p.join(timeout=120)
        server.stop()
    return {"server_cpu_s": (c1 - c0) / n, "client_wait_s": (t1 - t0) / n,
            **{f"{k}_cpu_s": v for k, v in by_request.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20, help="trials' requests per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.trials < 1 or args.repeats < 1:
        ap.error("--trials and --repeats: 1 or more")
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # a run's URL at every end, as in a study
    started = time.time()
    rows: dict[str, list[dict[str, float]]] = {f"{f}, {s}": [] for f in FORMS for s in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="rank1-mlflow-cost-") as tmp:
        for r in range(args.repeats):
            for f in FORMS:
                for s in SETTINGS:
                    row = _measure(Path(tmp), f, s, args.trials, f"{r}-{f}-{s.replace(' ', '-')}")
                    rows[f"{f}, {s}"].append(row)
                    print(f"repeat {r + 1}/{args.repeats} {f}, {s}: server CPU {row['server_cpu_s']:.3f} s, "
                          f"client waited {row['client_wait_s']:.3f} s per trial", flush=True)
    medians = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in rows.items()}
    from rank1.measure import machine_info

    cpu = machine_info("cpu")
    numbers = {f: sum(a + (b if f == "full" else 0) for a, b in (*EPOCHS, END)) for f in FORMS}
    result = {"command": " ".join(["python benchmarks/mlflow_server_cost.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{cpu.get('cpu', cpu['processor'])}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "minutes": (time.time() - started) / 60,
              "numbers_per_trial": numbers, "medians": medians, "repeats": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mlflow_server_cost.json").write_text(json.dumps(result, indent=2))
    lines = [f"# The MLflow server's CPU per trial (`{result['command']}`)", "",
             f"{result['machine']}, {result['date']} UTC, {result['minutes']:.1f} min; medians of {args.repeats} "
             f"repeat(s) of {args.trials} trials' requests each (every repeat's values in the JSON file).", "",
             "| numbers logged | beside | numbers per trial | server CPU per trial (s) | client waited per trial (s) "
             "| " + " | ".join(f"`{k}` CPU (s)" for k in REQUESTS) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(REQUESTS)]
    for f in FORMS:
        for s in SETTINGS:
            m = medians[f"{f}, {s}"]
            lines.append(f"| {f} | {s} | {numbers[f]} | {m['server_cpu_s']:.3f} | {m['client_wait_s']:.3f} | "
                         + " | ".join(f"{m[f'{k}_cpu_s']:.3f}" for k in REQUESTS) + " |")
    (out / "mlflow_server_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
