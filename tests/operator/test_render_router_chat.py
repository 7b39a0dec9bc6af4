"""The router pod is told where the model is, so it can render the model's own chat template."""

from __future__ import annotations

import argparse

from disagg_operator.render import render_children
from disagg_runtime.serve.options import add_serve_arguments, check_serve_arguments
from operator_plans import high_plan, render_input, spec


def test_operator_points_the_router_at_the_models_chat_template():
    def router_args(model: dict):
        objs = render_children(render_input(high_plan(), spec(model=model)))
        router = next(o for o in objs if o["kind"] == "Deployment")
        parser = argparse.ArgumentParser()
        add_serve_arguments(parser)
        args = parser.parse_args(router["spec"]["template"]["spec"]["containers"][0]["args"][1:])
        check_serve_arguments(args)
        return args

    assert router_args({"preset": "opt-13b", "path": "/models/opt-13b"}).model_path == "/models/opt-13b"
    assert router_args({"preset": "opt-13b"}).model_path is None  # random weights: the role-tag template
