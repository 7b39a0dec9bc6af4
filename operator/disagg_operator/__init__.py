"""The DisaggServing operator (kopf): validate -> plan -> render -> server-side apply -> status.

Entry points: `runner.run_operator` (or `disagg operator`), `crd.crd_manifest` (or `disagg crds`).
"""
