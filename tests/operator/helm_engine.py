"""Lint and render a chart with the real Helm engine: the `helm` binary when installed, else the Helm Go
library embedded by `helm-python-sdk` (same template engine, no binary needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import helm_python
import yaml


class ChartError(RuntimeError):
    """The chart failed to lint or render; the message is Helm's."""


def _binary() -> str | None:
    return shutil.which("helm")


def lint(chart: Path, values: dict[str, Any] | None = None) -> list[str]:
    """Helm lint in strict mode: the list of findings at warning level or above (empty when clean)."""
    helm = _binary()
    if helm is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(values or {}, f)
            f.flush()
            run = subprocess.run([helm, "lint", "--strict", str(chart), "-f", f.name], capture_output=True, text=True)
        return [] if run.returncode == 0 else [line for line in run.stdout.splitlines() if "[ERROR]" in line
                                               or "[WARNING]" in line] or [run.stdout + run.stderr]
    report = helm_python.lint(chart, values, strict=True)
    return [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def template(chart: Path, values: dict[str, Any] | None = None, *, name: str = "disagg",
             namespace: str = "disagg-system") -> dict[str, list[dict[str, Any]]]:
    """`helm template`: template file name -> the objects it renders (empty documents dropped)."""
    helm = _binary()
    if helm is not None:
        return _template_binary(helm, chart, values, name, namespace)
    try:
        with helm_python.Chart.load(chart) as loaded:
            rendered = loaded.render(values, name=name, namespace=namespace, is_install=True)
    except helm_python.HelmError as e:
        raise ChartError(str(e)) from e
    return {Path(path).name: [d for d in yaml.safe_load_all(text) if d]
            for path, text in sorted(rendered.items()) if path.endswith((".yaml", ".yml"))}


def _template_binary(helm: str, chart: Path, values: dict[str, Any] | None, name: str,
                     namespace: str) -> dict[str, list[dict[str, Any]]]:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(values or {}, f)
        f.flush()
        run = subprocess.run([helm, "template", name, str(chart), "-n", namespace, "-f", f.name],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise ChartError(run.stderr)
    out: dict[str, list[dict[str, Any]]] = {}
    source = None
    for doc_text in run.stdout.split("\n---"):
        for line in doc_text.splitlines():
            if line.startswith("# Source: "):
                source = Path(line.removeprefix("# Source: ")).name
        doc = yaml.safe_load(doc_text)
        if doc and source:
            out.setdefault(source, []).append(doc)
    return out
