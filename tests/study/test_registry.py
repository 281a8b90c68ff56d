"""Champion / challenger aliases on a real MLflow registry; model references."""

from __future__ import annotations

import pytest

from rank1.config import ConfigError
from study.registry import _set_alias, parse_model_ref
from tests.study.conftest import mlflow_client


def test_champion_moves_only_to_a_better_model_on_the_same_dataset_and_metric(tmp_path):
    with mlflow_client(tmp_path, server=True) as (client, _):
        name = "m-decomposed"
        client.create_registered_model(name)
        run = client.create_run(client.create_experiment("e"))

        def version(dataset, value, metric="rank1.decomposed_val_acc"):
            v = client.create_model_version(name, source=f"runs:/{run.info.run_id}/m", run_id=run.info.run_id, tags={
                "dataset": dataset, "metric": metric, "value": f"{value:.6f}"})
            return v, _set_alias(client, name, v, dataset, metric, value)

        v1, a1 = version("digits", 0.90)
        assert a1 == "champion"
        v2, a2 = version("digits", 0.85)  # worse: challenger, champion stays
        assert a2 == "challenger"
        assert client.get_model_version_by_alias(name, "champion").version == v1.version
        v3, a3 = version("digits", 0.95)  # better: the champion moves
        assert a3 == "champion"
        assert client.get_model_version_by_alias(name, "champion").version == v3.version
        v4, a4 = version("cifar10", 0.99)  # another dataset cannot be compared: challenger
        assert a4 == "challenger"
        assert client.get_model_version_by_alias(name, "champion").version == v3.version
        assert client.get_model_version_by_alias(name, "challenger").version == v4.version


@pytest.mark.parametrize(
    "ref, uri",
    [("m", "models:/m@champion"), ("m@challenger", "models:/m@challenger"), ("m/3", "models:/m/3"),
     ("models:/m/1", "models:/m/1")],
)
def test_model_references(ref, uri):
    assert parse_model_ref(ref) == uri


@pytest.mark.parametrize("ref", ["", "m@", "@x", "m/latest"])
def test_bad_model_references(ref):
    with pytest.raises(ConfigError, match="is not allowed"):
        parse_model_ref(ref)


def _card(metrics):
    return {"name": "m-decomposed", "study": "s", "trial_id": "t1", "seed": 0, "arm": "rank1", "dataset": "digits",
            "val_acc": 0.9, "params": {"depth": 2}, "metrics": metrics,
            "train_config": {"model": "vgg", "depth": 2, "width": 8, "batchnorm": True},
            "input": {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.25], "classes": 10}}


def test_the_model_card_says_how_fast_where_speed_was_measured_and_not_measured_where_not():
    from study.registry import card_markdown

    measured = card_markdown(_card({"rank1.threads": 1.0, "rank1.speedup_b1": 1.5, "rank1.speedup_b8": 2.25,
                                    "rank1.deploy_b1": "cpp", "rank1.flop_ratio": 3.0}), "2")
    assert "where it was trained (1 thread): batch 1: 1.50x" in measured and "batch 8: 2.25x" in measured
    assert "FLOP ratio 3.00x" in measured and "rank1 pull m-decomposed/2" in measured
    assert "where it was trained (2 threads)" in card_markdown(_card({"rank1.threads": 2.0, "rank1.speedup_b1": 1.5}))
    # A study with `measure_latency: false` has no speedup and no thread count: the card says so.
    unmeasured = card_markdown(_card({"rank1.flop_ratio": 3.0}))
    assert "speedup over its dense form: not measured; FLOP ratio 3.00x" in unmeasured


def test_the_model_card_pulls_from_where_the_study_keeps_its_registry(tmp_path):
    """An embedded study's registry is reached through its home; a shared server's by its URL."""
    from study.config import load_study
    from study.registry import card_markdown
    from tests.study.conftest import write_study

    embedded = load_study(write_study(tmp_path))
    assert f"`rank1 pull m-decomposed/2 --home {embedded.home_path} --out model/`" in card_markdown(_card({}), "2", embedded)
    shared = load_study(write_study(tmp_path, name="shared", tracking_uri="http://127.0.0.1:5999"))
    assert "`rank1 pull m-decomposed@champion --tracking-uri http://127.0.0.1:5999 --out model/`" in \
        card_markdown(_card({}), cfg=shared)


def test_a_reference_not_in_the_registry_is_answered_with_what_is_there(tmp_path):
    """`rank1 pull` of a version or alias that does not exist names the model's versions and
    aliases; of a model that does not exist, the models there (a real SQLite registry)."""
    from mlflow import MlflowClient

    from study.registry import pull

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path))
    client.set_registered_model_alias("m", "champion", "2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(ConfigError, match=r"'m@best' was not found .*; it holds m versions 1, 2, aliases @champion \(version 2\)$"):
        pull("m@best", tmp_path / "out", uri)
    with pytest.raises(ConfigError, match=r"'m/3' was not found .*; it holds m versions 1, 2, aliases @champion"):
        pull("m/3", tmp_path / "out", uri)
    with pytest.raises(ConfigError, match=r"'n@champion' was not found in the registry at sqlite:.*; it holds the models m$"):
        pull("n@champion", tmp_path / "out", uri)
    # read through a server started for the call, the registry is named by the study's home, not its port
    with pytest.raises(ConfigError, match=r"'n@champion' was not found in the registry of study home runs/x \("):
        pull("n@champion", tmp_path / "out", uri, where="of study home runs/x")
    assert not (tmp_path / "out").exists()  # nothing downloaded


def test_the_pull_command_survives_a_home_with_a_space(tmp_path):
    import shlex

    from study.config import load_study
    from study.registry import pull_command
    from tests.study.conftest import write_study

    cfg = load_study(write_study(tmp_path, home=str(tmp_path / "my studies" / "demo")))
    argv = shlex.split(pull_command(cfg, "m@champion"))
    assert argv == ["rank1", "pull", "m@champion", "--home", str(tmp_path / "my studies" / "demo"), "--out", "model/"]
