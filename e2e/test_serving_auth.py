"""Authentication on the serving path as processes (what `disagg serve --local` and the pods run): API keys
at the router, the generated internal token on the workers' ports."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

from .conftest import serve_local

KEY = "sk-e2e-0123456789abcdef"


def _post(url: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            text = resp.read().decode()
            return resp.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("auth") / "tiny-llama", seed=11)


def test_processes_refuse_missing_keys_and_direct_worker_calls(model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# one key a line\n{KEY}\n")
    with LocalCluster(model_dir=model_dir, port=0, worker_args=["--device", "cpu", "--num-kv-blocks", "256"],
                      router_args=["--api-key-file", str(keys)]) as cluster:
        url = f"{cluster.url}/v1/completions"
        body = {"prompt": "Hello", "max_tokens": 4}
        status, reply = _post(url, body)
        assert status == 401 and reply["error"]["code"] == "invalid_api_key"
        assert _post(url, body, {"Authorization": "Bearer sk-nope"})[0] == 401
        status, reply = _post(url, body, {"Authorization": f"Bearer {KEY}"})
        assert status == 200 and reply["usage"]["completion_tokens"] >= 1
        prefill = next(p for n, p in cluster.ports.items() if n.startswith("prefill"))
        status, reply = _post(f"http://{cluster.host}:{prefill}/prefill",
                              {"request_id": "direct", "prompt": "Hello", "sampling": {"max_tokens": 4}})
        assert status == 403 and reply["error"]["type"] == "permission_error"
        # The workers still serve the router afterwards.
        assert _post(url, body, {"x-api-key": KEY})[0] == 200


def test_disagg_serve_local_takes_an_api_key_file(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    with serve_local(["--api-key-file", str(keys)], tmp_path) as served:
        url = f"{served.url}/v1/completions"
        assert _post(url, {"prompt": "Hello", "max_tokens": 2})[0] == 401
        assert _post(url, {"prompt": "Hello", "max_tokens": 2}, {"Authorization": f"Bearer {KEY}"})[0] == 200
    assert served.code == 0
