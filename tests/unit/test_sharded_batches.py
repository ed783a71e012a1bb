"""Training streams the train split shard by shard: coverage, determinism, and bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.dataset import ShardedBatches, decode_shard
from pipelines.shards import encode_shards

COUNTS = [40, 40, 16, 24]  # unequal shards, 120 images


def sharded(counts=COUNTS):
    """Shards whose pixel 0 holds each image's global id, and a loader that records what it decodes."""
    ids = np.arange(sum(counts))
    bounds = np.cumsum([0, *counts])
    shards = [(np.full((count, 2, 2, 1), 0, np.uint8), ids[start:end]) for count, start, end in
              zip(counts, bounds[:-1], bounds[1:])]
    loads = []

    def load(index):
        loads.append(index)
        return shards[index]

    return load, loads


def image_ids(batches: ShardedBatches, steps: range) -> list[np.ndarray]:
    return [batches.batch(step)[1] for step in steps]


def test_every_image_once_per_epoch_across_workers_in_shard_sized_reads():
    load, loads = sharded()
    workers = [ShardedBatches(COUNTS, load, batch_size=12, seed=3, rank=rank, world_size=2) for rank in (0, 1)]
    assert workers[0].steps_per_epoch == 5
    seen = np.concatenate([ids for worker in workers for ids in image_ids(worker, range(5))])
    assert sorted(seen) == list(range(120)), "one epoch visits every image exactly once across both workers"
    # Each worker decodes each shard it reads once per epoch: 4 shards + at most 1 shared at the boundary.
    assert len(loads) <= len(COUNTS) + 1


def test_batches_are_a_pure_function_of_seed_step_and_rank():
    first = ShardedBatches(COUNTS, sharded()[0], 12, seed=3, rank=1, world_size=2)
    again = ShardedBatches(COUNTS, sharded()[0], 12, seed=3, rank=1, world_size=2)
    # A restored run asks for step 7 first: it gets what the uninterrupted run got.
    uninterrupted = image_ids(first, range(10))
    assert np.array_equal(again.batch(7)[1], uninterrupted[7])
    assert not np.array_equal(uninterrupted[5], uninterrupted[0]), "a new epoch has a new order"
    other_seed = ShardedBatches(COUNTS, sharded()[0], 12, seed=4, rank=1, world_size=2)
    assert not np.array_equal(other_seed.batch(0)[1], uninterrupted[0])


def test_memory_holds_only_the_shards_of_the_current_batch():
    """Bounded by the shard size, not the dataset: here 100 shards of 10 images, batch 8."""
    counts = [10] * 100
    batches = ShardedBatches(counts, sharded(counts)[0], batch_size=8, seed=0, rank=0, world_size=1)
    most_resident = 0
    for step in range(3 * batches.steps_per_epoch):
        images, _ = batches.batch(step)
        assert len(images) == 8
        most_resident = max(most_resident, sum(len(shard[0]) for shard in batches._loaded.values()))
    assert most_resident <= 20, "at most the two shards a batch straddles are decoded at once"


def test_a_split_too_small_for_the_batch_names_the_params_to_change():
    with pytest.raises(ValueError, match="train.batch_size or train.num_workers"):
        ShardedBatches([5, 5], sharded([5, 5])[0], batch_size=8, seed=0, rank=0, world_size=2)


def test_encoded_shards_decode_to_the_same_arrays():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (25, 4, 4, 3), dtype=np.uint8), np.arange(25)
    shards = list(encode_shards(images, labels, shard_size=10))
    assert [count for _, count in shards] == [10, 10, 5]
    decoded = [decode_shard(content) for content, _ in shards]
    assert np.array_equal(np.concatenate([shard[0] for shard in decoded]), images)
    assert np.array_equal(np.concatenate([shard[1] for shard in decoded]), labels)


def test_load_split_with_a_limit_reads_only_the_shards_it_needs(tmp_path):
    """evaluate and the FID reference read a bounded sample; a shard past the limit is never opened."""
    import hashlib
    import json

    from pipelines.dataset import load_split

    images, labels = np.zeros((30, 2, 2, 1), np.uint8), np.arange(30)
    manifest = {"image_size": 2, "channels": 1, "shards": []}
    for index, (content, count) in enumerate(encode_shards(images, labels, shard_size=10)):
        name = f"train-{index:05d}.npz"
        (tmp_path / name).write_bytes(content)
        manifest["shards"].append({"file": name, "split": "train", "count": count,
                                   "sha256": hashlib.sha256(content).hexdigest()})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "train-00002.npz").write_bytes(b"corrupt")  # would fail its sha256 check if it were read
    _, first = load_split(tmp_path, "train", limit=15)
    assert list(first) == list(range(15))
    with pytest.raises(Exception, match="sha256"):
        load_split(tmp_path, "train")
