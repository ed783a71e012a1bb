"""fit() on a toy image set, in-process (tests) or as a driver process (`python toy_training.py PARAMS NAME`).

As a driver it joins the cluster named by RAY_ADDRESS and prints one JSON line, `RESULT {...}`: the
final step, the steps it was restored at, the history's steps, and the node of every training worker.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import ray
import torch

from gancore.images import from_uint8
from gancore.metrics.features import feature_reference
from gancore.models.classifier import Classifier
from pipelines.config import Params, parse_params
from pipelines.ray_runtime import put_shards
from pipelines.shards import encode_shards
from pipelines.stages.train import completed_state, fit


def blobs(count: int = 96, size: int = 16) -> np.ndarray:
    """Bright squares at random places: a learnable toy image set."""
    rng = np.random.default_rng(0)
    images = np.zeros((count, size, size, 1), dtype=np.uint8)
    for image in images:
        row, col = rng.integers(0, size - 6, size=2)
        image[row : row + 6, col : col + 6] = 255
    return images


TOY_SHAPE = {"channels": 1, "image_size": 16, "num_classes": 2}


def toy_data() -> tuple[tuple[tuple, tuple[int, ...]], ray.ObjectRef]:
    """The toy images in the object store (40 + 40 + 16 per shard: batches straddle shards) and their
    reference in an untrained featurenet's space (only the plumbing is under test)."""
    images = blobs()
    labels = np.arange(len(images), dtype=np.int64) % 2  # two arbitrary classes
    torch.manual_seed(0)
    reference = feature_reference(Classifier(1, 16, 10, 32), from_uint8(images), labels)
    return put_shards(encode_shards(images, labels, shard_size=40)), ray.put(reference)


def toy_fit(params: Params, name: str):
    """fit() on the toy images."""
    return fit(params, *toy_data(), TOY_SHAPE, params.train.optimizer(), name=name)


def training_worker_nodes() -> list[str]:
    """Node IP of every Ray Train worker this job started (alive or finished)."""
    from ray.util.state import list_actors

    job = ray.get_runtime_context().get_job_id()
    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)
    return sorted(addresses[worker["node_id"]] for worker in workers if worker["job_id"] == job)


if __name__ == "__main__":
    ray.init(logging_level="WARNING")
    state = completed_state(toy_fit(parse_params(json.loads(sys.argv[1])), sys.argv[2]))
    print("RESULT " + json.dumps({"step": state["step"], "restores": state["restores"],
                                  "history_steps": [row["step"] for row in state["history"]],
                                  "worker_nodes": training_worker_nodes()}), flush=True)
