"""Does a tune trial's score predict the full run's quality? Rank correlation over sampled configurations.

    python -m benchmarks.tune_correlation [--configs 6] [--processes 2]

Draws `--configs` optimizer settings from params.yaml's tune.search_space (seeded with tune.seed) and
trains each at the full budget on the prepared data with the plain gancore loop (train.steps at the
global batch train.num_workers x train.batch_size, final domain-FID from eval.num_samples samples).
A tune trial is a prefix of that run (same global batch and seed), so every tune.report_every (or
--every) steps the run is scored as a trial would be (domain-FID of tune.eval_samples EMA samples). Prints Spearman's
rho between each trial length's score and the full-budget FID.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from benchmarks import results
from benchmarks.prepared_setup import PreparedSetup, train_plain
from gancore.training import OptimizerSettings
from pipelines.config import Distribution, Params, load_params

SETUP: PreparedSetup | None = None  # trained once in the parent; forked workers inherit it


def draw(space: dict[str, Distribution], rng: np.random.Generator) -> dict[str, float]:
    """One configuration from the search space, with the distributions tune samples from."""
    config = {}
    for key, distribution in space.items():
        if distribution.loguniform is not None:
            config[key] = float(np.exp(rng.uniform(*np.log(distribution.loguniform))))
        elif distribution.uniform is not None:
            config[key] = float(rng.uniform(*distribution.uniform))
        else:
            config[key] = float(distribution.choice[rng.integers(len(distribution.choice))])
    return config


def score_config(job: tuple[Params, dict[str, float], int]) -> dict:
    """Train one configuration at the full budget, scoring it as a trial would at every tune report."""
    params, config, every = job
    torch.set_num_threads(1)
    optimizer = OptimizerSettings(**{**params.train.optimizer(), **config})
    reference = SETUP.test_features(len(SETUP.test_images), seed=0)
    trial_scores: dict[int, float] = {}

    def score_prefix(done: int, state) -> None:
        if done % every == 0 and done < params.train.steps:
            trial_scores[done] = SETUP.sample_fid(state.ema.module, params.tune.eval_samples, reference)

    started = time.perf_counter()
    full, _, _ = train_plain(params, optimizer, SETUP, params.train.global_batch_size(),
                             params.tune.seed, steps=params.train.steps, on_step=score_prefix)
    full_fid = SETUP.sample_fid(full.ema.module, params.eval.num_samples, reference)
    print(f"  {config} -> full FID {full_fid:.2f}; trial FIDs {trial_scores} ({time.perf_counter() - started:.0f} s)",
          flush=True)
    return {**config, "trial_scores": trial_scores, "full_fid": full_fid}


def main() -> None:
    global SETUP
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=6)
    parser.add_argument("--processes", type=int, default=2, help="configurations trained side by side, 1 thread each")
    parser.add_argument("--every", type=int, help="steps between trial scores (default: tune.report_every)")
    args = parser.parse_args()
    params = load_params()
    SETUP = PreparedSetup.load(params)
    rng = np.random.default_rng(params.tune.seed)
    configs = [draw(params.tune.search_space, rng) for _ in range(args.configs)]
    print(f"training {args.configs} configurations, {args.processes} at a time", flush=True)
    with multiprocessing.get_context("fork").Pool(args.processes) as pool:
        jobs = [(params, config, args.every or params.tune.report_every) for config in configs]
        rows = pool.map(score_config, jobs, chunksize=1)
    keys = list(params.tune.search_space)
    report = results.Report()
    report.line(f"{args.configs} configurations drawn from tune.search_space (seed {params.tune.seed}); trial = "
                f"{params.tune.steps} steps, full = {params.train.steps} steps; plain gancore loop, prepared data.")
    report.line(f"\n| {' | '.join(keys)} | trial FID at {params.tune.steps} steps | full FID |")
    report.line("|" + "---|" * (len(keys) + 2))
    for row in sorted(rows, key=lambda row: row["full_fid"]):
        report.line("| " + " | ".join(f"{row[key]:.3g}" for key in keys)
                    + f" | {row['trial_scores'].get(params.tune.steps, float('nan')):.2f} | {row['full_fid']:.2f} |")
    report.line("\nSpearman rank correlation of a trial's score (FID after `steps`) with the full-budget FID:\n")
    correlations = {}
    for steps in sorted(rows[0]["trial_scores"]):
        rho, p_value = spearmanr([row["trial_scores"][steps] for row in rows], [row["full_fid"] for row in rows])
        correlations[steps] = {"rho": float(rho), "p": float(p_value)}
        marker = "  <- tune.steps" if steps == params.tune.steps else ""
        report.line(f"- trial of {steps:5d} steps: rho = {rho:+.2f} (p = {p_value:.2f}, {len(rows)} configurations)"
                    f"{marker}")
    report.save("tune-correlation", {"rows": rows, "spearman": correlations},
                spread=f"{args.configs} configurations, one seed each (Spearman's p-value given)")

if __name__ == "__main__":
    main()
