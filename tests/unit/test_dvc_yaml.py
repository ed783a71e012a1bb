"""dvc.yaml is complete: each stage lists the code it imports and the params it reads, and nothing else.

Both sides are derived from the sources: the stage's module (`python -m pipelines.stages.<stage>`) and
everything in the repository it imports, transitively (package __init__s included, imports inside
functions too); and every `params.<section>[.<key>]` that code reads, with methods of a section
(`params.train.optimizer()`) resolved to the fields they read. A missing entry leaves stale results
marked up to date; an extra one reruns a stage for nothing.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from pipelines import artifacts, config
from pipelines.config import Params

PACKAGES = ("gancore", "pipelines")
DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


def module_file(module: str) -> Path | None:
    """The repository file of a dotted module name (package → its __init__.py), or None."""
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Dotted names this file imports from the repository's packages, with each parent package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules, when they are
    ours = {name for name in names if name.split(".")[0] in PACKAGES}
    return {".".join(name.split(".")[:end]) for name in ours for end in range(1, name.count(".") + 2)}


def stage_files(stage: str) -> set[Path]:
    """Every repository file that running the stage's module can execute."""
    module = STAGES[stage]["cmd"].removeprefix("python -m ")
    files, pending = set(), [module]
    while pending:
        path = module_file(pending.pop())
        if path is not None and path not in files:
            files.add(path)
            pending.extend(imported_modules(path))
    return files


def section_fields(section: str, key: str) -> set[str]:
    """The params `section.key` stands for: a field itself, or the fields a method of the section reads."""
    section_class = Params.model_fields[section].annotation
    if key in section_class.model_fields:
        return {f"{section}.{key}"}
    source = inspect.getsource(getattr(section_class, key))
    if "model_dump" in source:
        return {section}
    read = set(re.findall(r"self\.(\w+)", source))
    for class_name in re.findall(r"(\w+)\.model_fields", source):  # e.g. {k: getattr(self, k) for k in X.model_fields}
        read |= set(getattr(config, class_name).model_fields)
    if "getattr(self" in source and not read & set(section_class.model_fields):
        return {section}  # fields chosen at run time: count the whole section
    return {f"{section}.{name}" for name in read if name in section_class.model_fields}


def params_read(files: set[Path]) -> set[str]:
    """`section` or `section.key` for every params read in `files` (config.py's validators excluded)."""
    sections = "|".join(Params.model_fields)
    read = set()
    for path in files - {REPO / "pipelines/config.py"}:
        text = path.read_text()
        read.update(re.findall(rf"load_params(?:_or_exit)?\(\)\.({sections})\b", text))
        for section, key in re.findall(rf"\bparams\.({sections})\b(?:\.(\w+))?", text):
            read |= section_fields(section, key) if key else {section}
    return read


def covered(needed: str, listed: list[str], separator: str) -> bool:
    return any(needed == entry or needed.startswith(entry.rstrip(separator) + separator) for entry in listed)


def code_deps(stage: str) -> list[str]:
    """The stage's deps that are source code (the rest are data and other stages' outputs)."""
    return [dep for dep in STAGES[stage]["deps"]
            if dep.split("/")[0] in PACKAGES and (REPO / dep).exists()]


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_every_file_it_imports_and_no_other_code(stage):
    needed = {str(path.relative_to(REPO)) for path in stage_files(stage)}
    listed = code_deps(stage)
    missing = sorted(name for name in needed if not covered(name, listed, "/"))
    assert not missing, f"dvc.yaml stage {stage} does not list {missing}: a change there leaves it stale"
    unused = [dep for dep in listed if not any(covered(name, [dep], "/") for name in needed)]
    assert not unused, f"dvc.yaml stage {stage} lists {unused}, which it never imports: a change reruns it for nothing"


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_lists_every_param_it_reads_and_no_other(stage):
    needed = params_read(stage_files(stage))
    listed = STAGES[stage].get("params", [])
    missing = sorted(name for name in needed if not covered(name, listed, "."))
    assert not missing, f"dvc.yaml stage {stage} does not list params {missing}"
    unused = [entry for entry in listed if not any(covered(name, [entry], ".") or covered(entry, [name], ".")
                                                   for name in needed)]
    assert not unused, f"dvc.yaml stage {stage} lists params {unused}, which its code never reads"


def test_no_stage_depends_on_docs_or_unrelated_files():
    """Every dep is code the stage imports (checked above), another stage's output, or the data source."""
    outputs = {next(iter(out)) if isinstance(out, dict) else out
               for stage in STAGES.values() for kind in ("outs", "metrics", "plots") for out in stage.get(kind, [])}
    for name, stage in STAGES.items():
        others = [dep for dep in stage["deps"] if dep not in code_deps(name) and not dep.startswith("${")]
        strays = [dep for dep in others if not any(covered(dep, [out], "/") for out in outputs)]
        assert not strays, f"dvc.yaml stage {name} depends on {strays}, which is neither code it runs nor an output"


def test_artifacts_module_and_dvc_yaml_name_the_same_outputs():
    outputs = {next(iter(out)) if isinstance(out, dict) else out
               for stage in STAGES.values() for kind in ("outs", "metrics") for out in stage.get(kind, [])}
    constants = {str(value) for value in vars(artifacts).values() if isinstance(value, Path)}
    assert constants == outputs, "pipelines/artifacts.py and dvc.yaml disagree about where stage outputs live"
