"""Stage tune: Ray Tune over the search space in params.yaml, scored by domain-FID.

`tune.search` picks the method: optuna (TPE, suggested in seeded batches), pbt (synchronous population
based training) or random (sampled configs, synchronous successive halving). Same inputs, same choice:
every decision waits for all the trials it compares and is a function of tune.seed and their FIDs, never
of which trial reported first.

Ray Train V2 pattern: each trial is a small driver function that fits TorchTrainers. It fits one per
report interval, each run starting from the previous one's checkpoint, and reports to Tune between runs,
so Tune pauses, stops or (PBT) clones a trial while it is not training. All drivers together hold 0.05
CPU; their training runs (workers of 0.95 CPU each) take turns on the cluster.
"""

from __future__ import annotations

import csv
import json
import math
import random
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import ray.tune.schedulers.pbt as ray_pbt
import yaml
from mlflow import MlflowClient
from optuna.samplers import TPESampler
from ray import tune
from ray.train import Checkpoint, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch

from pipelines.artifacts import BEST_PARAMS_FILE, PREPARED_DIR, TRIALS_FILE
from pipelines.config import Distribution, Params, TuneParams, load_params
from pipelines.dataset import read_manifest
from pipelines.errors import UserError, run_main
from pipelines.ray_runtime import publish_training_data, require_resources, storage
from pipelines.storage import write_text_atomic
from pipelines.tracking import child_run, configure_mlflow, fail, log_params, log_step_metrics, pipeline_run
from pipelines.worker import LoopConfig, gan_train_loop

DRIVERS_CPU, WORKER_CPU = 0.05, 0.95
METRIC = "fid"  # domain-FID of EMA samples: lower is better
POINTER_FILE = "train_checkpoint.json"  # a trial's Tune checkpoint: where its Train checkpoint is


def search_space(space: dict[str, Distribution]) -> dict:
    def domain(distribution: Distribution):
        if distribution.loguniform is not None:
            return tune.loguniform(*distribution.loguniform)
        if distribution.uniform is not None:
            return tune.uniform(*distribution.uniform)
        return tune.choice(distribution.choice)

    return {key: domain(distribution) for key, distribution in space.items()}


def read_pointer(checkpoint: tune.Checkpoint | None) -> dict:
    """Where a trial resumes: its own last interval, or (after a PBT exploit) the cloned trial's."""
    if checkpoint is None:
        return {"path": None, "step": 0, "healthy": True}
    with checkpoint.as_directory() as directory:
        return json.loads((Path(directory) / POINTER_FILE).read_text())


def report_interval(metrics: dict, checkpoint: Checkpoint) -> dict:
    """Report one interval to Tune, with a pointer to its Train checkpoint as the trial's Tune checkpoint."""
    healthy = not metrics.get("health_error")
    fid = metrics.get(METRIC, math.inf)
    score = fid if healthy and math.isfinite(fid) else math.inf  # every search ranks numbers: this one last
    pointer = {"path": checkpoint.path, "step": metrics["step"], "healthy": healthy}
    report = {**metrics, METRIC: score, "train_checkpoint": pointer["path"]}
    # In the trial's local folder: a paused trial is stopped inside report(), before it could clean up.
    with tempfile.TemporaryDirectory(dir=tune.get_context().get_trial_dir()) as directory:
        (Path(directory) / POINTER_FILE).write_text(json.dumps(pointer))
        tune.report(report, checkpoint=tune.Checkpoint.from_directory(directory))
    return pointer


