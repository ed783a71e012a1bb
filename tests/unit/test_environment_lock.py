"""requirements.lock pins the pipeline's whole environment: every dependency at one exact version inside
pyproject.toml's range, installed by make setup."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path("requirements.lock")


def locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_dependency_is_pinned_inside_its_range():
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = locked()
    for text in declared:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in {LOCK}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK} pins {name}=={pins[name]}, outside pyproject's {requirement.specifier}: run `make lock`")


def test_make_setup_installs_from_the_lock():
    makefile = Path("Makefile").read_text()
    assert "-c $(LOCK) -e '.[test]'" in makefile and "LOCK := requirements.lock" in makefile
