"""Stage tune: Ray Tune + ASHA over the search space in params.yaml, scored by domain-FID.

Ray Train V2 pattern: each trial is a small driver function that builds and fits
its own TorchTrainer. A trial is a 0.05-CPU driver plus workers of 0.95 CPU each, so
`cpus // tune.num_workers` trials run side by side.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.config import ConfigError, Distribution, Params, load_params_or_exit
from pipelines.ray_runtime import init_ray, storage
from pipelines.worker import LoopConfig, gan_train_loop, publish_training_data

PREPARED = Path("data/prepared")
BEST_PARAMS_FILE = Path("results/tune/best_params.yaml")
TRIALS_FILE = Path("results/tune/trials.csv")
DRIVER_CPU, WORKER_CPU = 0.05, 0.95


def search_space(space: dict[str, Distribution]) -> dict:
    def domain(distribution: Distribution):
        if distribution.loguniform is not None:
            return tune.loguniform(*distribution.loguniform)
        if distribution.uniform is not None:
            return tune.uniform(*distribution.uniform)
        return tune.choice(distribution.choice)

    return {key: domain(distribution) for key, distribution in space.items()}


def run_trial(trial_config: dict, base: dict, storage_path: str, filesystem, num_workers: int) -> None:
    """One trial: fit a TorchTrainer whose reports flow back to Tune."""
    trainer = TorchTrainer(
        gan_train_loop,
        train_loop_config={**base, **trial_config},
        scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": WORKER_CPU}),
        run_config=RunConfig(
            name=tune.get_context().get_trial_id(),
            storage_path=storage_path,
            storage_filesystem=filesystem,
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def run_search(params: Params, shards, reference_ref, shape: dict) -> tune.ResultGrid:
    base = LoopConfig.from_params(
        params, shards, reference_ref, shape, params.train.optimizer(), steps=params.tune.steps,
        report_every=params.tune.report_every, checkpoint_every=0, seed=params.tune.seed,
        eval_every=params.tune.report_every, eval_samples=params.tune.eval_samples,
    ).to_dict()
    storage_path, filesystem = storage(params.train.storage_path)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    trial = tune.with_parameters(
        run_trial, base=base, storage_path=storage_path, filesystem=filesystem, num_workers=params.tune.num_workers
    )
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": DRIVER_CPU}),
        param_space=search_space(params.tune.search_space),
        tune_config=tune.TuneConfig(
            metric="fid",
            mode="min",
            num_samples=params.tune.num_samples,
            search_alg=BasicVariantGenerator(random_state=params.tune.seed,
                                             max_concurrent=max(1, cpus // params.tune.num_workers)),
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=math.ceil(params.tune.steps / params.tune.report_every),
                grace_period=params.tune.grace_period,
                reduction_factor=params.tune.reduction_factor,
            ),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=filesystem, verbose=1),
    )
    return tuner.fit()


def write_outputs(results: tune.ResultGrid, keys: list[str]) -> dict:
    rows = []
    for result in results:
        row = {key: result.config.get(key) for key in keys}
        history = result.metrics_dataframe
        row["fid"] = float(history["fid"].min()) if history is not None and "fid" in history else math.nan
        row["last_fid"] = (result.metrics or {}).get("fid", math.nan)
        row["steps"] = (result.metrics or {}).get("step", 0)
        health_error = (result.metrics or {}).get("health_error")
        if result.error is not None:
            row["error"] = str(result.error).splitlines()[0]
        else:
            row["error"] = health_error.splitlines()[0] if health_error else ""
        rows.append(row)
    finished = [row for row in rows if not math.isnan(row["last_fid"]) and not row["error"]]
    if not finished:
        errors = "; ".join(row["error"] for row in rows if row["error"]) or "no trial reported a FID"
        raise RuntimeError(f"every tune trial failed: {errors}")
    # ASHA stops weak trials early; compare only trials that ran the full budget.
    longest = max(row["steps"] for row in finished)
    best = min((row for row in finished if row["steps"] == longest), key=lambda row: row["last_fid"])
    best_params = {key: float(best[key]) for key in keys}
    TRIALS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with TRIALS_FILE.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*keys, "fid", "last_fid", "steps", "error"])
        writer.writeheader()
        writer.writerows(rows)
    BEST_PARAMS_FILE.write_text(yaml.safe_dump(best_params, sort_keys=True))
    return best | {"best_params": best_params}


def main() -> None:
    params = load_params_or_exit()
    init_ray()
    shards, reference, shape = publish_training_data(PREPARED)
    try:
        results = run_search(params, shards, reference, shape)
    except ConfigError as error:
        sys.exit(str(error))
    best = write_outputs(results, list(params.tune.search_space))
    print(f"[tune] {len(results)} trials; best domain-FID {best['last_fid']:.2f} with {best['best_params']}"
          f" -> {BEST_PARAMS_FILE}", flush=True)


if __name__ == "__main__":
    main()
