"""The one writer of benchmark result files: docs/results/<name>.md and its JSON twin, stamped with the
commit, the date, the machine and what the spread is over, so a figure is never typed by hand.

`python -m benchmarks.results --check` lists result files whose commit is older than the code they measure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS_DIR = Path("docs/results")
# What each benchmark's figures depend on: a commit that touches these after the stamp makes them stale.
MEASURED_CODE = ("gancore", "pipelines", "benchmarks", "params.yaml")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine() -> dict[str, object]:
    """Cores, CPU model and GPU (if torch sees one) of the machine that measured."""
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        gpu = None
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "python": platform.python_version()}


def _main_module() -> str:
    """The benchmark's module name (`python -m NAME`), never the path it was run from."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else Path(sys.argv[0]).name


def stamp(spread: str) -> dict[str, object]:
    """Where and when a result was measured; `spread` says what its ranges are over (seeds, rounds)."""
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE))
    return {"commit": commit + ("+dirty" if dirty else ""), "date": datetime.date.today().isoformat(),
            "machine": machine(), "spread": spread, "command": " ".join(["python -m", _main_module(), *sys.argv[1:]])}


def _plain(value: object) -> object:
    """numpy scalars and arrays as JSON numbers and lists."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write(name: str, markdown: str, data: dict, spread: str) -> Path:
    """docs/results/<name>.md (a stamp line, then `markdown`) and <name>.json ({"stamp": ..., **data})."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = stamp(spread)
    host = info["machine"]
    header = (f"<!-- written by `{info['command']}`; do not edit -->\n"
              f"Measured at commit `{info['commit']}` on {info['date']}, {host['cores']} cores ({host['cpu']}"
              f"{', ' + host['gpu'] if host['gpu'] else ''}); spread: {spread}.\n\n")
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(header + markdown.rstrip() + "\n")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"stamp": info, **data}, indent=2, default=_plain) + "\n")
    if README.is_file() and HEADLINE_START in README.read_text():
        write_readme()  # the README quotes result files: it follows every new one
    return path


class Report:
    """A benchmark's tables, printed as they are made and kept, so what it prints is what its result file holds."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def save(self, name: str, data: dict, spread: str) -> Path:
        path = write(name, "\n".join(self.lines), data, spread)
        print(f"\nwritten to {path}")
        return path


def stale() -> list[str]:
    """Names of the result files measured at a commit older than the newest change to the code they measure
    (uncommitted changes included)."""
    newest = _git("log", "-1", "--format=%H", "--", *MEASURED_CODE)
    changed_here = bool(_git("status", "--porcelain", "--untracked-files=no", "--", *MEASURED_CODE))
    found = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        commit = str(json.loads(path.read_text())["stamp"]["commit"]).removesuffix("+dirty")
        measured = _git("rev-parse", commit) if commit else ""
        # stale when the newest commit touching the measured code is not contained in the measured commit
        if not measured or changed_here or _git("rev-list", "--count", f"{measured}..{newest}") not in ("", "0"):
            found.append(path.stem)
    return found


PIPELINE_METRICS = ("fid", "kid", "precision", "recall", "density", "coverage", "conditional_accuracy")


def pipeline_run() -> Path:
    """docs/results/pipeline-<register.model_name>.md: the latest `make pipeline` run's evaluation, beside the
    real-vs-real baseline, with each metric's N and bootstrap 95% interval."""
    import yaml
    params = yaml.safe_load(Path("params.yaml").read_text())
    metrics = json.loads(Path("results/eval/metrics.json").read_text())
    real = metrics["real_vs_real"]
    lines = [f"`make pipeline` on `{params['data']['source']}` at {params['data']['image_size']} px, "
             f"{params['train']['steps']} steps, model `{params['register']['model_name']}`; featurenet space, "
             f"N = {metrics['n']}.", "", "| metric | model [95% interval] | real vs real |", "|---|---|---|"]
    for name in PIPELINE_METRICS:
        if name in metrics:
            entry = metrics[name]
            lines.append(f"| {name} | {entry['value']:.3f} [{entry['ci95_low']:.3f}, {entry['ci95_high']:.3f}] | "
                         f"{real[name]['value']:.3f} |")
    lines.append(f"\nFID / real-vs-real FID: {metrics['fid']['value'] / real['fid']['value']:.2f}")
    name = f"pipeline-{params['register']['model_name']}"
    run = {"source": params["data"]["source"], "image_size": params["data"]["image_size"],
           "steps": params["train"]["steps"]}
    return write(name, "\n".join(lines), {"run": run, "metrics": metrics},
                 spread="bootstrap 95% intervals over the N samples")


