"""Champion / challenger aliases on a real MLflow registry; model references."""

from __future__ import annotations

import pytest

from rank1.config import ConfigError
from study.registry import _set_alias, parse_model_ref
from tests.study.conftest import mlflow_client


def test_champion_moves_only_to_a_better_model_on_the_same_dataset_and_metric(tmp_path):
    with mlflow_client(tmp_path) as (client, _):
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
