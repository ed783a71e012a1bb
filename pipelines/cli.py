"""`gan`: the embedded stack, cluster submission, promotion and sampling."""

from __future__ import annotations

import os
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import typer

from pipelines.errors import UserError, run_main
from pipelines.stack import stack_app
from pipelines.uris import redact_credentials

app = typer.Typer(help="GAN pipeline: dvc repro runs the stages; this command does everything around them.",
                  no_args_is_help=True, add_completion=False)
app.add_typer(stack_app, name="stack", help="The embedded S3 endpoint on loopback (moto's server).")

# Forwarded to a cluster job, without any user:password@ in them. Secrets are not forwarded: cluster
# nodes use their own credential chain (AWS_*, MLFLOW_TRACKING_USERNAME/PASSWORD or a token there).
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI")
# DVC needs the git repository on the cluster (and the lineage records its commit); Ray leaves
# .git out of a working_dir upload unless its default excludes are overridden.
UPLOAD_DEFAULT_EXCLUDES = ".venv,venv,__pycache__"
# Stage outputs stay behind: the job recomputes (or `dvc pull`s) them on the cluster.
# Git config files can hold credentials (a remote URL with a token, CI's http.extraheader); git and DVC
# work without them on the cluster.
UPLOAD_EXCLUDES = ["/.venv", "/.dvc/cache", "/.dvc/tmp", "/.dvc/config.local", "/.ray_storage", "/.stack",
                   "/mlartifacts", "/mlflow.db", "/data", "/models", "/results", "/.git/config", "/.git/**/config"]


def mlflow_error(what: str, error: Exception, fix: str) -> UserError:
    """A registry or tracking failure as one line: what failed, MLflow's reason, and the fix."""
    reason = str(getattr(error, "message", error)).strip().splitlines()[0]
    return UserError(f"{what}: {reason}; {fix}")


ALIAS = typer.Option("champion", help="alias to move")
MODEL_NAME = typer.Option(None, help="registered model name (default: register.model_name)")


def registry(name: str | None):
    """(client, settings, model name) for the registry commands. Params first: outside the repository
    nothing (no mlflow.db) is created."""
    from pipelines.config import load_params
    from pipelines.tracking import configure_mlflow

    settings = load_params().register
    return configure_mlflow(create=False), settings, name or settings.model_name


@contextmanager
def registry_errors(what: str):
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as error:
        raise mlflow_error(what, error, "check the model name and version in the MLflow UI") from None


@app.command()
def promote(
    version: str = typer.Argument(..., help="model version to promote"),
    alias: str = ALIAS,
    name: str = MODEL_NAME,
    force: bool = typer.Option(False, help="move the alias past the gate (health, quality floor, comparability,"
                                           " beating the holder beyond noise)"),
) -> None:
    """Move an alias (default champion) to a version, through the champion gate unless --force."""
    from pipelines.promotion import promote as gated_promote, promotion_lock

    if not version.isdigit():
        raise UserError(f"model version {version!r} is not a version number; pass one such as 3")
    client, settings, model_name = registry(name)
    with registry_errors(f"cannot promote version {version} of {model_name}"), promotion_lock(client, model_name):
        moved, message = gated_promote(client, model_name, version, settings, reason="gan promote", alias=alias,
                                       force=force)
    typer.echo(message)
    raise typer.Exit(0 if moved else 1)


@app.command()
def rollback(alias: str = ALIAS, name: str = MODEL_NAME) -> None:
    """Give the alias back to the version that held it before its latest move."""
    from pipelines.promotion import promotion_lock, rollback as roll_back

    client, _, model_name = registry(name)
    with registry_errors(f"cannot roll back {alias} of {model_name}"), promotion_lock(client, model_name):
        typer.echo(roll_back(client, model_name, alias))


@app.command()
def history(name: str = MODEL_NAME) -> None:
    """Every alias move of the model: when, which version, the one before, why, and by whom."""
    from pipelines.promotion import history as moves

    client, _, model_name = registry(name)
    with registry_errors(f"cannot read the history of {model_name}"):
        recorded = moves(client, model_name)
    for move in recorded:
        before = f"version {move['previous']}" if move["previous"] else "nobody"
        typer.echo(f"{move['time']}  {move['alias']}: {before} -> version {move['version']}  ({move['reason']};"
                   f" {move['by']})")
    if not recorded:
        typer.echo(f"no alias of {model_name} has moved yet")


