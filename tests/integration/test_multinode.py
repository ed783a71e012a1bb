"""A two-node Ray cluster on this machine: the second node in its own network namespace, with its own address.

    host  10.77.0.1  ray head (1 CPU) + the S3 server both nodes reach
    netns 10.77.0.2  ray worker node (1 CPU)

Two training workers of 1 CPU each can only be placed one per node, so DDP runs across the veth link
(gloo), checkpoints go to the S3 server on the host's address, and every worker reads them on restore.
The driver runs as its own process, as `dvc repro` or `ray job submit` would run it; killing it mid-run
and starting it again resumes from the stored checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from conftest import SECRET_ACCESS_KEY, forget_ray_address, free_port, start_node, stop_node, tiny_params

from pipelines.stack import start_s3_server, stop

HOST_IP, NODE_IP, NAMESPACE = "10.77.0.1", "10.77.0.2", "gan-node2"
HOST_LINK, NODE_LINK = "gan-veth0", "gan-veth1"
BIN = Path(sys.executable).parent
DRIVER = Path(__file__).with_name("toy_training.py")


def sh(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


def network_namespace_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and subprocess.run(
        ["ip", "netns", "list"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def node_network() -> Iterator[None]:
    """A network namespace joined to the host by a veth pair: a second machine's network, on this one."""
    if not network_namespace_available():
        pytest.skip("needs root and iproute2 to create a network namespace")
    subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)  # left over from an aborted run
    created = subprocess.run(["ip", "netns", "add", NAMESPACE], capture_output=True, text=True)
    if created.returncode:
        pytest.skip(f"cannot create a network namespace here: {created.stderr.strip()}")
    try:
        sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", NODE_LINK)
        sh("ip", "link", "set", NODE_LINK, "netns", NAMESPACE)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_LINK)
        sh("ip", "link", "set", HOST_LINK, "up")
        for command in (["ip", "addr", "add", f"{NODE_IP}/24", "dev", NODE_LINK],
                        ["ip", "link", "set", NODE_LINK, "up"], ["ip", "link", "set", "lo", "up"]):
            sh("ip", "netns", "exec", NAMESPACE, *command)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NAMESPACE], capture_output=True)  # removes the veth pair too


@pytest.fixture(scope="module")
def cluster(node_network, tmp_path_factory) -> Iterator[dict]:
    """S3 server + head on the host address, a worker node in the namespace; the environment a driver needs."""
    logs = tmp_path_factory.mktemp("cluster")
    s3_port, gcs_port = free_port(), free_port()
    s3_url = f"http://{HOST_IP}:{s3_port}"
    env = {**os.environ, "AWS_ENDPOINT_URL": s3_url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY, "AWS_DEFAULT_REGION": "us-east-1", "RAY_AUTH_MODE": "token",
           "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(DRIVER.parent)}
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(name, None)
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    s3 = start_s3_server(s3_port, host=HOST_IP, log_path=logs / "s3.log")
    nodes = []
    try:
        # gloo picks its interface from the hostname, which both nodes share: name each node's own link.
        nodes.append(start_node([str(BIN / "ray"), "start", "--head", f"--node-ip-address={HOST_IP}",
                                 f"--port={gcs_port}", "--num-cpus=1", "--include-dashboard=true",
                                 f"--dashboard-host={HOST_IP}", f"--dashboard-port={free_port()}"],
                                env | {"GLOO_SOCKET_IFNAME": HOST_LINK}, logs / "head.log"))
        address = f"{HOST_IP}:{gcs_port}"  # the second `ray start` waits for the head's GCS by itself
        nodes.append(start_node(["ip", "netns", "exec", NAMESPACE, str(BIN / "ray"), "start", f"--address={address}",
                                 f"--node-ip-address={NODE_IP}", "--num-cpus=1"],
                                env | {"GLOO_SOCKET_IFNAME": NODE_LINK}, logs / "node2.log"))
        wait_for_nodes(address, 2, env)
        boto3.client("s3", endpoint_url=s3_url, aws_access_key_id="testing", aws_secret_access_key=SECRET_ACCESS_KEY,
                     region_name="us-east-1").create_bucket(Bucket="gan-cluster")
        yield {"env": env | {"RAY_ADDRESS": address}, "s3_url": s3_url, "logs": logs}
    finally:
        for node in reversed(nodes):
            stop_node(node)
        stop(s3)
        forget_ray_address(f"{HOST_IP}:{gcs_port}")


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 120) -> None:
    probe = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
             "print(sum(node['Alive'] for node in ray.nodes()))" % address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        if alive.returncode == 0 and alive.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the cluster at {address} did not reach {count} nodes in {timeout:.0f}s")


def start_driver(cluster: dict, params: dict, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(DRIVER), json.dumps(params), name], env=cluster["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_training_spans_both_nodes_and_a_killed_driver_resumes_from_s3(cluster):
    steps, every = 80, 10
    health = tiny_params()["train"]["health"] | {"check_every": 10**6}  # EMA samples scored at the end only
    params = tiny_params(train={"num_workers": 2, "steps": steps, "log_every": every, "checkpoint_every": every,
                                "max_failures": 1, "storage_path": "s3://gan-cluster/runs", "health": health})

    # 1. The driver dies (an interrupted `dvc repro`) after a few checkpoints reached S3.
    first = start_driver(cluster, params, "multinode")
    seen, output = 0, []
    for line in first.stdout:
        output.append(line)
        if "checkpoint saved" in line:
            seen = int(line.split("[train] step ")[1].split("/")[0])
            if seen >= 2 * every:
                break
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(30)
    assert seen >= 2 * every, "the first driver ended before it could be killed:\n" + "".join(output[-30:])

    # 2. Starting it again resumes from the stored checkpoints; both nodes' workers read them from S3.
    second = start_driver(cluster, params, "multinode")
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-4000:]
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["step"] == steps
    restored_at = result["restores"][0]
    assert seen - every <= restored_at < steps, "at most one checkpoint interval lost to the killed driver"
    assert f"[train] resumed from the checkpoint at step {restored_at}" in out
    assert result["history_steps"] == list(range(every, steps + 1, every)), \
        "the killed driver's checkpointed reports are kept, and none is repeated"
    assert result["worker_nodes"] == sorted([HOST_IP, NODE_IP]), "one training worker on each node"

    s3 = boto3.client("s3", endpoint_url=cluster["s3_url"], aws_access_key_id="testing",
                      aws_secret_access_key=SECRET_ACCESS_KEY, region_name="us-east-1")
    keys = [item["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket="gan-cluster", Prefix="runs/multinode/") for item in page.get("Contents", [])]
    assert any(key.endswith("checkpoint.pt") for key in keys), keys
