"""`gan stack down` signals only the moto server `up` recorded; a PID file naming anything else is just removed."""

import json
import subprocess
from collections.abc import Iterator

import psutil
import pytest
from conftest import free_port
from typer.testing import CliRunner

from pipelines import stack


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # PID_FILE and LOG_FILE are relative to the working directory


@pytest.fixture
def bystander() -> Iterator[psutil.Process]:
    """A live process of this user that is not the server, as after a reboot or PID reuse."""
    process = subprocess.Popen(["sleep", "60"])
    yield psutil.Process(process.pid)
    process.kill()
    process.wait()


def write_record(pid: int, started: float, port: int, host: str = "127.0.0.1") -> None:
    stack.STATE_DIR.mkdir(exist_ok=True)
    stack.PID_FILE.write_text(json.dumps({"pid": pid, "started": started, "host": host, "port": port}) + "\n")


def run_down() -> str:
    result = CliRunner().invoke(stack.stack_app, ["down"])
    assert result.exit_code == 0, result.output
    return result.output


def assert_alive(process: psutil.Process) -> None:
    # A signalled child of this test lingers as a zombie, which is_running() still counts.
    assert process.is_running() and process.status() != psutil.STATUS_ZOMBIE, "down signalled a process not its own"


def assert_stale_and_removed(output: str, pid: int) -> None:
    assert not stack.PID_FILE.exists()
    assert len(output.strip().splitlines()) == 1, output
    assert "stale" in output and str(pid) in output and "signalled nothing" in output


def test_down_leaves_another_program_with_the_recorded_pid_alive(bystander):
    write_record(bystander.pid, bystander.create_time(), free_port())
    output = run_down()
    assert_alive(bystander)
    assert_stale_and_removed(output, bystander.pid)
    assert "another process" in output and "sleep 60" in output


def test_down_leaves_a_pid_from_a_bare_pid_file_alive(bystander):
    """The bare PID older versions wrote cannot be checked, so it is never signalled."""
    stack.STATE_DIR.mkdir()
    stack.PID_FILE.write_text(f"{bystander.pid}\n")
    output = run_down()
    assert_alive(bystander)
    assert not stack.PID_FILE.exists() and "stale" in output and "signalled nothing" in output


def test_down_removes_the_record_of_a_dead_process():
    finished = subprocess.Popen(["true"])
    started = psutil.Process(finished.pid).create_time()
    finished.wait()
    write_record(finished.pid, started, free_port())
    output = run_down()
    assert_stale_and_removed(output, finished.pid)
    assert "no process" in output


def test_down_stops_the_recorded_server_but_not_one_started_at_another_time():
    port = free_port()
    pid = stack.start_recorded_server(port, "127.0.0.1")
    server = psutil.Process(pid)
    try:
        record = json.loads(stack.PID_FILE.read_text())
        assert record == {"pid": pid, "started": server.create_time(), "host": "127.0.0.1", "port": port}

        # Same command line, other start time: a server that reused the PID after a reboot.
        write_record(pid, record["started"] - 3600, port)
        assert_stale_and_removed(run_down(), pid)
        assert_alive(server)
        assert stack.answers(stack.endpoint_url(port))

        write_record(pid, record["started"], port)
        output = run_down()
        assert f"stopped moto S3 server (pid {pid})" in output
        assert not stack.PID_FILE.exists()
        assert not server.is_running() and not stack.answers(stack.endpoint_url(port))
    finally:
        if server.is_running():
            server.kill()
            server.wait(10)