def run_trial(trial_config: dict, base: dict, storage_path: str, filesystem, num_workers: int) -> None:
    """One trial: a TorchTrainer per report interval, each starting from the checkpoint Tune hands back."""
    trial_id = tune.get_context().get_trial_id()
    pointer = read_pointer(tune.get_checkpoint())
    while pointer["healthy"] and pointer["step"] < base["steps"]:
        until = min(pointer["step"] + base["log_every"], base["steps"])
        start = None if pointer["path"] is None else Checkpoint(pointer["path"], filesystem)
        trainer = TorchTrainer(
            gan_train_loop,
            train_loop_config={**base, **trial_config, "steps": until, "start_checkpoint": start},
            scaling_config=ScalingConfig(num_workers=num_workers, resources_per_worker={"CPU": WORKER_CPU}),
            # A new run per interval: Ray Train would resume a reused name from its own latest checkpoint.
            run_config=RunConfig(name=f"{trial_id}-to-{until}", storage_path=storage_path,
                                 storage_filesystem=filesystem),
        )
        result = trainer.fit()
        pointer = report_interval(result.metrics, result.checkpoint)


class SynchronousHalving(FIFOScheduler):
    """Successive halving (Jamieson & Talwalkar 2016), decided on whole rungs: ASHA without its asynchrony.

    A trial reaching a rung pauses until every trial of the search has reached it or ended; then the best
    max(1, n // reduction_factor) by FID go on (ties: the earlier trial) and the rest stop. So no decision
    depends on which trial reported first, nor on how many trials the cluster runs at once.
    """

    def __init__(self, num_trials: int, rungs: list[int], reduction_factor: int):
        super().__init__()
        self._num_trials, self._rungs, self._reduction_factor = num_trials, rungs, reduction_factor
        self._trials: list[Trial] = []  # in the order the searcher made them
        self._scores: dict[Trial, dict[int, float]] = {}
        self._ended: set[Trial] = set()  # stopped at a rung, finished or failed
        self._promoted: set[Trial] = set()  # paused at a decided rung, to go on
        self._decided: set[int] = set()

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._trials.append(trial)
        self._scores[trial] = {}

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        self._promoted.discard(trial)
        rung = result["training_iteration"]
        if rung not in self._rungs or rung in self._decided:
            return TrialScheduler.CONTINUE
        self._scores[trial][rung] = result[METRIC]
        return self._decide(tune_controller, rung, current=trial)

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        if trial in self._ended:
            return
        self._ended.add(trial)
        open_rungs = [rung for rung in self._rungs if rung not in self._decided]
        if open_rungs:  # the trial it waited for may have been the last one
            self._decide(tune_controller, open_rungs[0], current=None)

    def _decide(self, tune_controller, rung: int, current: Trial | None) -> str:
        contenders = [trial for trial in self._trials if trial not in self._ended]
        if len(self._trials) < self._num_trials or any(rung not in self._scores[trial] for trial in contenders):
            return TrialScheduler.PAUSE
        self._decided.add(rung)
        ranked = sorted(contenders, key=lambda trial: self._scores[trial][rung])  # stable: ties keep trial order
        keep = max(1, len(ranked) // self._reduction_factor)
        decision = TrialScheduler.CONTINUE
        for trial in ranked[keep:]:
            self._ended.add(trial)
            if trial is current:
                decision = TrialScheduler.STOP
            else:
                tune_controller.stop_trial(trial)
        self._promoted.update(trial for trial in ranked[:keep] if trial is not current)
        return decision

    def choose_trial_to_run(self, tune_controller) -> Trial | None:
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING or (trial.status == Trial.PAUSED and trial in self._promoted):
                return trial
        return None

    def debug_string(self) -> str:
        return f"Synchronous successive halving at reports {self._rungs}: {len(self._ended)} trials ended"


def halving_rungs(grace_period: int, reduction_factor: int, reports: int) -> list[int]:
    """Reports at which random search halves its trials: grace_period * reduction_factor**k, before the last."""
    rungs, rung = [], grace_period
    while rung < reports:
        rungs.append(rung)
        rung *= reduction_factor
    return rungs


def pbt_mutations(space: dict[str, Distribution], rng: random.Random) -> dict:
    """PBT's resampling per key, drawn from `rng` (Ray's Domain.sample would use numpy's global state)."""
    def resample(distribution: Distribution) -> list | Callable[[], float]:
        if distribution.choice is not None:
            return list(distribution.choice)  # PBT shifts to a neighbouring value or resamples
        if distribution.loguniform is not None:
            low, high = (math.log(bound) for bound in distribution.loguniform)
            return lambda: math.exp(rng.uniform(low, high))
        return lambda: rng.uniform(*distribution.uniform)

    return {key: resample(distribution) for key, distribution in space.items()}


def clip_to_space(space: dict[str, Distribution]) -> Callable[[dict], dict]:
    """PBT perturbs by x1.2 / x0.8; keep the result inside the searched range."""
    def clip(config: dict) -> dict:
        for key, distribution in space.items():
            bounds = distribution.loguniform or distribution.uniform
            if bounds is not None:
                config[key] = min(max(config[key], bounds[0]), bounds[1])
        return config

    return clip


@contextmanager
def seeded_pbt_draws(rng: random.Random) -> Iterator[None]:
    """PBT draws donors and perturbations from the `random` module, whose global state Tune's event loop
    also draws from, as often as timing dictates (random.shuffle in ray/air/execution/_internal/
    event_manager.py and actor_manager.py). A private seeded generator makes PBT's draws a function of the seed."""
    global_random = ray_pbt.random
    ray_pbt.random = rng
    try:
        yield
    finally:
        ray_pbt.random = global_random


def search_method(settings: TuneParams, trials: int, reports: int, rng: random.Random) -> tuple:
    """(search algorithm, scheduler) for tune.search, both seeded from tune.seed."""
    if settings.search == "optuna":
        # Batches: each set of suggestions sees every finished trial and no running one, whatever the
        # order they finished in. TPE samples at random for the first batch, then models the finished ones.
        sampler = TPESampler(seed=settings.seed, n_startup_trials=settings.optuna_batch, constant_liar=True)
        return (ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=settings.optuna_batch, batch=True),
                FIFOScheduler())
    configs = BasicVariantGenerator(random_state=settings.seed)
    if settings.search == "pbt":
        return configs, PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=1, synch=True,
            hyperparam_mutations=pbt_mutations(settings.search_space, rng),
            custom_explore_fn=clip_to_space(settings.search_space),
        )
    rungs = halving_rungs(settings.grace_period, settings.reduction_factor, reports)
    return configs, SynchronousHalving(trials, rungs, settings.reduction_factor)


