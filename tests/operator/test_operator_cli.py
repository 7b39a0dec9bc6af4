"""`disagg operator` and `disagg crds`: flags map onto the operator's configuration; drift is an exit code."""

from __future__ import annotations

import argparse
from pathlib import Path

from disagg_cli import crds as crds_cli
from disagg_cli import operator as operator_cli

REPO = Path(__file__).resolve().parents[2]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="disagg")
    operator_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["operator", *argv])


def test_operator_flags_become_config():
    args = _parse(["-n", "team-a", "--namespace", "team-b", "--plan-workers", "2", "--kubeconfig", "/k",
                   "--gpu-product-label", "", "--image-pull-policy", "Always", "--profiles-dir", "/p"])
    config = operator_cli.config_from_args(args)
    assert config.namespaces == ("team-a", "team-b") and config.plan_workers == 2 and config.kubeconfig == "/k"
    assert config.render.gpu_product_label == "" and config.render.image_pull_policy == "Always"
    assert config.profiles_dir == Path("/p") and args.run is operator_cli.run


def test_operator_defaults_watch_every_namespace():
    config = operator_cli.config_from_args(_parse([]))
    assert config.namespaces == () and config.plan_workers == 1


def test_crds_check_write_and_print(tmp_path, capsys):
    assert crds_cli.main(["--check", "--root", str(REPO)]) == 0
    assert crds_cli.main(["--check", "--root", str(tmp_path)]) == 1
    assert "missing; run `disagg crds --write`" in capsys.readouterr().err
    assert crds_cli.main(["--write", "--root", str(tmp_path)]) == 0
    assert crds_cli.main(["--check", "--root", str(tmp_path)]) == 0
    (tmp_path / "crds" / "disaggservings.yaml").write_text("edited by hand\n")
    assert crds_cli.main(["--check", "--root", str(tmp_path)]) == 1
    capsys.readouterr()
    assert crds_cli.main([]) == 0 and "kind: CustomResourceDefinition" in capsys.readouterr().out