@app.command()
def generate(
    model: str = typer.Option(..., help="MLflow model URI, e.g. models:/gan-mnist@champion"),
    n: int = typer.Option(64, min=1, help="number of samples"),
    out: Path = typer.Option(Path("grid.png"), help="PNG file for the sample grid"),
    seed: int = typer.Option(0),
) -> None:
    """Sample a registered generator into a PNG grid."""
    import mlflow.pytorch
    import torch
    from mlflow.exceptions import MlflowException

    from gancore.step import generate_images
    from pipelines.stages.evaluate import save_grid
    from pipelines.tracking import configure_mlflow

    if not model.startswith(("models:/", "runs:/")):
        raise UserError(f"--model {model!r} is not an MLflow model URI; use models:/<name>@<alias>,"
                        " models:/<name>/<version> or runs:/<run id>/generator")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist; create it or choose another path")
    configure_mlflow(create=False)
    try:
        generator = mlflow.pytorch.load_model(model, map_location="cpu").eval()
    except MlflowException as error:
        raise mlflow_error(f"cannot load {model}", error, "check the name, alias or version in the MLflow UI"
                           " (register one with `dvc repro register`)") from None
    images = generate_images(generator, n, generator.latent_dim, seed, num_classes=generator.num_classes)
    save_grid(images, out)
    typer.echo(f"{n} samples from {model} -> {out} ({tuple(images.shape[1:])}, torch {torch.__version__})")


@app.command()
def submit(
    address: str = typer.Option(os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                                help="Ray dashboard address (Jobs API)"),
    entrypoint: str = typer.Option("dvc repro", help="command the job runs in the uploaded working dir"),
    working_dir: Path = typer.Option(Path("."), help="folder uploaded as the job's working dir"),
    wait: bool = typer.Option(True, help="stream logs and exit with the job's status"),
    timeout: float = typer.Option(0, help="give up waiting after this many seconds (0: never)"),
) -> None:
    """Run the pipeline on a Ray cluster through the Jobs API (like `ray job submit -- dvc repro`)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    if not (working_dir / "dvc.yaml").is_file():
        raise UserError(f"--working-dir {working_dir} holds no dvc.yaml; run from the repository root or pass it")
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", UPLOAD_DEFAULT_EXCLUDES)
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as error:
        raise UserError(f"cannot reach the Ray Jobs API at {redact_credentials(address)} ({error}); start a cluster"
                        " (`ray start --head`, or infra/ray/cluster.yaml) or pass --address / RAY_ADDRESS") from None
    submission_id = f"gan-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                      runtime_env=job_runtime_env(working_dir, submission_id))
    typer.echo(f"submitted {submission_id} to {redact_credentials(address)}: {entrypoint}")
    if not wait:
        return
    printed, started = 0, time.monotonic()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(submission_id)
        logs = client.get_job_logs(submission_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in terminal:
            break
        if timeout and time.monotonic() - started > timeout:
            client.stop_job(submission_id)
            typer.echo(f"{submission_id}: stopped after {timeout:.0f}s", err=True)
            raise typer.Exit(124)
        time.sleep(2)
    typer.echo(f"{submission_id}: {status.value}")
    raise typer.Exit(0 if status == JobStatus.SUCCEEDED else 1)


def job_runtime_env(working_dir: Path, submission_id: str) -> dict:
    """The job's upload (without stage outputs or git credentials) and its forwarded, credential-free env."""
    env_vars = {key: redact_credentials(os.environ[key]) for key in FORWARDED_ENV if key in os.environ}
    env_vars["GAN_RAY_SUBMISSION_ID"] = submission_id
    return {"working_dir": str(working_dir), "excludes": UPLOAD_EXCLUDES, "env_vars": env_vars}


def main() -> None:
    run_main(app, "gan")


if __name__ == "__main__":
    main()
