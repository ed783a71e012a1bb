"""Which optimizer settings train uses, and how a Ray run is named (resume identity)."""

import pytest
import yaml

from conftest import tiny_params
from pipelines.config import parse_params
from pipelines.train import run_name, tuned_optimizer


def test_tuned_values_replace_searched_keys_only(tmp_path):
    best = tmp_path / "best_params.yaml"
    best.write_text(yaml.safe_dump({"lr_g": 0.0005, "beta1": 0.0}))
    params = parse_params(tiny_params())
    assert tuned_optimizer(params, best) == {"lr_g": 0.0005, "lr_d": params.train.lr_d, "beta1": 0.0,
                                             "beta2": params.train.beta2}


def test_use_tuned_false_pins_train_params(tmp_path):
    best = tmp_path / "best_params.yaml"
    best.write_text(yaml.safe_dump({"lr_g": 0.0005}))
    params = parse_params(tiny_params(train={"use_tuned": False, "lr_g": 1e-4}))
    assert tuned_optimizer(params, best)["lr_g"] == 1e-4


def test_missing_tune_output_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="use_tuned: false"):
        tuned_optimizer(parse_params(tiny_params()), tmp_path / "absent.yaml")


def test_run_name_changes_with_anything_that_shapes_the_model():
    params = parse_params(tiny_params())
    optimizer = params.train.optimizer()
    name = run_name(params, optimizer, "data-a")
    assert name == run_name(params, dict(optimizer), "data-a"), "same inputs resume the same run"
    assert name != run_name(params, optimizer, "data-b")
    assert name != run_name(params, {**optimizer, "lr_g": 0.001}, "data-a")
    assert name != run_name(parse_params(tiny_params(train={"batch_size": 8})), optimizer, "data-a")
    longer = parse_params(tiny_params(train={"steps": 99, "log_every": 3}))
    assert name == run_name(longer, optimizer, "data-a"), "a longer budget continues the same run"
