"""Committed results are read on other machines: they must not carry this machine's paths."""

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import results
from conftest import REPO
from pipelines.tracking import configure_mlflow, configured_tracking_uri

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


def test_the_default_store_is_recorded_relative_after_mlflow_is_configured(monkeypatch, tmp_path):
    """mlflow.set_tracking_uri exports the absolute store URI to the environment; the record must not take it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    configure_mlflow()
    assert configured_tracking_uri() == "sqlite:///mlflow.db"


@pytest.mark.parametrize("text", ["sqlite:////tmp/final/default/mlflow.db", "/home/me/repo/x.png"])
def test_the_pattern_finds_machine_paths(text):
    assert MACHINE_PATH.search(text)


def test_the_readme_quotes_the_result_files(monkeypatch):
    """The README's headline block is what `python -m benchmarks.results --readme` makes of the committed result
    files: no figure there is typed by hand or left behind by a newer file. (Which files are stale depends on the
    clone's history, so that one line is checked by the script, not here.)"""
    def figures(block: str) -> list[str]:
        return [line for line in block.strip().splitlines() if not line.startswith(results.STALE_LABEL)]

    monkeypatch.chdir(REPO)
    text = (REPO / "README.md").read_text()
    quoted = text[text.index(results.HEADLINE_START) + len(results.HEADLINE_START):text.index(results.HEADLINE_END)]
    assert figures(quoted) == figures(results.headline()), "README.md is out of date: python -m benchmarks.results --readme"
