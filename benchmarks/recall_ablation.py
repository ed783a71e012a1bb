"""What costs the default its recall: one change at a time against the default recipe, same budget.

    python -m benchmarks.recall_ablation [--variants default ema_off ...] [--seed 0] [--steps N]

Needs `dvc repro featurenet` (the pipeline's data and feature space). Every variant trains with the plain
single-process loop over gancore's TrainingState (benchmarks/prepared_setup.py) at the train stage's global
batch (num_workers x batch_size) and steps, two variants at a time on one core each, and is scored like
evaluate scores: featurenet space, N = eval.num_samples generated against as many held-out images.
Each trained model is scored three ways, because sampling is a candidate cause too:
  ema     the EMA generator in eval mode (what the pipeline exports);
  ema_bn  the same weights with batch-norm statistics of the sample batch (train-mode BN);
  raw     the generator itself, without the average, in eval mode.
Writes docs/results/<--name>.md and .json, and each variant's EMA grid to docs/results/<--name>/.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import time

import torch

from benchmarks import results
from benchmarks.prepared_setup import PreparedSetup, train_plain
from benchmarks.quality import CLASSIC_ADAM, CLASSIC_MODEL
from gancore.images import from_uint8
from gancore.metrics import coverage, fid, precision_recall
from gancore.step import generate_images
from gancore.training import OptimizerSettings
from pipelines.config import Params, load_params
from pipelines.stages.evaluate import save_grid
from pipelines.stages.train import tuned_optimizer

# name -> (model overrides, train overrides, optimizer overrides, global batch multiplier)
VARIANTS: dict[str, tuple[dict, dict, dict, float]] = {
    "default": ({}, {}, {}, 1),
    # Ray Tune's DCGAN example recipe (benchmarks/quality.py); its steps are twice the others' at half the
    # batch, about the same wall-clock (the quality benchmark times it exactly)
    "classic": (CLASSIC_MODEL, {"ema_decay": 0.0}, vars(CLASSIC_ADAM), 0.5),
    "resize": ({"upsample": "resize"}, {}, {}, 1),
    "transposed": ({"upsample": "transposed"}, {}, {}, 1),
    "ada": ({"augment": ["ada"]}, {}, {}, 1),
    "mode_seeking_1": ({"mode_seeking": 1.0}, {}, {}, 1),
    "mode_seeking_3": ({"mode_seeking": 3.0}, {}, {}, 1),
    "diffaugment": ({"augment": ["color", "translation", "cutout"]}, {}, {}, 1),
    "ema_off": ({}, {"ema_decay": 0.0}, {}, 1),
    "ema_0.999": ({}, {"ema_decay": 0.999}, {}, 1),
    "unconditional": ({"conditional": False}, {}, {}, 1),
    "lr_equal": ({}, {}, {"lr_g": 2e-4, "lr_d": 2e-4}, 1),
    "lr_d_faster": ({}, {}, {"lr_g": 2e-4, "lr_d": 4e-4}, 1),
    "beta2_0.9": ({}, {}, {"beta2": 0.9}, 1),
    "latent_128": ({"latent_dim": 128}, {}, {}, 1),
    "critic_2": ({"critic_steps": 2}, {}, {}, 1),
    "batch_half": ({}, {}, {}, 0.5),
}
METRICS = ("fid", "precision", "recall", "coverage")


def measure(fake, real, params: Params) -> dict[str, float]:
    """The values evaluate reports (the same functions and k), without its bootstrap intervals."""
    values = dict(zip(("precision", "recall"), precision_recall(real, fake, params.eval.precision_recall_k)))
    return {"fid": fid(fake, real), **values, "coverage": coverage(real, fake, params.eval.density_coverage_k)}


def variant_params(params: Params, name: str, seed: int, steps: int) -> tuple[Params, OptimizerSettings, int]:
    model, train, adam, batch = VARIANTS[name]
    optimizer = OptimizerSettings(**{**tuned_optimizer(params), **adam})
    updated = params.model_copy(update={"model": params.model.model_copy(update=model),
                                        "train": params.train.model_copy(update={"seed": seed, "steps": steps,
                                                                                 **train})})
    global_batch = int(params.train.num_workers * params.train.batch_size * batch)
    return updated, optimizer, global_batch


def sample(generator: torch.nn.Module, params: Params, n: int, batch_stats: bool) -> torch.Tensor:
    generator = copy.deepcopy(generator)
    generator.train(batch_stats)
    return generate_images(generator, n, generator.latent_dim, params.eval.seed, num_classes=generator.num_classes)


def run_variant(job: tuple[str, int, int, str]) -> dict:
    name, seed, steps, result_name = job
    torch.set_num_threads(1)
    params = load_params()
    setup = PreparedSetup.load(params)
    updated, optimizer, batch = variant_params(params, name, seed, steps)
    steps = steps * 2 if name == "classic" else steps
    started = time.perf_counter()
    state, done, seconds = train_plain(updated, optimizer, setup, batch, seed, steps=steps)
    n = min(params.eval.num_samples, len(setup.test_images))
    reference = setup.test_features(n, params.eval.seed)
    row = {"variant": name, "seed": seed, "steps": done, "batch": batch, "train_seconds": seconds}
    for scoring, generator, batch_stats in (("ema", state.ema.module, False), ("ema_bn", state.ema.module, True),
                                            ("raw", state.generator, False)):
        fakes = sample(generator, params, n, batch_stats)
        row[scoring] = measure(setup.features(fakes)[0], reference, params)
        if scoring == "ema":
            save_grid(fakes[: params.eval.grid_size], results.RESULTS_DIR / result_name / f"{name}-seed{seed}.png")
    print(f"{name} seed {seed}: {row['ema']} ({time.perf_counter() - started:.0f} s)", flush=True)
    return row


def real_vs_real(params: Params) -> dict:
    setup = PreparedSetup.load(params)
    n = min(params.eval.num_samples, len(setup.test_images))
    rows = torch.randperm(len(setup.train_images), generator=torch.Generator().manual_seed(0))[:n].numpy()
    return measure(setup.features(from_uint8(setup.train_images[rows]))[0], setup.test_features(n, params.eval.seed),
                   params)


def table(rows: list[dict], real: dict) -> str:
    lines = ["| variant | scored | " + " | ".join(METRICS) + " | train s |", "|---|---|" + "---|" * (len(METRICS) + 1)]
    lines.append("| real vs real | | " + " | ".join(f"{real[key]:.3f}" for key in METRICS) + " | |")
    for row in rows:
        for scoring in ("ema", "ema_bn", "raw"):
            lines.append(f"| {row['variant']} (seed {row['seed']}) | {scoring} | "
                         + " | ".join(f"{row[scoring][key]:.3f}" for key in METRICS)
                         + f" | {row['train_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: train.steps")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--name", default="recall_ablation", help="the result file's name under docs/results")
    args = parser.parse_args()
    params = load_params()
    steps = args.steps or params.train.steps
    real = real_vs_real(params)
    jobs = [(name, args.seed, steps, args.name) for name in args.variants]
    with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
        rows = pool.map(run_variant, jobs, chunksize=1)
    markdown = (f"Data {params.data.source} at {params.data.image_size} px. N = {params.eval.num_samples} generated "
                f"vs held-out images, featurenet space, {steps} steps (classic: {2 * steps} at half the batch), "
                f"plain loop at the train stage's global batch.\n\n{table(rows, real)}")
    path = results.write(args.name, markdown, {"real_vs_real": real, "rows": rows},
                         spread=f"one seed ({args.seed}) per variant")
    print(markdown, f"\nwritten to {path}", sep="\n")


if __name__ == "__main__":
    main()
