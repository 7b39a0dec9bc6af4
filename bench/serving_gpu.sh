#!/usr/bin/env bash
# One lent-GPU call for the serving path (issue 4) and the planner's predictions (design §5):
#   CUDA IPC channel tests, KV pull bandwidth per channel, the full served path's KV share of request
#   latency, and predicted-vs-measured SLO attainment. Results land in $OUT (copy into bench/results/).
# Run from the repo root on the device machine with the wheels of .whl/ carried.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/planner:$PWD/runtime:$PWD/cli:$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== GPU tests: KV links (CUDA IPC), kernels"
python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_kv_links.py 2>&1 | tail -5 | tee "$OUT/pytest-gpu.txt"

echo "== a ~1.2B Llama-shaped random bf16 model (Llama-3.2-1B shape)"
python3 - <<'PY'
from disagg_runtime.models.testing import write_random_model
write_random_model("/tmp/m1b", arch="llama", num_hidden_layers=16, hidden_size=2048, num_attention_heads=32,
                   num_key_value_heads=8, intermediate_size=8192, vocab_size=32000, max_position_embeddings=4096,
                   torch_dtype="bfloat16")
print("written")
PY

echo "== KV pull bandwidth (ipc, tcp) + full path share of request latency over CUDA IPC"
timeout 600 python3 bench/kv_transfer.py --device cuda --repeats 5 --model-path /tmp/m1b \
    --path-channel ipc --path-requests 32 --path-prompt 1024 --path-output 64 --out "$OUT" 2>&1 | tail -30

if [ -f bench/predicted_vs_measured.py ]; then
  echo "== predicted vs measured attainment"
  timeout 330 python3 bench/predicted_vs_measured.py --device cuda --shape llama-1b \
      --out "$OUT/predicted_vs_measured-cuda-llama-1b.json" 2>&1 | tail -40
fi
ls -la "$OUT"
