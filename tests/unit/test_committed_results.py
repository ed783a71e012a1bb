"""Committed results are read on other machines: they must not carry this machine's paths."""

import re
import subprocess
from pathlib import Path

import pytest

from pipelines.tracking import configured_tracking_uri

# What a machine path looks like inside a committed text file: an absolute POSIX path under a system or home root.
MACHINE_PATH = re.compile(r"(?<![\w.])/(?:tmp|home|root|Users|work|var|opt|mnt|private)/[\w.-]+")
RESULT_ROOTS = ("results", "reports", "docs/results", "dvc.lock")


def committed_result_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", *RESULT_ROOTS], capture_output=True, text=True, check=True).stdout
    return [Path(line) for line in listed.splitlines() if line.endswith((".json", ".yaml", ".csv", ".md", ".lock"))]


def test_no_committed_result_holds_a_machine_path():
    files = committed_result_files()
    assert files, "the committed results are listed"
    found = [f"{path}: {match}" for path in files for match in MACHINE_PATH.findall(path.read_text())]
    assert not found, f"absolute machine paths in committed results: {found}"


def test_the_recorded_tracking_uri_is_the_configured_one(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert configured_tracking_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret@mlflow.example:5000")
    assert "s3cret" not in configured_tracking_uri() and "mlflow.example:5000" in configured_tracking_uri()


@pytest.mark.parametrize("text", ["sqlite:////tmp/final/default/mlflow.db", "/home/me/repo/x.png"])
def test_the_pattern_finds_machine_paths(text):
    assert MACHINE_PATH.search(text)
