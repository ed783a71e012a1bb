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
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps({"stamp": info, **data}, indent=2) + "\n")
    return path


def stale() -> list[str]:
    """Result files measured at a commit older than the newest commit touching the code they measure."""
    newest = _git("log", "-1", "--format=%H", "--", *MEASURED_CODE)
    found = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        commit = str(json.loads(path.read_text())["stamp"]["commit"]).removesuffix("+dirty")
        measured = _git("rev-parse", commit) if commit else ""
        # stale when the newest commit touching the measured code is not contained in the measured commit
        if not measured or _git("rev-list", "--count", f"{measured}..{newest}") not in ("", "0"):
            found.append(f"{path.name}: measured at {commit or 'an unknown commit'}, code changed since")
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
    return write(name, "\n".join(lines), {"metrics": metrics}, spread="bootstrap 95% intervals over the N samples")


def main() -> None:
    parser = argparse.ArgumentParser(description="benchmark result files")
    parser.add_argument("--check", action="store_true", help="list stale result files")
    parser.add_argument("--pipeline", action="store_true", help="write the latest pipeline run's figures")
    args = parser.parse_args()
    if args.pipeline:
        print(f"wrote {pipeline_run()}")
    if args.check:
        lines = stale()
        print("\n".join(lines) if lines else "every result file is current")


if __name__ == "__main__":
    main()
