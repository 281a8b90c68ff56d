"""The full ``rank1`` command: rank1's own subcommands plus the study service.

``rank1 study run STUDY.yaml``     run a study (local Ray + embedded MLflow by default)
``rank1 study resume HOME``        continue a stopped or killed study
``rank1 study status HOME``        trials done / running / failed, best so far
``rank1 pull NAME[@alias|/ver]``   download a registered model, check it in a fresh process
``rank1 ui``                       the MLflow UI over a study home
``rank1 server``                   a tracking server for a cluster (PostgreSQL, shared artifacts, basic auth)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from rank1.cli import CliError, exit_program
from rank1.cli import build_parser as build_rank1_parser

__all__ = ["build_parser", "main", "program"]

STUDY_HELP = """\
A hyperparameter study of rank-1 training: Optuna searches (or a pre-registered grid) run by
Ray Tune, every trial training the arms side by side and landing in MLflow, the best decomposed
model registered. A study is a YAML file (studies/*.yaml); its home folder keeps everything.

  rank1 study run STUDY.yaml       on a local Ray instance with an embedded MLflow server
                                   (--address: a Ray cluster; --home: another folder;
                                   --no-report: no report at the end)
  rank1 study resume HOME          continue a stopped or killed study
  rank1 study status HOME          trials done / running / failed, the best so far
  rank1 study report HOME          the study report again (HTML + figures)
  rank1 study export HOME --out D  runs.jsonl, trials.csv, summary.json
  rank1 study submit STUDY.yaml --address URL
                                   to a Ray cluster as a Ray Job, followed with
                                   rank1 study jobs / logs JOB / stop JOB

Then: rank1 ui --home HOME (the MLflow UI), rank1 pull NAME@champion --home HOME (the model).
From Python: import study; study.run(...), study.results(HOME) (a DataFrame), study.pull(...)."""


def _check_node_wait(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.node_wait) and args.node_wait >= 0):
        raise CliError(f"--node-wait: {args.node_wait:g} is not allowed (allowed: seconds >= 0)")


def cmd_study_run(args: argparse.Namespace) -> int:
    """Run a study: Optuna search through Ray Tune, both arms per trial, all in MLflow."""
    from study import api

    if not Path(args.study).is_file():
        raise CliError(f"STUDY: {args.study!r} does not exist")
    _check_node_wait(args)
    overrides = {k: getattr(args, k) for k in ("home", "tracking_uri", "storage", "storage_path")
                 if getattr(args, k)} or None
    api.run(args.study, address=args.address, keep_ui=args.keep_ui, overrides=overrides, node_wait_s=args.node_wait,
            report=not args.no_report)
    return 0


def cmd_study_resume(args: argparse.Namespace) -> int:
    """Continue a stopped or killed study from its home."""
    from study import api

    _check_node_wait(args)
    api.resume(args.home, address=args.address, keep_ui=args.keep_ui, node_wait_s=args.node_wait,
               report=not args.no_report)
    return 0


def cmd_study_status(args: argparse.Namespace) -> int:
    """Trials done / running / failed and the best so far (from the Optuna storage)."""
    from rich.console import Console
    from rich.table import Table

    from study import api

    s = api.status(args.home)
    if args.json:
        print(json.dumps(s, indent=2, default=str))
        return 0
    t = Table(title=f"study {s['name']}: " + ", ".join(f"{v} {k}" for k, v in sorted(s["states"].items()))
                    + f" of {s['n_trials']} trials")
    for col in ("#", "trial", "status", "params", *s["value_names"]):
        t.add_column(col, overflow="fold")

    def params(p: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(p.items()))

    for tr in s["trials"]:
        values = tr["values"] or []
        t.add_row(str(tr["number"]), str(tr["trial_id"]), tr["status"], params(tr["params"]),
                  *(f"{values[i]:.4f}" if i < len(values) else "" for i in range(len(s["value_names"]))))
    Console().print(t)
    if s["best"]:
        b = s["best"]
        print(f"best so far: #{b['number']} ({b['trial_id']}) {params(b['params'])}: "
              + ", ".join(f"{name} {v:.4f}" for name, v in zip(s["value_names"], b["values"])))
    return 0


def cmd_study_submit(args: argparse.Namespace) -> int:
    """Submit a study to a Ray cluster as a Ray Job (validated here first); --wait streams it."""
    from study import jobs

    if not Path(args.study).is_file():
        raise CliError(f"STUDY: {args.study!r} does not exist")
    _check_node_wait(args)
    job_id = jobs.submit(args.study, args.address, args.node_wait, report=not args.no_report)
    print(f"submitted job {job_id}", flush=True)
    if not args.wait:
        print(f"follow it with: rank1 study logs {job_id} --address {args.address}")
        return 0
    status = jobs.wait(args.address, job_id, out=lambda s, end="": print(s, end=end, flush=True))
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_study_jobs(args: argparse.Namespace) -> int:
    """The Ray Jobs of a cluster."""
    from study import jobs

    for j in jobs.list_jobs(args.address):
        print(f"{j['job_id']}  {j['status']:<10} {j['study']:<20} {j['entrypoint']}")
    return 0


def cmd_study_logs(args: argparse.Namespace) -> int:
    """A job's logs so far."""
    from study import jobs

    print(jobs.logs(args.address, args.job_id), end="")
    return 0


def cmd_study_stop(args: argparse.Namespace) -> int:
    """Stop a job (the study can be resumed from its home later)."""
    from study import jobs

    print(f"job {args.job_id}: {'stop requested' if jobs.stop(args.address, args.job_id) else 'not running'}")
    return 0


def cmd_study_report(args: argparse.Namespace) -> int:
    """Build the study report (HTML + PNGs) into HOME/report and log it to the parent run."""
    from study import api

    print(f"report: {api.report(args.home, args.tracking_uri, log=not args.no_log)}")
    return 0


def cmd_study_export(args: argparse.Namespace) -> int:
    """Export a study for others to check: runs.jsonl (every trial, seed and arm, and every
    confirmation run), trials.csv and summary.json (verdicts, MLflow run ids, wall time)."""
    from study import api

    paths = api.export(args.home, args.out, args.tracking_uri)
    for what, p in paths.items():
        print(f"{what}: {p}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a registered model, load it in a fresh process, run one batch, print its card."""
    from study import api

    card = api.pull(args.model, args.out, home=args.home, tracking_uri=args.tracking_uri)
    check = subprocess.run([sys.executable, "-m", "study.registry", str(args.out)], capture_output=True, text=True)
    if check.returncode != 0:
        print(check.stderr, file=sys.stderr)
        raise CliError(f"the pulled model failed to load and run in a fresh process (exit {check.returncode})")
    result = json.loads(check.stdout.strip().splitlines()[-1])
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{card['name']} version {card['version']} {card.get('aliases') or ''}")
    t.add_column("", overflow="fold")
    t.add_column("", overflow="fold")
    for k in ("study", "trial_id", "dataset", "val_acc", "seed", "arch", "model_uri"):
        t.add_row(k, str(card.get(k)))
    t.add_row("params", " ".join(f"{k}={v}" for k, v in sorted(card["params"].items())))
    t.add_row("input", f"{card['input']['channels']} x {card['input']['size'][0]} x {card['input']['size'][1]}, "
                       f"{card['input']['classes']} classes")
    t.add_row("fresh-process check", f"{result['correct']}/{result['batch']} of an example batch correct")
    for b, r in result["timing"].items():
        t.add_row(f"on this machine, batch {b}", f"{r['plan']}: {r['deployed_ms']:.3f} ms vs dense {r['dense_ms']:.3f} ms "
                                                 f"= {r['speedup']:.2f}x")
    t.caption = (f"{result['machine']}, {result['threads']} threads: the fastest decomposed form of this machine, "
                 "planned when the model loaded")
    Console().print(t)
    print(f"model in {Path(args.out) / 'model'} (mlflow.pyfunc.load_model: the fast form of the machine that loads "
          f"it; the exportable chain form is {Path(args.out) / 'model' / 'artifacts' / 'exportable.pt2'}, "
          f"torch.export.load); card in {Path(args.out) / 'model_card.json'}")
    return 0


def _check_port(args: argparse.Namespace) -> None:
    if not 1 <= args.port <= 65535:
        raise CliError(f"--port: {args.port} is not allowed (allowed: 1-65535)")


def cmd_ui(args: argparse.Namespace) -> int:
    """The MLflow UI over a study home (127.0.0.1 unless --host says otherwise)."""
    from study.services import MlflowServer

    _check_port(args)
    home = Path(args.home).expanduser().resolve()
    if not (home / "mlflow.db").exists():
        raise CliError(f"--home: {str(home)!r} has no embedded MLflow store (mlflow.db); run a study there first")
    try:
        server = MlflowServer(home, host=args.host, port=args.port).start()
    except RuntimeError as e:
        raise CliError(str(e)) from None
    from study.names import experiment_url

    state = home / "state.json"
    exp = json.loads(state.read_text()).get("experiment_id") if state.exists() else None
    where = f"; the study's runs: {experiment_url(server.url, exp)}" if exp else ""
    return _serve(server, f"MLflow UI: {server.url}{where}  (Ctrl-C to stop)")


def _serve(server, line: str) -> int:
    """Announce a started server and keep it up until Ctrl-C."""
    print(line, flush=True)
    try:
        server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()
    code = server.proc.returncode if server.proc is not None else 0
    if code:
        print(f"the server exited with code {code}; see {server.home / 'mlflow-server.log'}", file=sys.stderr)
    return 1 if code else 0


def cmd_server(args: argparse.Namespace) -> int:
    """A tracking server that a cluster can share: any backend store (PostgreSQL), a shared
    artifact store, optional basic auth with the admin from the environment."""
    from study.config import check_no_secret
    from study.services import AUTH_CACHE_S, MlflowServer, check_storage

    _check_port(args)
    if args.auth_cache is not None and not args.auth:
        raise CliError("--auth-cache: only with --auth (it is how long the basic-auth app trusts a checked password)")
    if args.auth_cache is not None and not 0 <= args.auth_cache <= 86400:
        raise CliError(f"--auth-cache: {args.auth_cache} is not allowed (allowed: whole seconds 0-86400; "
                       "0 checks the password on every request)")
    check_no_secret("--backend-store-uri", args.backend_store_uri, "PGPASSWORD (or ~/.pgpass)")
    check_no_secret("--auth-db-uri", args.auth_db_uri, "PGPASSWORD (or ~/.pgpass)")
    for field, uri in (("--backend-store-uri", args.backend_store_uri), ("--auth-db-uri", args.auth_db_uri)):
        if uri:
            check_storage(uri, field)
    if args.auth and not (os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        raise CliError("--auth: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                       "(the server's admin user; clients use the same variables)")
    home = Path(args.home).expanduser().resolve()
    try:
        server = MlflowServer(home, host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
                              artifacts_destination=args.artifacts_destination, auth=args.auth,
                              auth_db_uri=args.auth_db_uri,
                              auth_cache_s=AUTH_CACHE_S if args.auth_cache is None else args.auth_cache).start()
    except RuntimeError as e:
        raise CliError(str(e)) from None
    auth = " with basic auth (admin: $MLFLOW_TRACKING_USERNAME)" if args.auth else ""
    return _serve(server, f"MLflow tracking server: http://{args.host}:{server.port}{auth}; log in "
                          f"{home / 'mlflow-server.log'} (Ctrl-C to stop)")


def build_parser() -> argparse.ArgumentParser:
    parser = build_rank1_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))

    study = sub.add_parser("study", help="The hyperparameter-study service: run, resume, status, report, export, submit a "
                                         "study (Ray Tune + Optuna, every trial in MLflow).", description=STUDY_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    ssub = study.add_subparsers(dest="study_command", required=True, metavar="STUDY_COMMAND")
    run = ssub.add_parser("run", help=cmd_study_run.__doc__, description=cmd_study_run.__doc__)
    run.add_argument("study", metavar="STUDY.yaml")
    run.add_argument("--home", help="study home (default: the file's home, or runs/NAME)")
    run.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    run.add_argument("--node-wait", type=float, default=600.0, metavar="SECONDS",
                    help="with --address: how long to wait for a node that fits a trial (default 600)")
    run.add_argument("--keep-ui", action="store_true", help="keep the embedded MLflow server up at the end")
    run.add_argument("--tracking-uri", help="override the file's tracking_uri (the same study on another site)")
    run.add_argument("--storage", help="override the file's storage (Optuna RDB URL; password from PGPASSWORD)")
    run.add_argument("--storage-path", help="override the file's storage_path (Tune trial storage)")
    run.add_argument("--no-report", action="store_true",
                     help="skip the study report at the end (`rank1 study report HOME` builds it later)")
    run.set_defaults(func=cmd_study_run)
    resume = ssub.add_parser("resume", help=cmd_study_resume.__doc__, description=cmd_study_resume.__doc__)
    resume.add_argument("home", metavar="STUDY_HOME")
    resume.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    resume.add_argument("--node-wait", type=float, default=600.0, metavar="SECONDS",
                    help="with --address: how long to wait for a node that fits a trial (default 600)")
    resume.add_argument("--keep-ui", action="store_true")
    resume.add_argument("--no-report", action="store_true",
                        help="skip the study report at the end (`rank1 study report HOME` builds it later)")
    resume.set_defaults(func=cmd_study_resume)
    status = ssub.add_parser("status", help=cmd_study_status.__doc__, description=cmd_study_status.__doc__)
    status.add_argument("home", metavar="STUDY_HOME")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(func=cmd_study_status)

    submit = ssub.add_parser("submit", help=cmd_study_submit.__doc__, description=cmd_study_submit.__doc__)
    submit.add_argument("study", metavar="STUDY.yaml")
    submit.add_argument("--address", required=True, help="the head's Ray dashboard URL, e.g. http://HEAD:8265")
    submit.add_argument("--wait", action="store_true", help="stream the logs; exit with the job's status")
    submit.add_argument("--node-wait", type=float, default=600.0, metavar="SECONDS",
                        help="how long the study waits for a node that fits a trial (default 600)")
    submit.add_argument("--no-report", action="store_true",
                        help="skip the study report at the end (`rank1 study report HOME` builds it later)")
    submit.set_defaults(func=cmd_study_submit)
    for name, fn in (("jobs", cmd_study_jobs), ("logs", cmd_study_logs), ("stop", cmd_study_stop)):
        sp = ssub.add_parser(name, help=fn.__doc__, description=fn.__doc__)
        if name != "jobs":
            sp.add_argument("job_id", metavar="JOB")
        sp.add_argument("--address", required=True, help="the head's Ray dashboard URL, e.g. http://HEAD:8265")
        sp.set_defaults(func=fn)

    report = ssub.add_parser("report", help=cmd_study_report.__doc__, description=cmd_study_report.__doc__)
    report.add_argument("home", metavar="STUDY_HOME")
    report.add_argument("--tracking-uri", help="MLflow server of the study (default: the study's, or embedded)")
    report.add_argument("--no-log", action="store_true", help="do not log the report to the parent run")
    report.set_defaults(func=cmd_study_report)

    exp = ssub.add_parser("export", help=cmd_study_export.__doc__, description=cmd_study_export.__doc__)
    exp.add_argument("home", metavar="STUDY_HOME")
    exp.add_argument("--out", required=True, help="folder for runs.jsonl, trials.csv and summary.json")
    exp.add_argument("--tracking-uri", help="MLflow server of the study (default: the study's, or embedded)")
    exp.set_defaults(func=cmd_study_export)

    p = sub.add_parser("pull", help=cmd_pull.__doc__, description=cmd_pull.__doc__)
    p.add_argument("model", metavar="NAME[@ALIAS|/VERSION]", help="registered model (default alias: champion)")
    p.add_argument("--out", required=True, help="folder to download into")
    p.add_argument("--home", help="study home whose embedded MLflow store to read")
    p.add_argument("--tracking-uri", help="MLflow tracking server URL (or set MLFLOW_TRACKING_URI)")
    p.set_defaults(func=cmd_pull)

    ui = sub.add_parser("ui", help=cmd_ui.__doc__, description=cmd_ui.__doc__)
    ui.add_argument("--home", required=True, help="study home")
    ui.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    from study.services import AUTH_CACHE_S

    sv = sub.add_parser("server", help=cmd_server.__doc__, description=cmd_server.__doc__)
    sv.add_argument("--home", required=True, help="folder for the server's log and its default stores")
    sv.add_argument("--backend-store-uri", help="runs and registry, e.g. postgresql://rank1@DBHOST/mlflow "
                    "(password from PGPASSWORD; default: SQLite in --home)")
    sv.add_argument("--artifacts-destination", help="shared artifact store, e.g. s3://bucket/mlflow or an NFS "
                    "path (default: --home/mlartifacts)")
    sv.add_argument("--host", default="127.0.0.1",
                    help="interface to bind (default 127.0.0.1; a cluster head needs its private address or 0.0.0.0)")
    sv.add_argument("--port", type=int, default=5000)
    sv.add_argument("--auth", action="store_true", help="MLflow's basic-auth app; admin user from "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    sv.add_argument("--auth-db-uri", help="user store of --auth (default: SQLite in --home)")
    sv.add_argument("--auth-cache", type=int, metavar="SECONDS",
                    help=f"with --auth: trust a checked password this long (default {AUTH_CACHE_S}; 0: check every request, "
                         "~0.23 s of the server's CPU each). A change through MLflow's user API applies at once, "
                         "one made in the user store directly after at most this long")
    sv.set_defaults(func=cmd_server)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from rank1.cli import run_command
    from study.services import quiet

    quiet()
    return run_command(build_parser(), argv)


def program() -> None:
    """The ``rank1`` program (its console script): :func:`main`, then a quick exit."""
    exit_program(main())


if __name__ == "__main__":
    program()
