"""Which optimizer settings train uses, and how a Ray run is named (resume identity)."""

import shutil

import pytest
import torch
import yaml

from conftest import tiny_params
from pipelines.config import ConfigError, parse_params
from pipelines.stages.train import REPOSITORY, SHAPING_CODE, code_digest, run_name, tuned_optimizer


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
    with pytest.raises(ConfigError, match="use_tuned: false"):
        tuned_optimizer(parse_params(tiny_params()), tmp_path / "absent.yaml")


INPUTS = {"data": "data-a", "featurenet": "featurenet-a", "code": "code-a"}


def test_run_name_changes_with_anything_that_shapes_the_model():
    params = parse_params(tiny_params())
    optimizer = params.train.optimizer()
    name = run_name(params, optimizer, INPUTS)
    assert name == run_name(params, dict(optimizer), dict(INPUTS)), "same inputs resume the same run"
    for key in INPUTS:
        assert name != run_name(params, optimizer, {**INPUTS, key: "changed"}), f"a new {key} starts a new run"
    assert name != run_name(params, {**optimizer, "lr_g": 0.001}, INPUTS)
    assert name != run_name(parse_params(tiny_params(train={"batch_size": 8})), optimizer, INPUTS)
    longer = parse_params(tiny_params(train={"steps": 99, "log_every": 3}))
    assert name == run_name(longer, optimizer, INPUTS), "a longer budget continues the same run"


@pytest.fixture
def code_copy(tmp_path):
    """The SHAPING_CODE sources and the README, copied under tmp_path."""
    for name in (*SHAPING_CODE, "README.md"):
        source, target = REPOSITORY / name, tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    return tmp_path


def test_a_change_to_the_training_code_starts_a_new_run(code_copy):
    original = code_digest(code_copy)
    assert original == code_digest(REPOSITORY), "the digest reads the sources, not where they live"
    (code_copy / "README.md").write_text("edited\n")
    assert code_digest(code_copy) == original, "a README edit resumes the same run"
    step = code_copy / "gancore/step.py"
    step.write_text(step.read_text() + "\n# a change\n")
    assert code_digest(code_copy) != original, "a change to gancore/step.py trains from step 0"
    step.write_text(step.read_text().removesuffix("\n# a change\n"))
    assert code_digest(code_copy) == original
    worker = code_copy / "pipelines/worker.py"
    worker.write_text(worker.read_text() + "\n")
    assert code_digest(code_copy) != original, "so does a change to the worker loop"


def test_autocast_auto_turns_bf16_on_only_where_it_was_measured_to_win():
    from gancore.models import ModelSpec
    from pipelines.worker import autocast_dtype

    default, wide = ModelSpec("dcgan", 64, 3, 32, 32), ModelSpec("dcgan", 64, 3, 64, 128)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype("auto", wide, gpu) == torch.bfloat16
    assert autocast_dtype("auto", default, gpu) is None, "the default width ran 0.80x in bf16"
    assert autocast_dtype("auto", wide, cpu) is None, "CPU runs stay float32"
    assert autocast_dtype("bf16", default, cpu) == torch.bfloat16 and autocast_dtype("off", wide, gpu) is None
    raw = yaml.safe_load(open("params.yaml"))
    raw["train"]["autocast"] = "bf16"
    assert parse_params(raw).train.autocast == "bf16"
    raw["train"]["autocast"] = "fp8"
    with pytest.raises(ConfigError, match=r"train\.autocast"):
        parse_params(raw)
