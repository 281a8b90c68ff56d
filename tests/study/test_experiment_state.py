"""A driver killed while Tune copies its saved state leaves torn files; the resume restores the
experiment from the last complete set instead of Tune starting it anew (a real local Tune)."""

from __future__ import annotations

import pytest

from study.tuning import SNAPSHOT, _session_files, _state_keeper, _whole, repair_experiment_state


def _trainable(config):
    from ray import tune

    for epoch in range(1, 3):
        tune.report({"objective": config["x"] * epoch, "epoch": epoch})


@pytest.mark.slow(seconds=20)
def test_a_torn_saved_state_is_replaced_by_the_last_complete_one_and_tune_restores_the_experiment(tmp_path, capsys):
    import ray
    from ray import tune

    path = tmp_path / "tune"
    ray.init(num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        results = tune.Tuner(
            _trainable, param_space={"x": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(name="tune", storage_path=str(tmp_path), verbose=0,
                                      callbacks=[_state_keeper(str(path))]),
        ).fit()
        ids = sorted(r.metrics["trial_id"] for r in results)
        files = _session_files(path)
        names = {f.name for f in files}
        assert any(n.startswith("experiment_state-") for n in names) and len(names) > 1  # and the search's
        kept = {f.name for f in (path / SNAPSHOT).iterdir()}
        assert kept == names and all(_whole(f) for f in (path / SNAPSHOT).iterdir())
        assert not repair_experiment_state(str(path))  # a whole state is left alone

        state = next(f for f in files if f.name.startswith("experiment_state-"))
        whole = state.read_bytes()
        state.write_bytes(whole[: len(whole) // 2])  # the kill, in the middle of Tune's copy
        assert not _whole(state)
        assert repair_experiment_state(str(path))
        assert "resuming from the last complete one" in capsys.readouterr().out
        assert all(_whole(f) for f in _session_files(path))
        assert len(list(tmp_path.glob("tune/.rank1-torn-*/experiment_state-*.json"))) == 1  # the torn one, kept
        restored = tune.Tuner.restore(str(path), trainable=_trainable).fit()
        assert sorted(r.metrics["trial_id"] for r in restored) == ids  # the same experiment, not a new one
        assert all(r.error is None for r in restored)

        # Torn, and no complete copy (a study started before the keeper): said, and left to Tune.
        for d in path.glob(f"{SNAPSHOT}*"):
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
        state = next(f for f in _session_files(path) if f.name.startswith("experiment_state-"))
        state.write_bytes(state.read_bytes()[:100])
        assert not repair_experiment_state(str(path))
        assert "no complete copy is kept" in capsys.readouterr().out
    finally:
        ray.shutdown()
