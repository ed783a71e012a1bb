"""Does the metric space see what a person sees? Known corruptions of real images, scored in featurenet's space.

    python -m benchmarks.feature_space [--steps 155 900] [--count 1000]

Run in a repository whose `dvc repro` has prepared unlabelled data (e.g. after `make pipeline PRESET=photos-64`).
For each SimCLR budget in `--steps` (featurenet.encoder_steps), trains the encoder on the prepared train split
exactly as the featurenet stage does, then prints the FID between held-out images and: other real images
(real-vs-real), real images with Gaussian noise, blurred (3x3 box, 1/2/4 passes), downsampled 4x and upsampled
(blocky), and the pipeline's trained generator (models/gan, when there is one). A space fit to judge a
generator makes every corruption cost clearly more than real-vs-real, growing with its strength.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks import results
from gancore.images import from_uint8
from gancore.metrics import extract, fid
from gancore.step import generate_images
from pipelines.artifacts import MODEL_DIR, PREPARED_DIR, load_generator
from pipelines.config import load_params
from pipelines.dataset import load_split
from pipelines.stages.featurenet import train_encoder


def blur(images: torch.Tensor, passes: int) -> torch.Tensor:
    kernel = torch.full((images.shape[1], 1, 3, 3), 1 / 9)
    for _ in range(passes):
        images = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=images.shape[1])
    return images


def corruptions(real: torch.Tensor) -> dict[str, torch.Tensor]:
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    blocky = F.interpolate(F.interpolate(real, scale_factor=0.25, mode="area"), scale_factor=4, mode="nearest")
    return {"real-vs-real": real, "noise 0.1": real + 0.1 * noise, "noise 0.3": real + 0.3 * noise,
            "blur 1": blur(real, 1), "blur 2": blur(real, 2), "blur 4": blur(real, 4), "blocky 4x": blocky}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[155, 900])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--name", default="feature-space", help="the result file's name in docs/results/")
    args = parser.parse_args()
    params = load_params()
    train, _ = load_split(PREPARED_DIR, "train")
    test, _ = load_split(PREPARED_DIR, "test", limit=args.count)
    count = min(args.count, len(test))
    rows = corruptions(from_uint8(train[:count]))
    if (MODEL_DIR / "config.json").exists():
        generator, config = load_generator()
        rows["generator (models/gan)"] = generate_images(generator, count, config["latent_dim"], seed=0,
                                                         num_classes=config["num_classes"])
    table: dict[int, dict[str, float]] = {}
    for steps in args.steps:
        started = time.perf_counter()
        settings = params.featurenet.model_copy(update={"encoder_steps": steps})
        encoder = train_encoder(train, settings)
        reference = extract(encoder, from_uint8(test[:count]))[0]
        table[steps] = {name: fid(extract(encoder, images.clamp(-1, 1))[0], reference) for name, images in rows.items()}
        print(f"encoder_steps {steps} trained and scored in {time.perf_counter() - started:.0f} s", flush=True)
    report = results.Report()
    report.line(f"FID against {count} held-out images of `{params.data.source}` at {params.data.image_size} px, "
                f"in featurenet spaces trained for each SimCLR budget (x: ratio to real-vs-real).\n")
    report.line("| images | " + " | ".join(f"encoder_steps {steps}" for steps in table) + " |")
    report.line("|---|" + "---|" * len(table))
    for name in rows:
        report.line(f"| {name} | " + " | ".join(f"{scores[name]:.2f} (x{scores[name] / scores['real-vs-real']:.1f})"
                                               for scores in table.values()) + " |")
    report.save(args.name, {"source": params.data.source, "count": count, "fid": table},
                spread="one encoder per budget, one sample of each corruption")

if __name__ == "__main__":
    main()
