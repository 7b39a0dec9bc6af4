#!/usr/bin/env bash
# Fresh machine -> a planned placement and a running disaggregated server on CPU (no cluster, no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU build; a bare `torch` pulls GBs of CUDA wheels
pip install -q -e ".[runtime]"
disagg plan examples/specs/opt-13b-chatbot.yaml
exec disagg serve --local "$@"
