"""Checks before a study starts: the environment, the stores, and on a cluster the nodes.

Everything that can be wrong is found here, before the home is written or any trial
runs, and raised as a :class:`rank1.config.ConfigError` naming the field (the CLI turns
it into one line and exit status 2). Beside :mod:`study.services`, whose store checks
(tracking server, database) it calls.
"""

from __future__ import annotations

import time

import torch

from rank1.config import ConfigError
from study.config import StudyConfig
from study.services import check_storage, check_tracking_uri

__all__ = ["check_cluster_resources", "preflight"]


def preflight(cfg: StudyConfig, address: str | None = None) -> None:
    """Everything that can be wrong before anything starts; raises ConfigError."""
    try:
        cfg.base.check_environment()
    except ConfigError as e:
        raise ConfigError(f"train.{e}") from None
    if cfg.resources.gpu > 0 and not address and not torch.cuda.is_available():
        raise ConfigError(
            f"resources.gpu: {cfg.resources.gpu} GPU per trial was asked for, but this machine has no GPU "
            "(allowed here: 0); trials would wait forever"
        )
    if cfg.tracking_uri:
        check_tracking_uri(cfg.tracking_uri)
    check_storage(cfg.storage_url)


def _is_loopback(uri: str | None) -> bool:
    """Unset (the embedded server on 127.0.0.1) or a loopback host."""
    if not uri:
        return True
    from urllib.parse import urlsplit

    host = urlsplit(uri).hostname or ""
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _fits(resources: dict, cfg: StudyConfig) -> bool:
    return resources.get("CPU", 0) >= cfg.resources.cpu and resources.get("GPU", 0) >= cfg.resources.gpu


def _node_groups_that_fit(cfg: StudyConfig) -> list[str] | None:
    """Autoscaler node groups (KubeRay, autoscaler v2) that could run a trial; None when the
    cluster does not publish them (a fixed cluster, or Ray's v1 autoscaler)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # a private API: its absence only means "unknown"
        return None
    if not config or not config.node_group_configs:
        return None
    return [g.name for g in config.node_group_configs if g.max_count != 0 and _fits(dict(g.resources), cfg)]


def _request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the cluster's autoscaler (if any) for these bundles; ``[]`` withdraws the ask."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception as e:  # no autoscaler API here: waiting is all that is left
        print(f"note: could not ask the autoscaler for a node ({type(e).__name__}: {e})", flush=True)


def check_cluster_resources(cfg: StudyConfig, node_wait_s: float = 600.0) -> None:
    """On a cluster: stores every node can reach, and a node that can run a trial.

    Trials on other hosts need a tracking server and a trial storage they can reach:
    without them, an error before any trial starts. When no live node fits a trial, an
    autoscaler may still add one: the driver waits up to ``node_wait_s`` for it, then fails
    with what the cluster has; a cluster whose node groups (KubeRay, autoscaler v2) cannot
    fit a trial at all fails at once. Never a study that waits forever.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    here = ray.util.get_node_ip_address()
    elsewhere = sorted({n["NodeManagerAddress"] for n in nodes} - {here})
    if elsewhere and not cfg.tracking_uri:
        raise ConfigError(
            f"tracking_uri: unset, so trials would log to an MLflow server on 127.0.0.1 of this machine, which the "
            f"cluster's other hosts ({', '.join(elsewhere)}) cannot reach; start `rank1 server --host ADDRESS` "
            "on the head and set tracking_uri: http://ADDRESS:5000"
        )
    if elsewhere and not cfg.storage_path:
        raise ConfigError(
            f"storage_path: unset, so trial checkpoints would go to {cfg.tune_path} on this machine, which the "
            f"cluster's other hosts ({', '.join(elsewhere)}) cannot write; set a shared path (NFS) or s3://bucket/path"
        )
    if not elsewhere and _is_loopback(cfg.tracking_uri):
        print("warning: the tracking server is on 127.0.0.1 of this machine; nodes on other hosts (an autoscaler's "
              "new ones included) cannot log to it: on a real cluster start `rank1 server --host ADDRESS` and set "
              "tracking_uri", flush=True)
    want = f"{cfg.resources.cpu:g} CPU and {cfg.resources.gpu:g} GPU"
    if any(_fits(n["Resources"], cfg) for n in nodes):
        return
    groups = _node_groups_that_fit(cfg)
    total = ray.cluster_resources()
    have = f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU"
    if groups == []:
        raise ConfigError(
            f"resources: no node of this Ray cluster, and no node group its autoscaler may add, has {want} "
            f"for a trial (cluster now: {have}); lower resources.cpu / resources.gpu or add a node group"
        )
    print(f"waiting up to {node_wait_s:g} s for a node with {want} for a trial (cluster now: {have}; "
          f"{'node groups that fit: ' + ', '.join(groups) if groups else 'an autoscaler may add one'})", flush=True)
    # An autoscaler adds nodes for demand it sees: ask for one trial's bundle while waiting
    # (nothing else asks yet: the driver reserves nothing), and withdraw the ask either way.
    bundle = {k: v for k, v in (("CPU", cfg.resources.cpu), ("GPU", cfg.resources.gpu)) if v}
    _request_resources([bundle])
    try:
        deadline = time.monotonic() + node_wait_s
        while time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
            if any(_fits(n["Resources"], cfg) for n in ray.nodes() if n.get("Alive")):
                return
    finally:
        _request_resources([])
    raise ConfigError(
        f"resources: no node with {want} for a trial joined this Ray cluster within {node_wait_s:g} s "
        f"(cluster now: {have}); lower resources.cpu / resources.gpu, add such a node, or wait longer "
        "with --node-wait SECONDS"
    )
