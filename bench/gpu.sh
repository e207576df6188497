#!/usr/bin/env bash
# GPU benchmark, prepared to run in one go on a CUDA machine (e.g. one H200): Omniglot conv4 MAML/FOMAML
# meta-gradient tasks/s of metatrain-worker (per-task loop and batched) and of PyTorch (per-task loop and
# torch.func.vmap) on the same GPU, with the GPU's utilisation sampled by nvidia-smi during each.
#
# Needs: nvidia-smi, cargo, and a python whose torch is a CUDA build of 2.11.0 (BENCH_PYTHON, default
# python3); libtorch is taken from that torch (LIBTORCH_USE_PYTORCH), and the worker is built with CUDA
# (METATRAIN_CUDA=1: links libtorch_cuda, see README). Results: target/bench/gpu-*.jsonl and a table.
# Usage: bench/gpu.sh [DEVICE]   (default cuda:0); BENCH_SECONDS (default 5), BENCH_TASKS (default 32).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
device="${1:-cuda:0}"
seconds="${BENCH_SECONDS:-5}"
tasks="${BENCH_TASKS:-32}"
py="${BENCH_PYTHON:-python3}"
out="$here/target/bench"
mkdir -p "$out"
"$py" -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
export LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1
PATH="$(dirname "$(command -v "$py")"):$PATH"
export PATH
cargo build --release -p metatrain-worker --features metatrain-worker/cuda >&2
# Not scripts/env.sh: its LIBTORCH (the CPU install) would take precedence over LIBTORCH_USE_PYTORCH.
worker="${CARGO_TARGET_DIR:-$here/target}/release/metatrain-worker"

# Mean and max GPU utilisation (%) while "$@" runs.
with_utilisation() {
  local log
  log="$(mktemp)"
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -i "${device#cuda:}" -lms 200 >"$log" &
  local smi=$!
  "$@"
  kill "$smi" 2>/dev/null || true
  awk '{ s += $1; if ($1 > m) m = $1; n++ } END { if (n) printf "gpu utilisation: mean %.0f%%, max %d%% (%d samples)\n", s / n, m, n }' "$log" >&2
  rm -f "$log"
}

echo "== metatrain-worker bench, conv4 Omniglot 5-way 1-shot, $device, $tasks tasks per round"
with_utilisation "$worker" bench --config configs/omniglot-5w1s.toml --device "$device" --batch "$tasks" \
  --seconds "$seconds" --json | tee "$out/gpu-metatrain.jsonl"
echo "== PyTorch reference (loop, vmap), same shapes, $device"
with_utilisation "$py" bench/pytorch_reference.py --model conv4 --algo all --device "$device" --tasks "$tasks" \
  --seconds "$seconds" --json | tee "$out/gpu-pytorch.jsonl"
"$py" - "$out/gpu-metatrain.jsonl" "$out/gpu-pytorch.jsonl" <<'EOF'
import json, sys
rs = {r["algo"]: r for r in map(json.loads, open(sys.argv[1]))}
pt = {r["algo"]: r for r in map(json.loads, open(sys.argv[2]))}
print(f"{'algo':7} {'torch loop':>11} {'torch vmap':>11} {'mt loop':>9} {'mt batched':>11} {'batched/torch loop':>19} {'batched/vmap':>13}")
for algo in ("maml", "fomaml"):
    r, p = rs[algo], pt[algo]
    tl, tv, ml, mb = p["loop_tasks_per_s"], p["vmap_tasks_per_s"], r["loop_tasks_per_s"], r["batched_tasks_per_s"]
    print(f"{algo:7} {tl:11.1f} {tv:11.1f} {ml:9.1f} {mb:11.1f} {mb / tl:18.2f}x {mb / tv:12.2f}x")
EOF