def run_search(params: Params, shards, reference_ref, shape: dict) -> tune.ResultGrid:
    settings = params.tune
    # A trial is a prefix of the full run: the train stage's global batch, split over tune.num_workers
    # (benchmarks/tune_correlation.py measures how well its score predicts the full run's FID).
    base = LoopConfig.from_params(
        params, shards, reference_ref, shape, params.train.optimizer(), steps=settings.steps,
        batch_size=params.train.global_batch_size() // settings.num_workers,
        log_every=settings.report_every, checkpoint_every=settings.report_every, seed=settings.seed,
        # A trial is scored (and checked) at every report, on tune.eval_samples samples.
        health=params.train.health.model_copy(update={"check_every": settings.report_every,
                                                      "samples": settings.eval_samples}),
    ).to_dict()
    storage_path, filesystem = storage(params.train.storage_path)
    reports = math.ceil(settings.steps / settings.report_every)
    trials = settings.trials(shape["image_size"])
    rng = random.Random(settings.seed)
    search_alg, scheduler = search_method(settings, trials, reports, rng)
    trial = tune.with_parameters(
        run_trial, base=base, storage_path=storage_path, filesystem=filesystem, num_workers=settings.num_workers
    )
    tuner = tune.Tuner(
        tune.with_resources(trial, {"cpu": DRIVERS_CPU / trials}),
        param_space=search_space(settings.search_space),
        # reuse_actors: a paused trial's driver, idle in report(), is handed the next trial to run (no new process).
        tune_config=tune.TuneConfig(metric=METRIC, mode="min", num_samples=trials,
                                    search_alg=search_alg, scheduler=scheduler, reuse_actors=True),
        # Stopped at the last report, before any scheduler sees it: PBT never perturbs a finished trial.
        run_config=tune.RunConfig(name="tune", storage_path=storage_path, storage_filesystem=filesystem,
                                  stop={"training_iteration": reports}, verbose=1),
    )
    with seeded_pbt_draws(rng):
        return tuner.fit()


