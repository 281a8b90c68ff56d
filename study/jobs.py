"""Studies as Ray Jobs: submit to a cluster's head, list, stream logs, stop.

The job's entrypoint is ``rank1 study run STUDY.yaml --address auto`` on the head node
(where ``ray_cluster.yaml`` installs this project); the study file travels in the job's
``working_dir``. The driver never asks for a GPU: the entrypoint reserves no resources.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rank1.config import ConfigError

__all__ = ["client", "list_jobs", "logs", "stop", "submit", "wait"]

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def _auth_headers() -> dict[str, str]:
    """Ray's token auth: $RAY_AUTH_TOKEN, else the token file Ray writes (~/.ray/auth_token).
    Sent as a header only; never printed or logged."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


AGENT_WAIT_S = 120.0  # how long a submit waits for a starting head's job agent


def client(address: str):
    """A Jobs client, or a clear error when the dashboard cannot be reached."""
    from ray.job_submission import JobSubmissionClient

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address: {address!r} is not allowed (allowed: the head's dashboard URL, "
                          "e.g. http://HEAD:8265)")
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as e:  # ConnectionError, auth errors, a non-Ray server: all say the same to the user
        raise ConfigError(f"--address: cannot reach the Ray Jobs API at {address} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]})") from None


def submit(study_file: str | Path, address: str, node_wait_s: float = 600.0, report: bool = True) -> str:
    """Validate the study here, then submit it; returns the job id. ``report=False``: the job
    builds no study report at the end (`rank1 study report` builds it later)."""
    from study.config import load_study

    path = Path(study_file).resolve()
    cfg = load_study(path)  # a bad study fails here, before anything reaches the cluster
    c = client(address)
    # A head that has just started answers "No available agent" until its job agent is up
    # (seconds, longer on a loaded machine): wait for it, then say so instead of a traceback.
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return c.submit_job(
                entrypoint=f"rank1 study run {path.name} --address auto --node-wait {node_wait_s:g}"
                           + ("" if report else " --no-report"),
                runtime_env={"working_dir": str(path.parent), "excludes": ["runs/", ".venv/", "*.db"]},
                metadata={"rank1.study": cfg.name},
                entrypoint_num_cpus=0,
            )
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise ConfigError(f"--address: the Ray cluster at {address} has no job agent ready after "
                                  f"{AGENT_WAIT_S:g} s (is the head still starting, or could its dashboard agent not "
                                  "start? Its port, --dashboard-agent-listen-port, is 52365 unless set)") from None
            time.sleep(1.0)


def wait(address: str, job_id: str, poll_s: float = 1.0, out=print) -> str:
    """Stream the job's logs until it ends; returns its final status."""
    c = client(address)
    shown = 0
    while True:
        status = str(c.get_job_status(job_id).value)
        text = c.get_job_logs(job_id)
        if len(text) > shown:
            out(text[shown:], end="")
            shown = len(text)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def list_jobs(address: str) -> list[dict[str, Any]]:
    return [{"job_id": j.submission_id, "status": str(j.status.value), "entrypoint": j.entrypoint,
             "study": (j.metadata or {}).get("rank1.study", "")} for j in client(address).list_jobs()]


def logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
