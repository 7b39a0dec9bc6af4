"""`disagg plan` and `disagg simulate`: tables, JSON, manifests, and exit 2 with a clear message on bad input."""

import json
import subprocess
import sys

import pytest
import yaml
from disagg_cli.main import SUBCOMMANDS, main
from disagg_planner.api import Plan

SPEC = {
    "model": {"preset": "opt-13b"},
    "cluster": {"nodes": 1, "gpusPerNode": 4},
    "workload": {"rate": 4.0, "dataset": "chatbot"},
    "slo": {"ttftMs": 250, "tpotMs": 100},
}


def _write(tmp_path, doc, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _manifest(spec):
    return {"apiVersion": "disagg.io/v1alpha1", "kind": "DisaggServing", "metadata": {"name": "chat"}, "spec": spec}


@pytest.fixture(scope="module")
def plan_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    path = _write(tmp, _manifest(SPEC), "manifest.yaml")
    out = subprocess.run([sys.executable, "-m", "disagg_cli.main", "plan", str(path), "--json", "--workers", "1"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_manifest_plan_prints_plan_json(plan_json):
    plan = Plan.model_validate_json(plan_json)
    doc = json.loads(plan_json)
    assert "perGpuGoodput" in doc and "mode" in doc  # the camelCase wire form the CR status uses
    # spec.mode defaults to auto: every mode evaluated is listed, the deployed one among them.
    alternatives = doc["alternatives"]
    assert [a["mode"] for a in alternatives] == ["disaggregated", "colocated", "colocated-chunked"]
    for alt in alternatives:
        assert {"mode", "perGpuGoodput", "goodputRps", "gpus", "meetsTarget"} <= set(alt)
    [chosen] = [a for a in plan.alternatives if a.mode == plan.serving_mode]
    assert chosen.per_gpu_goodput == plan.per_gpu_goodput
    assert plan.choice.startswith(plan.serving_mode)
    iv = doc["goodputInterval"]
    assert iv["method"] == "repeated-seeds" and iv["lowRps"] <= plan.goodput_rps <= iv["highRps"]


def test_bare_spec_prints_the_modes_evaluated_and_why(tmp_path, capsys):
    assert main(["plan", str(_write(tmp_path, SPEC)), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("serving modes evaluated", "disaggregated", "colocated-chunked", "deployed", "why: ",
                 "per-GPU goodput", "isolated", "node 0:",
                 "goodput interval", "repeated-seeds", "share of goodput"):
        assert text in out


def test_an_explicit_disaggregated_spec_prints_its_phases_and_baseline(tmp_path, capsys):
    assert main(["plan", str(_write(tmp_path, dict(SPEC, mode="disaggregated"))), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    for text in ("disaggregated plan", "prefill", "decode", "colocated baseline", "gain over colocated", "node 0:"):
        assert text in out


def test_malformed_spec_names_the_field(tmp_path, capsys):
    bad = dict(SPEC, slo={"ttftMs": -1, "tpotMs": 100})
    assert main(["plan", str(_write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "spec.slo.ttftMs: Input should be greater than 0" in err
    assert "Traceback" not in err


def test_unknown_field_in_a_manifest_is_named(tmp_path, capsys):
    bad = _manifest(dict(SPEC, cluster={"nodes": 1, "gpusPerNode": 4, "gpuz": 3}))
    assert main(["plan", str(_write(tmp_path, bad))]) == 2
    assert "spec.cluster.gpuz: Extra inputs are not permitted" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({"apiVersion": "v1", "kind": "ConfigMap", "data": {}}, "no DisaggServing manifest"),
        (dict(_manifest(SPEC), apiVersion="disagg.io/v2"), "this CLI reads disagg.io/v1alpha1"),
        ([1, 2], "expected one mapping"),
    ],
)
def test_wrong_documents_are_refused(tmp_path, capsys, doc, fragment):
    assert main(["plan", str(_write(tmp_path, doc))]) == 2
    assert fragment in capsys.readouterr().err


def test_missing_file_and_bad_yaml(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert main(["plan", str(broken)]) == 2
    assert "not valid YAML/JSON" in capsys.readouterr().err


def test_infeasible_spec_exits_2_with_the_reason(tmp_path, capsys):
    tight = dict(SPEC, slo={"ttftMs": 5, "tpotMs": 100})
    assert main(["plan", str(_write(tmp_path, tight))]) == 2
    err = capsys.readouterr().err
    assert "no feasible plan: the TTFT SLO of 5 ms is below the unloaded latency" in err
    huge = dict(SPEC, model={"preset": "opt-175b"})
    assert main(["plan", str(_write(tmp_path, huge))]) == 2
    assert "no feasible plan:" in capsys.readouterr().err


def test_simulate_with_a_given_plan_writes_json_and_png(tmp_path, plan_json, capsys):
    spec_path = _write(tmp_path, SPEC)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan_json)
    out = tmp_path / "sim"
    assert main(["simulate", str(spec_path), "--plan", str(plan_path), "--rates", "2,4,8", "--out", str(out),
                 "--workers", "1"]) == 0
    doc = json.loads((out / "simulate.json").read_text())
    assert doc["rates"] == [2.0, 4.0, 8.0]
    for name in ("disaggregated", "colocated"):
        points = doc["plans"][name]["points"]
        assert [p["rate"] for p in points] == [2.0, 4.0, 8.0]
        assert points[0]["attainment"] >= points[-1]["attainment"]
    assert (out / "attainment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SLO attainment by rate" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["--rates", "1,x"], ["--sweep", "4:1:3"], ["--rates", "0,1"]])
def test_simulate_rejects_bad_rates(tmp_path, capsys, args):
    assert main(["simulate", str(_write(tmp_path, SPEC)), *args, "--out", str(tmp_path / "o")]) == 2
    assert "disagg simulate:" in capsys.readouterr().err


def test_help_lists_every_registered_subcommand(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_invalid_profile_names_its_fields(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text('{"version": 1, "gpu": "A100-80GB"}')
    assert main(["plan", str(_write(tmp_path, SPEC)), "--profile", str(profile)]) == 2
    err = capsys.readouterr().err
    assert "invalid latency profile" in err and "profile.model: Field required" in err
