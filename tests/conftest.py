from __future__ import annotations

import os
import tempfile

import pytest
import torch

# A developer's own tracking server must not receive the tests' runs (studies fall back to it).
os.environ.pop("MLFLOW_TRACKING_URI", None)
# Decoded datasets are cached under a folder of the session's own (subprocesses inherit it).
os.environ["RANK1_DATA_CACHE"] = tempfile.mkdtemp(prefix="rank1-test-data-cache-")
# and so is the embedded MLflow server's empty-store template (study.services.empty_store_template)
os.environ["RANK1_MLFLOW_CACHE"] = tempfile.mkdtemp(prefix="rank1-test-mlflow-cache-")
# Under pytest-xdist the workers share the cores: each worker's torch gets its share of them,
# not all of them (oversubscribed, two workers ran the CPU tests no faster than one).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from the same RNG state; CPU tests stay on the CPU."""
    torch.manual_seed(0)
    yield


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Max absolute difference relative to the reference's largest magnitude."""
    y, ref = y.detach(), ref.detach()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@pytest.fixture(scope="session")
def smoke_study(tmp_path_factory):
    """``studies/smoke.yaml`` (with the dense arm, per-arm learning rates and a confirmation
    phase) run once for the session, end to end, as a user runs it: ``(folder, study file,
    finished process)``; the home is ``folder / "home"``."""
    import uuid

    from tests.study.conftest import MARK, cli, write_study

    tmp = tmp_path_factory.mktemp("smoke")
    # The shipped smoke study plus the controls a reviewer asks for: the dense arm, each arm's
    # own learning rate searched, and a confirmation phase (best of each arm, fresh seeds, test).
    path = write_study(tmp, train={"arm": "all"}, confirm_seeds=2,
                       search={"depth": {"low": 1, "high": 2}, "init": ["kaiming", "dirac"],
                               "projection": ["epoch:1", "step:5", "end"],
                               "rank1_lr": {"low": 0.02, "high": 0.1, "log": True},
                               "flat1d_lr": {"low": 0.02, "high": 0.1, "log": True}})
    mark = uuid.uuid4().hex  # every process the study starts inherits it (tests/study/test_processes.py)
    scratch = tmp / "scratch"  # its temp dir, so that what a study leaves in one can be seen
    scratch.mkdir()
    # and its kernel-plan cache, so that who planned what can be read back
    p = cli("study", "run", str(path), env={MARK: mark, "TMPDIR": str(scratch),
                                            "RANK1_IMPL_CACHE": str(tmp / "impl_cache.json")}, report=True)
    (tmp / "process-mark").write_text(mark)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return tmp, path, p


@pytest.fixture(scope="session")
def smoke_tracking(smoke_study):
    """One real MLflow server over the smoke study's home for every test that reads it:
    ``(client, url)`` (each server start is seconds of CPU)."""
    from mlflow import MlflowClient

    from study.services import MlflowServer

    home = smoke_study[0] / "home"  # the server's own files (log, pid) go beside it, not into the home
    server = MlflowServer(smoke_study[0] / "reader", backend_store_uri=f"sqlite:///{home / 'mlflow.db'}",
                          artifacts_destination=str(home / "mlartifacts")).start()
    try:
        yield MlflowClient(server.url), server.url
    finally:
        server.stop()


# Under pytest-xdist (`make test` runs two workers), the tests that share an expensive fixture
# run on one worker, so that it is built once: the session's smoke study, the jobs tests' Ray
# head, the multi-node cluster, the Triton interpreter's run. Other tests go wherever a worker
# is free. Each group's fixture costs the seconds given here once (2-core Intel Xeon,
# 2026-12-04), on top of its tests.
SHARED_FIXTURES = {"smoke_study": ("smoke-study", 55), "smoke_tracking": ("smoke-study", 0),
                   "head": ("ray-head", 10), "cluster": ("ray-cluster", 20),
                   # one subprocess under Triton's interpreter for every kernel case (~13 s; each
                   # worker that ran a kernel case started its own before, AMD EPYC 2026-12-06)
                   "interpreted": ("triton-interpreter", 13)}
SLOW_S, FAST_S = 10.0, 0.5  # what a test costs without a `slow(seconds=...)` estimate


def _cost(item) -> float:
    """A test's expected seconds: the largest `slow(seconds=...)` on it, else a flat guess."""
    seconds = [m.kwargs["seconds"] for m in item.iter_markers("slow") if "seconds" in m.kwargs]
    if seconds:
        return float(max(seconds))
    return SLOW_S if item.get_closest_marker("slow") else FAST_S


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    scope_of, fixture_cost = {}, {}
    for item in items:
        scope_of[item] = item.nodeid
        for fixture, (group, seconds) in SHARED_FIXTURES.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                scope_of[item] = group
                fixture_cost[group] = max(fixture_cost.get(group, 0), seconds)
                break
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    # Longest first (each worker collects, and sorts, the same way): xdist hands a free worker
    # the next group or test in this order (`--no-loadscope-reorder` in the Makefile keeps it),
    # so the long studies start early and the many short tests fill in at the end. In
    # collection order the longest study started last on one worker while the other had run
    # out of work (2-core Intel Xeon, 2026-12-04: the workers finished 70 s apart).
    cost = dict(fixture_cost)
    for item in items:
        cost[scope_of[item]] = cost.get(scope_of[item], 0) + _cost(item)
    first = {}
    for i, item in enumerate(items):
        first.setdefault(scope_of[item], i)
    order = {item: (-cost[scope_of[item]], first[scope_of[item]], i) for i, item in enumerate(items)}
    items.sort(key=order.__getitem__)
