"""`make pipeline PRESET=...` and `dvc exp run -S` edit params.yaml through DVC's own override code
(`dvc.utils.hydra.apply_overrides`); what they write must still be a valid params.yaml that says what was set."""

import shlex
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO
from dvc.utils.hydra import apply_overrides

from pipelines.config import load_params

PRESETS = sorted((REPO / "presets").iterdir())


def preset_overrides(preset) -> list[str]:
    """The -S arguments `make pipeline PRESET=...` passes to `dvc exp run` (make -n prints, runs nothing)."""
    plan = subprocess.run(["make", "-n", "pipeline", f"PRESET={preset.name}"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout
    words = shlex.split(next(line for line in plan.splitlines() if "dvc exp run" in line).split("dvc exp run", 1)[1])
    assert words and words[::2] == ["-S"] * (len(words) // 2), words
    return words[1::2]


def test_presets_exist_for_the_embedded_rgb_dataset():
    assert {p.name for p in PRESETS} >= {"photos-32", "photos-64"}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_applied_by_dvc_gives_valid_params_with_its_values(tmp_path, preset):
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    overrides = preset_overrides(preset)
    apply_overrides(params_file, overrides)
    params = load_params(params_file).model_dump()
    for override in overrides:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert params[section][name] == yaml.safe_load(value), override


@pytest.mark.parametrize("set_it, set_it_back", [
    ("model.augment=[translation,color]", "model.augment=[]"),
    ("+eval.feature_spaces.dinov2=dinov2_vits14.pt", "~eval.feature_spaces.dinov2"),
    ("tune.search_space.beta1={choice: [0.5]}", "tune.search_space.beta1={choice: [0.0, 0.5]}"),
])
def test_setting_a_collection_param_and_setting_it_back_leaves_params_yaml_as_it_was(tmp_path, set_it, set_it_back):
    # An inline comment after a list or dict param made DVC's YAML round trip write "train: num_workers: 2".
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    original = yaml.safe_load(params_file.read_text())
    apply_overrides(params_file, [set_it])
    assert yaml.safe_load(params_file.read_text()) != original
    apply_overrides(params_file, [set_it_back])
    assert yaml.safe_load(params_file.read_text()) == original
    load_params(params_file)
