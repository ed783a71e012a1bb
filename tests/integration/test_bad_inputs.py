"""Every bad input ends in one message that says what is wrong and what to do: a non-zero exit, no
traceback, and no new file. Each row runs a stage or a `gan` command as a user would, in a fresh folder."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SECRET_ACCESS_KEY, free_port

from pipelines.errors import UserError

DEAD_PORT = free_port()  # nothing listens here: the unreachable services
GAN = [sys.executable, "-m", "pipelines.cli"]


def stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"pipelines.stages.{name}"]


@dataclass(frozen=True)
class Case:
    command: list[str]
    phrase: str  # a key part of the message
    params: dict = field(default_factory=dict)  # {"section.key": value} changes to params.yaml
    env: dict = field(default_factory=dict)
    exit_code: int = 1
    params_file: str | None = "params.yaml"  # None: no params.yaml at all (outside the repository)
    params_text: str | None = None  # params.yaml's whole text instead


CASES = {
    # params
    "unknown key": Case(stage("featurenet"), "train.nope", {"train.nope": 1}),
    "wrong type": Case(stage("featurenet"), "train.steps", {"train.steps": "many"}),
    "storage scheme": Case(stage("train"), "gs:// storage paths are not supported", {"train.storage_path": "gs://b/ray"}),
    "source scheme": Case(stage("prepare"), "gs:// sources are not supported", {"data.source": "gs://b/images"},
                          exit_code=2),
    "image size": Case(stage("featurenet"), "data.image_size", {"data.image_size": 48}),
    "gate metric": Case(stage("register"), "register.gate_metric", {"register.gate_metric": "beauty"}),
    "tune reports": Case(stage("tune"), "tune.report_every", {"tune.report_every": 10**6}),
    "encoder missing": Case(stage("evaluate"), "eval.feature_spaces", {"eval.feature_spaces": {"dinov2": "/no/d.pt"}}),
    "invalid yaml": Case(stage("featurenet"), "not valid YAML", params_text="data: [unclosed\n"),
    "no params": Case(stage("train"), "params.yaml: not found", params_file=None),
    # missing inputs: each stage run before the one it needs
    "featurenet first": Case(stage("featurenet"), "dvc repro prepare"),
    "tune first": Case(stage("tune"), "dvc repro prepare"),
    "train first": Case(stage("train"), "dvc repro prepare"),
    "evaluate first": Case(stage("evaluate"), "dvc repro train"),
    "register first": Case(stage("register"), "dvc repro train"),
    # storage and credentials
    "s3 unreachable": Case(stage("prepare"), "cannot reach the S3 endpoint", {"data.source": "s3://b/images"},
                           {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{DEAD_PORT}"}, exit_code=2),
    "partial credentials": Case(stage("prepare"), "no usable AWS credentials", {"data.source": "s3://b/images"},
                                {"AWS_SECRET_ACCESS_KEY": ""}, exit_code=2),
    "local source missing": Case(stage("prepare"), "fix data.source", {"data.source": "/no/such/folder"},
                                 exit_code=2),
    # CLI arguments and model URIs
    "version not a number": Case([*GAN, "promote", "abc"], "not a version number"),
    "no registry here": Case([*GAN, "promote", "999"], "no MLflow store here"),
    "unknown version": Case([*GAN, "promote", "999"], "cannot promote version 999",
                            env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/store.db"}),
    "outside the repository": Case([*GAN, "promote", "1"], "params.yaml: not found", params_file=None),
    "not a model uri": Case([*GAN, "generate", "--model", "not a uri"], "not an MLflow model URI"),
    "unknown model": Case([*GAN, "generate", "--model", "models:/nope@champion"], "cannot load models:/nope@champion",
                          env={"MLFLOW_TRACKING_URI": "sqlite:///{tmp}/store.db"}),
    "output folder missing": Case([*GAN, "generate", "--model", "models:/m@champion", "--out", "/no/such/g.png"],
                                  "does not exist"),
    # unreachable services (credentials in the URI must not be echoed)
    "mlflow unreachable": Case([*GAN, "generate", "--model", "models:/m@champion"], "does not answer",
                               env={"MLFLOW_TRACKING_URI": f"http://user:{SECRET_ACCESS_KEY}@127.0.0.1:{DEAD_PORT}"}),
    "register to unreachable mlflow": Case([*GAN, "promote", "1"], "does not answer",
                                           env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{DEAD_PORT}"}),
    "ray unreachable": Case([*GAN, "submit", "--address", f"http://127.0.0.1:{DEAD_PORT}", "--working-dir", str(REPO)],
                            "cannot reach the Ray Jobs API"),
    "submit outside the repository": Case([*GAN, "submit", "--working-dir", "/"], "holds no dvc.yaml"),
}


def params_text(case: Case) -> str:
    if case.params_text is not None:
        return case.params_text
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in case.params.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return yaml.safe_dump(raw)


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@dataclass(frozen=True)
class Outcome:
    finished: subprocess.CompletedProcess
    files_before: set[Path]
    files_after: set[Path]


def run_case(case: Case, folder: Path) -> Outcome:
    """The case's command in a fresh folder, with only the environment the case sets."""
    work, store = folder / "work", folder / "store"
    work.mkdir(parents=True)
    store.mkdir()
    if case.params_file:
        (work / case.params_file).write_text(params_text(case))
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env |= {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_MAX_ATTEMPTS": "1", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    env |= {key: value.replace("{tmp}", str(store)) for key, value in case.env.items()}
    before = files_under(work)
    finished = subprocess.run(case.command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return Outcome(finished, before, files_under(work))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    """Every case, two at a time: each is a new Python process that mostly imports, one core's work."""
    root = tmp_path_factory.mktemp("bad-inputs")
    with ThreadPoolExecutor(max_workers=2) as pool:
        running = {name: pool.submit(run_case, case, root / f"case{number}")
                   for number, (name, case) in enumerate(CASES.items())}
        return {name: future.result() for name, future in running.items()}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_ends_in_one_clear_message(name, outcomes):
    case, outcome = CASES[name], outcomes[name]
    output = outcome.finished.stdout + outcome.finished.stderr
    assert outcome.finished.returncode == case.exit_code, output[-3000:]
    assert case.phrase in outcome.finished.stderr, output[-3000:]
    assert "Traceback" not in output, "a user error is a message, not a crash:\n" + output[-3000:]
    assert SECRET_ACCESS_KEY not in output, "a credential was echoed"
    assert outcome.files_after == outcome.files_before, "a failed command left files behind"


def test_a_programming_error_keeps_its_traceback():
    """Only UserError is shortened: a bug must stay debuggable."""
    code = "from pipelines.errors import run_main\nrun_main(lambda: {}['missing'], 'demo')"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert finished.returncode == 1 and "Traceback" in finished.stderr and "KeyError" in finished.stderr


def test_requests_the_cluster_can_never_place_are_refused_before_waiting(ray_local):
    from pipelines.ray_runtime import require_resources

    with pytest.raises(UserError, match="64 workers need 64 CPUs, but the Ray cluster has 2"):
        require_resources(64, use_gpu=False)
    with pytest.raises(UserError, match="train.use_gpu is true .* the Ray cluster has 0"):
        require_resources(1, use_gpu=True)
    require_resources(2, use_gpu=False)  # what this machine has is accepted
