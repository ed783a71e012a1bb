"""The embedded default S3 endpoint for one machine: moto's standalone server, seeded with the sample datasets.

`gan stack up` (or `python -m pipelines.stack up`) starts it in the background and
prints the `export` lines that point boto3, DVC and the stages at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import MutableMapping
from pathlib import Path
from typing import Annotated

import psutil
import typer
from botocore.exceptions import BotoCoreError, ClientError

from pipelines.errors import UserError
from pipelines.sample_data import SAMPLE_DATASETS, seed
from pipelines.storage import StorageError, s3_client

STATE_DIR = Path(".stack")
PID_FILE = STATE_DIR / "s3.pid"
LOG_FILE = STATE_DIR / "s3.log"
DEFAULT_PORT = 9555
DATA_BUCKET = "gan-data"
DVC_BUCKET = "gan-dvc"
MOTO_DEFAULTS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
# psutil derives start times from the boot time, which clock adjustments can shift by a second.
START_TIME_TOLERANCE_S = 1.0


class StackError(UserError):
    """The embedded stack could not be started or stopped; the message says why."""


class StaleRecord(Exception):
    """The PID file does not name the live server `up` started; the message says why."""


def endpoint_url(port: int, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{port}"


def answers(url: str, timeout: float = 1.0) -> bool:
    """True when anything speaks HTTP at `url`, whatever the status code."""
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def use_moto_defaults(env: MutableMapping[str, str]) -> None:
    """Fill in moto's dummy credentials and region only where the environment has none."""
    if not any(name in env for name in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE")):
        env["AWS_ACCESS_KEY_ID"] = MOTO_DEFAULTS["AWS_ACCESS_KEY_ID"]
        env["AWS_SECRET_ACCESS_KEY"] = MOTO_DEFAULTS["AWS_SECRET_ACCESS_KEY"]
    if not any(name in env for name in ("AWS_REGION", "AWS_DEFAULT_REGION")):
        env["AWS_DEFAULT_REGION"] = MOTO_DEFAULTS["AWS_DEFAULT_REGION"]


def server_arguments(port: int, host: str) -> list[str]:
    """The moto server's command line after the interpreter; `down` matches a process against it."""
    return ["-m", "moto.server", "-H", host, "-p", str(port)]


def start_s3_server(
    port: int,
    host: str = "127.0.0.1",
    log_path: Path | None = None,
    detach: bool = False,
    startup_timeout: float = 30.0,
) -> subprocess.Popen:
    """Start moto's S3 server and return once it answers HTTP (or raise StackError).

    `detach` puts it in its own session so it outlives the calling shell command.
    """
    child_env = dict(os.environ)
    use_moto_defaults(child_env)
    log = log_path.open("ab") if log_path else subprocess.DEVNULL
    try:
        process = subprocess.Popen(
            [sys.executable, *server_arguments(port, host)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
            start_new_session=detach,
        )
    finally:
        if log_path:
            log.close()

    url = endpoint_url(port, host)
    deadline = time.monotonic() + startup_timeout
    while not answers(url):
        if process.poll() is not None:
            raise StackError(f"moto S3 server on {url} exited with code {process.returncode}{_log_tail(log_path)}")
        if time.monotonic() > deadline:
            stop(process)
            raise StackError(
                f"moto S3 server on {url} did not answer within {startup_timeout:.0f}s{_log_tail(log_path)}"
            )
        time.sleep(0.1)
    return process


def stop(process: subprocess.Popen, timeout: float = 10.0) -> None:
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start_recorded_server(port: int, host: str) -> int:
    """Start the detached server `up` leaves running and record which process it is, for `down`; return its PID.

    A PID alone can name another program after a reboot or PID reuse, so the record
    also holds the process's start time and the address its command line names.
    """
    STATE_DIR.mkdir(exist_ok=True)
    process = start_s3_server(port, host, log_path=LOG_FILE, detach=True)
    record = {"pid": process.pid, "started": psutil.Process(process.pid).create_time(), "host": host, "port": port}
    PID_FILE.write_text(json.dumps(record) + "\n")
    return process.pid


def recorded_server() -> psutil.Process:
    """The live process PID_FILE names, if it is still the moto server `up` started; else raise StaleRecord."""
    try:
        record = json.loads(PID_FILE.read_text())
        pid, started, host, port = record["pid"], record["started"], record["host"], record["port"]
    except (ValueError, KeyError, TypeError):
        raise StaleRecord("it is not a record this version of `gan stack up` wrote") from None
    try:
        process = psutil.Process(pid)
        command, actual_start = process.cmdline(), process.create_time()
    except psutil.NoSuchProcess:  # also a zombie: it has exited already
        raise StaleRecord(f"no process has pid {pid} any more") from None
    except psutil.AccessDenied:  # our own server would be readable: same user
        raise StaleRecord(f"pid {pid} belongs to another user") from None
    # argv[0] is whichever interpreter ran `up`; `down` may run under another one.
    if command[1:] != server_arguments(port, host) or abs(actual_start - started) > START_TIME_TOLERANCE_S:
        raise StaleRecord(f"pid {pid} is now another process ({' '.join(command) or process.name()})")
    return process


def ensure_bucket(name: str) -> None:
    client = s3_client()
    try:
        client.head_bucket(Bucket=name)
        return
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
            raise
    region = client.meta.region_name
    # us-east-1 is the one region that rejects an explicit LocationConstraint.
    location = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
    client.create_bucket(Bucket=name, **location)


def _log_tail(log_path: Path | None, chars: int = 2000) -> str:
    if log_path is None or not log_path.exists():
        return ""
    return f"; last log lines ({log_path}):\n{log_path.read_text(errors='replace')[-chars:]}"


def _exports(url: str) -> str:
    # ${VAR:-default} keeps real credentials the shell already has, and never prints them.
    lines = [f"export AWS_ENDPOINT_URL={url}"]
    lines += [f"export {name}=${{{name}:-{value}}}" for name, value in MOTO_DEFAULTS.items()]
    return "\n".join(lines)


stack_app = typer.Typer(help="The embedded S3 endpoint (moto) for one machine.", no_args_is_help=True)
PortOption = Annotated[int, typer.Option(envvar="GAN_S3_PORT", help="Loopback port of the S3 endpoint.")]
HostOption = Annotated[str, typer.Option(help="Interface to bind.")]


@stack_app.command()
def up(port: PortOption = DEFAULT_PORT, host: HostOption = "127.0.0.1") -> None:
    """Start the S3 endpoint in the background, create the buckets, seed the sample datasets, print exports."""
    url = endpoint_url(port, host)
    try:
        if answers(url):
            typer.echo(f"an S3 endpoint already answers at {url}; using it", err=True)
        else:
            pid = start_recorded_server(port, host)
            typer.echo(f"started moto S3 server at {url} (pid {pid}, log {LOG_FILE})", err=True)
        os.environ["AWS_ENDPOINT_URL"] = url
        use_moto_defaults(os.environ)
        s3_client.cache_clear()
        ensure_bucket(DVC_BUCKET)
        ensure_bucket(DATA_BUCKET)
        counts = {name: seed(name, DATA_BUCKET, name) for name in SAMPLE_DATASETS}
    except (StackError, StorageError, BotoCoreError, ClientError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    for name, count in counts.items():
        typer.echo(f"s3://{DATA_BUCKET}/{name} holds {count} images", err=True)
    typer.echo(f"s3://{DVC_BUCKET} is ready", err=True)
    typer.echo("# point boto3, DVC and the stages at it:", err=True)
    typer.echo(_exports(url))


@stack_app.command()
def down() -> None:
    """Stop the S3 endpoint started by `up`, and no other process."""
    if not PID_FILE.exists():
        typer.echo(f"no embedded S3 server recorded in {PID_FILE}; nothing to stop", err=True)
        return
    try:
        process = recorded_server()
    except StaleRecord as why:
        PID_FILE.unlink()
        typer.echo(f"removed stale {PID_FILE}: {why}; signalled nothing", err=True)
        return
    try:
        # psutil re-checks the start time before each signal, so a PID reused since the check is left alone.
        process.terminate()
        try:
            process.wait(10)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(10)
    except psutil.NoSuchProcess:
        pass  # it exited on its own between the check and the signal
    PID_FILE.unlink()
    typer.echo(f"stopped moto S3 server (pid {process.pid})", err=True)


@stack_app.command()
def env(port: PortOption = DEFAULT_PORT, host: HostOption = "127.0.0.1") -> None:
    """Print the export lines that point at the S3 endpoint: eval "$(gan stack env)"."""
    typer.echo(_exports(endpoint_url(port, host)))


if __name__ == "__main__":
    stack_app()