def trial_rows(results: tune.ResultGrid, settings: TuneParams) -> list[dict]:
    """One row per trial in the order the search made it: its config (pbt: the final one), its last step and
    the FID there. From each trial's last result, which Tune keeps in memory (its logged history can lose
    rows across a pause)."""
    rows = []
    for index, result in enumerate(results):
        metrics = result.metrics or {}
        problem = str(result.error) if result.error is not None else metrics.get("health_error") or ""
        rows.append({
            "trial": index, "search": settings.search,
            **{key: result.config.get(key) for key in settings.search_space},
            "steps": metrics.get("step", 0), "fid": metrics.get(METRIC, math.nan),
            "error": problem.splitlines()[0] if problem else "",
        })
    return rows


def write_outputs(results: tune.ResultGrid, settings: TuneParams) -> dict:
    """trials.csv, and best_params.yaml from the best trial at the last step, among those that reached it."""
    rows = trial_rows(results, settings)
    finished = [row for row in rows if row["steps"] == settings.steps and not row["error"]
                and math.isfinite(row["fid"])]
    if not finished:
        errors = "; ".join(row["error"] for row in rows if row["error"]) or "stopped early"
        raise UserError(f"no tune trial finished its {settings.steps} steps healthy: {errors}; widen"
                        " tune.search_space or relax train.health, or set train.use_tuned: false")
    best = min(finished, key=lambda row: (row["fid"], row["trial"]))
    best_params = {key: float(best[key]) for key in settings.search_space}
    TRIALS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with TRIALS_FILE.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text_atomic(BEST_PARAMS_FILE, yaml.safe_dump(best_params, sort_keys=True))
    return best | {"best_params": best_params}


def trial_curve(result) -> list[dict]:
    """A trial's reports (step, FID, losses), from Tune's record of them; its last result when that is empty."""
    frame = result.metrics_dataframe
    rows = frame.to_dict("records") if frame is not None and "step" in frame else []
    return rows or ([result.metrics] if result.metrics and "step" in result.metrics else [])


def log_trials(client: MlflowClient, parent: str, results: tune.ResultGrid, rows: list[dict]) -> None:
    """Each trial as a child run of the pipeline's: its settings, its score curve, and how it ended."""
    for row, result in zip(rows, results):
        run_id = child_run(client, parent, "tune", f"tune trial {row['trial']}", {"search": row["search"]})
        log_params(client, run_id, {key: value for key, value in row.items() if key not in ("fid", "error")})
        for report in trial_curve(result):
            values = {key: report.get(key) for key in ("fid", "loss_d", "loss_g", "images_per_second")}
            log_step_metrics(client, run_id, {key: value for key, value in values.items() if value is not None},
                             int(report["step"]))
        if row["error"]:
            fail(client, run_id, row["error"])
        else:
            client.set_terminated(run_id, "FINISHED")


def main() -> None:
    params = load_params()
    manifest = read_manifest(PREPARED_DIR)
    client = configure_mlflow()  # before any compute: an unreachable tracking server stops the stage at once
    parent = pipeline_run(client, params.register.experiment, manifest["dataset_hash"])
    published = publish_training_data(PREPARED_DIR)
    require_resources(params.tune.num_workers, use_gpu=False, cpus_per_worker=WORKER_CPU)
    results = run_search(params, *published)
    log_trials(client, parent, results, trial_rows(results, params.tune))
    try:
        best = write_outputs(results, params.tune)
    except UserError as error:
        fail(client, parent, str(error))
        raise
    print(f"[tune] {params.tune.search}: {len(results)} trials; best domain-FID {best['fid']:.2f} at step "
          f"{params.tune.steps} (trial {best['trial']}) with {best['best_params']} -> {BEST_PARAMS_FILE}", flush=True)


if __name__ == "__main__":
    run_main(main, "tune")
