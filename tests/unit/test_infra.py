"""The cluster files in infra/: Ray's validation, GPU workers, the torch pin, token auth, no literal secrets."""

import copy
import inspect
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _get_default_token_path
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv
from conftest import REPO

from pipelines import cli

CLUSTER_FILE = REPO / "infra" / "ray" / "cluster.yaml"
RAYJOB_FILE = REPO / "infra" / "k8s" / "rayjob.yaml"

# (vCPUs, GPUs) of EC2 GPU instance types, from AWS's instance specifications.
GPU_INSTANCES = {
    "g4dn.xlarge": (4, 1), "g4dn.12xlarge": (48, 4), "g5.xlarge": (4, 1), "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1), "g5.12xlarge": (48, 4), "g5.48xlarge": (192, 8), "g6.xlarge": (4, 1),
    "g6.12xlarge": (48, 4), "p4d.24xlarge": (96, 8), "p5.48xlarge": (192, 8),
}
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRET_VALUE = re.compile(r"(?i)(?:secret_access_key|session_token)['\"]?\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{16,}")
# The shape of `ray get-auth-token --generate` and `openssl rand -hex 32`, and a token assigned on a command line.
HEX_TOKEN = re.compile(r"\b[0-9a-fA-F]{32,}\b")
TOKEN_ASSIGNMENT = re.compile(r"\bRAY_AUTH_TOKEN\s*=\s*(?!\$)\S")
RAY_GPU_IMAGE = re.compile(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-(?:gpu|cu\d+)")


def torch_pin() -> str:
    """The torch requirement the Makefile installs before the project."""
    match = re.search(r"pip install -q (torch==\S+)", (REPO / "Makefile").read_text())
    assert match, "the Makefile no longer pins torch"
    return match.group(1)


def project_name() -> str:
    return re.search(r'^name = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)


def assert_no_literal_credentials(text: str) -> None:
    assert not ACCESS_KEY_ID.search(text), "an AWS access key id is written in the file"
    assert not SECRET_VALUE.search(text), "an AWS secret is written in the file"


def assert_no_literal_auth_token(text: str) -> None:
    assert not HEX_TOKEN.search(text), "a Ray auth token is written in the file"
    assert not TOKEN_ASSIGNMENT.search(text), "RAY_AUTH_TOKEN is given a value in the file"


def ray_start_environment(command: str) -> dict[str, str]:
    """The NAME=value words in front of `ray start` in one shell command line."""
    segment = next(part for part in re.split(r";|&&|\|\|", command) if re.search(r"\bray start\b", part))
    words = shlex.split(segment)
    return dict(word.split("=", 1) for word in words[:words.index("ray")])


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB_FILE.read_text())


def containers(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    groups = {"head": spec["headGroupSpec"], **{group["groupName"]: group for group in spec["workerGroupSpecs"]}}
    return {f"{group}/{container['name']}": container
            for group, body in groups.items() for container in body["template"]["spec"]["containers"]}


def test_cluster_passes_rays_own_validation(cluster):
    """What `ray up` runs before it touches AWS: defaults filled in, then the JSON schema and consistency checks."""
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_rays_validation_rejects_a_broken_cluster(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["worker.gpu.1x"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="not of type 'integer'"):
        validate_config(prepare_config(broken))


def test_cluster_workers_are_gpu_nodes_that_advertise_their_gpus(cluster):
    workers = {name: node for name, node in cluster["available_node_types"].items()
               if name != cluster["head_node_type"]}
    assert workers
    for name, node in workers.items():
        instance = node["node_config"]["InstanceType"]
        assert instance in GPU_INSTANCES, f"{name}: {instance} is not a known GPU instance type"
        vcpus, gpus = GPU_INSTANCES[instance]
        assert node["resources"]["GPU"] == gpus, f"{name}: {instance} has {gpus} GPUs"
        assert node["resources"].get("CPU", vcpus) <= vcpus
        assert 0 <= node.get("min_workers", 0) <= node["max_workers"] <= cluster["max_workers"]


def test_cluster_installs_the_makefile_torch_pin_before_the_project(cluster):
    pin = torch_pin()
    prepared = prepare_config(copy.deepcopy(cluster))
    project_dir = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    for role in ("head_setup_commands", "worker_setup_commands"):
        commands = prepared[role]
        torch_at = next((i for i, command in enumerate(commands) if pin in command.split()), None)
        project_at = next((i for i, command in enumerate(commands)
                           if "pip install" in command and project_dir in command.split()), None)
        assert torch_at is not None, f"{role}: does not install {pin}"
        assert project_at is not None, f"{role}: does not install the project from {project_dir}"
        assert torch_at < project_at, f"{role}: torch must be pinned before the project installs"
        torch_requirements = re.findall(r"\btorch\b[=<>~!]*[\w.+]*", " ".join(commands))
        assert set(torch_requirements) == {pin}, f"{role}: another torch requirement than {pin}"


def test_cluster_runs_the_installed_ray_version(cluster):
    assert RAY_GPU_IMAGE.fullmatch(cluster["docker"]["image"])


def test_cluster_gets_s3_access_from_instance_profiles_only(cluster):
    text = CLUSTER_FILE.read_text()
    assert_no_literal_credentials(text)
    for variable in CREDENTIAL_VARIABLES:
        assert variable.lower() not in text.lower(), f"{variable} in the cluster file; nodes use instance profiles"
    for name, node in cluster["available_node_types"].items():
        assert node["node_config"].get("IamInstanceProfile"), f"{name} has no instance profile for S3"


def test_cluster_starts_every_node_with_token_auth(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    for role in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [command for command in prepared[role] if re.search(r"\bray start\b", command)]
        assert starts, f"{role}: no `ray start`"
        for command in starts:
            env = ray_start_environment(command)
            assert env.get(AUTH_MODE_ENV_VAR) == "token", f"{role}: `ray start` without {AUTH_MODE_ENV_VAR}=token"
            # On a command line the token would show in `ps`, shell history and the launcher's logs.
            assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env), f"{role}: token set on the command line"


def test_cluster_copies_the_launching_machines_token_to_rays_default_path(cluster):
    """No token in the file: every node gets the launching machine's ~/.ray/auth_token where Ray looks for it."""
    remote = next((remote for remote, local in cluster["file_mounts"].items()
                   if Path(remote).expanduser() == _get_default_token_path()), None)
    assert remote, "no file mount puts the token where Ray reads it"
    assert Path(cluster["file_mounts"][remote]).expanduser() == _get_default_token_path()


@pytest.mark.parametrize("path", [CLUSTER_FILE, RAYJOB_FILE], ids=lambda path: path.name)
def test_no_auth_token_is_committed(path):
    assert_no_literal_auth_token(path.read_text())


def test_rayjob_runs_the_pipeline_like_gan_submit(rayjob):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    submit_entrypoint = inspect.signature(cli.submit).parameters["entrypoint"].default.default
    assert submit_entrypoint in rayjob["spec"]["entrypoint"]


def test_rayjob_cluster_is_deleted_after_the_job(rayjob):
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert isinstance(rayjob["spec"]["ttlSecondsAfterFinished"], int) and rayjob["spec"]["ttlSecondsAfterFinished"] >= 0


def test_rayjob_has_an_autoscaled_gpu_worker_group(rayjob):
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [group for group in groups if any(
        int(container["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
        for container in group["template"]["spec"]["containers"])]
    assert gpu_groups, "no worker group requests nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        tolerated = {toleration["key"] for toleration in group["template"]["spec"].get("tolerations", [])}
        assert "nvidia.com/gpu" in tolerated, f"{group['groupName']} cannot schedule on tainted GPU nodes"


def test_rayjob_cluster_uses_token_auth_from_a_secret(rayjob):
    """KubeRay generates the token into a Secret and sets mode and token on every Ray container and the submitter."""
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    for name, container in containers(rayjob).items():
        env = {entry["name"]: entry for entry in container.get("env", [])}
        mode, token = env.get(AUTH_MODE_ENV_VAR), env.get("RAY_AUTH_TOKEN")
        assert mode is None or mode.get("value") == "token", f"{name}: overrides the auth mode KubeRay sets"
        assert token is None or "secretKeyRef" in token.get("valueFrom", {}), f"{name}: token not from a Secret"


def test_rayjob_runs_the_installed_ray_version(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    for name, container in containers(rayjob).items():
        assert RAY_GPU_IMAGE.fullmatch(container["image"]), f"{name}: {container['image']}"


def test_rayjob_takes_aws_credentials_from_a_secret(rayjob):
    assert_no_literal_credentials(RAYJOB_FILE.read_text())
    for name, container in containers(rayjob).items():
        env = {entry["name"]: entry for entry in container.get("env", [])}
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert variable in env, f"{name} has no {variable}: its Ray workers could not reach S3"
        for variable in set(CREDENTIAL_VARIABLES) & set(env):
            assert "value" not in env[variable], f"{name}: {variable} is written in the file"
            reference = env[variable]["valueFrom"]["secretKeyRef"]
            assert reference["name"] and reference["key"]
    head = containers(rayjob)["head/ray-head"]
    assert "MLFLOW_TRACKING_URI" in {entry["name"] for entry in head["env"]}, "register would use a throwaway sqlite"


def test_rayjob_runtime_env_installs_the_cloned_ref_and_the_torch_pin(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)  # raises on anything Ray would refuse at submission
    assert not set(CREDENTIAL_VARIABLES) & set(runtime_env.get("env_vars", {}))
    packages = runtime_env["pip"]["packages"]
    assert torch_pin() in packages
    url, ref = runtime_env["env_vars"]["GAN_GIT_URL"], runtime_env["env_vars"]["GAN_GIT_REF"]
    entrypoint = rayjob["spec"]["entrypoint"]
    assert '"$GAN_GIT_URL"' in entrypoint and '"$GAN_GIT_REF"' in entrypoint
    assert f"{project_name()} @ git+{url}@{ref}" in packages, "workers would import other code than the driver"
