"""The tune stage's three searches on a real local Ray runtime, tiny params: each picks params inside the space,
the same inputs pick the same params, and a PBT exploit continues the donor's weights and step count."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from conftest import tiny_params
from toy_training import TOY_SHAPE, toy_data

from pipelines.config import ConfigError, parse_params
from pipelines.stages.tune import BEST_PARAMS_FILE, TRIALS_FILE, SynchronousHalving, run_search, write_outputs
from pipelines.worker import load_checkpoint


def tuned(tmp_path: Path, **tune_settings) -> tuple[dict, pd.DataFrame, list]:
    """Run tune's search on toy images (scored by an untrained featurenet) in tmp_path; return best_params.yaml,
    trials.csv and the Tune results."""
    params = parse_params(tiny_params(tune=tune_settings, train={"storage_path": str(tmp_path / "ray")}))
    results = run_search(params, *toy_data(), TOY_SHAPE)
    write_outputs(results, params.tune)
    return yaml.safe_load(BEST_PARAMS_FILE.read_text()), pd.read_csv(TRIALS_FILE), list(results)


def assert_within_space(best: dict) -> None:
    space = tiny_params()["tune"]["search_space"]
    assert set(best) == set(space)
    for key, distribution in space.items():
        if "choice" in distribution:
            assert best[key] in distribution["choice"], key
        else:
            low, high = distribution.get("loguniform") or distribution["uniform"]
            assert low <= best[key] <= high, key


def test_random_search_halves_on_whole_rungs_and_repeats_itself(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best, trials, results = tuned(tmp_path, search="random")
    assert_within_space(best)
    assert list(trials["search"]) == ["random", "random"] and list(trials["trial"]) == [0, 1]
    # One rung (report 1 of 2): the better trial there goes on to step 16, the other stops at 8.
    assert sorted(trials["steps"]) == [8, 16]
    winner, loser = sorted(range(2), key=lambda index: -trials["steps"][index])
    winner_at_rung = load_checkpoint(ray.train.Checkpoint(results[winner].metrics["train_checkpoint"]))["history"][0]
    assert winner_at_rung["step"] == 8
    assert (winner_at_rung["fid"], winner) < (trials["fid"][loser], loser), "the better trial at the rung went on"

    first_csv = TRIALS_FILE.read_text()
    again, _, _ = tuned(tmp_path, search="random")
    assert again == best
    assert TRIALS_FILE.read_text() == first_csv, "same configs, same FIDs, same decisions"


def test_optuna_search_suggests_from_finished_trials(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # Batches of one: the second trial is suggested by TPE from the first one's final FID.
    best, trials, _ = tuned(tmp_path, search="optuna", optuna_batch=1, steps=8, report_every=8)
    assert_within_space(best)
    assert list(trials["search"]) == ["optuna", "optuna"] and list(trials["steps"]) == [8, 8]
    chosen = trials.sort_values(["fid", "trial"]).iloc[0]
    assert all(math.isclose(best[key], chosen[key]) for key in best), "the best trial at the last step"


def test_pbt_exploit_continues_the_donors_weights_and_steps(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    best, trials, results = tuned(tmp_path, search="pbt")
    assert_within_space(best)
    assert list(trials["steps"]) == [16, 16], "the whole population finishes"
    states = [load_checkpoint(ray.train.Checkpoint(result.metrics["train_checkpoint"])) for result in results]
    # Two members: at the one perturbation (report 1) the worse clones the better's checkpoint and perturbs
    # its config. So both final checkpoints share the donor's first 8 steps, then train on with their own settings.
    assert [state["step"] for state in states] == [16, 16]
    assert states[0]["history"][0] == states[1]["history"][0] and states[0]["history"][0]["step"] == 8
    assert results[0].config != results[1].config, "the clone explored"
    assert states[0]["history"][1]["fid"] != states[1]["history"][1]["fid"]
    for state, result in zip(states, results):
        assert state["generator_optimizer"]["param_groups"][0]["lr"] == result.config["lr_g"], "its own lr"
        assert state["discriminator_optimizer"]["param_groups"][0]["betas"] == (result.config["beta1"],
                                                                                 result.config["beta2"])


class FakeTrial:
    status = "PAUSED"


class FakeController:
    def __init__(self, trials):
        self.trials, self.stopped = trials, []

    def stop_trial(self, trial):
        self.stopped.append(trial)

    def get_trials(self):
        return self.trials


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_halving_decides_the_same_whatever_the_report_order(order):
    trials = [FakeTrial() for _ in range(4)]
    scheduler = SynchronousHalving(num_trials=4, rungs=[1], reduction_factor=2)
    controller = FakeController(trials)
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    fids = [3.0, 1.0, 2.0, 2.0]  # a tie for the second place: the earlier trial takes it
    decisions = [scheduler.on_trial_result(controller, trials[index], {"training_iteration": 1, "fid": fids[index]})
                 for index in order]
    assert decisions[:3] == ["PAUSE"] * 3, "nothing is decided before every trial reached the rung"
    last = trials[order[-1]]
    stopped = set(controller.stopped) | ({last} if decisions[-1] == "STOP" else set())
    assert stopped == {trials[0], trials[3]}
    assert {scheduler.choose_trial_to_run(controller)} <= {trials[1], trials[2]}


def test_pbt_params_that_cannot_run_fail_before_compute():
    space = tiny_params()["tune"]["search_space"] | {"beta1": {"choice": [0.5]}}
    with pytest.raises(ConfigError, match=r"tune: .*pbt cannot mutate a one-value choice \(beta1\)") as error:
        parse_params(tiny_params(tune={"search": "pbt", "search_space": space}))
    assert len(str(error.value).splitlines()) == 2, "one line under the header"
    with pytest.raises(ConfigError, match="tune.num_samples"):
        parse_params(tiny_params(tune={"search": "pbt", "num_samples": 1}))
    with pytest.raises(ConfigError, match="tune.steps must exceed tune.report_every"):
        parse_params(tiny_params(tune={"search": "pbt", "steps": 8, "report_every": 8}))
    with pytest.raises(ConfigError, match="tune.search"):
        parse_params(tiny_params(tune={"search": "hyperband"}))