README = Path("README.md")
HEADLINE_START = "<!-- headline: written by `python -m benchmarks.results --readme` from docs/results/*.json -->"
HEADLINE_END = "<!-- end of headline -->"
SCORES = ("fid", "precision", "recall")
STALE_LABEL = "Stale (the code they measure changed since): "


def _number(key: str, value: float) -> str:
    return f"{value:.3g}" if key == "fid" else f"{value:.3f}"


def _range(key: str, values: list[float]) -> str:
    """One value, or the median [min, max] of several."""
    middle = _number(key, statistics.median(values))
    return middle if len(values) == 1 else f"{middle} [{_number(key, min(values))}, {_number(key, max(values))}]"


def _rows(name: str, data: dict) -> list[tuple[str, dict[str, str], dict]]:
    """(row label, score -> text, real-vs-real scores) for the result files the README quotes; none for others."""
    if name.startswith("pipeline-"):
        metrics, run = data["metrics"], data.get("run", {})
        label = f"`make pipeline`, {run.get('source', '?')} at {run.get('image_size', '?')} px"
        scores = {key: f"{_number(key, metrics[key]['value'])} [{_number(key, metrics[key]['ci95_low'])}, "
                       f"{_number(key, metrics[key]['ci95_high'])}]" for key in SCORES}
        return [(label, scores, {key: metrics["real_vs_real"][key]["value"] for key in SCORES})]
    if name.startswith("quality-"):
        return [(recipe, {key: _range(key, [run[key] for run in runs]) for key in SCORES}, data["real_vs_real"])
                for recipe, runs in data["rows"].items()]
    if "ablation" in name:  # one seed per variant; the EMA generator is what the pipeline exports
        return [(f"{row['variant']} (seed {row['seed']})", {key: _number(key, row["ema"][key]) for key in SCORES},
                 data["real_vs_real"]) for row in data["rows"]]
    return []


def headline() -> str:
    """The README's results block: every quoted figure read from its result file, with the file's stamp."""
    lines = ["| result file (commit, date) | run | FID | precision | recall | real vs real FID / P / R |",
             "|---|---|---|---|---|---|"]
    others = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        link = f"[{path.stem}](docs/results/{path.stem}.md) ({data['stamp']['commit']}, {data['stamp']['date']})"
        rows = _rows(path.stem, data)
        if not rows:
            others.append(f"[{path.stem}](docs/results/{path.stem}.md) ({data['stamp']['commit']})")
        for label, scores, real in rows:
            lines.append(f"| {link} | {label} | {scores['fid']} | {scores['precision']} | {scores['recall']} | "
                         + " / ".join(_number(key, real[key]) for key in SCORES) + " |")
            link = "″"
    lines.append("\nFeaturenet space, N = 1,000 unless the file says otherwise; [a, b]: 95% interval (pipeline) or "
                 "the range over seeds (quality). The spread of each file is stated in it.")
    if others:
        lines.append("\nOther result files: " + ", ".join(others) + ".")
    lines.append(f"\n{STALE_LABEL}{', '.join(stale()) or 'none'}.")
    return "\n".join(lines)


def write_readme() -> bool:
    """Rewrite the README's headline block; True when it changed."""
    text = README.read_text()
    start, end = text.index(HEADLINE_START) + len(HEADLINE_START), text.index(HEADLINE_END)
    updated = text[:start] + "\n" + headline() + "\n" + text[end:]
    README.write_text(updated)
    return updated != text


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark result files")
    parser.add_argument("--check", action="store_true", help="list stale result files")
    parser.add_argument("--pipeline", action="store_true", help="write the latest pipeline run's figures")
    parser.add_argument("--readme", action="store_true", help="rewrite README.md's headline block from the files")
    args = parser.parse_args()
    if args.pipeline:
        print(pipeline_run().read_text())
    if args.readme:
        print("README.md headline " + ("rewritten" if write_readme() else "already current"))
    if args.check:
        names = stale()
        print(f"{STALE_LABEL}{', '.join(names)}" if names else "every result file is current")


if __name__ == "__main__":
    main()
