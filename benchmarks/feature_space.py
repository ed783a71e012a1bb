"""Does the metric space see what a person sees? Known corruptions of real images, scored in featurenet's space.

    python benchmarks/feature_space.py [--steps 155 900] [--count 1000]

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
    print(f"# FID against {count} held-out images of {params.data.source} at {params.data.image_size} px "
          f"(x: ratio to real-vs-real)")
    for steps in args.steps:
        started = time.perf_counter()
        settings = params.featurenet.model_copy(update={"encoder_steps": steps})
        encoder = train_encoder(train, settings)
        reference = extract(encoder, from_uint8(test[:count]))[0]
        scores = {name: fid(extract(encoder, images.clamp(-1, 1))[0], reference) for name, images in rows.items()}
        base = scores["real-vs-real"]
        listed = ", ".join(f"{name} {value:.2f} (x{value / base:.1f})" for name, value in scores.items())
        print(f"encoder_steps {steps} (trained in {time.perf_counter() - started:.0f} s): {listed}", flush=True)


if __name__ == "__main__":
    main()
