"""What MLflow's basic auth costs a study, with and without `rank1 server --auth-cache`.

    python benchmarks/auth_server.py [--calls 40] [--repeats 2] [--out benchmarks/results]

Three `rank1 server`s over SQLite on 127.0.0.1, one at a time: no auth, ``--auth --auth-cache 0``
(MLflow's default: every request's password checked against its hash) and ``--auth`` (a checked
password trusted for 60 s, the default). Against each:

  request  the median wall time of one ``log_metric`` and of one ``log_batch`` of 100 metrics
           (a trial's end-of-trial batch is about that size), over ``--calls`` calls each;
  study    ``rank1 study run studies/smoke.yaml --tracking-uri SERVER`` (4 trials, 2 at a time,
           the champion registered through the server): its search (``fit_s``) and its whole
           driver clock (``total_s``) from its ``outcome.json``.

The three settings take turns within each repeat, so a drifting machine moves them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SETTINGS = {"no auth": [], "auth, no cache": ["--auth", "--auth-cache", "0"], "auth, cache 60 s": ["--auth"]}


def _server(home: Path, args: list[str]) -> tuple[subprocess.Popen, str]:
    from study.services import free_port

    port = free_port()
    home.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "study.cli", "server", "--home", str(home), "--port", str(port),
                             *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the server with {args} did not come up: {home / 'mlflow-server.log'}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return proc, url
        except OSError:
            time.sleep(0.3)


def _requests(url: str, calls: int) -> dict[str, float]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(url)
    run = client.create_run(client.create_experiment("bench-" + secrets.token_hex(4)))
    rid, one, batch = run.info.run_id, [], []
    for i in range(calls):
        t = time.perf_counter()
        client.log_metric(rid, "m", float(i), step=i)
        one.append(time.perf_counter() - t)
        metrics = [Metric(f"final/x{j}", float(j), 0, i) for j in range(100)]
        t = time.perf_counter()
        client.log_batch(rid, metrics=metrics)
        batch.append(time.perf_counter() - t)
    return {"log_metric_ms": 1000 * statistics.median(one), "log_batch_100_ms": 1000 * statistics.median(batch)}


def _study(url: str, home: Path) -> dict[str, float]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "study.cli", "study", "run", str(REPO / "studies" / "smoke.yaml"),
                        "--home", str(home), "--tracking-uri", url], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"the smoke study failed against {url}:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    timings = json.loads((home / "outcome.json").read_text())["timings"]
    return {"fit_s": timings["fit_s"], "total_s": timings["total_s"], "process_s": wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-study", action="store_true", help="the request timings only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        ap.error("--calls and --repeats: 1 or more")
    # The admin of the authenticated servers, for this process and what it starts only.
    os.environ["MLFLOW_TRACKING_USERNAME"] = "bench-admin"
    os.environ["MLFLOW_TRACKING_PASSWORD"] = "pw-" + secrets.token_hex(16)
    started = time.time()
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="rank1-auth-") as tmp:
        for r in range(args.repeats):
            for i, (name, flags) in enumerate(SETTINGS.items()):
                # The no-auth server is reached without credentials, as a site without auth is.
                env_backup = {k: os.environ.pop(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")} \
                    if not flags else {}
                tag = f"{r}-{i}"
                proc, url = _server(Path(tmp) / f"server-{tag}", flags)
                try:
                    row = _requests(url, args.calls)
                    if not args.no_study:
                        row.update(_study(url, Path(tmp) / f"home-{tag}"))
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                    os.environ.update(env_backup)
                rows[name].append(row)
                print(f"repeat {r + 1}/{args.repeats} {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()),
                      flush=True)
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in rows.items()}
    from rank1.measure import machine_info

    cpu = machine_info("cpu")
    result = {"command": " ".join(["python benchmarks/auth_server.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": f"{cpu.get('cpu', cpu['processor'])}, {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)), "minutes": (time.time() - started) / 60,
              "medians": medians, "repeats": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "auth_server.json").write_text(json.dumps(result, indent=2))
    cols = list(next(iter(medians.values())))
    lines = [f"# MLflow basic auth: what a study pays per request (`{result['command']}`)", "",
             f"{result['machine']}, {result['date']} UTC, {result['minutes']:.1f} min; medians of "
             f"{args.repeats} repeat(s), {args.calls} calls each per request kind.", "",
             "| server | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(f"{m[c]:.1f}" for c in cols) + " |" for name, m in medians.items()]
    (out / "auth_server.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
