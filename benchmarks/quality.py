"""The default pipeline against the classic plain DCGAN loop at equal wall-clock, over seeds.

    python -m benchmarks.quality [--seeds 0 1 2] [--name quality-mnist]

Needs `dvc repro tune` first (the featurenet and tune's best settings): everything is scored like the
evaluate stage (same featurenet, held-out images, N and metric code). For each seed, in one invocation:

- **default**: the train stage's own Ray Train run (params.yaml as it is, train.seed = seed, the
  optimizer the train stage picks: tune's best trial in results/tune/best_params.yaml), timed from fit()
  to its last checkpoint;
- **classic DCGAN**: a plain single-process loop of Radford et al.'s recipe as in Ray Tune's
  pbt_dcgan_mnist example (z = 100, 32 base channels, non-saturating BCE, Adam 2e-4 with betas
  (0.5, 0.999), batch 64, unconditional, no EMA), given the same wall-clock on the same cores.

Writes docs/results/<name>.md and .json (benchmarks/results.py: the median and range over seeds, real vs
real beside, per-seed rows) and each seed's grids to docs/results/<name>/.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import ray
import torch

from benchmarks import results
from benchmarks.prepared_setup import PreparedSetup, train_plain
from gancore.images import from_uint8
from gancore.models import ModelSpec, build_gan
from gancore.step import generate_images
from gancore.training import OptimizerSettings
from pipelines.artifacts import PREPARED_DIR
from pipelines.config import Params, load_params
from pipelines.ray_runtime import publish_training_data
from pipelines.stages.evaluate import save_grid, score
from pipelines.stages.train import completed_state, fit, tuned_optimizer

CLASSIC_MODEL = {"family": "dcgan", "latent_dim": 100, "base_channels": 32, "conditional": False,
                 "loss": "non_saturating", "spectral_norm": False, "minibatch_discrimination": False,
                 "critic_steps": 1, "gradient_penalty": 0.0, "r1_gamma": 0.0, "label_smoothing": 0.0,
                 "feature_matching": 0.0, "augment": []}
CLASSIC_ADAM = OptimizerSettings(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999)
CLASSIC_BATCH = 64
METRICS = ("fid", "kid", "precision", "recall")


def with_seed(params: Params, seed: int, **train: object) -> Params:
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed, **train})})


def run_default(params: Params, published) -> tuple[torch.nn.Module, float]:
    """The train stage's fit() on the published shards; its EMA generator and the seconds fit() took."""
    optimizer = tuned_optimizer(params)
    name = f"quality-seed{params.train.seed}-{time.time_ns()}"  # never resume an old run
    started = time.perf_counter()
    state = completed_state(fit(params, *published, optimizer, name))
    seconds = time.perf_counter() - started
    generator, _ = build_gan(ModelSpec(**state["config"]["model"]))
    generator.load_state_dict(state["generator_ema"])
    return generator.eval(), seconds


def run_classic(params: Params, setup: PreparedSetup, seed: int, seconds: float) -> tuple[torch.nn.Module, int]:
    """The classic recipe for `seconds` of training on all cores; its generator and the steps it made."""
    classic = params.model_copy(update={"model": params.model.model_copy(update=CLASSIC_MODEL),
                                        "train": params.train.model_copy(update={"ema_decay": 0.0})})
    state, steps, _ = train_plain(classic, CLASSIC_ADAM, setup, CLASSIC_BATCH, seed, seconds=seconds)
    return state.ema.module, steps  # decay 0: the EMA copy is G itself, in eval mode


def evaluate(generator: torch.nn.Module, setup: PreparedSetup, params: Params, grid: Path) -> dict:
    n = min(params.eval.num_samples, len(setup.test_images))
    fakes = generate_images(generator, n, generator.latent_dim, params.eval.seed, num_classes=generator.num_classes)
    save_grid(fakes[: params.eval.grid_size], grid)
    features, probs = setup.features(fakes)
    metrics = score(features, probs, setup.test_features(n, params.eval.seed), params.eval)
    return {key: metrics[key]["value"] for key in METRICS if key in metrics}


def summary(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows if key in row]
    if not values:
        return "—"
    return f"{statistics.median(values):.3g} [{min(values):.3g}, {max(values):.3g}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="quality-mnist", help="the result file's name in docs/results/")
    args = parser.parse_args()
    grids = results.RESULTS_DIR / args.name
    params = load_params()
    setup = PreparedSetup.load(params)
    n = min(params.eval.num_samples, len(setup.test_images))
    train_rows = torch.randperm(len(setup.train_images), generator=torch.Generator().manual_seed(0))[:n]
    real = score(*setup.features(from_uint8(setup.train_images[train_rows.numpy()])),
                 setup.test_features(n, params.eval.seed), params.eval)
    published = publish_training_data(PREPARED_DIR)
    rows: dict[str, list[dict]] = {"default": [], "classic DCGAN": []}
    for seed in args.seeds:
        seeded = with_seed(params, seed)
        generator, seconds = run_default(seeded, published)
        rows["default"].append({**evaluate(generator, setup, seeded, grids / f"default-seed{seed}.png"),
                                "seconds": seconds, "steps": params.train.steps})
        classic, steps = run_classic(seeded, setup, seed, seconds)
        rows["classic DCGAN"].append({**evaluate(classic, setup, seeded, grids / f"classic-seed{seed}.png"),
                                      "seconds": seconds, "steps": steps})
        print(f"seed {seed}: default FID {rows['default'][-1]['fid']:.2f} in {seconds:.0f} s; classic FID "
              f"{rows['classic DCGAN'][-1]['fid']:.2f} in {steps} steps", flush=True)
    ray.shutdown()
    write_result(args.name, params, n, args.seeds, {key: real[key]["value"] for key in METRICS if key in real}, rows)


def write_result(name: str, params: Params, n: int, seeds: list[int], real: dict, rows: dict[str, list[dict]]) -> None:
    """docs/results/<name>.md + .json: the summary over seeds, real vs real beside, each seed's row and grid."""
    ratios = [classic["fid"] / default["fid"] for default, classic in zip(rows["default"], rows["classic DCGAN"])]
    over_real = [row["fid"] / real["fid"] for row in rows["default"]]
    grids = sorted((results.RESULTS_DIR / name).glob("*.png"))
    lines = [f"`{params.data.source}` at {params.data.image_size} px; N = {n} generated vs {n} held-out images, "
             f"featurenet space; median [min, max] over seeds {seeds}. Real vs real: FID {real['fid']:.3g}, "
             f"precision {real['precision']:.3g}, recall {real['recall']:.3g}.", "",
             "| recipe | domain-FID | KID | precision | recall | G steps | train wall-clock (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {recipe} | " + " | ".join(summary(runs, key) for key in (*METRICS, "steps", "seconds")) + " |"
              for recipe, runs in rows.items()]
    lines += ["", "classic FID / default FID, per seed: " + ", ".join(f"{ratio:.2f}" for ratio in ratios),
              "default FID / real-vs-real FID, per seed: " + ", ".join(f"{ratio:.2f}" for ratio in over_real),
              "", "Grids: " + ", ".join(f"[{path.stem}]({name}/{path.name})" for path in grids)]
    path = results.write(name, "\n".join(lines), {"real_vs_real": real, "rows": rows,
                                                   "classic_over_default_fid": ratios},
                         spread=f"median [min, max] over seeds {seeds}")
    print(path.read_text())


if __name__ == "__main__":
    main()
