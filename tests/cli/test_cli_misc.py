"""`disagg --version`, `disagg crds --check`, and the CLI's warning for deprecated spec fields."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from disagg_cli.main import main

REPO = Path(__file__).resolve().parents[2]


def test_version_comes_from_the_package_metadata(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    out = capsys.readouterr().out.strip()
    assert out == f"disagg {importlib.metadata.version('disagg')}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{out.split()[1]}"' in pyproject


def test_crds_check_says_so_when_up_to_date(capsys):
    assert main(["crds", "--check", "--root", str(REPO)]) == 0
    assert capsys.readouterr().out.startswith("CRD up to date")


def test_crds_check_fails_on_drift(tmp_path, capsys):
    shutil.copytree(REPO / "crds", tmp_path / "crds")
    (tmp_path / "charts" / "disagg-operator" / "crds").mkdir(parents=True)
    (tmp_path / "charts" / "disagg-operator" / "crds" / "disaggservings.yaml").write_text("stale\n")
    assert main(["crds", "--check", "--root", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "CRD up to date" not in captured.out and "disagg crds --write" in captured.err


def test_plan_warns_about_deprecated_bandwidth_fields(tmp_path):
    spec = {"model": {"preset": "opt-13b"}, "cluster": {"nodes": 1, "gpusPerNode": 4, "intraNodeGbps": 300},
            "workload": {"rate": 1.0, "dataset": "chatbot"}, "slo": {"ttftMs": 250, "tpotMs": 100}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "disagg_cli.main", "plan", str(path), "--json", "--workers", "1"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "warning:" in out.stderr and "intraNodeGbps is deprecated" in out.stderr
    assert "intraNodeBandwidth: 300GB" in out.stderr
